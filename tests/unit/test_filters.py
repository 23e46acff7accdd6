"""DeNS structure filters (``max_force_norm``, ``min_num_atoms``, ``max_stress``) on real OC20
frames: which structures each flags, and that they never change the corruption stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fairchem_dens.config import DeNSConfig, DeNSConfigError
from fairchem_dens.corruption import sample_corruption, step_generator
from fairchem_dens.filters import filter_flags
from tests.conftest import atoms_to_batch, demo_frames


@pytest.fixture(scope="module")
def frames():
    """Four real OC20 frames: 33, 55, 52 and 38 atoms, largest forces ~1.3 to ~13.8 eV/A."""
    return demo_frames(max_systems=4)


@pytest.fixture(scope="module")
def batch(frames):
    return atoms_to_batch(frames)


def _largest_force(frames) -> np.ndarray:
    """Reference: each frame's largest per-atom force norm straight from ASE (eV/A)."""
    return np.array([np.linalg.norm(a.get_forces(apply_constraint=False), axis=1).max()
                     for a in frames])


def test_filters_are_off_by_default(batch) -> None:
    assert filter_flags(DeNSConfig(std=0.1), batch.natoms, batch.forces, None) == {}


def test_max_force_norm_flags_structures_whose_largest_force_exceeds_it(frames, batch) -> None:
    largest = _largest_force(frames)
    threshold = float(np.median(largest))  # splits the batch: some flagged, some not
    flags = filter_flags(DeNSConfig(std=0.1, max_force_norm=threshold), batch.natoms,
                         batch.forces, None)
    assert list(flags) == ["max_force_norm"]
    assert flags["max_force_norm"].tolist() == (largest > threshold).tolist()
    assert 0 < int(flags["max_force_norm"].sum()) < len(frames)
    # the largest atom decides, not the mean: a threshold just below the smallest maximum
    # flags every structure although most of their atoms are far below it
    low = filter_flags(DeNSConfig(std=0.1, max_force_norm=float(largest.min()) - 1e-3),
                       batch.natoms, batch.forces, None)["max_force_norm"]
    assert bool(low.all())


def test_min_num_atoms_flags_smaller_structures(frames, batch) -> None:
    sizes = [len(a) for a in frames]  # 33, 55, 52, 38
    flags = filter_flags(DeNSConfig(std=0.1, min_num_atoms=52), batch.natoms, batch.forces,
                         None)
    assert flags["min_num_atoms"].tolist() == [n < 52 for n in sizes] == [True, False, False, True]


def test_max_stress_uses_the_largest_absolute_component(batch) -> None:
    stress = torch.zeros(4, 3, 3)
    stress[0, 0, 0] = 0.02    # tensile, above the bound
    stress[1, 1, 2] = -0.03   # compressive shear, above the bound in absolute value
    stress[2] = 0.009         # every component just below
    stress[3, 2, 2] = -0.01   # exactly at the bound: kept
    flags = filter_flags(DeNSConfig(std=0.1, max_stress=0.01), batch.natoms, batch.forces,
                         stress)
    assert flags["max_stress"].tolist() == [True, True, False, False]


@pytest.mark.parametrize(("kwargs", "forces", "stress", "key"), [
    ({"max_force_norm": 5.0}, False, None, "max_force_norm"),
    ({"max_stress": 0.01}, True, None, "max_stress"),
    ({"max_stress": 0.01}, True, torch.zeros(4, 3), "max_stress"),
])
def test_a_filter_without_its_data_names_the_key(batch, kwargs, forces, stress, key) -> None:
    cfg = DeNSConfig(std=0.1, **kwargs)
    with pytest.raises(DeNSConfigError, match=f"optim.dens.{key}.*"):
        filter_flags(cfg, batch.natoms, batch.forces if forces else None, stress)


@pytest.mark.parametrize(("key", "value"), [
    ("max_force_norm", 0), ("max_force_norm", -1.0), ("max_force_norm", float("inf")),
    ("max_force_norm", True), ("max_stress", "1"), ("max_stress", 0.0),
    ("min_num_atoms", 0), ("min_num_atoms", 2.5), ("min_num_atoms", True),
])
def test_invalid_filter_values_name_the_key_and_how_to_switch_off(key, value) -> None:
    with pytest.raises(DeNSConfigError, match=rf"optim\.dens\.{key}=.*or null"):
        DeNSConfig(std=0.1, **{key: value})


def test_filters_keep_the_corruption_stream_of_the_other_structures(frames, batch) -> None:
    """Filtered structures go through ``skip``; the draws are the same, so every structure the
    filter keeps is corrupted exactly as without the filter."""
    cfg = DeNSConfig(prob=1.0, corrupt_ratio=0.5, std_high=0.5, num_steps=10)
    flags = filter_flags(DeNSConfig(std=0.1, max_force_norm=7.0), batch.natoms, batch.forces,
                         None)["max_force_norm"]
    assert flags.tolist() == (_largest_force(frames) > 7.0).tolist() == [False, False, True, True]
    atom_of = torch.repeat_interleave(torch.arange(4), batch.natoms)
    for step in range(5):
        plain = sample_corruption(cfg, batch.natoms, batch.fixed, step_generator(7, step))
        kept = sample_corruption(cfg, batch.natoms, batch.fixed, step_generator(7, step),
                                 skip=flags)
        keep = ~flags[atom_of]
        assert torch.equal(kept.selected, plain.selected & ~flags)
        assert torch.equal(kept.noise[keep], plain.noise[keep])
        assert torch.equal(kept.target[keep], plain.target[keep])
        assert torch.equal(kept.sigma[~flags], plain.sigma[~flags])
        assert not kept.mask[~keep].any() and plain.mask[~keep].any()
        assert bool((kept.noise[~keep] == 0).all())
