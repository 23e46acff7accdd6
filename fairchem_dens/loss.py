"""Loss reductions: fairchem's DDP mean made finite when a term has no samples anywhere (e.g. no
free, uncorrupted atom on any rank), the authors' OC20/OC22 shared free-atom reduction, and the
denoising metrics."""

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


class StructureSubsetLoss(torch.nn.Module):
    """A per-structure loss term (fairchem's ``fn(pred, target, natoms)`` with ``[B, k]`` rows)
    taken over the structures in ``keep`` only: the stress of a DeNS step, whose corrupted
    structures have no stress label (``optim.dens.uncorrupted_structure_targets``).

    ``fn`` is called exactly once per call, with the kept rows (possibly none), so a DDP mean
    all-reduces its count in the same order on every rank.
    """

    def __init__(self, fn: torch.nn.Module, keep: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        self.keep = keep  # bool [B]

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                natoms: torch.Tensor) -> torch.Tensor:
        if pred.shape[0] != self.keep.numel():
            raise ValueError(f"a per-structure loss term has {pred.shape[0]} rows for "
                             f"{self.keep.numel()} structures")
        return self.fn(pred[self.keep], target[self.keep], natoms=natoms[self.keep])


def shared_free_atom_loss(
    forces_pred: torch.Tensor,
    forces_target: torch.Tensor,
    noise_pred: torch.Tensor | None,
    noise_target: torch.Tensor,
    free: torch.Tensor,
    corrupted: torch.Tensor,
    forces_coefficient: float,
    dens_coefficient: float,
    num_counted: int | None = None,
) -> torch.Tensor:
    """The forces + DeNS loss of the authors' OC20/OC22 trainer (their
    ``compute_atomwise_denoising_pos_and_force_hybrid_loss``), reduced across ranks by
    fairchem's ``DDPLoss`` rule::

        (lambda_F sum_{free, uncorrupted} |F_pred - F| + lambda_DeNS sum_{corrupted} |e_pred - e|)
            / #(free or corrupted atoms of the batch, summed over ranks)

    with |.| the per-atom L2 norm (l2mae). Without ``all_atoms`` every corrupted atom is free, so
    the denominator is the batch's number of free atoms; with ``all_atoms`` the authors count the
    corrupted fixed atoms too. On one rank this is exactly the authors' ``torch.mean`` over those
    atoms; over several ranks the count is all-reduced (the authors average per-rank means).

    Parameters
    ----------
    forces_pred, forces_target: ``[N, 3]`` predicted and normalised true forces.
    noise_pred: ``[N, 3]`` predicted noise, or ``None`` when no atom is corrupted on this rank.
    noise_target: ``[N, 3]`` eps/sigma (or eps/std_high), zero where not corrupted.
    free: bool ``[N]``, atom is free (``fixed == 0``).
    corrupted: bool ``[N]``, atom was corrupted.
    forces_coefficient, dens_coefficient: lambda_F and lambda_DeNS.
    num_counted: this rank's number of free-or-corrupted atoms when the caller knows it on the
        host (the corruption draw does); ``None`` counts ``free | corrupted`` (one device sync).

    Returns
    -------
    Scalar loss, already multiplied by the world size as ``DDPLoss`` does (DDP averages gradients).
    """
    forces_err = (forces_pred - forces_target)[free & ~corrupted].norm(dim=-1)
    total = forces_coefficient * forces_err.sum()
    if noise_pred is not None:
        noise_err = (noise_pred - noise_target)[corrupted].norm(dim=-1)
        total = total + dens_coefficient * noise_err.sum()
    if num_counted is None:
        num_counted = int((free | corrupted).sum())
    count = distutils.all_reduce(num_counted, device=forces_pred.device)
    count = count.clamp_min(1) if torch.is_tensor(count) else max(count, 1)
    return total * distutils.get_world_size() / count


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
    * the per-structure properties in ``structure_rows`` (stress of a DeNS step) are evaluated
      on the structures where its mask ``[B]`` is true (not at all when none is).

    Every other metric is fairchem's, computed exactly as by ``evaluator``.
    """

    def __init__(self, evaluator: Evaluator, skip: Collection[str] = (),
                 structure_rows: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(evaluator.task, evaluator.target_metrics)
        self.skip = set(skip)
        self.structure_rows = dict(structure_rows or {})

    def _subset(self, keep_threshold: bool) -> dict[str, list[str]]:
        subset = {}
        for prop, fns in self.target_metrics.items():
            kept = [fn for fn in fns if (fn == THRESHOLD_METRIC) == keep_threshold]
            if kept and prop not in self.skip and prop not in self.structure_rows:
                subset[prop] = kept
        return subset

    def eval(self, prediction, target, prev_metrics=None):
        metrics = prev_metrics or {}
        others = self._subset(keep_threshold=False)
        if others:
            metrics = Evaluator(self.task, others).eval(prediction, target, metrics)
        for prop, rows in self.structure_rows.items():
            fns = [fn for fn in self.target_metrics.get(prop, []) if fn != THRESHOLD_METRIC]
            if fns and prop in prediction and bool(rows.any()):
                kept = ({prop: d[prop][rows], "natoms": d["natoms"][rows]}
                        for d in (prediction, target))
                metrics = Evaluator(self.task, {prop: fns}).eval(*kept, metrics)
        threshold = self._subset(keep_threshold=True)
        scored = target["natoms"] > 0
        if not threshold or self.skip or not bool(scored.any()):
            return metrics
        if not bool(scored.all()):
            prediction, target = (
                {**d, "energy": d["energy"][scored], "natoms": d["natoms"][scored]}
                for d in (prediction, target))
        return Evaluator(self.task, threshold).eval(prediction, target, metrics)

