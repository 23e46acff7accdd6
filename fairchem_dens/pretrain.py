"""Pre-training by denoising equilibrium structures (Zaidi et al. 2023), and fine-tuning after it.

Pre-training is the DeNS trainer with ``optim.dens.pretrain: true`` (see
:class:`~fairchem_dens.config.DeNSConfig`): every eligible atom is noised, no forces are
encoded, the model predicts eps/sigma with its noise head, plus the energy when the data has
one. DeNS reduces to it when forces vanish (DeNS paper, Sec. 3.1). This module holds the checks
around it:

* :func:`mean_force_magnitude` / :func:`check_equilibrium`: structures with large forces are
  not at equilibrium; denoising them towards their positions teaches a wrong target, so warn
  with the measured mean |F|.
* :func:`check_pretrain_config`: no validation split (fairchem's validation computes S2EF
  metrics from force labels that pre-training data need not have).
* :func:`starts_fine_tuning` / :func:`drop_training_state`: a checkpoint written by
  pre-training, loaded into a run that is not pre-training, starts a new schedule
  (``--checkpoint`` path).
* :func:`describe_finetune_config`: fairchem's ``model.finetune_config.starting_checkpoint``
  path — logs whether heads are kept from the checkpoint or re-initialised, and refuses the
  combinations fairchem would silently get wrong.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fairchem_dens.checkpoints import without_training_state
from fairchem_dens.config import DeNSConfig, DeNSConfigError

__all__ = ["check_equilibrium", "check_pretrain_config", "describe_finetune_config",
           "drop_training_state", "mean_force_magnitude", "starts_fine_tuning"]

# Heads whose family is known: a head is built on a backbone of its own family only.
_HEAD_FAMILIES = {
    "equiformerV2_scalar_head": "equiformer_v2_backbone",
    "equiformerV2_vector_head": "equiformer_v2_backbone",
    "fairchem_dens.models.equiformer_v2.DeNSEquiformerV2NoiseHead": "equiformer_v2_backbone",
    "escn_energy_head": "escn_backbone",
    "escn_force_head": "escn_backbone",
    "fairchem_dens.models.escn.DeNSeSCNNoiseHead": "escn_backbone",
    "esen_mlp_energy_head": "esen_backbone",
    "esen_linear_force_head": "esen_backbone",
    "esen_mlp_efs_head": "esen_backbone",
    "fairchem_dens.models.esen.DeNSeSENNoiseHead": "esen_backbone",
}


def mean_force_magnitude(dataset: Any, forces_key: str, max_structures: int = 256
                         ) -> tuple[float, int, int] | None:
    """Mean |F| (eV/Angstrom, raw labels) over the free atoms of up to ``max_structures``
    structures spread evenly over ``dataset``; ``(mean, atoms, structures)``, or ``None`` when
    the data carry no ``forces_key``."""
    n = len(dataset)
    if n == 0:
        return None
    indices = sorted({int(i) for i in torch.linspace(0, n - 1, min(n, max_structures))})
    total, atoms = 0.0, 0
    for i in indices:
        data = dataset[i]
        if forces_key not in data:
            return None
        forces = data[forces_key].view(-1, 3).double()
        free = data.fixed.view(-1) == 0 if "fixed" in data else torch.ones(len(forces), dtype=bool)
        total += float(forces[free].norm(dim=-1).sum())
        atoms += int(free.sum())
    return (total / atoms if atoms else 0.0), atoms, len(indices)


def check_equilibrium(dataset: Any, dens: DeNSConfig) -> float | None:
    """Warn when pre-training data carry forces above ``dens.equilibrium_force_tol``; returns
    the measured mean |F| (``None`` when the data have no forces)."""
    measured = mean_force_magnitude(dataset, dens.forces_key)
    if measured is None:
        logging.info(f"DeNS pre-training: the data have no '{dens.forces_key}'; taking the "
                     "structures as equilibrium structures")
        return None
    mean, atoms, structures = measured
    if mean > dens.equilibrium_force_tol:
        logging.warning(
            f"DeNS pre-training: the training structures carry forces of mean |F| = {mean:.3f} "
            f"eV/A over {atoms} free atoms of {structures} structures (tolerance "
            f"optim.dens.equilibrium_force_tol = {dens.equilibrium_force_tol}): they are not "
            "equilibrium structures, and denoising pulls atoms back to positions that are not "
            "energy minima. Pre-train on relaxed structures (e.g. the last frame of each "
            "relaxation, or IS2RE pos_relaxed), or train with DeNS (pretrain: false), which "
            "encodes these forces.")
    else:
        logging.info(f"DeNS pre-training: mean |F| = {mean:.4f} eV/A over {atoms} free atoms "
                     f"of {structures} structures (equilibrium)")
    return mean


def check_pretrain_config(dataset: dict | list | None) -> None:
    """Refuse settings pre-training cannot honour, naming the key and the fix. ``dataset``: the
    config's ``dataset`` section (``{train, val, ...}`` or fairchem's older list form)."""
    val = (dataset[1] if len(dataset) > 1 else None) if isinstance(dataset, list) else (
        (dataset or {}).get("val"))
    if "src" in (val or {}):
        raise DeNSConfigError(
            "optim.dens.pretrain is true but dataset.val is set: fairchem's validation computes "
            "S2EF metrics (energy/forces) that pre-training data need not have. Remove "
            "dataset.val (or set it to null when a config you include has one); the training "
            "log reports denoising_* metrics and the loss.")


def starts_fine_tuning(checkpoint: dict | None, dens: DeNSConfig | None) -> bool:
    """True for a checkpoint written by denoising pre-training loaded into a run that is not
    pre-training: its training state (optimizer, schedule, step) does not carry over."""
    saved = ((checkpoint or {}).get("config") or {}).get("optim", {}).get("dens") or {}
    return bool(saved.get("pretrain")) and not (dens is not None and dens.pretrain)


def drop_training_state(checkpoint: dict) -> dict:
    """``checkpoint`` without optimizer/scheduler state and step counters (logged)."""
    out, dropped = without_training_state(checkpoint)
    logging.info(
        "fine-tuning from a denoising pre-training checkpoint: all its weights (backbone and "
        f"heads) are kept; training state {dropped} dropped, the schedule starts at step 0")
    return out


def describe_finetune_config(model_config: dict) -> None:
    """Log what fairchem's ``finetune_config.starting_checkpoint`` will do with this model
    config; raise for combinations that would silently lose the pre-trained weights or put
    heads on a backbone of another architecture."""
    finetune = model_config.get("finetune_config")
    if not finetune:
        return
    path = finetune.get("starting_checkpoint")
    if model_config.get("backbone") is not None:
        raise DeNSConfigError(
            f"model.finetune_config.starting_checkpoint={path!r} and model.backbone are both "
            "set: fairchem then builds a fresh backbone from model.backbone and ignores the "
            "checkpoint's backbone weights. Remove model.backbone to fine-tune the pre-trained "
            "backbone.")
    heads = model_config.get("heads")
    if not heads:
        logging.info(f"fine-tuning from {path}: backbone and heads kept from the checkpoint "
                     "(model.heads is unset)")
        return
    from fairchem_dens.checkpoints import _backbone, backbone_family

    try:  # only the stored config is read here; fairchem loads the weights itself
        checkpoint = torch.load(path, map_location="cpu", mmap=True)
    except RuntimeError:  # not a zip-format checkpoint: mmap unsupported
        checkpoint = torch.load(path, map_location="cpu")
    stored = (checkpoint.get("config") or {}).get("model")
    if stored is None:
        raise DeNSConfigError(f"model.finetune_config.starting_checkpoint={path!r} has no "
                              "stored config; fairchem cannot rebuild its model")
    family = backbone_family(_backbone(stored)[0])
    wrong = {name: spec["module"] for name, spec in heads.items()
             if _HEAD_FAMILIES.get(spec.get("module"), family) != family}
    if wrong:
        raise DeNSConfigError(
            f"model.heads {wrong} belong to another architecture than the backbone of "
            f"model.finetune_config.starting_checkpoint={path!r} ({family!r}): use heads of "
            f"that family, or a checkpoint of the heads' architecture")
    logging.info(f"fine-tuning from {path}: backbone ({family}) kept from the checkpoint; heads "
                 f"{sorted(heads)} re-initialised from model.heads")
