"""DeNS eSEN: fairchem 1.10's ``esen_backbone`` plus force encoding, and a noise head of the same
kind as eSEN's direct force head (``esen_linear_force_head``). Use in configs by dotted path::

    model:
      name: hydra
      backbone: {model: fairchem_dens.models.esen.DeNSeSENBackbone, ...}
      heads:
        energy: {module: esen_mlp_energy_head}      # direct forces, or instead
        forces: {module: esen_linear_force_head}    # efs: {module: esen_mlp_efs_head}
        noise: {module: fairchem_dens.models.esen.DeNSeSENNoiseHead}

With ``esen_mlp_efs_head`` (forces and stress as gradients of the energy) the backbone and heads
run unchanged; which terms a corrupted structure then contributes to the loss is defined in
``docs/esen.md`` (not wired into the trainer yet).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fairchem.core.models.esen.esen import Linear_Force_Head, eSEN_Backbone

from fairchem_dens.models.dens import DeNSBackboneMixin, ForceHeadNoiseMixin

if TYPE_CHECKING:
    import torch


class DeNSeSENBackbone(DeNSBackboneMixin, eSEN_Backbone):
    """eSEN whose initial node embedding (the atom embedding ``[N, (lmax+1)^2, C]``, a plain
    tensor, first argument of the edge-degree embedding) also receives the force encoding of
    corrupted atoms.

    Seam: ``edge_degree_embedding`` adds its edge sum to its first argument, so encoding its input
    gives the same sum as encoding the input of ``blocks.0`` (the authors' eSEN and EquiformerV2
    ports add it at this point too), and it also runs for a structure without edges, where eSEN
    skips its blocks. The encoding depends on the (fixed) encoded forces and the mask, never on
    ``pos``: gradient forces and stress (``esen_mlp_efs_head``) are derivatives of the same
    energy function, evaluated with the encoding held fixed.
    """

    dens_seam = "edge_degree_embedding"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_dens()

    @property
    def lmax_list(self) -> list[int]:
        """eSEN has one resolution, ``lmax``; the mixin reads it as ``lmax_list``."""
        return [self.lmax]


class DeNSeSENNoiseHead(ForceHeadNoiseMixin, Linear_Force_Head):
    """Noise head: eSEN's direct force readout (an SO(3) linear map of the l <= 1 coefficients of
    the node embedding to one channel, whose l = 1 part is the vector) predicting the normalised
    noise eps/sigma ``[N, 3]`` (key ``noise``)."""

    def _restrict(self, emb: dict[str, Any], mask: torch.Tensor) -> dict[str, Any] | None:
        """A per-atom linear readout: each row depends on its own atom's embedding only, so
        there is no message passing to cut; the readout of all rows costs what a gather of the
        corrupted rows would (no host sync: ``_expand`` zeroes the other rows)."""
        return emb

    def _expand(self, out: dict[str, torch.Tensor], mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        keep = mask.unsqueeze(-1)  # [N, 1]: rows of uncorrupted atoms are zero (the contract)
        return {key: value * keep.to(value.dtype) for key, value in out.items()}
