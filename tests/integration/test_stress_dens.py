"""Stress under DeNS on real mlearn Si (DFT energies, forces and stress): a corrupted structure
contributes its original energy, the forces of its uncorrupted atoms and the noise of its
corrupted ones, and **no stress** (its label belongs to the unperturbed cell; docs/esen.md).
Checked term by term for EquiformerV2 with fairchem's decomposed rank-2 stress head and for the
conservative eSEN (forces and stress as gradients of the energy), plus the errors on bad
stress setups and data."""

from __future__ import annotations

import copy

import pytest
import torch

from fairchem_dens.config import DeNSConfigError
from tests.conftest import TINY_ESEN_CONSERVATIVE, build_trainer, demo_config
from tests.integration.test_trainer import first_batch, mixed_step, per_term_loss
from tests.integration.test_trainer import (
    test_dataset_without_forces_names_the_key_mapping as forces_missing_is_named,
)

DENS = {"prob": 0.5, "corrupt_ratio": 0.5, "std": 0.05, "coefficient": 10}
# each stress term, on unnormalised eV/A^3: fairchem's OMat24 configs weigh the stress 5 after
# dividing it by its fitted rmsd (mlearn Si: ~0.01 eV/A^3), i.e. ~500 on the raw stress
STRESS_COEFFICIENT = 500
PARTS = {"stress_isotropic": {"irrep_dim": 0}, "stress_anisotropic": {"irrep_dim": 2}}


def _eqv2_rank2(config: dict) -> tuple[str, ...]:
    """EquiformerV2 + fairchem's ``rank2_symmetric_head`` predicting the isotropic and
    anisotropic parts of the stress, set up as fairchem's OMat24 configs do."""
    config["outputs"]["stress"] = {"level": "system", "property": "stress",
                                   "decomposition": copy.deepcopy(PARTS)}
    for split in ("train", "val"):
        transforms = config["dataset"][split].setdefault("transforms", {})
        transforms["decompose_tensor"] = {"tensor": "stress", "rank": 2,
                                          "decomposition": copy.deepcopy(PARTS)}
    config["model"]["heads"]["stress"] = {"module": "rank2_symmetric_head", "output_name": "stress",
                                          "use_source_target_embedding": True, "decompose": True}
    return tuple(PARTS)


def _esen_efs(config: dict) -> tuple[str, ...]:
    """Conservative eSEN: ``esen_mlp_efs_head``'s forces and stress are gradients of its energy,
    so energy, forces and stress share one scale (the force RMS, mean 0), as in
    configs/mlearn/esen_cpu.yml."""
    config["outputs"]["stress"] = {"level": "system", "property": "stress"}
    normalizers = config["dataset"]["train"]["transforms"]["normalizer"]
    shared = normalizers["forces"]["file"]
    normalizers.update(energy={"file": shared}, stress={"file": shared})
    config["model"] = {
        "name": "hydra", "pass_through_head_outputs": True,
        "backbone": {"model": "fairchem_dens.models.esen.DeNSeSENBackbone",
                     **TINY_ESEN_CONSERVATIVE},
        "heads": {"efs": {"module": "esen_mlp_efs_head"},
                  "noise": {"module": "fairchem_dens.models.esen.DeNSeSENNoiseHead"}},
    }
    return ("stress",)


FAMILIES = {"eqv2_rank2": _eqv2_rank2, "esen_efs": _esen_efs}


def stress_config(lmdb, tmp_path, family: str, dens: dict | None = DENS) -> dict:
    """The demo DeNS config on ``lmdb`` with a stress target of ``family``: the demo's energy
    and forces terms plus one mae term per stress target."""
    config = demo_config(lmdb, dens, tmp_path, first_n=2)  # the 2 validation cells
    del config["dataset"]["train"]["first_n"]  # all 8 training cells
    targets = FAMILIES[family](config)
    config["loss_functions"] += [{t: {"fn": "mae", "coefficient": STRESS_COEFFICIENT}}
                                 for t in targets]
    config["evaluation_metrics"]["metrics"].update({t: ["mae"] for t in ("stress", *targets)})
    return config


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def stress_targets(family: str) -> tuple[str, ...]:
    return tuple(PARTS) if family == "eqv2_rank2" else ("stress",)


