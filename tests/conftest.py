"""Shared fixtures: real OC20 frames from the bundled demo data and a tiny EquiformerV2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FAIRCHEM_DENS_SHARED", REPO.parent / "shared"))
DEMO_DIR = REPO / "fairchem_dens" / "demo_data" / "oc20_s2ef"
from fairchem_dens.demo import DEMO_VAL_SYSTEMS  # noqa: E402

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

TINY_ESCN = {
    "use_pbc": True,
    "regress_forces": True,
    "otf_graph": True,
    "max_neighbors": 30,
    "cutoff": 5.0,
    "max_num_elements": 90,
    "num_layers": 2,
    "lmax_list": [3],
    "mmax_list": [2],
    "sphere_channels": 16,
    "hidden_channels": 16,
    "edge_channels": 16,
    # eSCN's heads integrate over sampled sphere points: fine sampling keeps its grid error
    # (the host's own equivariance limit) well below the test tolerance
    "num_sphere_samples": 512,
    "resolution": 32,
    "distance_resolution": 0.1,
}


# eSEN as fairchem's OMat/MPtrj configs use it (rms_norm_sh, s2 activation, grid MLP), shrunk;
# a fine grid keeps its S2 grid error below the equivariance tolerance.
TINY_ESEN = {
    "use_pbc": True,
    "regress_forces": True,
    "direct_forces": True,
    "otf_graph": True,
    "max_neighbors": 30,
    "cutoff": 5.0,
    "max_num_elements": 90,
    "num_layers": 2,
    "lmax": 2,
    "mmax": 2,
    "sphere_channels": 16,
    "hidden_channels": 16,
    "edge_channels": 16,
    "num_distance_basis": 32,
    "grid_resolution": 18,
}
# the conservative variant: energy head whose forces and stress are its gradients
TINY_ESEN_CONSERVATIVE = {**TINY_ESEN, "direct_forces": False, "regress_stress": True}


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


@pytest.fixture(scope="session")
def demo_lmdb(tmp_path_factory) -> Path:
    """The bundled real OC20 trajectories converted to fairchem LMDBs, once per test session:
    split by system (val = the demo's val systems, train = the other 12), references and
    normalisers fitted on train."""
    from fairchem_dens.data import ConversionOptions, convert, demo_data_dir

    out = tmp_path_factory.mktemp("demo_lmdb")
    convert(ConversionOptions(inputs=[str(demo_data_dir())], out_dir=out, overwrite=True,
                              val_systems=DEMO_VAL_SYSTEMS))
    return out


#: the mlearn Si training cells (Zuo et al. 2020, DFT energies, forces, virial stress) with at
#: most this many atoms: 10 cells of 12-36 atoms (bulk, surfaces, strained), a fast real
#: periodic set with stress
MLEARN_SI_MAX_ATOMS = 36


def mlearn_si_training() -> Path:
    """The shared mlearn Si training set (Zuo et al. 2020); skips the test when it is absent."""
    src = SHARED / "data" / "mlearn" / "Si" / "training.json.xz"
    if not src.exists():
        pytest.skip(f"shared mlearn data not found at {src}")
    return src


@pytest.fixture(scope="session")
def mlearn_si_lmdb(tmp_path_factory) -> Path:
    """Real mlearn Si with stress, converted to fairchem LMDBs as a user would
    (``fairchem-dens convert --stress``: ``stress`` [1, 3, 3] eV/Å^3, fairchem's sign): the
    training cells of at most :data:`MLEARN_SI_MAX_ATOMS` atoms, 2 of them validating."""
    import ase.io

    from fairchem_dens.data import ConversionOptions, convert
    from fairchem_dens.data.mlearn import read_mlearn

    src = mlearn_si_training()
    raw = tmp_path_factory.mktemp("mlearn_si_raw")
    small = [a for a in read_mlearn(src) if len(a) <= MLEARN_SI_MAX_ATOMS]
    for sid, atoms in enumerate(small):
        ase.io.write(raw / f"Si_{sid:05d}.extxyz", atoms)
    out = tmp_path_factory.mktemp("mlearn_si_lmdb")
    convert(ConversionOptions(inputs=[str(raw)], out_dir=out, overwrite=True,
                              val_systems=(0, len(small) - 1), stress=True))
    return out


def demo_config(data_dir: Path, dens: dict | None, run_dir: Path, first_n: int | None = None,
                model: str = "eqv2", **optim) -> dict:
    """The demo config of ``model`` (eqv2 or escn; plain when ``dens`` is None) as a dict with
    data paths filled in (:func:`config_on_lmdb`: a private copy of ``data_dir``, since lmdb
    refuses to open one path twice in a process and earlier tests' trainers may hold theirs)."""
    name = f"{model}_dens_cpu.yml" if dens is not None else f"{model}_cpu.yml"
    config = config_on_lmdb(f"oc20/s2ef/demo/{name}", data_dir, Path(run_dir))
    if first_n is not None:
        config["dataset"]["train"]["first_n"] = first_n
        config["dataset"]["val"]["first_n"] = first_n
        # a few steps per epoch: warm up over a whole epoch (fairchem's cosine schedule
        # divides by int(warmup_epochs * steps_per_epoch))
        config["optim"]["scheduler_params"]["warmup_epochs"] = 1
    if dens is not None:
        config["optim"]["dens"] = dict(dens)
    config["optim"].update(optim)
    return config


def config_on_lmdb(rel: str, lmdb: Path, run_dir: Path) -> dict:
    """configs/``rel`` as fairchem loads it, with its train/val LMDBs and every reference or
    normaliser file it names pointed at the file of that name in ``lmdb`` (copied into
    ``run_dir``: lmdb opens a path once per process)."""
    import shutil

    from fairchem.core.common.utils import load_config

    config, _, _ = load_config(str(REPO / "configs" / rel))
    data = Path(shutil.copytree(lmdb, run_dir / "data"))  # lmdb: one open per path
    train = config["dataset"]["train"]
    train["src"] = str(data / "train")
    for kind in ("element_references", "normalizer"):
        for value in train["transforms"].get(kind, {}).values():
            if isinstance(value, dict) and "file" in value:
                value["file"] = str(data / Path(value["file"]).name)
    config["dataset"]["val"] = {"src": str(data / "val")}
    config["optim"].update(num_workers=0)
    config.update(run_dir=str(run_dir), logger="tensorboard")
    return config


def build_trainer(config: dict, seed: int = 0):
    """Construct the configured trainer in-process exactly as fairchem's CLI does (same
    arguments as ``new_trainer_context``), on the CPU, without logging or checkpoints."""
    from fairchem_dens.runs import build_trainer as build

    return build(config, seed=seed)


@pytest.fixture
def _single_thread():
    """One intra-op thread: with several, torch's CPU backward accumulates scatter sums in a
    varying order, so gradient forces (eSEN's efs head) differ between two runs of the *same*
    model in the last bits; bitwise comparisons need a deterministic order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
