"""Checkpoint layout and checking a checkpoint against the model of a config.

This module owns the layout helpers the other checkpoint modules (``finetune``, ``export``,
``pretrain``) import: :data:`TRAINING_STATE` / :func:`without_training_state` (what belongs to a
run, not to the model) and :func:`dens_only_keys` (the weights a plain model lacks).

fairchem's strict load reports a wrong checkpoint as hundreds of missing/unexpected keys or
size mismatches. :func:`check_checkpoint_matches` names the cause instead:

* no ``config`` in the checkpoint (only ``state_dict``): nothing to compare with, say so;
* another architecture (e.g. an eSCN checkpoint for an EquiformerV2 config): both backbone
  classes, resolved to their fairchem family (a DeNS backbone is the DeNS variant of
  ``equiformer_v2_backbone`` / ``escn_backbone``);
* the same family with other hyper-parameters (``num_layers``, ``sphere_channels``,
  ``lmax_list``, ...): each one, checkpoint value vs config value.

A plain checkpoint for the DeNS model of the same family is fine-tuning, not a mismatch: the
DeNS-only weights (force encoding, noise head) may be missing from it.

:func:`prepare_checkpoint` is what :class:`~fairchem_dens.trainer.DenoisingForcesTrainer` runs
on every checkpoint: convert fairchem's legacy (non-Hydra) EquiformerV2 layout with fairchem's
own converter, then check.
"""

from __future__ import annotations

import copy
import inspect
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["TRAINING_STATE", "CheckpointMismatchError", "backbone_family", "check_checkpoint_matches",
           "convert_legacy_checkpoint", "dens_only_keys", "is_legacy_checkpoint",
           "prepare_checkpoint", "require_config", "without_training_state"]

_MAX_LISTED = 5
LEGACY_CONVERTIBLE = ("equiformer_v2",)  # fairchem 1.10 converts only these to Hydra


#: Checkpoint entries that belong to a training run (optimizer, schedule, counters), not to
#: the model: dropped when a checkpoint starts a new run or leaves the project.
TRAINING_STATE = ("optimizer", "scheduler", "epoch", "step", "best_val_metric",
                  "primary_metric")


def without_training_state(checkpoint: dict) -> tuple[dict, list[str]]:
    """(``checkpoint`` without :data:`TRAINING_STATE` entries, the names dropped)."""
    dropped = [k for k in TRAINING_STATE if k in checkpoint]
    return {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}, dropped


def _strip(key: str) -> str:
    """State-dict key without DataParallel/DDP ``module.`` prefixes."""
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _dens_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the DeNS-only modules (noise heads, force encoding)."""
    from fairchem_dens.models.dens import noise_head_names

    prefixes = [f"output_heads.{name}." for name in noise_head_names(model)]
    if hasattr(getattr(model, "backbone", None), "force_encoding"):
        prefixes.append("backbone.force_encoding.")
    return tuple(prefixes)


def dens_only_keys(model: nn.Module) -> list[str]:
    """State-dict keys (unprefixed) of the DeNS-only modules of a DeNS Hydra model."""
    prefixes = _dens_prefixes(model)
    return [k for k in model.state_dict() if k.startswith(prefixes)] if prefixes else []


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model of the config it is loaded into."""


def require_config(checkpoint: dict, what: str = "this checkpoint") -> dict:
    """The checkpoint's stored training config; a clear error when it has none."""
    config = checkpoint.get("config")
    if not isinstance(config, dict) or "model" not in config:
        keys = sorted(checkpoint)
        raise CheckpointMismatchError(
            f"{what} has no training config (checkpoint['config'] with a 'model' entry; its keys "
            f"are {keys}), so its architecture cannot be checked. Use a checkpoint written by "
            "fairchem's trainer (checkpoint.pt / best_checkpoint.pt), or add the config it was "
            "trained with: ckpt['config'] = fairchem.core.common.utils.load_config(YAML)[0]; "
            "torch.save(ckpt, PATH)")
    return config


def _model_class(name: str) -> type | None:
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports

    setup_imports()
    try:
        return registry.get_model_class(name)
    except Exception:  # unknown name or unimportable dotted path
        return None


def _family_class(name: str) -> tuple[str, type | None]:
    """(fairchem registry name, class) of the non-DeNS model class ``name`` belongs to."""
    from fairchem.core.common.registry import registry

    from fairchem_dens.models.dens import DeNSBackboneMixin

    cls = _model_class(name)
    if cls is None:
        return name, None
    names = registry.mapping["model_name_mapping"]
    for base in cls.__mro__:
        if isinstance(base, type) and issubclass(base, DeNSBackboneMixin):
            continue
        for registered_name, registered in names.items():
            if registered is base and "." not in registered_name:
                return registered_name, base
    return name, cls


