#!/usr/bin/env python
"""Regenerate the bundled OC20 demo data from the shared OC20 trajectory tarball.

Takes the 14 smallest systems (33-74 atoms) of the 24 OC20 relaxation trajectories in
``oc20_s2ef_trajs.tar.xz`` (``random<sid>.traj``), keeps every 2nd frame (frames 0, 2,
4, ... of the original trajectory) and writes each as ``random<sid>.extxyz.xz``
(extended XYZ, xz-compressed with preset 9e, byte-reproducible) into
``fairchem_dens/demo_data/oc20_s2ef/``. Every frame keeps the total DFT energy (eV), the
raw unconstrained forces (eV/Å), the cell, ``pbc``, tags and the ``FixAtoms`` constraint
(written as ``move_mask``) and gets ``info["fid"]`` = its index in the original
trajectory. The script re-reads every file and checks the round trip.

Usage::

    python scripts/make_demo_data.py [--tarball PATH] [--out DIR] [--stride 2]

The tarball defaults to ``$FAIRCHEM_DENS_SHARED/data/oc20_s2ef_trajs.tar.xz`` or
``<repo>/../shared/data/oc20_s2ef_trajs.tar.xz``. Needs only ASE and NumPy.
"""

from __future__ import annotations

import argparse
import io
import lzma
import os
import tarfile
import tempfile
from pathlib import Path

import ase.io
import numpy as np
from ase.constraints import FixAtoms

from fairchem_dens.data.extxyz_io import write_extxyz

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FAIRCHEM_DENS_SHARED", REPO.parent / "shared"))
DEFAULT_TARBALL = SHARED / "data" / "oc20_s2ef_trajs.tar.xz"
DEFAULT_OUT = REPO / "fairchem_dens" / "demo_data" / "oc20_s2ef"
#: The 14 systems of the tarball with <= 74 atoms (33-74), by OC20 system id.
DEMO_SIDS = (
    1000100, 1000103, 1000110, 1000120, 1000141, 1000142, 1000156,
    1000161, 1000167, 1000169, 1000170, 1000188, 1000193, 1000194,
)  # fmt: skip
DEFAULT_STRIDE = 2


def fixed_indices(atoms: ase.Atoms) -> np.ndarray:
    """Sorted indices of atoms held by ``FixAtoms`` constraints."""
    fixed = [c.index for c in atoms.constraints if isinstance(c, FixAtoms)]
    return np.sort(np.concatenate(fixed)) if fixed else np.zeros(0, dtype=int)


def check_round_trip(original: list[ase.Atoms], written: Path) -> None:
    """Assert the written file reproduces the frames the converter needs."""
    with lzma.open(written, "rt") as handle:
        reread = ase.io.read(handle, index=":", format="extxyz")
    assert len(reread) == len(original), written
    for before, after in zip(original, reread):
        assert after.info["fid"] == before.info["fid"]
        assert after.get_potential_energy() == before.get_potential_energy()
        np.testing.assert_allclose(
            after.get_forces(apply_constraint=False),
            before.get_forces(apply_constraint=False),
            atol=1e-7,
        )
        np.testing.assert_allclose(after.positions, before.positions, atol=1e-7)
        np.testing.assert_allclose(after.cell.array, before.cell.array, atol=1e-7)
        assert (after.numbers == before.numbers).all()
        assert (after.pbc == before.pbc).all()
        assert (after.get_tags() == before.get_tags()).all()
        assert (fixed_indices(after) == fixed_indices(before)).all()


def write_system(trajectory: Path, out_file: Path, stride: int) -> tuple[int, int]:
    """Write every ``stride``-th frame of ``trajectory``; return (frames, atoms)."""
    frames = ase.io.read(trajectory, index=f"::{stride}")
    for position, atoms in enumerate(frames):
        atoms.info["fid"] = position * stride
    text = io.StringIO()
    write_extxyz(text, frames)  # keeps FixAtoms as move_mask with any ASE
    out_file.write_bytes(lzma.compress(text.getvalue().encode(), preset=9 | lzma.PRESET_EXTREME))
    check_round_trip(frames, out_file)
    return len(frames), len(frames[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tarball", type=Path, default=DEFAULT_TARBALL)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--stride", type=int, default=DEFAULT_STRIDE)
    args = parser.parse_args()
    if not args.tarball.is_file():
        parser.error(f"{args.tarball} not found (set FAIRCHEM_DENS_SHARED or --tarball)")
    args.out.mkdir(parents=True, exist_ok=True)
    total_frames = total_bytes = 0
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(args.tarball) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for sid in DEMO_SIDS:
            member = members[f"random{sid}.traj"]
            tar.extract(member, tmp, filter="data")
            out_file = args.out / f"random{sid}.extxyz.xz"
            frames, natoms = write_system(Path(tmp) / member.name, out_file, args.stride)
            size = out_file.stat().st_size
            total_frames += frames
            total_bytes += size
            print(f"{out_file.name}: {frames} frames, {natoms} atoms, {size / 1e3:.0f} kB")
    print(f"{len(DEMO_SIDS)} systems, {total_frames} frames, {total_bytes / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
