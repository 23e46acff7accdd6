"""Loss reduction that stays finite when a term has no samples anywhere (e.g. no free,
uncorrupted atom on any rank), and the denoising metrics."""

from __future__ import annotations

from collections.abc import Collection

import torch
from fairchem.core.common import distutils
from fairchem.core.modules.evaluator import Evaluator
from fairchem.core.modules.loss import DDPLoss

#: fairchem's per-structure S2EF metric: energy and every scored atom's forces within thresholds
THRESHOLD_METRIC = "energy_forces_within_threshold"


class ZeroSafeDDPLoss(DDPLoss):
    """fairchem's :class:`DDPLoss` whose mean divides by ``max(global count, 1)``.

    Identical to ``DDPLoss`` whenever at least one sample exists across ranks; returns 0 instead
    of 0/0 = NaN when none does. Every rank still makes the same all-reduce every call, so a rank
    without samples cannot desynchronise DDP.
    """

    def _ddp_mean(self, num_samples: int, loss: torch.Tensor) -> torch.Tensor:
        global_samples = distutils.all_reduce(num_samples, device=loss.device)
        if torch.is_tensor(global_samples):
            global_samples = global_samples.clamp_min(1)
        else:
            global_samples = max(global_samples, 1)
        return loss * distutils.get_world_size() / global_samples


def denoising_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, dict[str, float]]:
    """Evaluator-style stats of the noise prediction on corrupted atoms.

    Parameters
    ----------
    pred, target: ``[M, 3]`` predicted and true normalised noise eps/sigma of the M corrupted atoms.

    Returns
    -------
    ``{"denoising_noise_mae": ..., "denoising_noise_l2mae": ...}``, each ``{metric, total, numel}``.
    """
    err = (pred.detach() - target).float()
    # one host sync per step: both sums come back together
    abs_total, norm_total = torch.stack([err.abs().sum(), err.norm(dim=-1).sum()]).tolist()
    n_components, n_atoms = err.numel(), err.shape[0]
    return {
        "denoising_noise_mae": {
            "metric": abs_total / max(n_components, 1),
            "total": abs_total,
            "numel": n_components,
        },
        "denoising_noise_l2mae": {
            "metric": norm_total / max(n_atoms, 1),
            "total": norm_total,
            "numel": n_atoms,
        },
    }


class ScoredStructuresEvaluator(Evaluator):
    """fairchem's :class:`Evaluator` for the training metrics of a DeNS step, where
    ``target["natoms"]`` counts each structure's scored (free, uncorrupted) atoms and may be 0.

    * ``energy_forces_within_threshold`` takes a max over each structure's atoms: structures
      with no scored atom are left out of it (their forces cannot be judged); none left, it is
      not updated this step.
    * the properties in ``skip`` (atom-level targets when no atom at all is scored on this rank)
      are not evaluated: an empty set would give 0/0.

    Every other metric is fairchem's, computed exactly as by ``evaluator``.
    """

    def __init__(self, evaluator: Evaluator, skip: Collection[str] = ()) -> None:
        super().__init__(evaluator.task, evaluator.target_metrics)
        self.skip = set(skip)

    def _subset(self, keep_threshold: bool) -> dict[str, list[str]]:
        subset = {}
        for prop, fns in self.target_metrics.items():
            kept = [fn for fn in fns if (fn == THRESHOLD_METRIC) == keep_threshold]
            if kept and prop not in self.skip:
                subset[prop] = kept
        return subset

    def eval(self, prediction, target, prev_metrics=None):
        metrics = prev_metrics or {}
        others = self._subset(keep_threshold=False)
        if others:
            metrics = Evaluator(self.task, others).eval(prediction, target, metrics)
        threshold = self._subset(keep_threshold=True)
        scored = target["natoms"] > 0
        if not threshold or self.skip or not bool(scored.any()):
            return metrics
        if not bool(scored.all()):
            prediction, target = (
                {**d, "energy": d["energy"][scored], "natoms": d["natoms"][scored]}
                for d in (prediction, target))
        return Evaluator(self.task, threshold).eval(prediction, target, metrics)