def stress_loss(trainer, batch, out, targets: tuple[str, ...],
                rows: torch.Tensor) -> torch.Tensor:
    """The stress terms by hand: STRESS_COEFFICIENT x mae of the (normalised, where a normaliser
    is set) stress over the structures in ``rows``."""
    num = batch.natoms.numel()
    terms = []
    for t in targets:
        target = batch[t].view(num, -1)
        if t in trainer.normalizers:
            target = trainer.normalizers[t].norm(target)
        terms.append(STRESS_COEFFICIENT * (out[t].view(num, -1)[rows] - target[rows]).abs().mean())
    return sum(terms)


def test_stress_is_trained_on_uncorrupted_structures_only(mlearn_si_lmdb, tmp_path,
                                                          family) -> None:
    trainer = build_trainer(stress_config(mlearn_si_lmdb, tmp_path, family))
    batch, out, c = mixed_step(trainer)
    corrupted = c.corrupted_structures
    assert corrupted.any() and not corrupted.all()
    # a structure is "corrupted" exactly when one of its atoms is
    owner = torch.repeat_interleave(torch.arange(batch.natoms.numel()), batch.natoms)
    assert torch.equal(corrupted, torch.zeros_like(corrupted).index_fill(0, owner[c.mask], True))

    loss = trainer._compute_loss(out, batch)
    targets = stress_targets(family)
    plain_terms, *_ = per_term_loss(trainer, batch, out, c)  # energy, forces, DeNS
    expected = plain_terms + stress_loss(trainer, batch, out, targets, ~corrupted)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0), (loss.item(), expected.item())
    # training every structure's stress against the original label would change the value
    every = plain_terms + stress_loss(trainer, batch, out, targets, torch.ones_like(corrupted))
    assert abs((every - expected).item()) > 1e-4 * abs(expected.item())

    metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})
    kept = int((~corrupted).sum())
    for t in targets:
        assert metrics[f"{t}_mae"]["numel"] == kept * out[t].view(batch.natoms.numel(), -1).shape[1]
    if family == "eqv2_rank2":  # the full tensor rebuilt from its parts: same structures
        assert metrics["stress_mae"]["numel"] == 9 * kept


def test_stress_gradients_reach_the_stress_head_only_through_uncorrupted_structures(
    mlearn_si_lmdb, tmp_path
) -> None:
    """EquiformerV2: the loss's gradient with respect to the predicted isotropic stress is zero
    on corrupted structures and non-zero on the others."""
    config = stress_config(mlearn_si_lmdb, tmp_path, "eqv2_rank2")
    trainer = build_trainer(config)
    batch, out, c = mixed_step(trainer)
    iso = out["stress_isotropic"]
    grad = torch.autograd.grad(trainer._compute_loss(out, batch), iso, retain_graph=True)[0]
    assert torch.all(grad.view(-1)[c.corrupted_structures] == 0)
    assert torch.all(grad.view(-1)[~c.corrupted_structures] != 0)


def test_plain_step_trains_every_structures_stress(mlearn_si_lmdb, tmp_path, family) -> None:
    trainer = build_trainer(stress_config(mlearn_si_lmdb, tmp_path, family,
                                          {**DENS, "prob": 0.0}))
    batch = first_batch(trainer)
    trainer.model.train()
    trainer.step = 1
    out = trainer._forward(batch)
    loss = trainer._compute_loss(out, batch)
    fairchem = super(type(trainer), trainer)._compute_loss(out, batch)
    assert torch.allclose(loss, fairchem, rtol=1e-6, atol=0)
    all_rows = torch.ones(batch.natoms.numel(), dtype=torch.bool)
    part = stress_loss(trainer, batch, out, stress_targets(family), all_rows)
    assert 0 < part.item() < loss.item()


