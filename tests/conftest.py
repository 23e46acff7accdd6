"""Shared fixtures: real OC20 frames from the bundled demo data and a tiny EquiformerV2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FAIRCHEM_DENS_SHARED", REPO.parent / "shared"))
DEMO_DIR = REPO / "fairchem_dens" / "demo_data" / "oc20_s2ef"

# Small enough for CPU unit tests, large enough to exercise every path (lmax 3, mmax 2).
TINY_EQV2 = {
    "use_pbc": True,
    "regress_forces": True,
    "otf_graph": True,
    "max_neighbors": 30,
    "max_radius": 5.0,
    "max_num_elements": 90,
    "num_layers": 2,
    "sphere_channels": 16,
    "attn_hidden_channels": 16,
    "num_heads": 2,
    "attn_alpha_channels": 8,
    "attn_value_channels": 4,
    "ffn_hidden_channels": 16,
    "norm_type": "layer_norm_sh",
    "lmax_list": [3],
    "mmax_list": [2],
    "grid_resolution": 24,  # fine S2 grid: EqV2 is equivariant up to grid error
    "num_sphere_samples": 32,
    "edge_channels": 16,
    "alpha_drop": 0.0,
    "drop_path_rate": 0.0,
    "proj_drop": 0.0,
    "enforce_max_neighbors_strictly": False,
}


def demo_frames(max_systems: int = 2, frames_per_system: int = 1):
    """Real OC20 frames (ASE Atoms) from the bundled demo data."""
    from ase.io import read

    files = sorted(p for p in DEMO_DIR.rglob("*") if p.suffix in {".traj", ".extxyz", ".xyz"}
                   or p.name.endswith(".extxyz.xz"))
    if not files:
        pytest.skip(f"no bundled demo data under {DEMO_DIR}")
    frames = []
    for path in files[:max_systems]:
        frames += list(read(str(path), index=f":{frames_per_system}"))
    return frames


def atoms_to_batch(frames) -> object:
    """Collate ASE frames into a fairchem batch with energy, raw forces, fixed, tags."""
    from fairchem.core.common.data_parallel import data_list_collater
    from fairchem.core.preprocessing import AtomsToGraphs

    a2g = AtomsToGraphs(r_energy=True, r_forces=True, r_fixed=True, r_pbc=True, r_edges=False)
    data = []
    for i, atoms in enumerate(frames):
        d = a2g.convert(atoms)
        d.forces = torch.tensor(atoms.get_forces(apply_constraint=False), dtype=torch.float32)
        d.sid, d.fid = i, 0
        data.append(d)
    return data_list_collater(data, otf_graph=True)


@pytest.fixture(scope="session", autouse=True)
def _fairchem_registry() -> None:
    """Register fairchem's models/trainers by name, as its CLI does at start-up."""
    from fairchem.core.common.utils import setup_imports

    setup_imports()


@pytest.fixture
def oc20_batch():
    """Two real OC20 frames (adsorbate + slab with fixed atoms), collated."""
    return atoms_to_batch(demo_frames(max_systems=2))


@pytest.fixture
def tiny_eqv2() -> dict:
    return dict(TINY_EQV2)
