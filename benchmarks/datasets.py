"""Real datasets of the benchmarks, converted once into fairchem LMDBs (cached under ``runs/``).

* ``oc20``: the 24 OC20 S2EF relaxation trajectories of ``../shared/data/oc20_s2ef_trajs.tar.xz``
  (3947 DFT frames, 33-185 atoms, slabs with fixed atoms), every 4th frame, split **by system**:
  the 4 validation systems below hold 180 frames, the 20 training systems 814.
* ``oc20_relaxed``: the last (relaxed) frame of each of the 20 training trajectories, for
  denoising pre-training (benchmarks/pretraining.py); no validation split of its own.
* ``md17``: ``../shared/data/md17_ethanol`` (2000 MD17 frames of ethanol, kcal/mol), cut into 20
  chunks of 100 frames in file order: chunks 0-9 train (1000 frames, as the paper's ~950),
  chunks 15-19 validation (500 frames). The file is a random sample of the MD17 trajectory, not
  a time series (energy lag-1 autocorrelation 0.008; consecutive frames differ as much as random
  pairs), so this is in effect a random split, as in the paper.
* ``md17_sigma_e``: the same frames and split, force normaliser sigma_E of the training energies
  (``--forces-normalizer energy_std``), the force scale of the authors' MD17 code.
* ``mlearn_si``, ``mlearn_mo``: the mlearn elemental sets of Zuo et al. (J. Phys. Chem. A 2020;
  ``../shared/data/mlearn``, BSD-3): periodic bulk, AIMD, strained cells, surfaces, vacancies, in
  pymatgen JSON. Their own test split is the converter's ``test`` split (evaluated once, after
  training); every 10th structure of their training split is held out as ``val`` (learning
  curves, plateau), the rest trains.
* ``mlearn_si_stress``, ``mlearn_mo_stress``: the same structures and split, converted with
  ``--stress`` (``stress`` [1, 3, 3] in eV/A^3, fairchem's sign; written by
  :mod:`fairchem_dens.data.mlearn`, which reads VASP's ``virial_stress``) for the stress configs
  of ``configs/mlearn``.

Every dataset is written by :func:`fairchem_dens.data.convert`, the converter users run.
"""

from __future__ import annotations

import lzma
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CACHE = REPO / "runs" / "benchmarks" / "data"

# Held-out OC20 systems whose elements all occur in the 20 training systems (the converter
# checks and records it), so validation energies can be referenced.
OC20_VAL_SYSTEMS = (1000100, 1000161, 1000169, 1000193)
OC20_STRIDE = 4
MD17_CHUNK = 100
MD17_TRAIN_CHUNKS = range(10)
MD17_VAL_CHUNKS = range(15, 20)
MD17_TEST_CHUNKS = range(10, 15)  # held out by every suite before ``scaling``; its test part
MD17_SCALING_SIZES = (100, 200, 1000)


@dataclass(frozen=True)
class Dataset:
    """A converted dataset: ``lmdb_dir`` holds ``train``/``val`` LMDBs and the fitted npz files."""

    name: str
    lmdb_dir: Path
    config_stem: str  # benchmark config family (``oc20`` or ``md17``)

    def overrides(self, config: Path | None = None) -> list[str]:
        """fairchem command-line overrides pointing ``config`` (or any config using the
        converter's default files) at this dataset."""
        from fairchem_dens.runs import data_overrides

        return data_overrides(self.lmdb_dir, config)


def _require(path: Path) -> Path:
    if not path.exists():
        raise SystemExit(f"benchmark data not found: {path} (the shared data directory must sit "
                         f"beside the checkout, at {SHARED_DATA})")
    return path


def _extract_oc20(dest: Path) -> Path:
    traj_dir = dest / "oc20_s2ef_trajs"
    if not (traj_dir / ".complete").exists():
        with tarfile.open(_require(SHARED_DATA / "oc20_s2ef_trajs.tar.xz")) as tar:
            tar.extractall(dest, filter="data")
        (traj_dir / ".complete").touch()
    return traj_dir


def _convert(out: Path, log=print, **options) -> Path:
    from fairchem_dens.data import ConversionOptions, convert

    if not (out / "conversion.json").exists():
        convert(ConversionOptions(out_dir=out, overwrite=True, **options), log=log)
    return out