def backbone_family(name: str) -> str:
    """fairchem registry name of the plain backbone ``name`` is (or is the DeNS variant of):
    ``fairchem_dens.models.escn.DeNSeSCNBackbone`` -> ``escn_backbone``."""
    return _family_class(name)[0]


def _describe(name: str) -> str:
    family = backbone_family(name)
    return repr(name) if family == name else f"{name!r} (the DeNS variant of {family!r})"


def _backbone(model_config: dict) -> tuple[str, dict]:
    """(class name, hyper-parameters) of a Hydra backbone, or of a legacy single model."""
    if model_config.get("name") == "hydra" and "backbone" in model_config:
        params = dict(model_config["backbone"])
        return str(params.pop("model")), params
    params = dict(model_config)
    return str(params.pop("name", "?")), params


def _with_defaults(name: str, params: dict) -> dict:
    """``params`` completed with the defaults of the family class's ``__init__``."""
    _, cls = _family_class(name)
    if cls is None:
        return params
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return params
    defaults = {k: p.default for k, p in signature.parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **params}


def _differences(checkpoint_model: dict, config_model: dict) -> dict[str, tuple[Any, Any]]:
    name, ours = _backbone(config_model)
    _, theirs = _backbone(checkpoint_model)
    ours, theirs = _with_defaults(name, ours), _with_defaults(name, theirs)
    missing = "<unset>"
    return {k: (theirs.get(k, missing), ours.get(k, missing))
            for k in sorted(set(ours) | set(theirs))
            if _normal(theirs.get(k, missing)) != _normal(ours.get(k, missing))}


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _weight_mismatch(model: nn.Module, state: dict, strict: bool) -> list[str]:
    """What keeps ``state`` from loading into ``model`` (DeNS-only weights may be absent)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {_strip(k): tuple(v.shape) for k, v in state.items()}
    dens_keys = set(dens_only_keys(model))
    optional = dens_keys if not dens_keys & set(found) else set()
    problems = [f"{k}: {found[k]} in the checkpoint, {own[k]} in the model"
                for k in sorted(set(own) & set(found)) if own[k] != found[k]]
    if strict:
        missing = sorted(set(own) - set(found) - optional)
        unexpected = sorted(set(found) - set(own))
        if missing:
            problems.append(f"{len(missing)} weights missing from the checkpoint, e.g. "
                            f"{missing[:_MAX_LISTED]}")
        if unexpected:
            problems.append(f"{len(unexpected)} checkpoint weights not in the model, e.g. "
                            f"{unexpected[:_MAX_LISTED]}")
    return problems


def _heads(model_config: dict) -> dict[str, str]:
    return {k: str((v or {}).get("module")) for k, v in (model_config.get("heads") or {}).items()}


def check_checkpoint_matches(config_model: dict, checkpoint: dict,
                             model: nn.Module | None = None, strict: bool = True) -> None:
    """Raise :class:`CheckpointMismatchError` if ``checkpoint`` is not a checkpoint of the model
    ``config_model`` (the ``model`` section of a fairchem config) describes.

    Checks the backbone family always; with the built ``model`` also that the weights load
    (``strict``: no missing/unexpected keys besides the DeNS-only ones; shapes always). When they
    do not, the error lists the disagreeing backbone hyper-parameters. Settings that differ
    without changing any weight (cutoff radius, dropout, ...) are only logged.
    """
    checkpoint_model = require_config(checkpoint)["model"]
    if isinstance(checkpoint_model, str):  # legacy layout: model name + model_attributes
        checkpoint_model = {**checkpoint["config"].get("model_attributes", {}),
                            "name": checkpoint_model}
    if any(m.get("name") == "hydra" and m.get("backbone") is None
           for m in (config_model, checkpoint_model)):
        # backbone taken from model.finetune_config's checkpoint: no settings to compare,
        # the weights must still fit
        problems = _weight_mismatch(model, checkpoint.get("state_dict") or {}, strict) if (
            model is not None) else []
        if problems:
            raise CheckpointMismatchError(
                "the checkpoint does not fit the model of the config (backbone from "
                f"model.finetune_config): {'; '.join(problems[:_MAX_LISTED])}")
        return
    ours, _ = _backbone(config_model)
    theirs, _ = _backbone(checkpoint_model)
    if backbone_family(ours) != backbone_family(theirs):
        hint = ""
        if theirs in LEGACY_CONVERTIBLE or checkpoint_model.get("name") != "hydra":
            hint = (" (a legacy non-Hydra checkpoint; fairchem 1.10 converts only "
                    f"{list(LEGACY_CONVERTIBLE)} ones to Hydra)")
        raise CheckpointMismatchError(
            f"the checkpoint is another architecture: its backbone is {_describe(theirs)}{hint}, "
            f"the config's model.backbone.model is {_describe(ours)}. Use a config of the "
            f"checkpoint's architecture (for a DeNS run: its DeNS variant, e.g. "
            "configs/oc20/s2ef/demo/escn_dens_cpu.yml for escn_backbone, eqv2_dens_cpu.yml for "
            "equiformer_v2_backbone), or a checkpoint of the config's")
    differences = _differences(checkpoint_model, config_model)
    if model is None:
        return
    problems = _weight_mismatch(model, checkpoint.get("state_dict") or {}, strict)
    if not problems:
        if differences:
            logging.info("checkpoint and config differ in settings that change no weight "
                         "(checkpoint -> config): %s", differences)
        return
    lines = [f"  {k}: {a!r} in the checkpoint, {b!r} in the config"
             for k, (a, b) in differences.items()]
    heads_ckpt, heads_cfg = _heads(checkpoint_model), _heads(config_model)
    extra_heads = sorted(set(heads_ckpt) - set(heads_cfg))
    if extra_heads:
        lines.append(f"  heads {extra_heads}: in the checkpoint, not in the config's model.heads")
    if lines:
        what = "the model.backbone hyper-parameters differ:\n" + "\n".join(lines)
        fix = ("Set these to the checkpoint's values in the config's model section (or use the "
               "config stored in the checkpoint, checkpoint['config']), or train without "
               "--checkpoint.")
    else:
        what = "no model.backbone hyper-parameter differs, but the weights do."
        fix = ("The weights were not trained with this model config (compare model.heads and "
               "the checkpoint's config with yours).")
    raise CheckpointMismatchError(
        f"the checkpoint does not fit the model of the config ({_describe(ours)}): {what}\n"
        f"{fix} Weights: {'; '.join(problems[:_MAX_LISTED])}")


def is_legacy_checkpoint(checkpoint: dict) -> bool:
    """A pre-Hydra fairchem checkpoint (``model: equiformer_v2`` etc., no backbone/heads)."""
    model = (checkpoint.get("config") or {}).get("model")
    return isinstance(model, str) or (isinstance(model, dict) and model.get("name") != "hydra")


def convert_legacy_checkpoint(checkpoint: dict) -> dict:
    """A legacy (non-Hydra) EquiformerV2 checkpoint in fairchem's Hydra layout, converted by
    fairchem's own ``convert_checkpoint_and_config_to_hydra`` (which works on files, so this
    goes through a temporary directory). As fairchem's converter does, the EMA, optimizer and
    scheduler state are dropped."""
    import torch
    import yaml
    from fairchem.core.models.equiformer_v2.eqv2_to_eqv2_hydra import (
        convert_checkpoint_and_config_to_hydra,
    )

    config = require_config(checkpoint)
    name = config["model"] if isinstance(config["model"], str) else config["model"].get("name")
    if name not in LEGACY_CONVERTIBLE:
        raise CheckpointMismatchError(
            f"legacy (non-Hydra) checkpoint of model {name!r}: fairchem 1.10 converts only "
            f"{list(LEGACY_CONVERTIBLE)} checkpoints to the Hydra layout DeNS needs. Convert it "
            "to a Hydra backbone + heads checkpoint first, or start from a Hydra checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "legacy.pt", Path(tmp) / "hydra.pt"
        yml, new_yml = Path(tmp) / "legacy.yml", Path(tmp) / "hydra.yml"
        torch.save(checkpoint, src)
        yml.write_text(yaml.safe_dump({"outputs": copy.deepcopy(config.get("outputs") or {})}))
        convert_checkpoint_and_config_to_hydra(str(yml), str(src), str(new_yml), str(dst))
        converted = torch.load(dst, map_location="cpu")
    logging.info("converted a legacy %r checkpoint to fairchem's Hydra layout (fairchem's "
                 "convert_checkpoint_and_config_to_hydra; its EMA/optimizer state dropped)", name)
    return converted


def prepare_checkpoint(model: nn.Module, config_model: dict, checkpoint: dict | None,
                       strict: bool = True) -> dict | None:
    """Checks (and, for a legacy EquiformerV2 checkpoint, converts) ``checkpoint`` for loading
    into ``model`` built from ``config_model``; ``None`` passes through (fairchem then reports
    the missing file)."""
    if checkpoint is None:
        return None
    require_config(checkpoint)
    if is_legacy_checkpoint(checkpoint) and config_model.get("name") == "hydra":
        legacy = checkpoint["config"]["model"]
        name = legacy if isinstance(legacy, str) else legacy.get("name")
        if name in LEGACY_CONVERTIBLE and backbone_family(_backbone(config_model)[0]) == (
                "equiformer_v2_backbone"):
            checkpoint = convert_legacy_checkpoint(checkpoint)
    check_checkpoint_matches(config_model, checkpoint, model, strict=strict)
    return checkpoint
