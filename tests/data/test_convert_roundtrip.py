"""Converter round trip on the bundled real OC20 trajectories: LMDB entries == ASE values."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import lmdb
import numpy as np
import pytest
from ase.constraints import FixAtoms

from fairchem_dens.data import ConversionOptions, convert
from fairchem_dens.data.splits import split_counts, split_systems

from .conftest import (
    DEMO_SEED,
    DEMO_SPLIT,
    assert_same_up_to_lattice_translation,
    read_demo_file,
)


def read_lmdb(path: Path) -> list:
    """All entries of a converter LMDB in key order (checks the ``length`` key)."""
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        length = pickle.loads(txn.get(b"length"))
        assert env.stat()["entries"] == length + 1
        entries = [pickle.loads(txn.get(str(i).encode("ascii"))) for i in range(length)]
    env.close()
    return entries


def ase_frames_by_fid(path: Path) -> dict[int, object]:
    return {atoms.info["fid"]: atoms for atoms in read_demo_file(path)}


def test_demo_data_is_small_and_complete(demo_dir: Path) -> None:
    files = sorted(demo_dir.glob("random*.extxyz.xz"))
    assert len(files) == 14
    assert (demo_dir / "README.md").is_file()
    assert "CC BY 4.0" in (demo_dir / "README.md").read_text()
    assert sum(f.stat().st_size for f in demo_dir.iterdir()) < 4e6


def test_every_entry_equals_the_ase_frame(demo_conversion: dict, demo_out: Path) -> None:
    systems = demo_conversion["systems"]
    total = 0
    for split in demo_conversion["splits"]:
        entries = read_lmdb(demo_out / split / "data.lmdb")
        natoms = np.load(demo_out / split / "metadata.npz")["natoms"]
        assert natoms.tolist() == [int(d.natoms) for d in entries]
        frames = {}
        for data in entries:
            sid = int(data.sid)
            path = Path(systems[str(sid)]["path"])
            assert systems[str(sid)]["split"] == split
            assert int(re.search(r"random(\d+)", path.name).group(1)) == sid
            if sid not in frames:
                frames[sid] = ase_frames_by_fid(path)
            atoms = frames[sid][int(data.fid)]
            assert data.energy == atoms.get_potential_energy()
            np.testing.assert_allclose(
                data.forces.numpy(), atoms.get_forces(apply_constraint=False), rtol=1e-6, atol=1e-6
            )
            fixed = np.zeros(len(atoms), dtype=int)
            fixed[atoms.constraints[0].index] = 1
            assert isinstance(atoms.constraints[0], FixAtoms)
            assert data.fixed.tolist() == fixed.tolist()
            assert fixed.sum() > 0
            assert 0 < data.fixed.sum() < len(atoms)
            assert_same_up_to_lattice_translation(data.pos.numpy(), atoms)
            np.testing.assert_allclose(data.cell.numpy()[0], atoms.cell.array, atol=1e-5)
            assert data.atomic_numbers.tolist() == atoms.numbers.tolist()
            assert data.tags.tolist() == atoms.get_tags().tolist()
            assert data.pbc.tolist() == [[True, True, True]]
            assert data.natoms == len(atoms)
        for sid, by_fid in frames.items():
            fids = [int(d.fid) for d in entries if int(d.sid) == sid]
            assert fids == sorted(by_fid), "every frame once, in trajectory order"
            assert systems[str(sid)]["frames"] == len(fids)
        total += len(entries)
    assert total == 1019


def test_entry_dtypes_and_shapes(demo_out: Path) -> None:
    data = read_lmdb(demo_out / "val" / "data.lmdb")[0]
    n = data.natoms
    assert isinstance(n, int)
    assert isinstance(data.energy, float)
    assert isinstance(data.sid, int)
    assert isinstance(data.fid, int)
    expected = {
        "atomic_numbers": ((n,), "torch.float32"),
        "pos": ((n, 3), "torch.float32"),
        "cell": ((1, 3, 3), "torch.float32"),
        "pbc": ((1, 3), "torch.bool"),
        "forces": ((n, 3), "torch.float32"),
        "fixed": ((n,), "torch.int64"),
        "tags": ((n,), "torch.int64"),
    }
    for key, (shape, dtype) in expected.items():
        assert tuple(data[key].shape) == shape, key
        assert str(data[key].dtype) == dtype, key
    assert "edge_index" not in data


def test_split_is_by_system_disjoint_and_seeded(demo_conversion: dict) -> None:
    splits = {name: report["systems"] for name, report in demo_conversion["splits"].items()}
    all_sids = sorted(int(sid) for sid in demo_conversion["systems"])
    assert [len(splits[name]) for name in ("train", "val", "test")] == [10, 2, 2]
    assert sorted(sid for sids in splits.values() for sid in sids) == all_sids
    assert splits == split_systems(all_sids, DEMO_SPLIT, DEMO_SEED)
    assert split_systems(all_sids, DEMO_SPLIT, DEMO_SEED) == split_systems(
        list(reversed(all_sids)), DEMO_SPLIT, DEMO_SEED
    )
    other = [split_systems(all_sids, DEMO_SPLIT, seed) for seed in range(1, 4)]
    assert any(assignment != splits for assignment in other)


@pytest.mark.parametrize(
    ("num_systems", "fractions", "expected"),
    [
        (14, (0.8, 0.1, 0.1), (12, 1, 1)),
        (14, (0.7, 0.15, 0.15), (10, 2, 2)),
        (10, (0.8, 0.1, 0.1), (8, 1, 1)),
        (3, (0.8, 0.1, 0.1), (1, 1, 1)),
        (2, (0.8, 0.1, 0.1), (2, 0, 0)),
        (1, (0.5, 0.5, 0.0), (1, 0, 0)),
        (5, (0.8, 0.2, 0.0), (4, 1, 0)),
    ],
)
def test_split_counts(num_systems: int, fractions: tuple, expected: tuple) -> None:
    assert split_counts(num_systems, fractions) == expected


def test_stride_keeps_every_kth_frame(demo_dir: Path, tmp_path: Path) -> None:
    files = sorted(demo_dir.glob("random*.extxyz.xz"))[:2]
    summary = convert(
        ConversionOptions(
            inputs=[str(f) for f in files], out_dir=tmp_path / "out", stride=3, split=(1, 0, 0)
        )
    )
    entries = read_lmdb(tmp_path / "out" / "train" / "data.lmdb")
    for path in files:
        sid = int(re.search(r"random(\d+)", path.name).group(1))
        original_fids = [a.info["fid"] for a in read_demo_file(path)]
        fids = [int(d.fid) for d in entries if int(d.sid) == sid]
        assert fids == original_fids[::3]
        assert summary["systems"][str(sid)]["frames"] == len(fids)
    assert summary["options"]["stride"] == 3
    assert not (tmp_path / "out" / "val").exists()
