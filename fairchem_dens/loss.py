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

    ``check_finite=False`` (the DeNS term): non-finite predictions are zeroed as ``DDPLoss``
    zeroes them (``nan_to_num``, the identity on finite values, so the value and gradients are
    the same), without ``DDPLoss``'s test ``not torch.all(input.isfinite())``, a host-device
    sync per term, and so without its warning.
    """

    def __init__(self, loss_name, reduction=None, check_finite: bool = True) -> None:
        super().__init__(loss_name, reduction)
        self.check_finite = check_finite

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                natoms: torch.Tensor) -> torch.Tensor:
        if self.check_finite:
            return super().forward(input, target, natoms)
        if input.shape != target.shape:
            raise ValueError(f"Mismatched shapes: {input.shape} and {target.shape}")
        input = torch.nan_to_num(input, nan=0.0)  # DDPLoss's fix, applied unconditionally
        return self._reduction(input, self.loss_fn(input, target, natoms), natoms)

    def _ddp_mean(self, num_samples: int, loss: torch.Tensor) -> torch.Tensor:
        global_samples = distutils.all_reduce(num_samples, device=loss.device)
        if torch.is_tensor(global_samples):
            global_samples = global_samples.clamp_min(1)
        else:
            global_samples = max(global_samples, 1)
        return loss * distutils.get_world_size() / global_samples


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` for rows given as indices (long, no device sync: ``index_select``) or as a
    bool mask (boolean indexing, one sync on a device)."""
    return x[rows] if rows.dtype == torch.bool else x.index_select(0, rows)


def has_rows(rows: torch.Tensor) -> bool:
    """Whether ``rows`` (indices, or a bool mask) selects any row; free for indices (a shape)."""
    return bool(rows.any()) if rows.dtype == torch.bool else rows.numel() > 0


class StructureSubsetLoss(torch.nn.Module):
    """A per-structure loss term (fairchem's ``fn(pred, target, natoms)`` with ``[B, k]`` rows)
    taken over the structures in ``keep`` only: the stress of a DeNS step, whose corrupted
    structures have no stress label (``optim.dens.uncorrupted_structure_targets``).

    ``keep``: bool ``[B]``, or long ``[B']`` row indices (the trainer's, built on the host:
    ``index_select`` needs no device sync) with ``num_structures`` = ``B``.

    ``fn`` is called exactly once per call, with the kept rows (possibly none), so a DDP mean
    all-reduces its count in the same order on every rank.
    """

    def __init__(self, fn: torch.nn.Module, keep: torch.Tensor,
                 num_structures: int | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.keep = keep  # bool [B] or long [B']
        if keep.dtype == torch.bool:
            num_structures = keep.numel()
        elif num_structures is None:
            raise ValueError("StructureSubsetLoss: row indices need num_structures")
        self.num_structures = num_structures

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                natoms: torch.Tensor) -> torch.Tensor:
        if pred.shape[0] != self.num_structures:
            raise ValueError(f"a per-structure loss term has {pred.shape[0]} rows for "
                             f"{self.num_structures} structures")
        rows = self.keep
        return self.fn(take_rows(pred, rows), take_rows(target, rows),
                       natoms=take_rows(natoms, rows))


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
    scored_index: torch.Tensor | None = None,
    corrupted_index: torch.Tensor | None = None,
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
    scored_index, corrupted_index: long ``[K]`` / ``[M]``, the free uncorrupted and the
        corrupted atoms (ascending), when the caller built them on the host: the rows are then
        gathered without the device sync of boolean indexing (same rows, same order, same sum).

    Returns
    -------
    Scalar loss, already multiplied by the world size as ``DDPLoss`` does (DDP averages gradients).
    """
    scored = free & ~corrupted if scored_index is None else scored_index
    forces_err = take_rows(forces_pred - forces_target, scored).norm(dim=-1)
    total = forces_coefficient * forces_err.sum()
    if noise_pred is not None:
        rows = corrupted if corrupted_index is None else corrupted_index
        noise_err = take_rows(noise_pred - noise_target, rows).norm(dim=-1)
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
    err = pred.detach() - target
    err = err.to(torch.promote_types(err.dtype, torch.float32))  # bf16 summed in float32
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
      on the structures its rows select (a bool mask ``[B]`` or long indices; not at all when
      none).
    * ``scored_rows``: long indices of the structures with a scored atom, when the caller knows
      them on the host (the trainer's corruption draw does); ``None`` finds them from
      ``target["natoms"] > 0`` (device syncs).
    * the per-structure properties in ``structure_natoms`` (energy, stress) are evaluated with
      ``natoms`` = its tensor ``[B]``, each structure's free atoms as fairchem counts them for a
      plain step (``energy_per_atom_mae`` divides by them, not by the scored atoms).

    Every other metric is fairchem's, computed exactly as by ``evaluator``.
    """

    def __init__(self, evaluator: Evaluator, skip: Collection[str] = (),
                 structure_rows: dict[str, torch.Tensor] | None = None,
                 structure_natoms: tuple[Collection[str], torch.Tensor] | None = None,
                 scored_rows: torch.Tensor | None = None) -> None:
        super().__init__(evaluator.task, evaluator.target_metrics)
        self.skip = set(skip)
        self.scored_rows = scored_rows
        self.structure_rows = dict(structure_rows or {})
        self.structure_props, self.structure_natoms = (
            (set(structure_natoms[0]), structure_natoms[1]) if structure_natoms else (set(), None))

    def _with_natoms(self, prop: str, d: dict) -> dict:
        """``d`` with the natoms a per-structure property is evaluated with."""
        if prop in self.structure_props and self.structure_natoms is not None:
            return {**d, "natoms": self.structure_natoms}
        return d

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
        atom_level = {p: f for p, f in others.items() if p not in self.structure_props}
        if atom_level:
            metrics = Evaluator(self.task, atom_level).eval(prediction, target, metrics)
        for prop in others.keys() - atom_level.keys():
            pair = (self._with_natoms(prop, d) for d in (prediction, target))
            metrics = Evaluator(self.task, {prop: others[prop]}).eval(*pair, metrics)
        for prop, rows in self.structure_rows.items():
            fns = [fn for fn in self.target_metrics.get(prop, []) if fn != THRESHOLD_METRIC]
            if fns and prop in prediction and has_rows(rows):
                kept = ({prop: take_rows(d[prop], rows),
                         "natoms": take_rows(self._with_natoms(prop, d)["natoms"], rows)}
                        for d in (prediction, target))
                metrics = Evaluator(self.task, {prop: fns}).eval(*kept, metrics)
        threshold = self._subset(keep_threshold=True)
        if not threshold or self.skip:
            return metrics
        scored = self.scored_rows if self.scored_rows is not None else target["natoms"] > 0
        num_scored = scored.numel() if scored.dtype != torch.bool else int(scored.sum())
        if num_scored == 0:
            return metrics
        if num_scored < target["natoms"].shape[0]:
            prediction, target = (
                {**d, "energy": take_rows(d["energy"], scored),
                 "natoms": take_rows(d["natoms"], scored)}
                for d in (prediction, target))
        return Evaluator(self.task, threshold).eval(prediction, target, metrics)

