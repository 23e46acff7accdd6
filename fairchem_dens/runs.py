"""Plumbing shared by the demo (:mod:`fairchem_dens.demo`), the benchmarks and the tests for
driving the stock ``fairchem`` console script: where it is, how to point a config at converted
data, and how to read validation metrics back from its log."""

from __future__ import annotations

import re
import sys
from pathlib import Path

__all__ = ["data_overrides", "fairchem_executable", "parse_val_metrics"]

_METRIC = re.compile(r"(\w+): (-?[0-9.]+(?:e[-+]?\d+)?)")


def fairchem_executable() -> str:
    """The ``fairchem`` console script of the running interpreter's environment (falls back
    to ``fairchem`` on ``PATH``)."""
    fairchem = Path(sys.executable).with_name("fairchem")
    return str(fairchem) if fairchem.exists() else "fairchem"


def data_overrides(lmdb_dir: Path) -> list[str]:
    """fairchem command-line overrides pointing a config at the output of ``fairchem-dens
    convert`` in ``lmdb_dir``: train/val LMDBs, element references and normalisers."""
    t = "--dataset.train"
    return [
        f"{t}.src={lmdb_dir / 'train'}",
        f"{t}.transforms.element_references.energy.file={lmdb_dir / 'element_references.npz'}",
        f"{t}.transforms.normalizer.energy.file={lmdb_dir / 'energy_normalizer.npz'}",
        f"{t}.transforms.normalizer.forces.file={lmdb_dir / 'forces_normalizer.npz'}",
        f"--dataset.val.src={lmdb_dir / 'val'}",
    ]


def parse_val_metrics(log: str) -> list[dict[str, float]]:
    """Metrics of every ``Evaluating on val.`` block of a fairchem training log, in order."""
    results, pending = [], False
    for line in log.splitlines():
        if "Evaluating on val" in line:
            pending = True
        elif pending and "forces_mae" in line and "step:" not in line:  # not a train line
            results.append({k: float(v) for k, v in _METRIC.findall(line)})
            pending = False
    return results
