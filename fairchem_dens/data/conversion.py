"""Convert ASE trajectories into fairchem-1.x S2EF LMDBs (train / val / test).

Output directory layout::

    out/
      train/data.lmdb  train/metadata.npz     # LmdbDataset src: out/train
      val/data.lmdb    val/metadata.npz
      test/data.lmdb   test/metadata.npz
      element_references.npz                  # fitted on train only
      energy_normalizer.npz  forces_normalizer.npz
      conversion.json                          # inputs, splits, sid mapping, units, fits

Systems are assigned to splits either by fractions and a seed
(:func:`~fairchem_dens.data.splits.split_systems`) or explicitly with
``val_systems`` / ``test_systems`` (:func:`~fairchem_dens.data.splits.assign_systems`);
``conversion.json`` records which under ``split_mode`` (``"fractions"`` or
``"explicit"``).

Molecules without periodic directions are placed in a cubic periodic box with
``box_padding`` Å (default 15, above a 12 Å cutoff) of vacuum to their images, so that
fairchem's ``radius_graph_pbc`` (``use_pbc: True``, ``otf_graph: True``) builds every graph
and torch-cluster is never needed (details in :mod:`fairchem_dens.data.frames`).

Every output file is first written under a hidden temporary name in its final directory
and moved into place with ``os.replace`` only after *all* inputs converted, so bad input
leaves no LMDB (and no new directory) behind.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from ase.data import chemical_symbols

from fairchem_dens import __version__
from fairchem_dens.data.force_scale import forces_normalizer_fit
from fairchem_dens.data.frames import build_data, frame_record
from fairchem_dens.data.lmdb_writer import LmdbWriter, write_metadata
from fairchem_dens.data.options import SPLIT_NAMES, ConversionError, ConversionOptions
from fairchem_dens.data.reading import assign_system_ids, discover_input_files, read_frames
from fairchem_dens.data.references import (
    ELEMENT_REFERENCES_FILE,
    ENERGY_NORMALIZER_FILE,
    FORCES_NORMALIZER_FILE,
    TrainStatistics,
    config_snippet,
    write_reference_files,
)
from fairchem_dens.data.splits import assign_systems, split_systems

if TYPE_CHECKING:
    from fairchem_dens.data.reading import SystemFile

__all__ = ["LMDB_NAME", "METADATA_NAME", "SUMMARY_NAME", "convert"]

LMDB_NAME = "data.lmdb"
METADATA_NAME = "metadata.npz"
SUMMARY_NAME = "conversion.json"
_REFERENCE_FILES = (
    ("element_references", ELEMENT_REFERENCES_FILE),
    ("energy_normalizer", ENERGY_NORMALIZER_FILE),
    ("forces_normalizer", FORCES_NORMALIZER_FILE),
)
_TOP_LEVEL_OUTPUTS = (*(file for _, file in _REFERENCE_FILES), SUMMARY_NAME)


class _Staging:
    """Temporary files and new directories of one conversion; commit or roll back."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []
        self.writers: list[LmdbWriter] = []
        self.new_dirs: list[Path] = []

    def directory(self, path: Path) -> Path:
        missing = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        self.new_dirs.extend(missing)  # deepest first
        return path

    def temp_for(self, final: Path) -> Path:
        temp = final.with_name(f".{final.stem}.{os.getpid()}.tmp{final.suffix}")
        self.pending.append((temp, final))
        return temp

    def commit(self) -> None:
        for writer in self.writers:
            writer.commit()
        for temp, final in self.pending:
            os.replace(temp, final)

    def rollback(self) -> None:
        for writer in self.writers:
            writer.discard()
        for temp, _ in self.pending:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        for directory in self.new_dirs:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only succeeds while empty


#: Residual energy std (eV) below which the energy normaliser is degenerate: the references
#: interpolate the training energies (no more compositions than elements, one frame each).
DEGENERATE_ENERGY_RMSD = 1e-6


