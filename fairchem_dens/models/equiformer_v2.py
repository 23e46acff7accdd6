"""DeNS EquiformerV2: fairchem 1.10's ``equiformer_v2_backbone`` plus force encoding, and a noise
head of the same kind as its force head. Use in configs by dotted path::

    model:
      name: hydra
      backbone: {model: fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone, ...}
      heads:
        energy: {module: equiformerV2_scalar_head}
        forces: {module: equiformerV2_vector_head}
        noise: {module: fairchem_dens.models.equiformer_v2.DeNSEquiformerV2NoiseHead}
"""

from __future__ import annotations

from typing import Any

from fairchem.core.models.base import BackboneInterface
from fairchem.core.models.equiformer_v2.equiformer_v2 import EquiformerV2Backbone
from fairchem.core.models.equiformer_v2.heads import EqV2VectorHead

from fairchem_dens.models.dens import DeNSBackboneMixin, DeNSNoiseHeadMixin


class DeNSEquiformerV2Backbone(DeNSBackboneMixin, EquiformerV2Backbone):
    """EquiformerV2 whose initial node embedding (atom + edge-degree embedding, the input of the
    first transformer block) also receives the force encoding of corrupted atoms."""

    dens_seam = "blocks.0"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.num_layers < 1:
            raise ValueError("DeNSEquiformerV2Backbone needs num_layers >= 1")
        self._init_dens()


class DeNSEquiformerV2NoiseHead(DeNSNoiseHeadMixin, EqV2VectorHead):
    """Noise head: an SO(2) equivariant graph-attention block like the force head's, predicting
    the normalised noise eps/sigma ``[N, 3]`` (key ``noise``) from the l = 1 coefficients."""

    def __init__(self, backbone: BackboneInterface, output_name: str = "noise") -> None:
        super().__init__(backbone, output_name=output_name)
