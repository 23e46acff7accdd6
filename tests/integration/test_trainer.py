"""DenoisingForcesTrainer on real OC20 batches: the exact loss, corruption of a copy only,
clean validation, prob = 0 == plain training, and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from fairchem_dens.config import DeNSConfigError
from fairchem_dens.corruption import DENS_FORCES_KEY, DENS_MASK_KEY
from fairchem_dens.trainer import NOISE_PRED_KEY
from tests.conftest import build_trainer, demo_config

DENS = {"prob": 0.5, "corrupt_ratio": 0.5, "std": 0.1, "coefficient": 10}


@pytest.fixture(params=["eqv2", "escn"])
def trainer(request, demo_lmdb, tmp_path):
    """The DeNS trainer on each backbone family: the loss and corruption path is shared."""
    return build_trainer(demo_config(demo_lmdb, DENS, tmp_path, first_n=16, model=request.param))


def first_batch(trainer):
    return next(iter(trainer.train_loader))


def mixed_step(trainer, needs_plain_structure: bool = True, batch=None):
    """A training forward whose batch mixes corrupted and (with ``needs_plain_structure``) plain
    structures and still has free uncorrupted atoms, so every loss term is exercised (searched
    over steps, deterministic). ``batch``: the batch to use (default: the trainer's first)."""
    batch = first_batch(trainer) if batch is None else batch
    trainer.model.train()
    for step in range(1, 200):
        trainer.step = step
        b = copy.copy(batch)
        out = trainer._forward(b)
        c = trainer._dens_step
        free = b.fixed == 0
        plain = (~c.selected).any() or not needs_plain_structure
        if c.num_corrupted and plain and (free & ~c.mask).any():
            return b, out, c
    raise AssertionError("no mixed step found")


def energy_loss(trainer, batch, out) -> torch.Tensor:
    """The demo configs' energy term by hand: MAE of the referenced, normalised energies."""
    energy_target = trainer.elementrefs["energy"].dereference(batch.energy.view(-1, 1), batch)
    energy_target = trainer.normalizers["energy"].norm(energy_target)
    return (out["energy"].view(-1, 1) - energy_target).abs().mean()


def dens_loss(out, c) -> torch.Tensor:
    """The DeNS term by hand: l2mae of the predicted vs true eps/sigma over corrupted atoms."""
    return (out[NOISE_PRED_KEY][c.mask] - c.target[c.mask]).norm(dim=-1).mean()


def per_term_loss(trainer, batch, out, c) -> tuple[torch.Tensor, ...]:
    """The demo configs' DeNS loss by hand (``reduction: per_term``), and its three terms:
    2 L_E (mae) + 100 L_F (l2mae, free uncorrupted atoms) + 10 L_DeNS (l2mae, corrupted)."""
    l_energy = energy_loss(trainer, batch, out)
    keep = (batch.fixed == 0) & ~c.mask
    f_target = trainer.normalizers["forces"].norm(batch.forces)
    l_forces = (out["forces"][keep] - f_target[keep]).norm(dim=-1).mean()
    l_dens = dens_loss(out, c)
    return 2 * l_energy + 100 * l_forces + 10 * l_dens, l_energy, l_forces, l_dens


def test_loss_is_exactly_energy_plus_uncorrupted_forces_plus_denoising(trainer) -> None:
    batch, out, c = mixed_step(trainer)
    loss = trainer._compute_loss(out, batch)
    expected, _, l_forces, _ = per_term_loss(trainer, batch, out, c)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0), (loss.item(), expected.item())
    # each term once: dropping any of them, or counting forces twice, would change the value
    assert abs(loss.item() - (expected + 100 * l_forces).item()) > 1e-3 * loss.item()