def _check_existing(out_dir: Path, overwrite: bool) -> None:
    existing = [out_dir / name for name in _TOP_LEVEL_OUTPUTS]
    existing += [out_dir / split / LMDB_NAME for split in SPLIT_NAMES]
    existing = [path for path in existing if path.exists()]
    if existing and not overwrite:
        raise ConversionError(
            f"{out_dir}: already holds converter output ({existing[0].name} and "
            f"{len(existing) - 1} more); pass --overwrite or choose another --out"
        )


def _convert_split(
    systems: list[SystemFile],
    writer: LmdbWriter,
    options: ConversionOptions,
    train_stats: TrainStatistics | None,
    report: dict[str, Any],
) -> set[int]:
    """Write all frames of ``systems`` to ``writer``; return the atomic numbers seen."""
    elements: set[int] = set()
    md_sids = None if options.md_systems is None else set(options.md_systems)
    for system in systems:
        frames = 0
        md = None if md_sids is None else int(system.sid in md_sids)
        if md is not None:
            report[str(system.sid)]["md"] = md
        for index, (fid, atoms) in enumerate(read_frames(system.path, options.stride)):
            record = frame_record(atoms, system.path, fid, options, index * options.stride)
            writer.append(build_data(record, system.sid, fid, md=md))
            if train_stats is not None:
                train_stats.add(record.atomic_numbers, record.energy, record.forces)
            if frames == 0:
                report[str(system.sid)].update(
                    natoms=len(atoms), formula=atoms.get_chemical_formula()
                )
            elements.update(int(z) for z in record.atomic_numbers)
            frames += 1
        report[str(system.sid)]["frames"] = frames
    return elements


