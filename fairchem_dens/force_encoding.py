"""Force encoding (paper Eq. 5): x_f^(L) = SO3_Linear^(L)(|f| * Y^(L)(f / |f|)), L = 0..lmax."""

from __future__ import annotations

import torch
from e3nn import o3
from fairchem.core.models.equiformer_v2.so3 import SO3_Embedding, SO3_LinearV2
from torch import nn


class ForceEncoding(nn.Module):
    """Embeds per-atom force vectors as SO(3) node features; atoms outside ``mask`` get exactly 0.

    Parameters
    ----------
    lmax: maximum degree of the node embedding it is added to.
    channels: number of channels (``sphere_channels``) of that embedding.
    weight_init_bound: if set, the linear weights are drawn from U(-bound, bound) instead of
        SO3_LinearV2's default U(-1, 1) (the authors' eSCN uses 0.001); the bias stays 0.
    """

    def __init__(self, lmax: int, channels: int, weight_init_bound: float | None = None) -> None:
        super().__init__()
        self.lmax = lmax
        self.channels = channels
        self.linear = SO3_LinearV2(1, channels, lmax=lmax)
        if weight_init_bound is not None:
            nn.init.uniform_(self.linear.weight, -weight_init_bound, weight_init_bound)

    def forward(self, forces: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode forces.

        Parameters
        ----------
        forces: ``[N, 3]`` (normalised) forces.
        mask: bool ``[N]``, atoms whose forces are encoded.

        Returns
        -------
        ``[N, (lmax + 1) ** 2, channels]`` embedding, zero on rows where ``mask`` is false
        (masking happens after the linear layer, whose l = 0 bias would otherwise leak in).
        """
        norm = forces.norm(dim=-1, keepdim=True)  # [N, 1]
        direction = forces / norm.clamp_min(torch.finfo(forces.dtype).tiny)  # 0 where |f| = 0
        sh = o3.spherical_harmonics(
            list(range(self.lmax + 1)), direction, normalize=False, normalization="component"
        )  # [N, (lmax+1)^2]; Y(0) = (1, 0, ...), times |f| = 0 gives a zero encoding, no NaN
        x = SO3_Embedding(0, [self.lmax], 1, device=forces.device, dtype=forces.dtype)
        x.set_embedding((sh * norm).unsqueeze(-1))  # [N, (lmax+1)^2, 1]
        # SO3_Linear has an l = 0 bias (Eq. 5): a corrupted atom with |f| = 0 is encoded as that
        # bias alone, which still marks it as corrupted. The official code zeroes the input of
        # uncorrupted atoms but applies the linear layer, hence its bias, to every atom on every
        # forward (training and eval), so its plain model carries a learned constant; we mask the
        # output instead, so uncorrupted atoms and inference see exactly the plain backbone.
        encoded = self.linear(x).embedding  # [N, (lmax+1)^2, channels]
        return encoded * mask.view(-1, 1, 1).to(encoded.dtype)
