"""Per-structure filters that keep structures out of DeNS (``optim.dens.max_force_norm``,
``min_num_atoms``, ``max_stress``), as later DeNS trainers (EquiformerV3-style) do.

A filtered structure is treated like one flagged by ``skip_key``: it is never corrupted but
still trains energy/forces as a plain structure. The filters only feed the ``skip`` flag of
:func:`~fairchem_dens.corruption.sample_corruption`, which draws the same random numbers
whatever is skipped, so switching a filter on leaves the corruption stream of the other
structures unchanged. Everything here runs on the CPU batch before it moves to the device.
"""

from __future__ import annotations

import torch

from fairchem_dens.config import DeNSConfig, DeNSConfigError
from fairchem_dens.corruption import HOST

# Filter name (the optim.dens key) -> training metric counting the structures it skipped.
FILTER_KEYS = ("max_force_norm", "min_num_atoms", "max_stress")


def skipped_metric(name: str) -> str:
    """Training metric of filter ``name``: structures of the step it kept out of DeNS."""
    return f"dens_skipped_{name}"


def filter_flags(
    cfg: DeNSConfig,
    natoms: torch.Tensor,
    forces: torch.Tensor | None,
    stress: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Which structures each enabled filter keeps out of DeNS.

    Parameters
    ----------
    cfg: DeNS settings; a filter whose key is ``None`` is off and absent from the result.
    natoms: ``[B]`` atoms per structure (atoms ordered structure by structure).
    forces: ``[N, 3]`` raw (un-normalised) forces in eV/Angstrom, or ``None`` when the batch
        has none (then ``max_force_norm`` is an error).
    stress: ``[B, 3, 3]`` (or ``[B, 9]``) stress in the units of the data's stress target, or
        ``None`` when the batch has none (then ``max_stress`` is an error).

    Returns
    -------
    ``{key: bool [B]}`` for each enabled filter, True where the structure is skipped:
    ``max_force_norm``: the largest per-atom force norm exceeds it; ``min_num_atoms``: fewer
    atoms than it; ``max_stress``: the largest absolute stress component exceeds it.
    """
    natoms = natoms.detach().to(HOST).long().view(-1)
    flags: dict[str, torch.Tensor] = {}
    if cfg.max_force_norm is not None:
        if forces is None:
            raise DeNSConfigError(
                f"optim.dens.max_force_norm={cfg.max_force_norm!r} filters structures by their "
                f"largest force, but the training batch has no '{cfg.forces_key}': add forces "
                "to the data (or name them with optim.dens.forces_key), or remove max_force_norm")
        norms = forces.detach().to(HOST).view(-1, 3).double().norm(dim=-1)  # [N] eV/A
        structure_of_atom = torch.repeat_interleave(
            torch.arange(natoms.numel(), device=HOST), natoms)
        largest = torch.zeros(natoms.numel(), dtype=norms.dtype, device=HOST).scatter_reduce(
            0, structure_of_atom, norms, reduce="amax", include_self=True)
        flags["max_force_norm"] = largest > cfg.max_force_norm
    if cfg.min_num_atoms is not None:
        flags["min_num_atoms"] = natoms < cfg.min_num_atoms
    if cfg.max_stress is not None:
        if stress is None:
            raise DeNSConfigError(
                f"optim.dens.max_stress={cfg.max_stress!r} filters structures by their stress, "
                f"but the training batch has no '{cfg.stress_key}': add a stress target to the "
                "data (fairchem-dens convert writes `stress` [1, 3, 3] eV/A^3), name it with "
                "optim.dens.stress_key, or remove max_stress")
        if stress.numel() != 9 * natoms.numel():
            raise DeNSConfigError(
                f"optim.dens.max_stress: the batch's '{cfg.stress_key}' has shape "
                f"{tuple(stress.shape)} for {natoms.numel()} structures; it must hold one 3x3 "
                "stress per structure ([B, 3, 3]); fix the data or optim.dens.stress_key")
        stress = stress.detach().to(HOST).double().reshape(natoms.numel(), 9)
        flags["max_stress"] = stress.abs().amax(dim=1) > cfg.max_stress
    return flags
