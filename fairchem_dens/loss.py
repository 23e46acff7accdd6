"""Loss reduction that stays finite when a term has no samples anywhere (e.g. no free,
uncorrupted atom on any rank), and the denoising metrics."""

from __future__ import annotations

import torch
from fairchem.core.common import distutils
from fairchem.core.modules.loss import DDPLoss


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
