"""The DeNS model pieces shared by every SO(3)-embedding backbone (EquiformerV2, eSCN, ...).

A DeNS backbone is a plain fairchem backbone plus a :class:`ForceEncoding` whose output is added
to the initial SO(3) node embedding of corrupted atoms, hooked (forward pre-hook) onto the first
module that consumes that embedding. A DeNS noise head is a plain vector head that only runs on
training batches carrying corruption. At eval/inference neither does anything: the model is the
plain backbone and heads, with the same outputs.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from fairchem.core.common import gp_utils
from torch import nn

from fairchem_dens.corruption import DENS_FORCES_KEY, DENS_INDEX_KEY, DENS_MASK_KEY
from fairchem_dens.force_encoding import ForceEncoding

if TYPE_CHECKING:
    from torch_geometric.data import Batch

TRAINER_PATH = "fairchem_dens.trainer.DenoisingForcesTrainer"


class DeNSTrainerRequired(RuntimeError):
    """A DeNS module is being trained by a trainer that does not run DeNS."""


def attach_dens_trainer(model: nn.Module) -> None:
    """Mark the DeNS modules of ``model`` as driven by the DeNS trainer (called by
    :class:`~fairchem_dens.trainer.DenoisingForcesTrainer` once the model is built). Unmarked, a
    DeNS module refuses a training forward without DeNS inputs: under a plain fairchem trainer its
    parameters would never receive a gradient, and DDP fails at the second step."""
    for module in model.modules():
        if isinstance(module, (DeNSBackboneMixin, DeNSNoiseHeadMixin)):
            module.dens_trainer_attached = True


def _check_trainer(module: nn.Module, data: Batch) -> None:
    if not module.training or module.dens_trainer_attached or DENS_MASK_KEY in data:
        return
    raise DeNSTrainerRequired(
        f"{type(module).__name__} is being trained by a trainer that does not run DeNS (e.g. "
        "trainer: equiformerv2_forces): its force encoding and noise head would never be "
        "trained, and DDP stops at the second step with an unused-parameters error. Either set "
        f"`trainer: {TRAINER_PATH}` (optim.dens.prob: 0 trains it as a plain model), or "
        "convert a DeNS checkpoint to a plain one with `fairchem-dens export CKPT OUT` and "
        "train it with fairchem's plain backbone and heads (e.g. model.backbone.model: "
        "equiformer_v2_backbone, no noise head)."
    )


class DeNSBackboneMixin:
    """Adds force encoding to a fairchem backbone; put it first in the bases.

    A subclass provides

    * ``dens_seam``: dotted name of the submodule whose first positional argument is the initial
      SO(3) node embedding (an object with ``.embedding`` of shape ``[N, (lmax+1)^2, C]``, or
      that tensor itself, as in eSEN);
    * backbone attributes ``lmax_list`` (one resolution) and ``sphere_channels``;
    * a call to ``self._init_dens()`` at the end of ``__init__``.
    """

    dens_seam: ClassVar[str]
    dens_trainer_attached: bool = False  # set by attach_dens_trainer

    def _init_dens(self, weight_init_bound: float | None = None) -> None:
        """Build the force encoding (``weight_init_bound``: see :class:`ForceEncoding`) and hook it
        onto the seam."""
        if len(self.lmax_list) != 1:
            raise ValueError(
                f"DeNS force encoding supports one resolution, got lmax_list={self.lmax_list}; "
                "use a single lmax (e.g. lmax_list: [6])"
            )
        # Forked RNG: every plain parameter (backbone and heads built after it) is initialised
        # exactly as in a plain model with the same seed.
        with torch.random.fork_rng(devices=[]):
            self.force_encoding = ForceEncoding(self.lmax_list[0], self.sphere_channels,
                                                weight_init_bound)
        self._dens_input: tuple[torch.Tensor, torch.Tensor] | None = None
        seam = self.get_submodule(self.dens_seam)
        seam.register_forward_pre_hook(self._add_force_encoding, with_kwargs=True)

    def forward(self, data: Batch) -> dict[str, Any]:
        # Kept until the next forward (not cleared on return): with activation checkpointing the
        # seam runs again during backward and must add the same encoding.
        self._dens_input = None
        _check_trainer(self, data)
        if self.training and DENS_FORCES_KEY in data:
            if gp_utils.initialized():
                raise NotImplementedError("DeNS force encoding does not support graph parallelism")
            self._dens_input = (data[DENS_FORCES_KEY], data[DENS_MASK_KEY])
        return super().forward(data)

    def _add_force_encoding(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._dens_input is None or not self.training:
            return None
        forces, mask = self._dens_input
        if isinstance(args[0], torch.Tensor):  # eSEN: the embedding is a plain tensor
            x = args[0] + self.force_encoding(forces.to(args[0].dtype), mask)
            return (x, *args[1:]), kwargs
        x = copy.copy(args[0])  # shallow: the caller's embedding object is left untouched
        x.embedding = args[0].embedding + self.force_encoding(
            forces.to(x.embedding.dtype), mask
        )
        return (x, *args[1:]), kwargs


class DeNSNoiseHeadMixin:
    """Turns a vector head into the DeNS noise head: computed only on corrupted training batches,
    and there only for the corrupted atoms.

    Put it first in the bases of a head whose ``forward(data, emb)`` returns ``{name: [N, 3]}``
    and set ``self.output_name`` to that name. Its parameters are initialised under a forked RNG,
    so adding a noise head leaves every other parameter's initialisation unchanged.

    Output contract: ``{output_name: [N, 3]}`` on a training batch carrying
    ``data[DENS_MASK_KEY]`` (bool ``[N]``), ``{}`` otherwise. With ``restrict_to_corrupted``
    (the default) only the rows of corrupted atoms are computed; the other rows are zero and must
    not be read (the trainer reads ``noise[mask]`` only). Rows of corrupted atoms equal the full
    head's up to float rounding, and so do all gradients of a loss on those rows. A subclass
    provides ``_restrict(emb, mask)`` (the backbone outputs the stock head consumes, cut down to
    what the corrupted atoms' outputs depend on) and, when its head then returns fewer rows,
    ``_expand(out, mask)``. ``restrict_to_corrupted=False`` runs the stock head over the whole
    batch (kept for measurement); so does graph parallelism, which partitions nodes and edges.
    A subclass that gathers the corrupted atoms' rows takes their indices from
    :meth:`corrupted_atoms` (the trainer's host-built ``data[DENS_INDEX_KEY]``: no device sync).
    """

    output_name: str
    dens_trainer_attached: bool = False  # set by attach_dens_trainer

    def __init__(self, *args: Any, restrict_to_corrupted: bool = True, **kwargs: Any) -> None:
        with torch.random.fork_rng(devices=[]):
            super().__init__(*args, **kwargs)
        self._restrict_to_corrupted = restrict_to_corrupted
        self._corrupted_index: torch.Tensor | None = None

    @property
    def restrict_to_corrupted(self) -> bool:
        """Fixed at construction (a subclass may build its blocks for it)."""
        return self._restrict_to_corrupted

    def forward(self, data: Batch, emb: dict[str, Any]) -> dict[str, torch.Tensor]:
        _check_trainer(self, data)
        if not (self.training and DENS_MASK_KEY in data):
            return {}
        if not self.restrict_to_corrupted or gp_utils.initialized():
            return super().forward(data, emb)
        mask = data[DENS_MASK_KEY].bool()  # [N]; a no-op on the trainer's bool mask
        self._corrupted_index = getattr(data, DENS_INDEX_KEY, None)
        restricted = self._restrict(emb, mask)
        if restricted is None:  # nothing corrupted: nothing to compute, every row is zero
            return {self.output_name: data.pos.new_zeros(mask.shape[0], 3)}
        return self._expand(super().forward(data, restricted), mask)

    def corrupted_atoms(self, mask: torch.Tensor) -> torch.Tensor:
        """long ``[M]``: the corrupted atoms of this forward, ascending, i.e. ``mask`` (bool
        ``[N]``) as indices: the trainer's host-built ones when the batch carries them, else
        ``mask.nonzero()`` (one device sync, kept for the rest of the forward)."""
        if self._corrupted_index is None:
            self._corrupted_index = mask.nonzero().view(-1)
        return self._corrupted_index

    def _restrict(self, emb: dict[str, Any], mask: torch.Tensor) -> dict[str, Any] | None:
        """``emb`` cut down to what the outputs of the atoms in ``mask`` (bool ``[N]``) depend
        on; ``None`` when that is nothing."""
        raise NotImplementedError(f"{type(self).__name__} does not define _restrict")

    def _expand(self, out: dict[str, torch.Tensor], mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """``out`` of the restricted head as ``[N, 3]`` rows (default: already are)."""
        return out


class ForceHeadNoiseMixin(DeNSNoiseHeadMixin):
    """:class:`DeNSNoiseHeadMixin` for a stock force head whose ``__init__`` takes only the
    backbone and whose output is one ``[N, 3]`` entry under its own name (``forces``): the entry
    is returned as ``output_name``. Put it first in the bases; a subclass still provides
    ``_restrict`` (and ``_expand``)."""

    def __init__(self, backbone: Any, output_name: str = "noise",
                 restrict_to_corrupted: bool = True) -> None:
        super().__init__(backbone, restrict_to_corrupted=restrict_to_corrupted)
        self.output_name = output_name

    def forward(self, data: Batch, emb: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = super().forward(data, emb)  # {} unless a corrupted training batch
        # its one entry, named by the stock head (or ``output_name`` when nothing is corrupted)
        return {self.output_name: next(iter(out.values()))} if out else {}


def dens_only_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that exist only for DeNS (force encoding and noise heads) in ``model``."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, (ForceEncoding, DeNSNoiseHeadMixin)):
            params.extend(p for p in module.parameters() if p.requires_grad)
    return params


def noise_head_names(model: nn.Module) -> list[str]:
    """Names of the DeNS noise heads of a fairchem ``HydraModel``."""
    heads = getattr(model, "output_heads", {})
    return [name for name, head in heads.items() if isinstance(head, DeNSNoiseHeadMixin)]
