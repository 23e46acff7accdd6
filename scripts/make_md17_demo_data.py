#!/usr/bin/env python
"""Regenerate the bundled MD17 ethanol demo data from the shared MD17 ethanol sample file.

The shared file ``md17_ethanol/ethanol_sampledata.xyz.xz`` (schnetpack's tutorial sample of
MD17 ethanol) holds 2000 frames of the MD17 ethanol simulation (energies kcal/mol, forces
kcal/mol/Å). They are a sample of the trajectory, not consecutive steps: the interatomic
distances of consecutive frames differ as much as those of random pairs (0.21 Å on average)
and the energy's lag-1 autocorrelation is 0.01, so any split of them is a random split of
independent frames (the usual MD17 protocol). This script writes the frames the demo and
the benchmarks use in chunks of 500: chunks 0, 1 and 3 (frames 0-999 for training,
1500-1999 for validation, as ``benchmarks/datasets.py``) as ``ethanol_chunk<k>.extxyz.xz``
(extended XYZ, xz-compressed with preset 9e) into ``fairchem_dens/demo_data/md17_ethanol/``.
Every frame keeps its energy, forces, positions and species unchanged and gets
``info["fid"]`` = its index in the shared file. The script re-reads every file and checks the
round trip.

Usage::

    python scripts/make_md17_demo_data.py [--source PATH] [--out DIR]

The source defaults to ``$FAIRCHEM_DENS_SHARED/data/md17_ethanol/ethanol_sampledata.xyz.xz``
or ``<repo>/../shared/data/md17_ethanol/ethanol_sampledata.xyz.xz``. Needs only ASE and NumPy.
"""

from __future__ import annotations

import argparse
import io
import lzma
import os
from pathlib import Path

import ase.io
import numpy as np

from fairchem_dens.data.extxyz_io import write_extxyz

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FAIRCHEM_DENS_SHARED", REPO.parent / "shared"))
DEFAULT_SOURCE = SHARED / "data" / "md17_ethanol" / "ethanol_sampledata.xyz.xz"
DEFAULT_OUT = REPO / "fairchem_dens" / "demo_data" / "md17_ethanol"
CHUNK = 500  # frames per chunk (= system id of the converter: the digits of the file name)
CHUNKS = (0, 1, 3)  # 0-1 train, 3 validation (chunk 2 is not needed)


def check_round_trip(original: list[ase.Atoms], written: Path) -> None:
    """Assert the written file reproduces energies, forces, positions and species."""
    with lzma.open(written, "rt") as handle:  # decompressed first: ASE seeks in the stream
        reread = ase.io.read(io.StringIO(handle.read()), index=":", format="extxyz")
    assert len(reread) == len(original), written
    for before, after in zip(original, reread):
        assert after.info["fid"] == before.info["fid"]
        assert after.get_potential_energy() == before.get_potential_energy()
        np.testing.assert_allclose(after.get_forces(), before.get_forces(), atol=1e-7)
        np.testing.assert_allclose(after.positions, before.positions, atol=1e-7)
        assert (after.numbers == before.numbers).all()
        assert not after.pbc.any()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not args.source.is_file():
        parser.error(f"{args.source} not found (set FAIRCHEM_DENS_SHARED or --source)")
    with lzma.open(args.source, "rt") as handle:
        frames = ase.io.read(io.StringIO(handle.read()), index=":", format="extxyz")
    for fid, atoms in enumerate(frames):
        atoms.info["fid"] = fid
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for chunk in CHUNKS:
        part = frames[CHUNK * chunk:CHUNK * (chunk + 1)]
        out_file = args.out / f"ethanol_chunk{chunk}.extxyz.xz"
        text = io.StringIO()
        write_extxyz(text, part)
        out_file.write_bytes(lzma.compress(text.getvalue().encode(), preset=9 | lzma.PRESET_EXTREME))
        check_round_trip(part, out_file)
        total += out_file.stat().st_size
        print(f"{out_file.name}: frames {part[0].info['fid']}-{part[-1].info['fid']}, "
              f"{out_file.stat().st_size / 1e3:.0f} kB")
    print(f"{len(CHUNKS)} files, {len(CHUNKS) * CHUNK} frames, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
