"""The stock ``fairchem`` CLI with two gloo ranks (``--cpu --num-gpus 2``: torch elastic launch)
trains the DeNS demo config to completion, and both ranks end with identical parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairchem_dens.runs import data_overrides
from tests.conftest import REPO

CONFIG = REPO / "configs" / "oc20" / "s2ef" / "demo" / "eqv2_dens_cpu.yml"


@pytest.mark.timeout(300)
def test_two_rank_cli_training_keeps_ranks_identical(demo_lmdb, tmp_path) -> None:
    exe = Path(sys.executable).with_name("fairchem")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1"}
    cmd = [str(exe), "--mode", "train", "--config-yml", str(CONFIG), "--cpu", "--num-gpus", "2",
           "--run-dir", str(tmp_path), "--identifier", "ddp", *data_overrides(demo_lmdb),
           "--trainer=tests.distributed.checksum_trainer.ChecksumTrainer",
           "--dataset.train.first_n=16", "--dataset.val.first_n=4", "--optim.max_epochs=1",
           "--optim.scheduler_params.warmup_epochs=1", "--print_every=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=280)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "Running in local mode with 2 ranks" in log
    res = [torch.load(tmp_path / f"params_rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in res] == [2, 2]
    assert res[0]["step"] == res[1]["step"] == 2  # 16 frames / (2 ranks x batch 4)
    assert torch.equal(res[0]["params"], res[1]["params"])
    assert "denoising_noise_mae" in log  # DeNS ran (train metrics of corrupted atoms)
    assert list(tmp_path.glob("checkpoints/*/checkpoint.pt"))