def test_model_sees_a_corrupted_copy_and_nothing_leaks_back(trainer) -> None:
    before = trainer.train_dataset[0].pos.clone()
    seen = []
    trainer._unwrapped_model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    batch, out, c = mixed_step(trainer)
    model_in = seen[-1]
    assert model_in is not batch
    assert torch.allclose(model_in.pos, batch.pos + c.noise)
    assert torch.equal(model_in.pos[~c.mask], batch.pos[~c.mask])  # only corrupted atoms move
    assert (model_in.pos[c.mask] != batch.pos[c.mask]).any(dim=-1).all()
    assert torch.equal(model_in[DENS_MASK_KEY], c.mask)
    f_norm = trainer.normalizers["forces"].norm(batch.forces)
    assert torch.allclose(model_in[DENS_FORCES_KEY], f_norm)  # normalised original forces
    assert DENS_MASK_KEY not in batch and torch.equal(trainer.train_dataset[0].pos, before)
    assert not (batch.fixed.bool() & c.mask).any()  # fixed atoms never corrupted


def test_validation_sees_clean_structures(trainer) -> None:
    seen = []
    trainer._unwrapped_model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    metrics = trainer.validate("val", disable_tqdm=True)
    assert seen and all(DENS_MASK_KEY not in b for b in seen)
    assert trainer._dens_step is None
    assert "forces_mae" in metrics and "denoising_noise_mae" not in metrics


def test_training_metrics_include_denoising_on_corrupted_atoms(trainer) -> None:
    batch, out, c = mixed_step(trainer)
    metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})
    assert metrics["denoising_noise_mae"]["numel"] == 3 * c.num_corrupted
    err = (out[NOISE_PRED_KEY][c.mask] - c.target[c.mask]).detach()
    assert metrics["denoising_noise_mae"]["metric"] == pytest.approx(err.abs().mean().item())
    assert metrics["denoising_noise_l2mae"]["metric"] == pytest.approx(
        err.norm(dim=-1).mean().item())
    assert metrics["denoising_noise_l2mae"]["numel"] == c.num_corrupted
    keep = (batch.fixed == 0) & ~c.mask
    assert metrics["forces_mae"]["numel"] == 3 * int(keep.sum())


def _train_losses(config) -> list[float]:
    trainer = build_trainer(config, seed=3)
    losses = []
    compute = trainer._compute_loss
    trainer._compute_loss = lambda out, batch: losses.append(compute(out, batch)) or losses[-1]
    trainer.train(disable_eval_tqdm=True)
    return [x.item() for x in losses]


@pytest.mark.usefixtures("_single_thread")  # bitwise over training steps: deterministic kernels
def test_prob_zero_reproduces_plain_equiformer_v2_training_exactly(demo_lmdb, tmp_path) -> None:
    kw = {"first_n": 12, "max_epochs": 2, "eval_every": 1000}
    plain = _train_losses(demo_config(demo_lmdb, None, tmp_path / "plain", **kw))
    off = _train_losses(demo_config(demo_lmdb, {**DENS, "prob": 0.0}, tmp_path / "off", **kw))
    on = _train_losses(demo_config(demo_lmdb, DENS, tmp_path / "on", **kw))
    assert len(plain) == 6
    assert off == plain
    assert on != plain


def test_dataset_without_forces_names_the_key_mapping(trainer) -> None:
    batch = first_batch(trainer)
    del batch.forces
    trainer.model.train()
    trainer.step = 1
    with pytest.raises(DeNSConfigError, match="key_mapping"):
        trainer._forward(batch)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["model"]["heads"].pop("noise"), "needs exactly one noise head"),
        (lambda c: c["outputs"]["forces"].update(train_on_free_atoms=False),
         "train_on_free_atoms must be true"),
        (lambda c: c["optim"].update(use_denoising_pos=True), "use_denoising_pos"),
        (lambda c: c["optim"]["dens"].update(prob=2), "optim.dens.prob=2"),
        (lambda c: c["model"]["backbone"].update(model="equiformer_v2_backbone"),
         "no force encoding"),
    ],
)
def test_bad_setups_fail_at_construction(demo_lmdb, tmp_path, edit, message) -> None:
    config = demo_config(demo_lmdb, DENS, tmp_path, first_n=8)
    edit(config)
    with pytest.raises(DeNSConfigError, match=message):
        build_trainer(config)
