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
* **checkpoints at evaluation steps** (``save`` / ``update_best``): fairchem's loop writes the
  periodic checkpoint of step s *before* the validation of step s, which draws from the global
  generator (EquiformerV2's and eSCN's edge rolls); a resume from it would skip that validation
  and continue with the generators of before it. During training such a save is deferred until
  the validation of its step is done, so the checkpoint holds the state from which the
  uninterrupted run goes on to step s + 1 (and the validation of step s is in the log of the run
  that wrote it).
* **the final checkpoint** (``train``): with ``checkpoint_every`` not dividing the number of
  steps, fairchem leaves ``checkpoint.pt`` at the last multiple; it is written at the end too.
* **mid-epoch resume** (``train``): making the train loader's iterator draws from the global
  generator (torch's DataLoader seeds); the uninterrupted run did it at the start of the epoch,
  a run resumed mid-epoch does it again when it starts, so there the saved states are restored
  right after that draw (at an epoch boundary both runs draw, and they are restored before it).

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
import sys
from typing import Any

import torch
from fairchem.core.models.equiformer_v2.trainers.forces_trainer import (
    EquiformerV2ForcesTrainer,
)
from fairchem.core.trainers.ocp_trainer import OCPTrainer

from fairchem_dens import rng
from fairchem_dens.setup_checks import warn_unlearnable_targets

__all__ = ["ExactResumeForcesTrainer", "ExactResumeMixin"]

_SAVE_IDS = itertools.count()  # unique temporary checkpoint names, also for nested saves


class ExactResumeMixin:
    """Exact resume for a fairchem ``OCPTrainer`` subclass; put it before the trainer in the
    bases. Also stores the trainer's dotted path as ``config["trainer"]`` (fairchem stores the
    task name there; only ``OCPCalculator`` reads it back, to pick the class that loads a
    checkpoint), so the checkpoint reloads with this class."""

    _pending_rng_state: dict[str, Any] | None = None
    _in_training = False  # inside train(): periodic saves at evaluation steps are deferred
    _validated_step: int | None = None  # the step of the last validation during training
    _deferred_save: dict[str, Any] | None = None
    _checkpoint_step: int | None = None  # the step of the last training-state checkpoint.pt

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
        loader = getattr(self, "train_loader", None)
        mid_epoch = state is not None and loader is not None and self.step % len(loader) != 0
        if state is not None and not mid_epoch:
            rng.restore(state)  # the global generators continue where the saved run stood
        if mid_epoch:  # after the loop's iter(train_loader), which the saved run did earlier
            self.train_loader = _RestoreAfterIter(loader, state)
        self._in_training = True
        try:
            super().train(disable_eval_tqdm=disable_eval_tqdm)
        finally:
            self._in_training = False
            if isinstance(self.train_loader, _RestoreAfterIter):
                self.train_loader = self.train_loader.loader
        if self._checkpoint_step != self.step:  # the last periodic one was of an earlier step
            self.save(checkpoint_file="checkpoint.pt", training_state=True)

    def update_best(self, primary_metric, val_metrics, disable_eval_tqdm: bool = True) -> None:
        """fairchem's ``update_best`` (the loop calls it right after a validation), then the
        periodic checkpoint of this step if ``save`` deferred it."""
        super().update_best(primary_metric, val_metrics, disable_eval_tqdm=disable_eval_tqdm)
        self._validated_step = self.step
        deferred, self._deferred_save = self._deferred_save, None
        if deferred is not None:
            self.save(**deferred)

    def _defers_save(self, checkpoint_file: str, training_state: bool) -> bool:
        """Whether a save is the loop's periodic checkpoint of a step whose validation is still
        to come (fairchem validates when ``step % eval_every == 0``, after that save). Only a
        save called by fairchem's training loop itself is deferred: any other (submitit's
        preemption handler ``Runner.checkpoint``, which exits the process right after) is
        written at once."""
        if not (self._in_training and training_state and checkpoint_file == "checkpoint.pt"):
            return False
        if sys._getframe(2).f_code is not OCPTrainer.train.__code__:  # 0: here, 1: save
            return False
        if getattr(self, "val_loader", None) is None or self.step == self._validated_step:
            return False
        loader = getattr(self, "train_loader", None)
        eval_every = self.config["optim"].get("eval_every", len(loader) if loader else 0)
        return bool(eval_every) and self.step % eval_every == 0

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
        if self._defers_save(checkpoint_file, training_state):
            self._deferred_save = {"metrics": metrics, "checkpoint_file": checkpoint_file,
                                   "training_state": training_state}
            return os.path.join(self.config["cmd"]["checkpoint_dir"], checkpoint_file)
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
        if training_state and os.path.basename(checkpoint_file) == "checkpoint.pt":
            self._checkpoint_step = self.step
        return path


class _RestoreAfterIter:
    """The train loader for the first ``iter()`` of a mid-epoch resume: restores the saved
    generator states right after the iterator is made (fairchem's loop takes only ``len`` and
    ``iter`` of it; any other attribute comes from the loader)."""

    def __init__(self, loader, state: dict[str, Any]) -> None:
        self.loader, self.state = loader, state

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        iterator = iter(self.loader)
        if self.state is not None:
            rng.restore(self.state)
            self.state = None
        return iterator

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


class ExactResumeForcesTrainer(ExactResumeMixin, EquiformerV2ForcesTrainer):
    """fairchem's ``equiformerv2_forces`` trainer with exact resume, for plain (non-DeNS)
    models. Runs under the ``s2ef`` task name, as the stock name does, so predictions are
    written as ``s2ef_predictions.npz``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["name"] = "s2ef"
        super().__init__(*args, **kwargs)

    def load_loss(self) -> None:
        """fairchem's, then the set-up warnings of :mod:`fairchem_dens.setup_checks`."""
        super().load_loss()
        warn_unlearnable_targets(self.config, self.normalizers)