def oc20(cache: Path = CACHE) -> Dataset:
    trajs = _extract_oc20(cache / "raw")
    out = _convert(cache / "oc20_stride4", inputs=[str(trajs)], stride=OC20_STRIDE,
                   val_systems=OC20_VAL_SYSTEMS)
    return Dataset("oc20", out, "oc20")


def oc20_relaxed(cache: Path = CACHE) -> Path:
    """LMDB directory of the last (relaxed) frame of each of the 20 OC20 *training*
    trajectories (validation systems left out), converted with energies and forces; for
    denoising pre-training. Returns the converter's output directory (``train`` only)."""
    from ase.io import read, write

    trajs = _extract_oc20(cache / "raw")
    frames = cache / "raw" / "oc20_last_frames"
    if not (frames / ".complete").exists():
        frames.mkdir(parents=True, exist_ok=True)
        for traj in sorted(trajs.glob("*.traj")):
            if int("".join(c for c in traj.stem if c.isdigit())) not in OC20_VAL_SYSTEMS:
                # .traj keeps the fixed atoms with any ASE (ASE 3.25's extxyz writer drops them)
                write(frames / f"{traj.stem}.traj", read(traj, index=-1))
        (frames / ".complete").touch()
    return _convert(cache / "oc20_relaxed", inputs=[str(frames)], split=(1.0, 0.0, 0.0))


