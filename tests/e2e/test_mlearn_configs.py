"""The CPU mlearn configs (configs/mlearn) through the stock ``fairchem`` console script on a
tiny real subset of mlearn Si converted with stress: each trains and validates a few steps,
writes its checkpoint, and logs the stress loss and metrics of its family (EquiformerV2: the
decomposed isotropic / anisotropic parts and the reassembled stress; eSEN: the gradient
stress; eSCN: none, it has no stress head)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fairchem_dens.runs import data_overrides, parse_val_metrics
from tests.conftest import REPO

CONFIGS = REPO / "configs" / "mlearn"
EPOCHS = 2
SMALL = [  # the fixture's 8 training cells: 2 steps of 4 per epoch; val on its 2 cells
    f"--optim.max_epochs={EPOCHS}",
    "--optim.scheduler_params.warmup_epochs=1",
    "--print_every=1",
]
#: stress metrics of each family, in the training lines and the validation metrics
STRESS_METRICS = {
    "eqv2": ("stress_mae", "stress_isotropic_mae", "stress_anisotropic_mae"),
    "esen": ("stress_mae",),
    "escn": (),
}
pytestmark = pytest.mark.slow


def train(config: Path, lmdb: Path, run: Path) -> str:
    exe = Path(sys.executable).with_name("fairchem")
    proc = subprocess.run(
        [str(exe), "--mode", "train", "--config-yml", str(config), "--cpu", "--run-dir",
         str(run), "--identifier", config.stem, *data_overrides(lmdb, config), *SMALL],
        cwd=run, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return log


def train_lines(log: str) -> list[dict[str, float]]:
    """Metrics of fairchem's training lines (``..., step: N``), in order."""
    return [{k: float(v) for k, v in re.findall(r"(\w+): (-?[0-9.]+e[+-][0-9]+)", line)}
            for line in log.splitlines() if "(INFO): " in line and ", step: " in line]


@pytest.mark.parametrize("family", sorted(STRESS_METRICS))
@pytest.mark.parametrize("kind", ["plain", "dens"])
def test_mlearn_config_trains_with_its_stress_terms(family: str, kind: str, mlearn_si_lmdb,
                                                    tmp_path) -> None:
    config = CONFIGS / f"{family}{'_dens' if kind == 'dens' else ''}_cpu.yml"
    log = train(config, mlearn_si_lmdb, tmp_path)
    steps = train_lines(log)
    assert len(steps) == EPOCHS * 2
    evaluations = parse_val_metrics(log)
    assert len(evaluations) == EPOCHS
    for metrics in (*steps, *evaluations):
        assert 0 < metrics["forces_mae"] < 10 and math.isfinite(metrics["loss"])
        for name in STRESS_METRICS[family]:  # eV/A^3; mlearn Si's stresses are < 0.13
            assert 0 < metrics[name] < 1, (name, metrics)
    if not STRESS_METRICS[family]:
        assert "stress" not in " ".join(evaluations[-1]) and "stress_mae" not in log
    if kind == "dens":
        assert "denoising_noise_mae" in log  # some atoms were corrupted and denoised
        assert all("denoising_noise_mae" not in m for m in evaluations)  # clean validation
    if family == "esen":  # one scale for the energy and its gradients: the force RMS
        (saved,) = tmp_path.glob("checkpoints/*/normalizers.pt")
        normalizers = torch.load(saved, map_location="cpu", weights_only=False)
        force_rms = float(np.load(mlearn_si_lmdb / "forces_normalizer.npz")["rmsd"])
        for target in ("energy", "forces", "stress"):
            assert float(normalizers[target].mean) == 0.0
            np.testing.assert_allclose(float(normalizers[target].rmsd), force_rms, rtol=1e-6)
    (checkpoint,) = tmp_path.glob("checkpoints/*/checkpoint.pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    ours = state["config"]["trainer"] == "fairchem_dens.trainer.DenoisingForcesTrainer"
    assert ours == (kind == "dens")  # plain runs: fairchem's own trainer


def test_eqv2_stress_normalisers_are_fitted_on_the_training_stresses(mlearn_si_lmdb,
                                                                     tmp_path) -> None:
    """The converter writes no stress normaliser: eqv2_cpu.yml lets fairchem fit the isotropic
    and anisotropic parts on the whole training split at start-up (its OMat24 recipe); the
    fitted values are the mean and standard deviation of the training stresses' parts."""
    from fairchem.core.datasets import LmdbDataset

    train(CONFIGS / "eqv2_cpu.yml", mlearn_si_lmdb, tmp_path)
    (saved,) = tmp_path.glob("checkpoints/*/normalizers.pt")
    normalizers = torch.load(saved, map_location="cpu", weights_only=False)
    data = LmdbDataset({"src": str(mlearn_si_lmdb / "train")})
    stress = torch.stack([data[i].stress.view(3, 3).double() for i in range(len(data))])
    del data
    isotropic = torch.diagonal(stress, dim1=1, dim2=2).sum(1) / math.sqrt(3)  # eV/A^3
    fitted = normalizers["stress_isotropic"]
    np.testing.assert_allclose(float(fitted.mean), float(isotropic.mean()), rtol=1e-4)
    np.testing.assert_allclose(float(fitted.rmsd), float(isotropic.std()), rtol=1e-4)
    assert 0 < float(normalizers["stress_anisotropic"].rmsd) < 0.1  # eV/A^3
    forces = normalizers["forces"]  # the converter's file, unchanged
    converted = np.load(mlearn_si_lmdb / "forces_normalizer.npz")
    assert float(forces.mean) == 0.0
    np.testing.assert_allclose(float(forces.rmsd), float(converted["rmsd"]), rtol=1e-6)
