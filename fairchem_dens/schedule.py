"""lambda_DeNS over training: constant, linear decay to 0 (the authors' MD17 recipe,
``--use-denoising-pos-weight-linear-decay``, paper App. D.2) or a half cosine to 0.

The value is a pure function of fairchem's step counter and the configured end of training, so
a resumed run uses exactly the values of the uninterrupted one. (fairchem's schedulers step an
optimizer's learning rate and keep their position as state; lambda_DeNS has no optimizer, and a
stateless function of the step needs no checkpointing.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fairchem_dens.config import DeNSConfig


@dataclass(frozen=True)
class CoefficientSchedule:
    """lambda_DeNS at fairchem step ``step`` (1-based: ``trainer.step`` during a training step).

    Attributes
    ----------
    base: lambda_DeNS at the start of training (``optim.dens.coefficient``).
    kind: ``"constant"``, ``"linear"`` or ``"cosine"``.
    by: ``"epoch"``: progress t = e / max_epochs with e = (step - 1) // steps_per_epoch the
        0-based epoch, so lambda changes once per epoch (the authors' rule,
        lambda (1 - min(1, e / epochs))); ``"step"``: t = (step - 1) / total_steps.
    total: max_epochs (``by="epoch"``) or the number of steps the decay lasts (``by="step"``).
    steps_per_epoch: training batches per epoch (``len(trainer.train_loader)``).
    """

    base: float
    kind: str = "constant"
    by: str = "epoch"
    total: int = 1
    steps_per_epoch: int = 1

    def progress(self, step: int) -> float:
        """Fraction of training completed before step ``step``, clipped to [0, 1]."""
        done = max(int(step) - 1, 0)
        if self.by == "epoch":
            done //= self.steps_per_epoch
        return min(done / self.total, 1.0)

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return float(self.base)
        t = self.progress(step)
        if self.kind == "linear":
            return float(self.base) * (1.0 - t)
        return float(self.base) * 0.5 * (1.0 + math.cos(math.pi * t))  # cosine

    @classmethod
    def from_config(cls, dens: DeNSConfig, optim: dict[str, Any],
                    steps_per_epoch: int) -> CoefficientSchedule:
        """The schedule of ``optim.dens``; the end of training is ``optim.max_epochs`` (by
        epoch) or ``optim.max_steps`` if set, else max_epochs x steps_per_epoch (by step).
        ``DeNSConfig.check_schedule_end`` has refused configs without an end."""
        steps_per_epoch = max(int(steps_per_epoch), 1)
        if dens.coefficient_schedule == "constant":
            return cls(dens.coefficient)
        if dens.coefficient_schedule_by == "epoch":
            total = int(optim["max_epochs"])
        elif optim.get("max_steps") is not None:
            total = int(optim["max_steps"])
        else:
            total = int(optim["max_epochs"]) * steps_per_epoch
        return cls(dens.coefficient, dens.coefficient_schedule, dens.coefficient_schedule_by,
                   total, steps_per_epoch)
