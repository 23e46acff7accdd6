"""Checks against the real data in ../shared (skipped with a reason when it is absent)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import units
from fairchem.core.common.data_parallel import data_list_collater
from fairchem.core.datasets import LmdbDataset

from fairchem_dens.data import ConversionOptions, convert

from .conftest import (
    MD17_ETHANOL,
    OC20_TARBALL,
    TUTORIAL_S2EF_LMDB,
    assert_same_up_to_lattice_translation,
    read_demo_file,
    require_shared,
)

pytestmark = pytest.mark.shared

#: Keys the DeNS tooling reads from every S2EF entry.
S2EF_KEYS = {"pos", "atomic_numbers", "cell", "natoms", "energy", "forces", "fixed", "tags"}


def test_tutorial_lmdb_through_stock_key_mapping(demo_out: Path) -> None:
    src = require_shared(TUTORIAL_S2EF_LMDB)
    dataset = LmdbDataset({"src": str(src), "key_mapping": {"y": "energy", "force": "forces"}})
    assert len(dataset) == 20
    theirs = dataset[0]
    assert set(theirs.keys()) >= S2EF_KEYS
    assert "y" not in theirs
    assert "force" not in theirs
    assert theirs.forces.shape == (theirs.natoms, 3)
    assert np.ndim(theirs.energy) == 0
    ours = LmdbDataset({"src": str(demo_out / "val")})[0]
    assert set(ours.keys()) >= S2EF_KEYS
    for key in ("pos", "forces", "cell", "atomic_numbers"):
        assert ours[key].dtype == theirs[key].dtype, key
    batch = data_list_collater([dataset[i] for i in range(4)], otf_graph=True)
    assert batch.energy.shape == (4,)
    assert batch.forces.shape == (int(batch.natoms.sum()), 3)


@pytest.fixture(scope="module")
def original_trajectories(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two original OC20 ``.traj`` files (with FixAtoms) from the shared tarball."""
    tarball = require_shared(OC20_TARBALL)
    target = tmp_path_factory.mktemp("oc20_traj")
    wanted = {"random1000156.traj", "random1000194.traj"}
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if Path(m.name).name in wanted]
        for member in members:
            member.name = Path(member.name).name
            tar.extract(member, target)
    return sorted(target.glob("*.traj"))


def test_original_traj_round_trip(original_trajectories: list[Path], tmp_path: Path) -> None:
    summary = convert(
        ConversionOptions([str(p) for p in original_trajectories], tmp_path, split=(1, 0, 0))
    )
    dataset = LmdbDataset({"src": str(tmp_path / "train")})
    assert len(dataset) == sum(s["frames"] for s in summary["systems"].values()) == 36 + 61
    by_key = {(int(dataset[i].sid), int(dataset[i].fid)): dataset[i] for i in range(len(dataset))}
    for path in original_trajectories:
        sid = int(path.stem.removeprefix("random"))
        for fid, atoms in enumerate(ase.io.read(path, index=":")):
            data = by_key[(sid, fid)]
            raw = atoms.get_forces(apply_constraint=False)
            fixed = atoms.constraints[0].index
            assert np.abs(raw[fixed]).max() > 0, "raw forces on fixed atoms are kept"
            np.testing.assert_allclose(data.forces, raw, rtol=1e-6, atol=1e-6)
            assert data.energy == atoms.get_potential_energy()
            assert torch.nonzero(data.fixed).flatten().tolist() == sorted(fixed.tolist())
            np.testing.assert_allclose(data.cell[0], atoms.cell.array, atol=1e-5)
            assert_same_up_to_lattice_translation(data.pos.numpy(), atoms)
            assert data.atomic_numbers.tolist() == atoms.numbers.tolist()


def test_md17_kcal_per_mol_molecule(tmp_path: Path) -> None:
    path = require_shared(MD17_ETHANOL)
    convert(ConversionOptions([str(path)], tmp_path, stride=100, energy_unit="kcal/mol"))
    dataset = LmdbDataset({"src": str(tmp_path / "train")})
    frames = read_demo_file(path, index="::100")  # any .xz extxyz
    assert len(dataset) == len(frames) == 20
    kcal = units.kcal / units.mol
    for i in (0, 19):
        assert dataset[i].energy == pytest.approx(frames[i].get_potential_energy() * kcal)
        np.testing.assert_allclose(
            dataset[i].forces, frames[i].get_forces() * kcal, rtol=1e-5, atol=1e-6
        )
        assert dataset[i].cell[0, 0, 0] >= 15.0
        assert dataset[i].pbc.all()
    assert not (tmp_path / "val").exists(), "one file = one system: nothing to hold out"
