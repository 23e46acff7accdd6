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

from fairchem_dens.models.dens import DeNSBackboneMixin, ForceHeadNoiseMixin

if TYPE_CHECKING:
    import torch


class DeNSeSCNBackbone(DeNSBackboneMixin, eSCNBackbone):
    """eSCN whose initial node embedding (the atom embedding, input of the first layer block)
    also receives the force encoding of corrupted atoms."""

    dens_seam = "layer_blocks.0"
    force_encoding_init = 0.001  # U(+-0.001) weights, as the authors' escn_denoising.py

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_dens(weight_init_bound=self.force_encoding_init)


class DeNSeSCNNoiseHead(ForceHeadNoiseMixin, eSCNForceHead):
    """Noise head: an eSCN force block (grid sampling + projection on the sphere points)
    predicting the normalised noise eps/sigma ``[N, 3]`` (key ``noise``).

    The force block works on each atom's own sphere samples, so with ``restrict_to_corrupted``
    (default) it runs on the corrupted atoms' samples only; other rows are zero."""

    def _restrict(self, emb: dict[str, Any], mask: torch.Tensor) -> dict[str, Any] | None:
        atoms = self.corrupted_atoms(mask)  # [N'], host-built by the trainer: no sync
        if atoms.numel() == 0:
            return None
        values = emb["sphere_values"]  # [N * S, C], S sphere samples per atom
        per_atom = values.view(mask.shape[0], self.force_block.num_sphere_samples, -1)
        selected = per_atom.index_select(0, atoms)  # [N', S, C]
        return {**emb, "sphere_values": selected.flatten(0, 1)}

    def _expand(self, out: dict[str, torch.Tensor], mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        atoms = self.corrupted_atoms(mask)  # the corrupted rows, filled in order
        return {key: value.new_zeros(mask.shape[0], 3).index_copy(0, atoms, value)
                for key, value in out.items()}  # [N', 3] -> [N, 3]
