"""Failures found by running the CLI as a new user would (issue 13), each reproduced on the real
bundled OC20 data: every free atom corrupted (r = 1), training metrics on structures without a
scored atom, DeNS modules under a plain trainer, stale stored edges, a legacy model, resumed runs
with changed DeNS settings, stock schedules without ``scheduler_params``, graph parallelism."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from fairchem.core.modules.evaluator import Evaluator

from fairchem_dens.config import DeNSConfig, DeNSConfigError
from fairchem_dens.loss import ScoredStructuresEvaluator
from fairchem_dens.models.dens import DeNSTrainerRequired
from fairchem_dens.trainer import _log_changed_dens_settings
from tests.conftest import build_trainer, demo_config
from tests.integration.test_trainer import dens_loss, energy_loss

ALL_FREE = {"prob": 1.0, "corrupt_ratio": 1.0, "std": 0.1, "coefficient": 10}


def train_step(trainer, batch, step: int):
    """One training forward + loss + metrics at ``step`` (the corruption draw depends on it)."""
    trainer.model.train()
    trainer.step = step
    b = copy.copy(batch)
    out = trainer._forward(b)
    loss = trainer._compute_loss(out, b)
    metrics = trainer._compute_metrics(out, b, trainer.evaluator, {})
    return b, out, loss, metrics


@pytest.mark.parametrize("selection", ["structure", "batch"])
def test_every_free_atom_corrupted_trains_energy_and_denoising_only(demo_lmdb, tmp_path,
                                                                   selection) -> None:
    """prob 1, r 1: no free atom is left for the forces term (fairchem's own loss cannot reshape
    the empty target); the step trains energy + DeNS, the forces term is 0, all finite."""
    trainer = build_trainer(demo_config(demo_lmdb, {**ALL_FREE, "selection": selection},
                                        tmp_path, first_n=8))
    batch = next(iter(trainer.train_loader))
    b, out, loss, metrics = train_step(trainer, batch, step=1)
    c = trainer._dens_step
    assert c.num_free_uncorrupted == 0 and torch.equal(c.mask, b.fixed == 0)

    expected = 2 * energy_loss(trainer, b, out) + 10 * dens_loss(out, c)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    loss.backward()
    forces_head = trainer._unwrapped_model.output_heads["forces"]
    grads = [p.grad for p in forces_head.parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)  # nothing to learn from

    # training metrics: energy and denoising scored, no forces (none to score), no crash
    assert metrics["energy_mae"]["numel"] == len(b.natoms)
    assert metrics["denoising_noise_l2mae"]["numel"] == c.num_corrupted
    assert not any(k.startswith("forces") for k in metrics)
    assert "energy_forces_within_threshold" not in metrics
    assert all(math.isfinite(m["metric"]) for m in metrics.values())


def test_threshold_metric_leaves_out_structures_without_scored_atoms(demo_lmdb, tmp_path) -> None:
    """r 1 and p 0.5: selected structures have no free uncorrupted atom; the per-structure
    energy+forces threshold is computed over the others only, by fairchem's own function."""
    trainer = build_trainer(demo_config(demo_lmdb, {**ALL_FREE, "prob": 0.5}, tmp_path,
                                        first_n=8))
    batch = next(iter(trainer.train_loader))
    for step in range(1, 200):
        b, out, loss, metrics = train_step(trainer, batch, step)
        c = trainer._dens_step
        if c.num_corrupted and not bool(c.selected.all()):
            break
    else:
        raise AssertionError("no step mixing corrupted and plain structures")
    assert math.isfinite(loss.item())
    plain = int((~c.selected).sum())
    assert metrics["energy_forces_within_threshold"]["numel"] == plain
    assert metrics["energy_mae"]["numel"] == len(b.natoms)  # energy of every structure
    free_plain = (b.fixed == 0) & ~c.mask
    assert metrics["forces_mae"]["numel"] == 3 * int(free_plain.sum())


def test_scored_structures_evaluator_by_value() -> None:
    """Structure 1 has no scored atom: left out of the threshold metric, nothing else changes.
    (fairchem's function fails on it only when its energy is within the threshold: random.)"""
    pred = {"energy": torch.tensor([0.0, 0.0, 0.0]),
            "forces": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.1]]),
            "natoms": torch.tensor([1, 0, 1])}
    target = {"energy": torch.tensor([0.01, 0.0, 0.0]),
              "forces": torch.zeros(2, 3), "natoms": torch.tensor([1, 0, 1])}
    metrics = {"energy": ["mae"], "forces": ["mae"], "misc": ["energy_forces_within_threshold"]}
    got = ScoredStructuresEvaluator(Evaluator("s2ef", metrics)).eval(pred, target)
    assert got["energy_forces_within_threshold"]["numel"] == 2
    assert got["energy_forces_within_threshold"]["total"] == 1  # structure 0 passes, 2 fails
    assert got["energy_mae"]["numel"] == 3 and got["energy_mae"]["total"] == pytest.approx(0.01)
    assert got["forces_mae"]["numel"] == 6
    with pytest.raises(RuntimeError, match="max"):  # fairchem's: max() over the empty structure
        Evaluator("s2ef", metrics).eval(pred, target)
    skipped = ScoredStructuresEvaluator(Evaluator("s2ef", metrics), skip={"forces"})
    assert set(skipped.eval(pred, target)) == {"energy_mae"}


