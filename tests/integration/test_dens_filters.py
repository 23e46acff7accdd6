"""DeNS filters in the DenoisingForcesTrainer on real OC20 batches: flagged structures are never
corrupted, the stream of the others is unchanged, and the training metrics count each filter's
skipped structures."""

from __future__ import annotations

import copy

import pytest
import torch

from fairchem_dens.config import DeNSConfigError
from tests.conftest import atoms_to_batch, build_trainer, demo_config, demo_frames

DENS = {"prob": 1.0, "corrupt_ratio": 0.5, "std": 0.1, "coefficient": 10}


@pytest.fixture(scope="module")
def trainers(demo_lmdb, tmp_path_factory):
    """The same run without and with the force-norm and size filters (the thresholds split
    :func:`_batch`)."""
    plain = build_trainer(demo_config(demo_lmdb, DENS, tmp_path_factory.mktemp("plain"),
                                      first_n=16))
    filtered = build_trainer(demo_config(
        demo_lmdb, {**DENS, "max_force_norm": 10.0, "min_num_atoms": 35},
        tmp_path_factory.mktemp("filtered"), first_n=16))
    return plain, filtered


def _batch():
    """Four real OC20 frames of 33, 55, 52 and 38 atoms, largest forces 1.3 to 13.8 eV/A."""
    return atoms_to_batch(demo_frames(max_systems=4))


def _expected_flags(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference flags computed structure by structure from the raw forces (eV/A)."""
    forces, natoms = batch.forces, batch.natoms.tolist()
    starts = [0, *torch.tensor(natoms).cumsum(0).tolist()]
    largest = torch.stack([forces[a:b].norm(dim=-1).max() for a, b in zip(starts, starts[1:])])
    return largest > 10.0, batch.natoms < 35


def test_filtered_structures_are_not_corrupted_and_are_counted(trainers) -> None:
    plain, filtered = trainers
    batch = _batch()
    force_flag, size_flag = _expected_flags(batch)
    # the test bites: each filter flags a different structure, two are kept
    assert force_flag.tolist() == [False, False, True, False]
    assert size_flag.tolist() == [True, False, False, False]
    skipped = force_flag | size_flag
    atom_of = torch.repeat_interleave(torch.arange(len(batch.natoms)), batch.natoms)
    filtered.model.train()
    plain.model.train()
    for step in range(1, 4):
        filtered.step = plain.step = step
        out = filtered._forward(copy.copy(batch))
        c = filtered._dens_step
        plain._forward(copy.copy(batch))
        p = plain._dens_step
        assert c.skipped == {"max_force_norm": int(force_flag.sum()),
                             "min_num_atoms": int(size_flag.sum())}
        assert not c.selected[skipped].any() and c.selected[~skipped].all()  # prob 1
        assert not c.mask[skipped[atom_of]].any()
        keep = ~skipped[atom_of]  # the rest is corrupted exactly as without the filters
        assert torch.equal(c.noise[keep], p.noise[keep]) and torch.equal(c.mask[keep],
                                                                          p.mask[keep])
        metrics = filtered._compute_metrics(out, batch, filtered.evaluator, {})
        assert metrics["dens_skipped_max_force_norm"]["metric"] == int(force_flag.sum())
        assert metrics["dens_skipped_min_num_atoms"]["metric"] == int(size_flag.sum())
        assert "dens_skipped_max_stress" not in metrics
        assert metrics["denoising_noise_l2mae"]["numel"] == c.num_corrupted
    plain_metrics = plain._compute_metrics(plain._forward(copy.copy(batch)), batch,
                                           plain.evaluator, {})
    assert not any(k.startswith("dens_skipped") for k in plain_metrics)


def test_max_stress_on_data_without_stress_names_the_key(trainers) -> None:
    _, filtered = trainers
    batch = _batch()
    filtered.model.train()
    stressed = copy.copy(batch)
    stressed.stress = torch.zeros(len(batch.natoms), 3, 3)
    stressed.stress[0, 0, 1] = -0.2
    original = filtered.dens
    filtered.dens = type(original)(**{**DENS, "max_stress": 0.1})
    try:
        assert filtered._sample(stressed).skipped == {"max_stress": 1}
        with pytest.raises(DeNSConfigError, match="optim.dens.max_stress.*no 'stress'"):
            filtered._sample(copy.copy(batch))
    finally:
        filtered.dens = original


def test_filters_combine_with_skip_key(trainers) -> None:
    """``skip_key`` and the filters each keep their structures out; only the filters count."""
    _, filtered = trainers
    batch = _batch()  # 33, 55, 52, 38 atoms
    batch.md = torch.tensor([0, 1, 0, 0])
    original = filtered.dens
    filtered.dens = type(original)(**{**DENS, "skip_key": "md", "min_num_atoms": 35})
    try:
        step = filtered._sample(batch)
    finally:
        filtered.dens = original
    assert step.selected.tolist() == [False, False, True, True]  # prob 1
    assert step.skipped == {"min_num_atoms": 1}
