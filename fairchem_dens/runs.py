"""Plumbing shared by the demo (:mod:`fairchem_dens.demo`), the benchmarks and the tests for
driving the stock ``fairchem`` console script: where it is, how to point a config at converted
data, the command line of one training run, and how to read validation metrics back from its log."""

from __future__ import annotations

import re
import sys
from pathlib import Path

__all__ = ["build_trainer", "data_overrides", "fairchem_executable", "parse_val_metrics",
           "train_command"]

_METRIC = re.compile(r"(\w+): (-?[0-9.]+(?:e[-+]?\d+)?)")


def fairchem_executable() -> str:
    """The ``fairchem`` console script of the running interpreter's environment (falls back
    to ``fairchem`` on ``PATH``)."""
    fairchem = Path(sys.executable).with_name("fairchem")
    return str(fairchem) if fairchem.exists() else "fairchem"


def data_overrides(lmdb_dir: Path, config: str | Path | None = None) -> list[str]:
    """fairchem command-line overrides pointing a config at the output of ``fairchem-dens
    convert`` in ``lmdb_dir``: train/val LMDBs, element references and normalisers.

    Without ``config``: the converter's files for the energy references and the energy and
    force normalisers. With ``config`` (a yml path), every ``file`` the config names under
    ``dataset.train.transforms.{element_references,normalizer}.<target>`` is pointed at the file
    of the same name in ``lmdb_dir`` instead, so a config that reuses one of the converter's
    files for another target (e.g. configs/mlearn/esen_cpu.yml: the force normaliser for the
    energy and the stress) keeps its choice."""
    files = {"element_references.energy": "element_references.npz",
             "normalizer.energy": "energy_normalizer.npz",
             "normalizer.forces": "forces_normalizer.npz"}
    if config is not None:
        from fairchem.core.common.utils import load_config

        transforms = load_config(str(config))[0]["dataset"]["train"].get("transforms") or {}
        for kind in ("element_references", "normalizer"):
            for target, value in (transforms.get(kind) or {}).items():
                if isinstance(value, dict) and value.get("file"):
                    files[f"{kind}.{target}"] = Path(value["file"]).name
    t = "--dataset.train"
    return [
        f"{t}.src={lmdb_dir / 'train'}",
        *(f"{t}.transforms.{key}.file={lmdb_dir / name}" for key, name in files.items()),
        f"--dataset.val.src={lmdb_dir / 'val'}",
    ]


def train_command(config: Path, lmdb_dir: Path, run_dir: Path, identifier: str, seed: int,
                  extra: list[str]) -> list[str]:
    """The stock ``fairchem --mode train --cpu`` command line of one run of ``config`` on the
    output of ``fairchem-dens convert`` in ``lmdb_dir`` (:func:`data_overrides`), then ``extra``
    fairchem overrides."""
    return [
        fairchem_executable(),
        "--mode", "train",
        "--config-yml", str(config),
        "--cpu",
        "--run-dir", str(run_dir),
        "--identifier", identifier,
        "--seed", str(seed),
        *data_overrides(lmdb_dir, config),  # the normaliser files the config chooses
        *extra,
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


def build_trainer(config: dict, seed: int = 0, cpu: bool = True, amp: bool = False):
    """Construct the trainer ``config`` names in-process with the arguments fairchem's CLI
    passes (``new_trainer_context``), without logging or checkpoints (``is_debug``).
    ``config`` is a resolved config dict (``load_config``) with ``run_dir`` set; ``amp``:
    fairchem's ``--amp`` (a ``GradScaler`` and fp16 autocast on CUDA; ignored with ``cpu``)."""
    from fairchem.core.common.registry import registry

    name = config["trainer"]
    task_name = "s2ef" if name in ("forces", "equiformerv2_forces") else "ocp"
    return registry.get_trainer_class(name)(
        task=config.get("task", {}),
        model=config["model"],
        outputs=config["outputs"],
        dataset=config["dataset"],
        optimizer=config["optim"],
        loss_functions=config["loss_functions"],
        evaluation_metrics=config["evaluation_metrics"],
        identifier="test",
        run_dir=config["run_dir"],
        is_debug=True,
        print_every=1000,
        seed=seed,
        logger="tensorboard",
        local_rank=0,
        amp=amp,
        cpu=cpu,
        name=task_name,
    )