@pytest.mark.parametrize("trainer_name", ["equiformerv2_forces", "forces"])
def test_dens_model_under_a_plain_trainer_fails_at_the_first_step(demo_lmdb, tmp_path,
                                                                  trainer_name) -> None:
    """Under fairchem's stock trainers the DeNS modules never train; DDP would stop at step 2."""
    config = demo_config(demo_lmdb, ALL_FREE, tmp_path, first_n=8)
    config["trainer"] = trainer_name
    del config["optim"]["dens"]
    if trainer_name == "forces":  # its scheduler reads optim's own keys
        config["optim"]["scheduler"] = "Null"
    trainer = build_trainer(config)
    batch = next(iter(trainer.train_loader))
    trainer.model.train()
    with pytest.raises(DeNSTrainerRequired, match="fairchem-dens export") as err:
        trainer._forward(batch)
    assert "DenoisingForcesTrainer" in str(err.value) and "prob: 0" in str(err.value)
    trainer.model.eval()  # inference with a plain trainer is fine: the plain model
    assert set(trainer._forward(batch)) == {"energy", "forces"}


def test_stored_edges_are_refused(demo_lmdb, tmp_path) -> None:
    config = demo_config(demo_lmdb, ALL_FREE, tmp_path, first_n=8)
    config["model"]["backbone"]["otf_graph"] = False
    with pytest.raises(DeNSConfigError, match="model.backbone.otf_graph: true"):
        build_trainer(config)
    config["optim"]["dens"]["prob"] = 0.0  # plain training keeps fairchem's behaviour
    build_trainer(config)


def test_legacy_single_module_model_names_the_hydra_layout(demo_lmdb, tmp_path) -> None:
    config = demo_config(demo_lmdb, ALL_FREE, tmp_path, first_n=8)
    backbone = config["model"]["backbone"]
    backbone.pop("model")
    config["model"] = {"name": "equiformer_v2", **backbone}
    with pytest.raises(DeNSConfigError, match="model.name: hydra") as err:
        build_trainer(config)
    assert "convert_checkpoint_and_config_to_hydra" in str(err.value)


def test_graph_parallelism_is_refused_at_set_up(demo_lmdb, tmp_path) -> None:
    from fairchem.core.common.registry import registry

    config = demo_config(demo_lmdb, ALL_FREE, tmp_path, first_n=8)
    with pytest.raises(DeNSConfigError, match="graph parallelism"):
        registry.get_trainer_class(config["trainer"])(
            task={}, model=config["model"], outputs=config["outputs"],
            dataset=config["dataset"], optimizer=config["optim"],
            loss_functions=config["loss_functions"],
            evaluation_metrics=config["evaluation_metrics"], identifier="gp",
            run_dir=str(tmp_path), is_debug=True, local_rank=0, cpu=True, gp_gpus=2)


@pytest.mark.parametrize("scheduler", ["Null", "ReduceLROnPlateau", None])
def test_stock_schedule_without_scheduler_params(demo_lmdb, tmp_path, scheduler) -> None:
    """fairchem's own test configs (`trainer: forces`) name a scheduler but no
    ``scheduler_params``; the EquiformerV2 trainer we build on needs them."""
    config = demo_config(demo_lmdb, ALL_FREE, tmp_path, first_n=8)
    optim = config["optim"]
    del optim["scheduler_params"]
    optim.pop("scheduler", None)
    if scheduler is None:
        with pytest.raises(DeNSConfigError, match="optim.scheduler_params is missing"):
            build_trainer(config)
        return
    optim.update(scheduler=scheduler, factor=0.8, patience=3, mode="min")
    trainer = build_trainer(config)
    assert trainer.scheduler.scheduler_type == scheduler
    if scheduler == "ReduceLROnPlateau":  # the stock trainer's arguments, read from optim
        assert trainer.scheduler.scheduler.factor == 0.8
        assert trainer.scheduler.scheduler.patience == 3


def test_changed_dens_settings_on_resume_are_logged(caplog) -> None:
    checkpoint = {"config": {"optim": {"dens": {"prob": 0.5, "std": 0.05, "coefficient": 10}}}}
    now = DeNSConfig.from_dict({"prob": 0.5, "std": 0.2, "coefficient": 5})
    with caplog.at_level(logging.WARNING):
        _log_changed_dens_settings(checkpoint, now)
    assert "optim.dens.std changed since the checkpoint: 0.05 -> 0.2" in caplog.text
    assert "optim.dens.coefficient changed since the checkpoint: 10 -> 5" in caplog.text
    assert "optim.dens.prob" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _log_changed_dens_settings(checkpoint, DeNSConfig.from_dict(
            checkpoint["config"]["optim"]["dens"]))
    assert caplog.text == ""


def test_resume_through_load_checkpoint_logs_the_change(demo_lmdb, tmp_path, caplog) -> None:
    dens = {"prob": 0.5, "corrupt_ratio": 0.5, "std": 0.05, "coefficient": 10}
    first = build_trainer(demo_config(demo_lmdb, dens, tmp_path / "a", first_n=8))
    path = tmp_path / "ckpt.pt"
    state = {"epoch": 0, "step": 0, "state_dict": first.model.state_dict(),
             "optimizer": first.optimizer.state_dict(),
             "scheduler": first.scheduler.scheduler.state_dict(), "normalizers": {},
             "config": first.config, "val_metrics": {}, "ema": first.ema.state_dict(),
             "amp": None, "best_val_metric": 1e9, "primary_metric": "forces_mae"}
    torch.save(state, path)
    second = build_trainer(demo_config(demo_lmdb, {**dens, "std": 0.2}, tmp_path / "b",
                                       first_n=8))
    with caplog.at_level(logging.WARNING):
        second.load_checkpoint(str(path))
    assert "optim.dens.std changed since the checkpoint: 0.05 -> 0.2" in caplog.text