def convert(options: ConversionOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Convert the input trajectories and write all outputs to ``options.out_dir``.

    Parameters
    ----------
    options
        Validated conversion settings.
    log
        Called with progress messages (e.g. ``print``); silent when ``None``.

    Returns
    -------
    dict
        The summary also written to ``conversion.json``; its ``config_snippet`` entry is
        the YAML for a fairchem config.

    Raises
    ------
    ConversionError
        For bad options or input; nothing is written in that case.
    """
    say = log or (lambda message: None)
    files = discover_input_files(options.inputs)
    systems, sid_source = assign_system_ids(files)
    by_sid = {system.sid: system for system in systems}
    if options.split_mode == "explicit":
        split_sids = assign_systems(list(by_sid), options.val_systems, options.test_systems)
    else:
        split_sids = split_systems(list(by_sid), options.split, options.seed)
    out_dir = options.out_dir
    _check_existing(out_dir, options.overwrite)
    say(
        f"{len(systems)} systems ({options.split_mode} split): "
        + ", ".join(f"{k} {len(v)}" for k, v in split_sids.items())
    )

    system_report = {
        str(s.sid): {"path": str(s.path), "split": name}
        for name, sids in split_sids.items()
        for s in (by_sid[sid] for sid in sids)
    }
    stats = TrainStatistics()
    split_report: dict[str, Any] = {}
    elements: dict[str, set[int]] = {}
    staging = _Staging()
    try:
        for name in (n for n in SPLIT_NAMES if split_sids[n]):
            split_dir = staging.directory(out_dir / name)
            writer = LmdbWriter(split_dir / LMDB_NAME)
            staging.writers.append(writer)
            elements[name] = _convert_split(
                [by_sid[sid] for sid in split_sids[name]],
                writer,
                options,
                stats if name == "train" else None,
                system_report,
            )
            write_metadata(staging.temp_for(split_dir / METADATA_NAME), writer.natoms)
            split_report[name] = {
                "src": str(split_dir),
                "systems": split_sids[name],
                "num_systems": len(split_sids[name]),
                "num_frames": len(writer),
                "num_atoms": int(np.sum(writer.natoms)),
            }
            say(f"{name}: {len(split_sids[name])} systems, {len(writer)} frames")
        # ours, not fairchem's fit_linear_references/fit_normalizers: those give these files
        # only in float64 (test_written_files_equal_fairchem_fits_in_float64; as shipped they
        # round energies to float32) and need a second pass over the LMDB; this fit streams
        fit = forces_normalizer_fit(stats.fit(), options.forces_normalizer)
        if fit["energy_rmsd"] < DEGENERATE_ENERGY_RMSD and fit["num_frames"] > 1:
            say(f"WARNING: the per-element energy references reproduce every training energy "
                f"(residual std {fit['energy_rmsd']:.2e} eV over {fit['num_frames']} frames of "
                f"{fit['num_compositions']} compositions): energy_normalizer.npz would scale "
                "energies by ~1/0, and fairchem-dens' trainer refuses it. Energy cannot be "
                "learned from these structures alone: add training structures, or train "
                "without the energy loss term (e.g. denoising-only pre-training).")
        write_reference_files(
            fit,
            {role: staging.temp_for(out_dir / file) for role, file in _REFERENCE_FILES},
        )
        summary = _summary(options, sid_source, split_report, system_report, fit, elements)
        summary_temp = staging.temp_for(out_dir / SUMMARY_NAME)
        summary_temp.write_text(json.dumps(summary, indent=2) + "\n")
        staging.commit()
    except BaseException:
        staging.rollback()
        raise
    _remove_stale_splits(out_dir, split_sids)
    return summary


def _remove_stale_splits(out_dir: Path, split_sids: dict[str, list[int]]) -> None:
    """With --overwrite: drop old outputs of splits that are empty this time."""
    for name in (n for n in SPLIT_NAMES if not split_sids[n]):
        for file in (LMDB_NAME, f"{LMDB_NAME}-lock", METADATA_NAME):
            with contextlib.suppress(FileNotFoundError):
                (out_dir / name / file).unlink()


def _summary(
    options: ConversionOptions,
    sid_source: str,
    split_report: dict[str, Any],
    system_report: dict[str, Any],
    fit: dict[str, Any],
    elements: dict[str, set[int]],
) -> dict[str, Any]:
    train_elements = elements.get("train", set())
    unseen = {
        name: [chemical_symbols[z] for z in sorted(found - train_elements)]
        for name, found in elements.items()
        if name != "train"
    }
    md_report = None
    if options.md_systems is not None:
        marked = [r for r in system_report.values() if r.get("md")]
        md_report = {
            "attribute": "md",
            "listed_systems": len(options.md_systems),
            "marked_systems": len(marked),
            "marked_frames": int(sum(r.get("frames", 0) for r in marked)),
        }
    return {
        "fairchem_dens_version": __version__,
        "md_marking": md_report,
        "options": options.to_json(),
        "units": {"energy": "eV", "forces": "eV/Å", "positions": "Å"},
        "input_units": {"energy": options.energy_unit, "forces": options.force_unit},
        "sid_source": sid_source,
        "split_mode": options.split_mode,
        "splits": split_report,
        "systems": system_report,
        "element_references": {
            "file": ELEMENT_REFERENCES_FILE,
            "fitted_on": "train",
            "num_frames": fit["num_frames"],
            "raw_energy_std_eV": fit["raw_energy_std"],
            "residual_energy_std_eV": fit["energy_rmsd"],
            "residual_energy_mae_eV": fit["residual_energy_mae"],
            "eV_per_atom": {
                chemical_symbols[z]: float(value)
                for z, value in enumerate(fit["element_references"])
                if z in train_elements
            },
        },
        "normalizers": {
            "energy": {
                "file": ENERGY_NORMALIZER_FILE,
                "mean": fit["energy_mean"],
                "rmsd": fit["energy_rmsd"],
            },
            "forces": {"file": FORCES_NORMALIZER_FILE, "mean": 0.0, "rmsd": fit["forces_rmsd"]},
        },
        "elements_missing_from_train": unseen,
        "energy_normalizer_degenerate": fit["energy_rmsd"] < DEGENERATE_ENERGY_RMSD,
        "config_snippet": config_snippet(options.out_dir, list(split_report)),
    }
