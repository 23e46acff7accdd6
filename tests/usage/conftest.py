"""A tiny DeNS EquiformerV2 checkpoint trained once per session through the stock ``fairchem``
CLI on the bundled real OC20 data (8 frames, one epoch), shared by the usage tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fairchem_dens.runs import data_overrides
from tests.conftest import REPO

CONFIGS = REPO / "configs" / "oc20" / "s2ef" / "demo"
FAIRCHEM = Path(sys.executable).with_name("fairchem")


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return log


def train_tiny(config_name: str, lmdb: Path, out: Path) -> Path:
    """One epoch on 8 real frames through the stock CLI; returns its ``checkpoint.pt``."""
    run([FAIRCHEM, "--mode", "train", "--config-yml", CONFIGS / config_name, "--cpu",
         "--run-dir", out, "--identifier", Path(config_name).stem, *data_overrides(lmdb),
         "--dataset.train.first_n=8", "--dataset.val.first_n=4", "--optim.max_epochs=1",
         "--optim.scheduler_params.warmup_epochs=1", "--optim.lr_initial=0.002"], cwd=out)
    (ckpt,) = out.glob("checkpoints/*/checkpoint.pt")
    return ckpt


@pytest.fixture(scope="session")
def dens_ckpt(demo_lmdb, tmp_path_factory) -> dict[str, Path]:
    """``checkpoint.pt`` (raw weights + EMA + training state) and ``best_checkpoint.pt`` (EMA
    weights, fairchem's inference layout) of a one-epoch DeNS run, and the run's data."""
    out = tmp_path_factory.mktemp("usage_run")
    ckpt = train_tiny("eqv2_dens_cpu.yml", demo_lmdb, out)
    return {"last": ckpt, "best": ckpt.with_name("best_checkpoint.pt"), "run": out,
            "lmdb": demo_lmdb}


@pytest.fixture(scope="session")
def dens_escn_ckpt(demo_lmdb, tmp_path_factory) -> dict[str, Path]:
    """As ``dens_ckpt``, for eSCN + DeNS (escn_dens_cpu.yml)."""
    out = tmp_path_factory.mktemp("usage_run_escn")
    ckpt = train_tiny("escn_dens_cpu.yml", demo_lmdb, out)
    return {"last": ckpt, "best": ckpt.with_name("best_checkpoint.pt"), "run": out,
            "lmdb": demo_lmdb}
