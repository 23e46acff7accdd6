"""Corrupting structures for DeNS (paper Sec. 3.2, Algorithm 1 lines 16-33). Pure torch.

Every call draws the same number of random numbers for a given batch shape (one structure
coin per structure or per batch, one sigma index per structure, one coin and three normals per
atom), whatever the outcome, so the stream of a run depends only on its seed and batch shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from fairchem_dens.config import DeNSConfig

# Attributes the trainer attaches to the (copied) batch the model sees on a DeNS step.
DENS_MASK_KEY = "dens_corrupted"  # bool [n_atoms]: atom was corrupted
DENS_FORCES_KEY = "dens_forces"  # float [n_atoms, 3]: normalised original forces to encode
DENS_INDEX_KEY = "dens_corrupted_index"  # long [n_corrupted]: the corrupted atoms, ascending

#: the host, where the corruption is drawn (explicit, so a default device set with
#: ``torch.set_default_device`` cannot move the draw)
HOST = torch.device("cpu")


@dataclass
class Corruption:
    """One draw of DeNS corruption for a batch of ``B`` structures and ``N`` atoms.

    Attributes
    ----------
    mask: bool ``[N]``, atom is corrupted (moved, force-encoded, denoised).
    noise: ``[N, 3]`` Angstrom, the displacement eps (zero for uncorrupted atoms).
    target: ``[N, 3]`` unitless, eps / sigma (or eps / std_high); zero where not corrupted.
    sigma: ``[B]`` Angstrom, the sigma drawn for each structure (0 if not selected).
    selected: bool ``[B]``, structure chosen for DeNS (coin won and not skipped).
    num_corrupted: number of corrupted atoms (host int, no device sync needed later).
    num_free_uncorrupted: number of free (``fixed == 0``) atoms left uncorrupted, the atoms the
        forces term is trained on (host int); 0 when every free atom of the batch is corrupted.
    corrupted_structures: bool ``[B]``, structure has at least one corrupted atom (its
        per-structure labels other than the energy, e.g. stress, belong to the unperturbed
        structure; see ``optim.dens.uncorrupted_structure_targets``).
    index: long ``[num_corrupted]``, the corrupted atoms in ascending order (``mask`` as
        indices, built on the host: selecting rows with it needs no device sync).
    free_uncorrupted_index: long ``[num_free_uncorrupted]``, the free uncorrupted atoms,
        ascending (the atoms the forces term is trained on).
    clean_structures: long ``[B']``, the structures without a corrupted atom, ascending
        (``~corrupted_structures`` as indices: the rows of the uncorrupted-structure targets).
    scored_structures: long ``[B'']``, the structures with at least one free uncorrupted
        atom, ascending (the rows of the ``energy_forces_within_threshold`` metric).
    skipped: structures each enabled filter of :mod:`fairchem_dens.filters` kept out of DeNS
        this step, ``{optim.dens key: host int}`` (a structure flagged by two filters counts in
        both); empty when no filter is on.
    """

    mask: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor
    sigma: torch.Tensor
    selected: torch.Tensor
    num_corrupted: int
    num_free_uncorrupted: int
    corrupted_structures: torch.Tensor
    index: torch.Tensor
    free_uncorrupted_index: torch.Tensor
    clean_structures: torch.Tensor
    scored_structures: torch.Tensor
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_structures(self) -> int:
        """``B`` (a host int: a shape)."""
        return self.selected.shape[0]

    def to(self, device: torch.device | str) -> Corruption:
        """Every tensor moved to ``device`` once (``non_blocking``: the host values are not
        read back); the host counts stay host ints."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if torch.is_tensor(value):
                moved[name] = value.to(device, non_blocking=True)
        moved["skipped"] = dict(self.skipped)
        return Corruption(**moved)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """CPU generator for one training step, a pure function of (seed, step, rank).

    Deriving each step's stream from the step counter makes a resumed run draw exactly what the
    uninterrupted run drew, and gives every DDP rank its own stream.
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(rank)])
    return torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0]) >> 1)


def sample_corruption(
    cfg: DeNSConfig,
    natoms: torch.Tensor,
    fixed: torch.Tensor | None,
    generator: torch.Generator,
    skip: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Corruption:
    """Draw which atoms to corrupt and by how much.

    Parameters
    ----------
    cfg: DeNS settings.
    natoms: ``[B]`` atoms per structure (atoms are ordered structure by structure).
    fixed: ``[N]`` 1 for fixed atoms, 0 for free ones (``None``: all free).
    generator: CPU generator (see :func:`step_generator`).
    skip: ``[B]`` non-zero for structures that must never be corrupted (e.g. OC20 MD frames).
    dtype: dtype of the returned noise/target.

    Returns
    -------
    A :class:`Corruption` on the host (CPU): every decision and count is made there, from the
    loader's CPU batch, before the batch moves to the device.
    """
    natoms = natoms.detach().to(HOST).long()
    num_structures, num_atoms = natoms.numel(), int(natoms.sum())
    structure_of_atom = torch.repeat_interleave(torch.arange(num_structures, device=HOST), natoms)

    # float32 coins whatever the default dtype: the stream must not depend on it
    num_coins = num_structures if cfg.selection == "structure" else 1
    sigmas = cfg.sigma_schedule(torch.float64)  # [T] Angstrom
    coins = torch.rand(num_coins, generator=generator, dtype=torch.float32, device=HOST)
    sigma_index = torch.randint(len(sigmas), (num_structures,), generator=generator, device=HOST)
    atom_coins = torch.rand(num_atoms, generator=generator, dtype=torch.float32, device=HOST)
    normals = torch.randn(num_atoms, 3, generator=generator, dtype=torch.float64, device=HOST)

    selected = (coins < cfg.prob).expand(num_structures).clone()
    if skip is not None:
        skip = skip.detach().to(HOST).view(-1)
        if skip.numel() != num_structures:
            raise ValueError(
                f"DeNS skip flag '{cfg.skip_key}' has {skip.numel()} values for "
                f"{num_structures} structures; it must hold one value per structure"
            )
        selected &= skip == 0

    free = torch.ones(num_atoms, dtype=torch.bool, device=HOST)
    if fixed is not None:
        free = fixed.detach().to(HOST).view(-1) == 0
    eligible = torch.ones(num_atoms, dtype=torch.bool, device=HOST) if cfg.all_atoms else free
    mask = selected[structure_of_atom] & eligible & (atom_coins < cfg.corrupt_ratio)

    zero = torch.zeros((), dtype=torch.float64, device=HOST)
    sigma = torch.where(selected, sigmas[sigma_index], zero)
    sigma_of_atom = sigma[structure_of_atom].unsqueeze(-1)
    noise = torch.where(mask.unsqueeze(-1), normals * sigma_of_atom, zero)
    scale = cfg.target_scale
    divisor = torch.full_like(sigma_of_atom, scale) if scale is not None else sigma_of_atom
    target = torch.where(mask.unsqueeze(-1), noise / divisor.clamp_min(1e-12), zero)
    corrupted_structures = _structures_with(structure_of_atom, mask, num_structures)
    scored = _structures_with(structure_of_atom, free & ~mask, num_structures)
    index, free_uncorrupted_index = mask.nonzero().view(-1), (free & ~mask).nonzero().view(-1)
    return Corruption(
        mask=mask,
        noise=noise.to(dtype),
        target=target.to(dtype),
        sigma=sigma.to(dtype),
        selected=selected,
        num_corrupted=index.numel(),
        num_free_uncorrupted=free_uncorrupted_index.numel(),
        corrupted_structures=corrupted_structures,
        index=index,
        free_uncorrupted_index=free_uncorrupted_index,
        clean_structures=(~corrupted_structures).nonzero().view(-1),
        scored_structures=scored.nonzero().view(-1),
    )


def _structures_with(structure_of_atom: torch.Tensor, atoms: torch.Tensor,
                     num_structures: int) -> torch.Tensor:
    """bool ``[B]``: the structure holds at least one atom of ``atoms`` (bool ``[N]``); host."""
    found = torch.zeros(num_structures, dtype=torch.bool, device=HOST)
    found[structure_of_atom[atoms]] = True
    return found
