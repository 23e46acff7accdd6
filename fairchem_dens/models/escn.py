"""DeNS eSCN: fairchem 1.10's ``escn_backbone`` plus force encoding, and a noise head of the same
kind as eSCN's force block. Use in configs by dotted path::

    model:
      name: hydra
      backbone: {model: fairchem_dens.models.escn.DeNSeSCNBackbone, ...}
      heads:
        energy: {module: escn_energy_head}
        forces: {module: escn_force_head}
        noise: {module: fairchem_dens.models.escn.DeNSeSCNNoiseHead}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fairchem.core.models.escn.escn import eSCNBackbone, eSCNForceHead

from fairchem_dens.models.dens import DeNSBackboneMixin, DeNSNoiseHeadMixin

if TYPE_CHECKING:
    import torch
    from fairchem.core.models.base import BackboneInterface
    from torch_geometric.data import Batch


class DeNSeSCNBackbone(DeNSBackboneMixin, eSCNBackbone):
    """eSCN whose initial node embedding (the atom embedding, input of the first layer block)
    also receives the force encoding of corrupted atoms."""

    dens_seam = "layer_blocks.0"
    force_encoding_init = 0.001  # U(+-0.001) weights, as the authors' escn_denoising.py

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_dens(weight_init_bound=self.force_encoding_init)


class DeNSeSCNNoiseHead(DeNSNoiseHeadMixin, eSCNForceHead):
    """Noise head: an eSCN force block (grid sampling + projection on the sphere points)
    predicting the normalised noise eps/sigma ``[N, 3]`` (key ``noise``)."""

    def __init__(self, backbone: BackboneInterface, output_name: str = "noise") -> None:
        super().__init__(backbone)
        self.output_name = output_name

    def forward(self, data: Batch, emb: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = super().forward(data, emb)  # {} unless a corrupted training batch
        return {self.output_name: out["forces"]} if out else {}
