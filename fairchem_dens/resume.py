"""Exact resume for fairchem trainers, with or without DeNS.

fairchem 1.10's checkpoints resume a run only approximately, for three reasons unrelated to
DeNS; :class:`ExactResumeMixin` fixes each at the narrowest seam:

* **generator states** (``save`` / ``train``): EquiformerV2 draws its edge-frame roll angles
  from the global torch generator on every forward, so a resumed run diverges from its first
  step. A training-state checkpoint also stores the global generator states
  (``config["rng_state"]``, see :mod:`fairchem_dens.rng`); they are restored when training
  resumes (at the start of ``train``), never by ``--mode predict`` / ``validate`` /
  ``run-relaxations`` on the same checkpoint, whose outputs depend on ``--seed`` only.
* **LR schedule** (``load_checkpoint``): the periodic checkpoint is written one
  ``scheduler.step()`` behind; see :meth:`ExactResumeMixin._align_scheduler_with_step`.
* **atomic save** (``save``): written under a temporary name and renamed into place, so a
  preemption during a save never leaves a half-written ``checkpoint.pt``.

The checkpoint is fairchem's own plus one config entry (``rng_state``), which fairchem's own
trainers ignore when they load it (``OCPCalculator`` picks the class named in
``config["trainer"]``, so it needs this package installed).
For plain EquiformerV2 runs use :class:`ExactResumeForcesTrainer`
(``trainer: fairchem_dens.resume.ExactResumeForcesTrainer``, e.g.
``configs/oc20/s2ef/demo/eqv2_exact_resume_cpu.yml``);
:class:`~fairchem_dens.trainer.DenoisingForcesTrainer` builds on the mixin too.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import torch
from fairchem.core.models.equiformer_v2.trainers.forces_trainer import (
    EquiformerV2ForcesTrainer,
)

from fairchem_dens import rng

__all__ = ["ExactResumeForcesTrainer", "ExactResumeMixin"]

_SAVE_IDS = itertools.count()  # unique temporary checkpoint names, also for nested saves


class ExactResumeMixin:
    """Exact resume for a fairchem ``OCPTrainer`` subclass; put it before the trainer in the
    bases. Also stores the trainer's dotted path as ``config["trainer"]`` (fairchem stores the
    task name there; only ``OCPCalculator`` reads it back, to pick the class that loads a
    checkpoint), so the checkpoint reloads with this class."""

    _pending_rng_state: dict[str, Any] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config["trainer"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def read_checkpoint(self, checkpoint_path: str, checkpoint: dict | None) -> dict | None:
        """``checkpoint``, or the file read the way fairchem reads it (``None`` if there is
        no such file: fairchem's ``load_checkpoint`` then reports it)."""
        if checkpoint is None and os.path.isfile(checkpoint_path):
            map_location = torch.device("cpu") if self.cpu else self.device
            checkpoint = torch.load(checkpoint_path, map_location=map_location)
        return checkpoint

    def load_checkpoint(self, checkpoint_path: str, checkpoint: dict | None = None,
                        inference_only: bool = False) -> None:
        checkpoint = self.read_checkpoint(checkpoint_path, checkpoint)
        super().load_checkpoint(checkpoint_path, checkpoint, inference_only)
        if inference_only:
            return
        # fairchem's task set-up loads the checkpoint in every --mode; only train() continues
        # the saved generator streams (predict/validate/relaxations depend on --seed alone)
        self._pending_rng_state = (checkpoint.get("config") or {}).get(rng.RNG_STATE_KEY)
        self._align_scheduler_with_step()

    def train(self, disable_eval_tqdm: bool = False) -> None:
        state, self._pending_rng_state = self._pending_rng_state, None
        if state is not None:
            rng.restore(state)  # the global generators continue where the saved run stood
        super().train(disable_eval_tqdm=disable_eval_tqdm)

    def _align_scheduler_with_step(self) -> None:
        """fairchem's training loop saves its periodic checkpoint (``checkpoint_every``) after
        the optimiser step of step s but before that step's ``scheduler.step()``, so the saved
        scheduler is one step behind and a resume would shift the whole LR schedule by a step.
        A per-step scheduler has taken exactly ``self.step`` steps after a finished step; catch
        up the one missing step (checkpoints saved after ``scheduler.step()``, e.g. at the end of
        an epoch with ``checkpoint_every: -1``, are already aligned and left alone)."""
        sched = getattr(self, "scheduler", None)
        inner = getattr(sched, "scheduler", None)
        if sched is None or sched.scheduler_type in ("Null", "ReduceLROnPlateau") or not hasattr(
                inner, "last_epoch"):
            return
        if inner.last_epoch == self.step - 1:
            sched.step()

    def save(self, metrics=None, checkpoint_file: str = "checkpoint.pt",
             training_state: bool = True) -> str | None:
        """fairchem's ``save`` with two additions:

        * a training-state checkpoint also holds the global generator states
          (``config["rng_state"]``, see :mod:`fairchem_dens.rng`), so a resume is exact. fairchem
          builds the checkpoint dict inside ``save`` and stores ``self.config`` in it, so the
          states ride on a copy of the config for the duration of the call; the live config is
          never changed.
        * the file is written under a temporary name and renamed into place, so a checkpoint is
          never left half-written: submitit's preemption handler (``Runner.checkpoint``) can run
          in the middle of the training loop's own ``save`` of the same ``checkpoint.pt`` and then
          exits the process, which with fairchem's direct ``torch.save`` leaves a corrupt file.
        """
        config = self.config
        if training_state:
            self.config = {**config, rng.RNG_STATE_KEY: rng.capture()}
        tmp_name = f"{checkpoint_file}.tmp-{os.getpid()}-{next(_SAVE_IDS)}"
        try:
            tmp_path = super().save(metrics, tmp_name, training_state)
        finally:
            self.config = config
        if tmp_path is None:  # debug mode, or not rank 0: nothing written
            return None
        path = os.path.join(os.path.dirname(tmp_path), os.path.basename(checkpoint_file))
        os.replace(tmp_path, path)
        return path


class ExactResumeForcesTrainer(ExactResumeMixin, EquiformerV2ForcesTrainer):
    """fairchem's ``equiformerv2_forces`` trainer with exact resume, for plain (non-DeNS)
    models. Runs under the ``s2ef`` task name, as the stock name does, so predictions are
    written as ``s2ef_predictions.npz``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["name"] = "s2ef"
        super().__init__(*args, **kwargs)
