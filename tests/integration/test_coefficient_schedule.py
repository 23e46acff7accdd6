"""lambda_DeNS schedules inside the trainer: the loss uses the value of the current step, and
fairchem's training loop logs it as ``dens_coefficient``."""

from __future__ import annotations

import copy

import pytest

from tests.conftest import build_trainer, demo_config

DENS = {"prob": 0.5, "corrupt_ratio": 0.5, "std": 0.1, "coefficient": 10}


def test_loss_uses_the_scheduled_coefficient_of_the_step(demo_lmdb, tmp_path) -> None:
    dens = {**DENS, "coefficient_schedule": "linear", "coefficient_schedule_by": "step"}
    trainer = build_trainer(demo_config(demo_lmdb, dens, tmp_path, first_n=16, max_epochs=2))
    assert len(trainer.train_loader) == 4  # 16 frames, batch 4: 8 steps in all
    batch = next(iter(trainer.train_loader))
    trainer.model.train()
    for step in range(1, 200):  # a draw with corrupted atoms
        trainer.step = step
        out = trainer._forward(copy.copy(batch))
        if trainer._dens_step.num_corrupted:
            break
    losses = {}
    for step in (1, 5, 9):  # lambda 10, 10 (1 - 4/8) = 5, 0 (end of training)
        trainer.step = step
        losses[step] = trainer._compute_loss(out, batch).item()
        assert trainer.dens_coefficient() == pytest.approx({1: 10.0, 5: 5.0, 9: 0.0}[step])
    denoising = (losses[1] - losses[9]) / 10
    assert denoising > 0
    assert losses[5] == pytest.approx(losses[9] + 5 * denoising, rel=1e-5)


def test_training_loop_logs_the_coefficient(demo_lmdb, tmp_path) -> None:
    dens = {**DENS, "coefficient_schedule": "linear"}  # by epoch: 10 in epoch 0, 5 in epoch 1
    trainer = build_trainer(demo_config(demo_lmdb, dens, tmp_path, first_n=16, max_epochs=2,
                                        eval_every=1000))
    seen = []
    compute = trainer._compute_metrics
    trainer._compute_metrics = lambda *a: seen.append(trainer.dens_coefficient()) or compute(*a)
    trainer.train(disable_eval_tqdm=True)
    assert seen == [10.0] * 4 + [5.0] * 4
    logged = trainer.metrics["dens_coefficient"]  # print_every 1000: averaged over all 8 steps
    assert logged["numel"] == 8 and logged["metric"] == pytest.approx(7.5)
