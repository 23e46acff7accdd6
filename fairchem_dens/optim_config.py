"""Adapting an ``optim`` section written for fairchem's plain ``forces`` trainer to the
EquiformerV2 trainer that :class:`~fairchem_dens.trainer.DenoisingForcesTrainer` builds on
(not DeNS-specific)."""

from __future__ import annotations

import inspect
import logging

import torch

from fairchem_dens.config import DeNSConfigError


def with_scheduler_params(optim: dict) -> dict:
    """fairchem's EquiformerV2 trainer (our base) reads the LR schedule from
    ``optim.scheduler_params``; fairchem's plain ``forces`` trainer reads the scheduler's
    arguments from ``optim`` itself. A config written for the latter gets the same schedule:
    the named scheduler's arguments are copied into ``scheduler_params`` (logged)."""
    if "scheduler_params" in optim:
        return optim
    name = optim.get("scheduler")
    fix = ("add optim.scheduler_params, e.g. `scheduler: LambdaLR, scheduler_params: "
           "{lambda_type: cosine, warmup_factor: 0.2, warmup_epochs: 0.1, lr_min_factor: 0.01}`, "
           "or `scheduler: Null` for a constant learning rate")
    if name is None or name == "LambdaLR":
        raise DeNSConfigError(
            f"optim.scheduler_params is missing (optim.scheduler={name!r}): this trainer is "
            "fairchem's EquiformerV2 trainer, which reads the LR schedule from "
            "optim.scheduler_params (fairchem's plain `forces` trainer's default warm-up / "
            f"lr_milestones schedule does not exist there). Fix: {fix}.")
    if name == "Null":
        params: dict = {}
    else:
        scheduler = getattr(torch.optim.lr_scheduler, str(name), None)
        if scheduler is None:
            raise DeNSConfigError(f"optim.scheduler={name!r} is not a torch.optim.lr_scheduler "
                                  f"class; {fix}.")
        accepted = set(inspect.signature(scheduler).parameters) - {"optimizer"}
        params = {k: v for k, v in optim.items() if k in accepted}
    logging.info(f"optim.scheduler_params not set: using {params} from optim (scheduler {name})")
    return {**optim, "scheduler_params": params}
