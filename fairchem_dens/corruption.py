"""Corrupting structures for DeNS (paper Sec. 3.2, Algorithm 1 lines 16-33). Pure torch.

Every call draws the same number of random numbers for a given batch shape (one structure
coin per structure or per batch, one sigma index per structure, one coin and three normals per
atom), whatever the outcome, so the stream of a run depends only on its seed and batch shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fairchem_dens.config import DeNSConfig

# Attributes the trainer attaches to the (copied) batch the model sees on a DeNS step.
DENS_MASK_KEY = "dens_corrupted"  # bool [n_atoms]: atom was corrupted
DENS_FORCES_KEY = "dens_forces"  # float [n_atoms, 3]: normalised original forces to encode


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
    skipped: dict[str, int] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Corruption:
        return Corruption(
            self.mask.to(device),
            self.noise.to(device),
            self.target.to(device),
            self.sigma.to(device),
            self.selected.to(device),
            self.num_corrupted,
            self.num_free_uncorrupted,
            self.corrupted_structures.to(device),
            dict(self.skipped),
        )


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
    A :class:`Corruption` on the CPU.
    """
    natoms = natoms.detach().cpu().long()
    num_structures, num_atoms = natoms.numel(), int(natoms.sum())
    structure_of_atom = torch.repeat_interleave(torch.arange(num_structures), natoms)

    num_coins = num_structures if cfg.selection == "structure" else 1
    coins = torch.rand(num_coins, generator=generator)
    sigma_index = torch.randint(len(cfg.sigma_schedule()), (num_structures,), generator=generator)
    atom_coins = torch.rand(num_atoms, generator=generator)
    normals = torch.randn(num_atoms, 3, generator=generator, dtype=torch.float64)

    selected = (coins < cfg.prob).expand(num_structures).clone()
    if skip is not None:
        skip = skip.detach().cpu().view(-1)
        if skip.numel() != num_structures:
            raise ValueError(
                f"DeNS skip flag '{cfg.skip_key}' has {skip.numel()} values for "
                f"{num_structures} structures; it must hold one value per structure"
            )
        selected &= skip == 0

    free = torch.ones(num_atoms, dtype=torch.bool)
    if fixed is not None:
        free = fixed.detach().cpu().view(-1) == 0
    eligible = torch.ones(num_atoms, dtype=torch.bool) if cfg.all_atoms else free
    mask = selected[structure_of_atom] & eligible & (atom_coins < cfg.corrupt_ratio)

    sigma = torch.where(
        selected, cfg.sigma_schedule(torch.float64)[sigma_index], torch.zeros((), dtype=torch.float64)
    )
    sigma_of_atom = sigma[structure_of_atom].unsqueeze(-1)
    noise = torch.where(mask.unsqueeze(-1), normals * sigma_of_atom, torch.zeros(()))
    scale = cfg.target_scale
    divisor = torch.full_like(sigma_of_atom, scale) if scale is not None else sigma_of_atom
    target = torch.where(mask.unsqueeze(-1), noise / divisor.clamp_min(1e-12), torch.zeros(()))
    corrupted_structures = torch.zeros(num_structures, dtype=torch.bool)
    corrupted_structures[structure_of_atom[mask]] = True
    return Corruption(
        mask=mask,
        noise=noise.to(dtype),
        target=target.to(dtype),
        sigma=sigma.to(dtype),
        selected=selected,
        num_corrupted=int(mask.sum()),
        num_free_uncorrupted=int((free & ~mask).sum()),
        corrupted_structures=corrupted_structures,
    )
