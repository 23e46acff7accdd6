"""Set-up warnings for evaluated targets a run cannot learn (fairchem_dens.setup_checks): a zero
energy weight, an evaluated target without a loss term, a normaliser with rmsd 0 — each named by
its key, at trainer set-up, for the DeNS trainer and the plain exact-resume trainer."""

from __future__ import annotations

import logging

import pytest
import torch
from fairchem.core.modules.normalization.normalizer import Normalizer

from fairchem_dens.setup_checks import unlearnable_target_warnings
from tests.conftest import build_trainer, demo_config

METRICS = {"metrics": {"energy": ["mae"], "forces": ["mae"], "misc": ["energy_forces_within_threshold"]}}


def config(energy: float = 1.0, forces: float = 80.0, with_energy: bool = True) -> dict:
    losses = [{"energy": {"fn": "mae", "coefficient": energy}}] if with_energy else []
    return {"loss_functions": [*losses, {"forces": {"fn": "l2mae", "coefficient": forces}}],
            "evaluation_metrics": METRICS}


def test_a_sound_config_gives_no_warning() -> None:
    normalizers = {"energy": Normalizer(mean=0.0, rmsd=0.19), "forces": Normalizer(rmsd=0.5)}
    assert unlearnable_target_warnings(config(), normalizers) == []


def test_zero_energy_weight_is_named_by_its_key() -> None:
    (message,) = unlearnable_target_warnings(config(energy=0))
    assert message.startswith("loss_functions[0].energy.coefficient is 0")
    assert "evaluation_metrics.metrics.energy" in message and "weight > 0" in message


def test_zero_forces_weight_counts_too() -> None:
    (message,) = unlearnable_target_warnings(config(forces=0))
    assert message.startswith("loss_functions[1].forces.coefficient is 0")


def test_an_evaluated_target_without_loss_term_is_named() -> None:
    (message,) = unlearnable_target_warnings(config(with_energy=False))
    assert "evaluation_metrics.metrics.energy is reported but loss_functions has no 'energy'" in message


def test_a_zero_weight_target_not_evaluated_is_left_alone() -> None:
    cfg = config(energy=0)
    cfg["evaluation_metrics"] = {"metrics": {"forces": ["mae"]}}
    assert unlearnable_target_warnings(cfg) == []


@pytest.mark.parametrize("rmsd", [0.0, float("nan"), float("inf")])
def test_degenerate_normaliser_is_named(rmsd) -> None:
    normalizers = {"energy": Normalizer(mean=0.0, rmsd=torch.tensor(rmsd))}
    (message,) = unlearnable_target_warnings(config(), normalizers)
    assert message.startswith("dataset.train.transforms.normalizer.energy: rmsd is")


@pytest.mark.parametrize("dens", [None, {"prob": 0.5, "corrupt_ratio": 0.5, "std": 0.1}],
                         ids=["plain_exact_resume", "dens"])
def test_trainers_warn_at_set_up(dens, demo_lmdb, tmp_path, caplog) -> None:
    cfg = demo_config(demo_lmdb, dens, tmp_path, first_n=4)
    if dens is None:
        cfg["trainer"] = "fairchem_dens.resume.ExactResumeForcesTrainer"
    for entry in cfg["loss_functions"]:
        if "energy" in entry:
            entry["energy"]["coefficient"] = 0
    with caplog.at_level(logging.WARNING):
        build_trainer(cfg)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("loss_functions[0].energy.coefficient is 0" in m for m in warned), warned
