"""Corruption statistics and invariants over many draws (paper Algorithm 1, lines 16-33)."""

from __future__ import annotations

import pytest
import torch

from fairchem_dens.config import DeNSConfig
from fairchem_dens.corruption import sample_corruption, step_generator

NATOMS = torch.tensor([30, 50, 20, 41])


def _fixed(natoms: torch.Tensor) -> torch.Tensor:
    """First 40 % of each structure fixed, like an OC20 slab's subsurface layers."""
    parts = []
    for n in natoms.tolist():
        f = torch.zeros(n)
        f[: int(0.4 * n)] = 1
        parts.append(f)
    return torch.cat(parts)


def _draws(cfg: DeNSConfig, n: int = 400, skip: torch.Tensor | None = None):
    fixed = _fixed(NATOMS)
    return [
        sample_corruption(cfg, NATOMS, fixed, step_generator(0, step), skip=skip)
        for step in range(n)
    ], fixed


def test_structure_selection_rate_is_p_and_atom_rate_is_r() -> None:
    cfg = DeNSConfig(prob=0.3, corrupt_ratio=0.6, std=0.1)
    draws, fixed = _draws(cfg)
    selected = torch.stack([d.selected for d in draws]).float()
    assert selected.mean().item() == pytest.approx(0.3, abs=0.03)
    # structures are drawn independently: mixed batches occur
    per_batch = selected.sum(1)
    assert ((per_batch > 0) & (per_batch < len(NATOMS))).float().mean() > 0.5
    free = fixed == 0
    structure_of_atom = torch.repeat_interleave(torch.arange(len(NATOMS)), NATOMS)
    rates = []
    for d in draws:
        eligible = free & d.selected[structure_of_atom]
        if eligible.any():
            rates.append(d.mask[eligible].float().mean().item())
        assert not d.mask[~eligible].any()  # only eligible atoms of selected structures
    assert sum(rates) / len(rates) == pytest.approx(0.6, abs=0.03)


def test_batch_selection_is_all_or_nothing() -> None:
    cfg = DeNSConfig(prob=0.5, selection="batch", std=0.1)
    draws, _ = _draws(cfg, n=300)
    selected = torch.stack([d.selected for d in draws])
    assert bool(((selected.all(1)) | (~selected.any(1))).all())
    assert selected[:, 0].float().mean().item() == pytest.approx(0.5, abs=0.08)


def test_only_corrupted_atoms_move_and_fixed_atoms_never_do() -> None:
    cfg = DeNSConfig(prob=1.0, corrupt_ratio=1.0, std=0.2)
    draws, fixed = _draws(cfg, n=50)
    for d in draws:
        moved = d.noise.abs().sum(-1) > 0
        assert torch.equal(moved, d.mask)
        assert torch.equal(d.mask, fixed == 0)  # r = 1, p = 1: exactly the free atoms


def test_all_atoms_corrupts_fixed_atoms_too() -> None:
    cfg = DeNSConfig(prob=1.0, corrupt_ratio=1.0, std=0.2, all_atoms=True)
    draws, _ = _draws(cfg, n=5)
    assert all(bool(d.mask.all()) for d in draws)


def test_fixed_sigma_noise_has_that_std_and_target_is_eps_over_sigma() -> None:
    cfg = DeNSConfig(prob=1.0, corrupt_ratio=1.0, std=0.15)
    draws, _ = _draws(cfg, n=200)
    eps = torch.cat([d.noise[d.mask] for d in draws])
    assert eps.std().item() == pytest.approx(0.15, rel=0.02)
    assert eps.mean().item() == pytest.approx(0.0, abs=0.005)
    for d in draws[:10]:
        assert torch.allclose(d.target, d.noise / 0.15, atol=1e-6)
        assert torch.all(d.sigma == torch.tensor(0.15))


def test_multi_scale_draws_one_sigma_per_structure_from_the_schedule() -> None:
    cfg = DeNSConfig(prob=1.0, corrupt_ratio=1.0, std_low=0.01, std_high=0.5, num_steps=5)
    schedule = cfg.sigma_schedule()
    draws, _ = _draws(cfg, n=400)
    sig = torch.cat([d.sigma for d in draws])
    assert all(torch.isclose(s, schedule).any() for s in sig)
    counts = torch.stack([torch.isclose(sig, s).sum() for s in schedule]).float()
    assert (counts / counts.sum()).min().item() > 0.15  # roughly uniform over T = 5 values
    structure_of_atom = torch.repeat_interleave(torch.arange(len(NATOMS)), NATOMS)
    for d in draws[:20]:
        sigma_atom = d.sigma[structure_of_atom].unsqueeze(-1)
        assert torch.allclose(d.target[d.mask], (d.noise / sigma_atom)[d.mask], atol=1e-5)
        # per-structure noise scale matches its sigma
    big = [d for d in draws if d.sigma[1] == schedule[-1]]
    eps = torch.cat([d.noise[structure_of_atom == 1][d.mask[structure_of_atom == 1]] for d in big])
    assert eps.std().item() == pytest.approx(0.5, rel=0.08)


def test_normalize_by_std_high_divides_every_structure_by_std_high() -> None:
    cfg = DeNSConfig(prob=1.0, std_high=0.5, normalize_by="std_high")
    draws, _ = _draws(cfg, n=10)
    for d in draws:
        assert torch.allclose(d.target, d.noise / 0.5, atol=1e-6)


def test_skip_flag_is_honoured() -> None:
    cfg = DeNSConfig(prob=1.0, corrupt_ratio=1.0, std=0.1, skip_key="md")
    skip = torch.tensor([0, 1, 0, 1])
    draws, _ = _draws(cfg, n=20, skip=skip)
    structure_of_atom = torch.repeat_interleave(torch.arange(len(NATOMS)), NATOMS)
    for d in draws:
        assert d.selected.tolist() == [True, False, True, False]
        assert not d.mask[(structure_of_atom == 1) | (structure_of_atom == 3)].any()


def test_skip_flag_with_wrong_length_is_an_error() -> None:
    cfg = DeNSConfig(prob=1.0, std=0.1, skip_key="md")
    with pytest.raises(ValueError, match="'md' has 3 values for 4 structures"):
        sample_corruption(cfg, NATOMS, None, step_generator(0, 1), skip=torch.zeros(3))


def test_prob_zero_corrupts_nothing() -> None:
    draws, _ = _draws(DeNSConfig(prob=0.0, std=0.1), n=20)
    assert all(d.num_corrupted == 0 and not d.selected.any() for d in draws)


def test_stream_is_a_pure_function_of_seed_step_and_rank() -> None:
    cfg = DeNSConfig(prob=0.5, corrupt_ratio=0.5, std=0.1)
    a = sample_corruption(cfg, NATOMS, None, step_generator(7, 12, rank=0))
    b = sample_corruption(cfg, NATOMS, None, step_generator(7, 12, rank=0))
    c = sample_corruption(cfg, NATOMS, None, step_generator(7, 12, rank=1))
    d = sample_corruption(cfg, NATOMS, None, step_generator(7, 13, rank=0))
    assert torch.equal(a.noise, b.noise) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.noise, c.noise)
    assert not torch.equal(a.noise, d.noise)
