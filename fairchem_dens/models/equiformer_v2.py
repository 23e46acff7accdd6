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

import dataclasses
from typing import Any

import torch
from fairchem.core.models.base import BackboneInterface
from fairchem.core.models.equiformer_v2.equiformer_v2 import EquiformerV2Backbone
from fairchem.core.models.equiformer_v2.heads import EqV2VectorHead
from fairchem.core.models.equiformer_v2.so3 import SO3_Rotation
from torch import nn

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


class _EdgeSubsetRotation(SO3_Rotation):
    """The backbone's per-edge Wigner-D matrices (``wigner``, ``wigner_inv``: ``[E', K, K]``)
    for a subset of its edges, selected anew on every forward by :meth:`select`.

    Shares the backbone rotation's coefficient mapping, so the head's state-dict keys (and
    checkpoints) are those of the stock head."""

    def __init__(self, full: SO3_Rotation) -> None:
        super().__init__(full.lmax)
        self.mapping = full.mapping
        self._full = (full,)  # owned by the backbone, not a submodule of the head

    def select(self, edges: torch.Tensor) -> None:
        """Keep the rows of the backbone's current Wigner-D matrices at ``edges`` ``[E']``."""
        full = self._full[0]
        self.wigner = full.wigner.index_select(0, edges)
        self.wigner_inv = full.wigner_inv.index_select(0, edges)


class DeNSEquiformerV2NoiseHead(DeNSNoiseHeadMixin, EqV2VectorHead):
    """Noise head: an SO(2) equivariant graph-attention block like the force head's, predicting
    the normalised noise eps/sigma ``[N, 3]`` (key ``noise``) from the l = 1 coefficients.

    With ``restrict_to_corrupted`` (default) the block runs over the edges whose target atom is
    corrupted only: its attention softmax and message sum are per target atom over all of that
    atom's edges, so a corrupted atom's output is unchanged, and an uncorrupted atom gets no
    message (its row is zero). The edge inputs the stock block consumes (``edge_index``, the
    edge features ``edge_distance``, the Wigner-D rotations) are cut to those edges; node inputs
    stay whole (source atoms of any kind send messages)."""

    def __init__(self, backbone: BackboneInterface, output_name: str = "noise",
                 restrict_to_corrupted: bool = True) -> None:
        super().__init__(backbone, output_name=output_name,
                         restrict_to_corrupted=restrict_to_corrupted)
        if restrict_to_corrupted:  # else the stock block with the backbone's rotations
            self.force_block.SO3_rotation = nn.ModuleList(
                _EdgeSubsetRotation(rotation) for rotation in backbone.SO3_rotation
            )

    def _restrict(self, emb: dict[str, Any], mask: torch.Tensor) -> dict[str, Any] | None:
        graph = emb["graph"]
        # edges into corrupted atoms, in their original order (so per-atom sums add in the
        # same order); nonzero is this head's one host<->device sync, which the trainer's
        # host-built atom indices cannot spare: the edges are built on the device (otf_graph)
        edges = mask[graph.edge_index[1]].nonzero().squeeze(1)  # [E']
        if edges.numel() == 0:
            return None
        for rotation in self.force_block.SO3_rotation:
            rotation.select(edges)
        restricted = dataclasses.replace(
            graph,
            edge_index=graph.edge_index.index_select(1, edges),  # [2, E']
            edge_distance=graph.edge_distance.index_select(0, edges),  # [E', edge channels]
        )
        return {**emb, "graph": restricted}
