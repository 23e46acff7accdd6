"""lambda_DeNS schedules: values at given steps, resume = uninterrupted, bad input named."""

from __future__ import annotations

import math

import pytest

from fairchem_dens.config import DeNSConfig, DeNSConfigError
from fairchem_dens.schedule import CoefficientSchedule


def schedule(kind: str, by: str, steps_per_epoch: int = 10, **optim) -> CoefficientSchedule:
    dens = DeNSConfig(std=0.05, coefficient=5.0, coefficient_schedule=kind,
                      coefficient_schedule_by=by)
    dens.check_schedule_end(optim)
    return CoefficientSchedule.from_config(dens, optim, steps_per_epoch)


def test_constant_is_the_coefficient_at_every_step() -> None:
    s = schedule("constant", "epoch")
    assert [s(k) for k in (1, 2, 500, 10**6)] == [5.0] * 4


def test_linear_by_epoch_is_the_authors_rule_changing_once_per_epoch() -> None:
    # main_md17_dens.py: w * (1 - min(1, epoch / epochs)), epoch = 0, 1, ... (10 steps each)
    s = schedule("linear", "epoch", steps_per_epoch=10, max_epochs=4)
    assert [s(k) for k in (1, 10)] == [5.0, 5.0]  # epoch 0: full weight
    assert s(11) == pytest.approx(5.0 * 3 / 4) and s(20) == pytest.approx(5.0 * 3 / 4)
    assert s(31) == pytest.approx(5.0 / 4) and s(40) == pytest.approx(5.0 / 4)  # last epoch
    assert s(41) == 0.0 and s(1000) == 0.0  # past the end: stays 0


def test_linear_by_step_uses_max_epochs_times_steps_per_epoch() -> None:
    s = schedule("linear", "step", steps_per_epoch=10, max_epochs=5)  # 50 steps
    assert s(1) == 5.0
    assert s(26) == pytest.approx(5.0 * (1 - 25 / 50))
    assert s(50) == pytest.approx(5.0 / 50)
    assert s(51) == 0.0


def test_linear_by_step_prefers_an_explicit_max_steps() -> None:
    s = schedule("linear", "step", steps_per_epoch=10, max_epochs=5, max_steps=20)
    assert s(11) == pytest.approx(2.5) and s(21) == 0.0


def test_cosine_by_step_is_a_half_cosine_to_zero() -> None:
    s = schedule("cosine", "step", steps_per_epoch=4, max_steps=100)
    for k in (1, 26, 51, 76, 100, 101):
        t = min((k - 1) / 100, 1.0)
        assert s(k) == pytest.approx(5.0 * 0.5 * (1 + math.cos(math.pi * t)), abs=1e-12)
    assert s(51) == pytest.approx(2.5)


def test_value_is_a_pure_function_of_the_step_so_a_resume_matches() -> None:
    uninterrupted = schedule("linear", "epoch", steps_per_epoch=7, max_epochs=3)
    values = [uninterrupted(k) for k in range(1, 22)]
    resumed = schedule("linear", "epoch", steps_per_epoch=7, max_epochs=3)  # fresh object
    assert [resumed(k) for k in range(12, 22)] == values[11:]


@pytest.mark.parametrize(
    ("dens", "optim", "message"),
    [
        ({"coefficient_schedule": "exp"}, {"max_epochs": 2}, "optim.dens.coefficient_schedule='exp'"),
        ({"coefficient_schedule": "linear", "coefficient_schedule_by": "batch"},
         {"max_epochs": 2}, "optim.dens.coefficient_schedule_by='batch'"),
        ({"coefficient_schedule": "linear"}, {}, "set optim.max_epochs"),
        ({"coefficient_schedule": "cosine", "coefficient_schedule_by": "step"}, {},
         "optim.max_epochs or optim.max_steps"),
        ({"coefficient_schedule": "linear"}, {"max_epochs": 0}, "optim.max_epochs=0"),
        ({"coefficient": -2.0}, {"max_epochs": 2}, "optim.dens.coefficient=-2.0"),
    ],
)
def test_bad_schedules_name_the_key_and_the_fix(dens, optim, message) -> None:
    with pytest.raises(DeNSConfigError, match=message.replace(".", r"\.")):
        DeNSConfig.from_optim({**optim, "dens": {"std": 0.1, **dens}})


def test_constant_schedule_needs_no_end_of_training() -> None:
    assert DeNSConfig.from_optim({"dens": {"std": 0.1}}).coefficient_schedule == "constant"
