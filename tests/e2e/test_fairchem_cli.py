"""End-to-end through the stock ``fairchem`` console script (subprocesses, no mocks) on the
bundled real OC20 data: plain EquiformerV2 and EquiformerV2 + DeNS train, validate, checkpoint,
and a DeNS checkpoint predicts with ``--mode predict``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fairchem_dens.runs import data_overrides, parse_val_metrics
from tests.conftest import REPO

CONFIGS = REPO / "configs" / "oc20" / "s2ef" / "demo"
STEPS_PER_EPOCH, EPOCHS = 4, 10
SMALL = [  # 16 real frames seen 10 times (learning shows within 40 steps); val on 8 frames
    f"--dataset.train.first_n={4 * STEPS_PER_EPOCH}",
    "--dataset.val.first_n=8",
    f"--optim.max_epochs={EPOCHS}",
    "--optim.scheduler_params.warmup_epochs=1",
    "--print_every=1",
]
# Within 40 CPU steps the tiny EquiformerV2 visibly fits 16 frames; the tiny eSCN does not (plain
# eSCN neither: loss 31.0 -> 27.9 in the same budget), so its learning is checked in-process only.
LEARNING = {"eqv2": {"lr": 0.002, "loss_drop": 0.2}, "escn": {"lr": 0.002, "loss_drop": None}}
pytestmark = pytest.mark.slow


def fairchem(*args: str, cwd: Path) -> str:
    exe = Path(sys.executable).with_name("fairchem")
    proc = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return log


def train_losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r", loss: ([0-9.]+e[+-][0-9]+), lr:", log)]  # train lines


@pytest.fixture(scope="module", params=["eqv2", "escn"])
def dens_run(request, demo_lmdb, tmp_path_factory) -> tuple[Path, str, str]:
    """DeNS training of each backbone family through the stock CLI."""
    config = str(CONFIGS / f"{request.param}_dens_cpu.yml")
    run = tmp_path_factory.mktemp(f"dens_run_{request.param}")
    log = fairchem("--mode", "train", "--config-yml", config, "--cpu", "--run-dir", str(run),
                   "--identifier", "e2e", *data_overrides(demo_lmdb), *SMALL,
                   f"--optim.lr_initial={LEARNING[request.param]['lr']}", cwd=run)
    return run, log, request.param


def test_stock_equiformer_v2_trains_and_validates(demo_lmdb, tmp_path) -> None:
    log = fairchem("--mode", "train", "--config-yml", str(CONFIGS / "eqv2_cpu.yml"), "--cpu",
                   "--run-dir", str(tmp_path), "--identifier", "plain", *data_overrides(demo_lmdb),
                   *SMALL, "--optim.lr_initial=0.002", cwd=tmp_path)
    evaluations = parse_val_metrics(log)
    assert len(evaluations) == EPOCHS
    for m in evaluations:
        assert 0 < m["forces_mae"] < 5 and m["energy_mae"] > 0
    assert len(train_losses(log)) == EPOCHS * STEPS_PER_EPOCH
    assert list(tmp_path.glob("checkpoints/*/checkpoint.pt"))


def test_dens_training_through_the_stock_cli(dens_run) -> None:
    run, log, model = dens_run
    by_epoch = np.array(train_losses(log)).reshape(EPOCHS, STEPS_PER_EPOCH).mean(1)
    assert np.isfinite(by_epoch).all()
    drop = LEARNING[model]["loss_drop"]  # the same 16 frames every epoch: learning shows
    if drop is not None:
        assert by_epoch[-2:].mean() < (1 - drop) * by_epoch[:2].mean(), by_epoch
    assert "denoising_noise_mae" in log  # DeNS metrics on corrupted atoms were logged
    evaluations = parse_val_metrics(log)
    assert len(evaluations) == EPOCHS
    assert all("denoising_noise_mae" not in m for m in evaluations)  # clean validation
    assert 0 < evaluations[-1]["forces_mae"] < 5
    ckpt = list(run.glob("checkpoints/*/checkpoint.pt"))
    assert len(ckpt) == 1


def test_dens_checkpoint_predicts_s2ef_npz(dens_run, demo_lmdb) -> None:
    import shutil

    import torch

    run, _, model = dens_run
    config = str(CONFIGS / f"{model}_dens_cpu.yml")
    ckpt = next(run.glob("checkpoints/*/checkpoint.pt"))
    # predict on the val frames; a copy, since lmdb cannot open the val path twice in a process
    test_split = Path(shutil.copytree(demo_lmdb / "val", run / "test_split"))
    log = fairchem("--mode", "predict", "--config-yml", config, "--cpu", "--run-dir", str(run / "predict"), "--identifier", "pred",
                   "--checkpoint", str(ckpt), *data_overrides(demo_lmdb),
                   f"--dataset.test.src={test_split}", cwd=run)
    files = list((run / "predict").glob("results/*/s2ef_predictions.npz"))
    assert len(files) == 1, log[-3000:]
    from fairchem.core.datasets import LmdbDataset

    pred = np.load(files[0], allow_pickle=True)
    frames = LmdbDataset({"src": str(test_split)})
    free = sum(int((frames[i].fixed == 0).sum()) for i in range(len(frames)))
    ids = {f"{frames[i].sid}_{frames[i].fid}" for i in range(len(frames))}
    assert len(pred["energy"]) == len(frames)
    assert set(pred["ids"]) == ids
    assert pred["forces"].shape == (free, 3)  # fixed atoms excluded, as stock fairchem does
    assert np.isfinite(pred["energy"]).all() and np.isfinite(pred["forces"]).all()
    state = torch.load(ckpt, map_location="cpu")
    assert state["config"]["trainer"] == "fairchem_dens.trainer.DenoisingForcesTrainer"
    assert state["config"]["dens_rng"]["seed"] == 0


def test_every_free_atom_corrupted_through_the_stock_cli(demo_lmdb, tmp_path) -> None:
    """prob 1, r 1 (the paper configs' r with every structure selected): every free atom of
    every batch is corrupted, no forces term is left; training and its metrics run, and the test
    split on the val LMDB's own path (opened twice in one process: fairchem writes test
    predictions at each new best val metric) works with the pinned lmdb."""
    val = str(demo_lmdb / "val")
    log = fairchem("--mode", "train", "--config-yml", str(CONFIGS / "eqv2_dens_cpu.yml"), "--cpu",
                   "--run-dir", str(tmp_path), "--identifier", "r1", *data_overrides(demo_lmdb),
                   "--dataset.train.first_n=8", "--dataset.val.first_n=4",
                   f"--dataset.test.src={val}", "--dataset.test.first_n=4",
                   "--optim.max_epochs=2", "--optim.scheduler_params.warmup_epochs=1",
                   "--print_every=1", "--optim.dens.prob=1", "--optim.dens.corrupt_ratio=1",
                   cwd=tmp_path)
    losses = train_losses(log)
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert "denoising_noise_mae" in log
    train_lines = [line for line in log.splitlines() if ", loss: " in line and "step:" in line]
    assert train_lines and not any("forces_mae" in line for line in train_lines)  # none scored
    assert len(parse_val_metrics(log)) == 2
    assert list(tmp_path.glob("results/*/s2ef_predictions.npz"))