def _md17_chunks(chunks: Path, which: Sequence[int] | None = None) -> Path:
    """The shared MD17 ethanol file cut into ``ethanol_<i>.extxyz`` files of ``MD17_CHUNK``
    frames in ``chunks`` (written once): the chunks ``which``, or all of them."""
    from ase.io import read, write

    if not (chunks / ".complete").exists():
        with lzma.open(_require(SHARED_DATA / "md17_ethanol" / "ethanol_sampledata.xyz.xz"),
                       "rt") as f:
            frames = read(f, index=":", format="extxyz")
        chunks.mkdir(parents=True, exist_ok=True)
        for i in (range(len(frames) // MD17_CHUNK) if which is None else which):
            write(chunks / f"ethanol_{i:02d}.extxyz", frames[MD17_CHUNK * i:MD17_CHUNK * (i + 1)])
        (chunks / ".complete").touch()
    return chunks


def md17(cache: Path = CACHE) -> Dataset:
    chunks = _md17_chunks(cache / "raw" / "md17_ethanol_chunks",
                          (*MD17_TRAIN_CHUNKS, *MD17_VAL_CHUNKS))
    out = _convert(cache / "md17_ethanol", inputs=[str(chunks)], energy_unit="kcal/mol",
                   val_systems=tuple(MD17_VAL_CHUNKS))
    return Dataset("md17", out, "md17")


def md17_sigma_e(cache: Path = CACHE) -> Dataset:
    md17(cache)  # writes the chunks
    out = _convert(cache / "md17_ethanol_sigma_e", inputs=[str(cache / "raw" / "md17_ethanol_chunks")],
                   energy_unit="kcal/mol", val_systems=tuple(MD17_VAL_CHUNKS),
                   forces_normalizer="energy_std")
    return Dataset("md17_sigma_e", out, "md17")


def md17_scaling(frames: int, cache: Path = CACHE) -> Dataset:
    """MD17 ethanol with ``frames`` training frames (the first ``frames // 100`` chunks), the
    validation chunks of ``md17`` (15-19, 500 frames) and a test part of its own, chunks 10-14
    (500 frames no other suite used). Normalisers and references are fitted on the ``frames``
    training frames only; forces / sigma_E as ``md17_sigma_e`` (the authors' MD17 scale)."""
    if frames % MD17_CHUNK or not 0 < frames <= MD17_CHUNK * len(MD17_TRAIN_CHUNKS):
        raise ValueError(f"md17_scaling: frames={frames} must be a multiple of {MD17_CHUNK} "
                         f"up to {MD17_CHUNK * len(MD17_TRAIN_CHUNKS)}")
    chunks = _md17_chunks(cache / "raw" / "md17_ethanol_all_chunks")
    used = [*range(frames // MD17_CHUNK), *MD17_TEST_CHUNKS, *MD17_VAL_CHUNKS]
    out = _convert(cache / f"md17_ethanol_scaling_{frames}",
                   inputs=[str(chunks / f"ethanol_{i:02d}.extxyz") for i in used],
                   energy_unit="kcal/mol", val_systems=tuple(MD17_VAL_CHUNKS),
                   test_systems=tuple(MD17_TEST_CHUNKS), forces_normalizer="energy_std")
    return Dataset(f"md17_scaling_{frames}", out, "md17")


MLEARN_VAL_EVERY = 10  # every 10th structure of mlearn's training split validates


def _mlearn_raw(element: str, raw: Path) -> list[int]:
    """mlearn ``element``'s training and test files as one extxyz per structure in ``raw``
    (:func:`fairchem_dens.data.mlearn.write_mlearn_extxyz`: energy eV, forces eV/A, stress
    eV/A^3 in ASE's convention): sids 0.. for the training split, 10000.. for the test split.
    Returns the sorted sids."""
    from fairchem_dens.data.mlearn import write_mlearn_extxyz

    if not (raw / ".complete").exists():
        raw.mkdir(parents=True, exist_ok=True)
        for split, offset in (("training", 0), ("test", 10000)):
            write_mlearn_extxyz(_require(SHARED_DATA / "mlearn" / element / f"{split}.json.xz"),
                                raw, first_sid=offset)
        (raw / ".complete").touch()
    return sorted(int(p.stem.split("_")[1]) for p in raw.glob("*.extxyz"))


def mlearn(element: str, cache: Path = CACHE, stress: bool = False) -> Dataset:
    """mlearn ``element`` (``Si``, ``Mo``, ...): one file per structure; sids 0.. for the
    training split (every ``MLEARN_VAL_EVERY``-th validates), 10000.. for the test split.
    ``stress``: converted with ``--stress`` (dataset ``mlearn_<element>_stress``)."""
    suffix = "_stress" if stress else ""
    # the stress conversion reads its own raw copy: a raw folder written before the files
    # carried stress (the plain suite's cache) would be refused by --stress
    sids = _mlearn_raw(element, cache / "raw" / f"mlearn_{element}{suffix}")
    train = [s for s in sids if s < 10000]
    out = _convert(cache / f"mlearn_{element}{suffix}",
                   inputs=[str(cache / "raw" / f"mlearn_{element}{suffix}")],
                   val_systems=tuple(train[MLEARN_VAL_EVERY - 1::MLEARN_VAL_EVERY]),
                   test_systems=tuple(s for s in sids if s >= 10000), stress=stress)
    return Dataset(f"mlearn_{element.lower()}{suffix}", out, "mlearn")


def zero_force_mae(lmdb_dir: Path, first_n: int | None = None) -> float:
    """Validation force MAE (eV/A, free atoms; the first ``first_n`` frames if given) of a
    model that predicts zero forces: the floor below which a model has learned something
    about the held-out structures."""
    import torch
    from fairchem.core.datasets import LmdbDataset

    val = LmdbDataset({"src": str(lmdb_dir / "val")})
    frames = [val[i] for i in range(min(len(val), first_n or len(val)))]
    forces = [d.forces[d.fixed == 0] if "fixed" in d else d.forces for d in frames]
    mae = float(torch.cat(forces).abs().mean())
    del val  # lmdb: one open environment per path and process
    return mae


def zero_stress_mae(lmdb_dir: Path, first_n: int | None = None) -> float | None:
    """Validation stress MAE (eV/A^3, mean over the 9 components, as fairchem's ``stress_mae``)
    of a model that predicts zero stress; ``None`` for data without stress."""
    import torch
    from fairchem.core.datasets import LmdbDataset

    val = LmdbDataset({"src": str(lmdb_dir / "val")})
    frames = [val[i] for i in range(min(len(val), first_n or len(val)))]
    mae = (float(torch.cat([d.stress.reshape(-1, 9) for d in frames]).abs().mean())
           if frames and "stress" in frames[0] else None)
    del val  # lmdb: one open environment per path and process
    return mae


DATASETS = {"oc20": oc20, "md17": md17, "md17_sigma_e": md17_sigma_e,
            "md17_sigma_e_200": md17_sigma_e,  # the same data; the suite keeps 200 frames
            "mlearn_si": lambda: mlearn("Si"), "mlearn_mo": lambda: mlearn("Mo"),
            "mlearn_si_stress": lambda: mlearn("Si", stress=True),
            "mlearn_mo_stress": lambda: mlearn("Mo", stress=True),
            **{f"md17_scaling_{n}": (lambda n=n: md17_scaling(n)) for n in MD17_SCALING_SIZES}}
