"""DeNSConfig validation: every bad value is refused with a message naming the key."""

from __future__ import annotations

import math

import pytest
import torch

from fairchem_dens.config import DeNSConfig, DeNSConfigError


def test_fixed_sigma_schedule_is_that_sigma() -> None:
    cfg = DeNSConfig(std=0.15)
    assert not cfg.multi_scale
    assert cfg.sigma_schedule().tolist() == pytest.approx([0.15])
    assert cfg.target_scale is None


def test_multi_scale_schedule_is_the_geometric_progression_of_eq7() -> None:
    cfg = DeNSConfig(std_low=0.01, std_high=0.75, num_steps=50)
    sig = cfg.sigma_schedule(torch.float64)
    assert sig.shape == (50,)
    assert sig[0].item() == pytest.approx(0.01) and sig[-1].item() == pytest.approx(0.75)
    ratios = sig[1:] / sig[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))
    assert ratios[0].item() == pytest.approx(math.exp(math.log(75) / 49))


def test_normalize_by_std_high_uses_std_high_as_divisor() -> None:
    assert DeNSConfig(std_high=0.5, normalize_by="std_high").target_scale == 0.5


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"prob": 1.5, "std": 0.1}, "optim.dens.prob=1.5"),
        ({"prob": -0.1, "std": 0.1}, "optim.dens.prob"),
        ({"prob": "0.5", "std": 0.1}, "optim.dens.prob"),
        ({"corrupt_ratio": 0.0, "std": 0.1}, "optim.dens.corrupt_ratio=0.0"),
        ({"corrupt_ratio": 1.2, "std": 0.1}, "optim.dens.corrupt_ratio"),
        ({"coefficient": -1, "std": 0.1}, "optim.dens.coefficient"),
        ({"selection": "atom", "std": 0.1}, "optim.dens.selection='atom'"),
        ({"normalize_by": "max", "std": 0.1}, "optim.dens.normalize_by"),
        ({"std": -0.1}, "optim.dens.std=-0.1"),
        ({"std": 0.1, "normalize_by": "std_high"}, "optim.dens.normalize_by"),
        ({"std_high": 0.005}, "optim.dens.std_low"),
        ({"std_high": 0.5, "num_steps": 1}, "optim.dens.num_steps"),
        ({"std_high": 0.5, "num_steps": 2.5}, "optim.dens.num_steps"),
        ({"std": float("nan")}, "optim.dens.std"),
        ({"std": 0.1, "all_atoms": "yes"}, "optim.dens.all_atoms"),
        ({}, "exactly one noise setting"),
        ({"std": 0.1, "std_high": 0.5}, "exactly one noise setting"),
    ],
)
def test_invalid_values_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(DeNSConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        DeNSConfig(**kwargs)


def test_unknown_key_is_named() -> None:
    with pytest.raises(DeNSConfigError, match=r"unknown key\(s\) \['sigma'\]"):
        DeNSConfig.from_dict({"sigma": 0.1})


def test_official_keys_are_refused_with_a_translation() -> None:
    optim = {"use_denoising_pos": True, "denoising_pos_params": {"std": 0.1}}
    with pytest.raises(DeNSConfigError, match="use_denoising_pos.*optim.dens.prob"):
        DeNSConfig.from_optim(optim)


def test_missing_section_says_what_to_add() -> None:
    with pytest.raises(DeNSConfigError, match="optim.dens is missing"):
        DeNSConfig.from_optim({"lr_initial": 1e-4})


def test_from_optim_reads_the_section() -> None:
    cfg = DeNSConfig.from_optim({"dens": {"prob": 0.25, "std_high": 0.75, "coefficient": 10}})
    assert (cfg.prob, cfg.std_high, cfg.coefficient, cfg.selection) == (0.25, 0.75, 10, "structure")


def test_normalize_by_defaults_to_the_authors_choice_of_the_reduction_mode() -> None:
    assert DeNSConfig(std_high=0.5).normalize_by == "sigma"  # per_term: Eq. 4
    shared = DeNSConfig(std_high=0.5, reduction="shared_free_atoms")
    assert shared.normalize_by == "std_high" and shared.target_scale == 0.5  # OC trainer
    fixed = DeNSConfig(std=0.1, reduction="shared_free_atoms")  # eps/std either way
    assert fixed.normalize_by == "sigma" and fixed.target_scale is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"std": 0.1, "reduction": "mean"}, "optim.dens.reduction='mean'.*per_term"),
        ({"std_high": 0.5, "reduction": "shared_free_atoms", "normalize_by": "sigma"},
         "optim.dens.normalize_by='sigma'.*std_high"),
        ({"std": 0.1, "reduction": "shared_free_atoms", "loss_fn": "mse"},
         "optim.dens.loss_fn='mse'.*l2mae"),
        ({"std": 0.1, "reduction": "shared_free_atoms", "pretrain": True},
         "optim.dens.reduction='shared_free_atoms'.*pre-training"),
    ],
)
def test_bad_reduction_settings_name_the_key_and_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(DeNSConfigError, match=message):
        DeNSConfig.from_dict(kwargs)