def test_stress_target_without_a_stress_output_names_the_head(mlearn_si_lmdb, tmp_path) -> None:
    config = stress_config(mlearn_si_lmdb, tmp_path, "esen_efs")
    config["model"]["backbone"]["regress_stress"] = False  # efs head: energy and forces only
    trainer = build_trainer(config)
    trainer.model.train()
    trainer.step = 1
    with pytest.raises(DeNSConfigError, match="no 'stress' output.*regress_stress: true"):
        trainer._forward(first_batch(trainer))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda b: setattr(b, "stress", b.stress.view(-1)[: 6 * b.natoms.numel()]),
     r"'stress' has shape \(\d+,\).*one 3x3 stress per structure"),
    (lambda b: setattr(b, "stress", b.stress * 1602.1766),  # eV/A^3 -> kBar
     "max_plausible_stress=5.0 eV/Angstrom.*--stress-unit"),
])
def test_bad_stress_data_is_named(mlearn_si_lmdb, tmp_path, edit, message) -> None:
    trainer = build_trainer(stress_config(mlearn_si_lmdb, tmp_path, "esen_efs"))
    batch = first_batch(trainer)
    edit(batch)
    trainer.model.train()
    trainer.step = 1
    with pytest.raises(DeNSConfigError, match=message):
        trainer._forward(batch)


@pytest.mark.parametrize(("targets", "message"), [
    (["forces"], "per-atom target"),
    (["stress_trace"], "not a loss_functions target"),
    (["energy"], "element references"),
])
def test_bad_uncorrupted_structure_targets_fail_at_construction(mlearn_si_lmdb, tmp_path,
                                                               targets, message) -> None:
    config = stress_config(mlearn_si_lmdb, tmp_path, "esen_efs",
                           {**DENS, "uncorrupted_structure_targets": targets})
    with pytest.raises(DeNSConfigError, match=message):
        build_trainer(config)


def test_conservative_esen_encoding_without_forces_names_the_key(mlearn_si_lmdb,
                                                                 tmp_path) -> None:
    """The trainer's missing-forces error (test_trainer's check) on the conservative eSEN."""
    forces_missing_is_named(build_trainer(stress_config(mlearn_si_lmdb, tmp_path, "esen_efs")))


def test_per_structure_metrics_of_a_dens_step_are_fairchems_over_every_structure(
    mlearn_si_lmdb, tmp_path
) -> None:
    """Every structure of a DeNS step trains its original energy, so its energy metrics are
    fairchem's over the whole batch: ``energy_per_atom_mae`` divides each structure's error by
    its free atoms (as on a plain step), not by its uncorrupted ones (0 with r = 1: inf)."""
    from fairchem.core.trainers import OCPTrainer

    dens = {**DENS, "prob": 1.0, "corrupt_ratio": 1.0}
    config = stress_config(mlearn_si_lmdb, tmp_path, "esen_efs", dens)
    config["evaluation_metrics"]["metrics"]["energy"] = ["mae", "per_atom_mae"]
    trainer = build_trainer(config)
    batch = first_batch(trainer)
    trainer.model.train()
    trainer.step = 1
    out = trainer._forward(batch)
    assert trainer._dens_step.corrupted_structures.all()
    dens_metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})
    plain = OCPTrainer._compute_metrics(
        trainer, {k: v for k, v in out.items() if k in trainer.output_targets}, batch,
        trainer.evaluator, {})
    for name in ("energy_mae", "energy_per_atom_mae"):
        assert dens_metrics[name]["metric"] == pytest.approx(plain[name]["metric"], rel=1e-6)
        assert dens_metrics[name]["numel"] == plain[name]["numel"] == batch.natoms.numel()
    assert "stress_mae" not in dens_metrics  # no uncorrupted structure: stress not scored
    assert "forces_mae" not in dens_metrics  # no uncorrupted atom: forces not scored
