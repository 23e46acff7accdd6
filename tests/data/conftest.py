"""Fixtures of the converter tests: the bundled OC20 demo data, converted once per session,
the optional shared data folder, and builders of small (possibly broken) inputs."""

from __future__ import annotations

import io
import json
import lzma
import os
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from fairchem_dens.data import ConversionOptions, convert, demo_data_dir

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FAIRCHEM_DENS_SHARED", REPO / ".." / "shared")).resolve()
OC20_TARBALL = SHARED / "data" / "oc20_s2ef_trajs.tar.xz"
TUTORIAL_S2EF_LMDB = SHARED / "data" / "oc20_tutorial_lmdb" / "s2ef" / "val_20" / "data.lmdb"
MD17_ETHANOL = SHARED / "data" / "md17_ethanol" / "ethanol_sampledata.xyz.xz"

#: Split recommended for the demo data (14 systems -> 10 / 2 / 2).
DEMO_SPLIT = (0.7, 0.15, 0.15)
DEMO_SEED = 0


def require_shared(path: Path) -> Path:
    """Skip the calling test when ``path`` (under ../shared) is missing."""
    if not path.exists():
        pytest.skip(f"shared data not available: {path} (set FAIRCHEM_DENS_SHARED)")
    return path


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return demo_data_dir()


@pytest.fixture(scope="session")
def demo_conversion(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> dict:
    """All bundled demo data converted with the recommended split; returns the summary."""
    out = tmp_path_factory.mktemp("demo_lmdb")
    summary = convert(
        ConversionOptions(inputs=[str(demo_dir)], out_dir=out, split=DEMO_SPLIT, seed=DEMO_SEED)
    )
    assert json.loads((out / "conversion.json").read_text()) == json.loads(json.dumps(summary))
    return summary


@pytest.fixture(scope="session")
def demo_out(demo_conversion: dict) -> Path:
    return Path(demo_conversion["options"]["out_dir"])


def make_frames(
    num_frames: int = 3,
    num_atoms: int = 4,
    periodic: bool = True,
    fixed: tuple[int, ...] = (0, 1),
    seed: int = 0,
) -> list[Atoms]:
    """Small Cu/O frames with energy, forces (non-zero on fixed atoms) and FixAtoms."""
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(num_frames):
        atoms = Atoms(
            numbers=[29] * (num_atoms - 1) + [8],
            positions=rng.uniform(0.5, 4.5, size=(num_atoms, 3)),
            cell=np.diag([5.0, 5.0, 12.0]) if periodic else None,
            pbc=periodic,
        )
        if fixed:
            atoms.set_constraint(FixAtoms(indices=list(fixed)))
        atoms.calc = SinglePointCalculator(
            atoms,
            energy=-10.0 - index - rng.uniform(),
            forces=rng.normal(size=(num_atoms, 3)),
        )
        frames.append(atoms)
    return frames


def set_results(atoms: Atoms, **results: object) -> Atoms:
    """Replace the calculator results of ``atoms`` (e.g. to drop or corrupt a value)."""
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def assert_same_up_to_lattice_translation(pos: np.ndarray, atoms) -> None:
    """``pos`` are the ASE positions wrapped into the cell (as AtomsToGraphs does)."""
    cell = atoms.cell.array
    shift = np.linalg.solve(cell.T, (pos - atoms.positions).T).T
    np.testing.assert_allclose(shift, np.round(shift), atol=1e-5)
    fractional = np.linalg.solve(cell.T, pos.T).T
    assert fractional.min() > -1e-5
    assert fractional.max() < 1 + 1e-5


def read_demo_file(path: Path, index: str = ":") -> list[Atoms]:
    """Frames of a bundled ``.extxyz.xz`` file, read by plain ASE (decompressed in memory:
    ASE's extxyz reader seeks, which is slow on an lzma stream)."""
    with lzma.open(path, "rt") as handle:
        return ase.io.read(io.StringIO(handle.read()), index=index, format="extxyz")
