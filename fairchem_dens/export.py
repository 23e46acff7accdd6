"""``fairchem-dens export``: a DeNS checkpoint as a plain fairchem EquiformerV2 / eSCN checkpoint.

At eval a DeNS model computes exactly the plain model, so its inference weights are a plain
fairchem checkpoint once the DeNS-only pieces are removed:

* weights of the force encoding (``backbone.force_encoding.*``) and of every noise head
  (``output_heads.<noise>.*``), from the model state and from the EMA state;
* in the stored config: the DeNS backbone class becomes fairchem's own registry name
  (``equiformer_v2_backbone``, ``escn_backbone``), the noise head leaves ``model.heads``, the
  trainer becomes ``equiformerv2_forces`` and ``optim.dens`` / ``dens_rng`` / ``rng_state`` go.

Normalisers and element references are kept. The optimiser and scheduler state (which index
the DeNS parameters too) and the epoch/step counters are not: the result is an inference (or
fine-tuning start) checkpoint, not a resumable training state.

EMA (``--ema``): fairchem evaluates with the EMA weights when the trainer has an EMA
(``--mode validate/predict/run-relaxations``), but ``OCPCalculator`` builds its trainer without
one and uses the raw ``state_dict``. ``apply`` (default) writes the EMA weights into
``state_dict`` and drops the EMA, as fairchem's own ``best_checkpoint.pt``: every fairchem entry
point then uses the weights validation was scored with. ``keep`` keeps the raw weights and the
(pruned) EMA state, as in ``checkpoint.pt``.

Once exported, the checkpoint needs fairchem only (this package need not be installed).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

from fairchem_dens.checkpoints import (
    TRAINING_STATE,
    CheckpointMismatchError,
    check_checkpoint_matches,
    require_config,
)

__all__ = ["ExportError", "export_checkpoint", "export_file", "register"]

PLAIN_TRAINER = "equiformerv2_forces"
SUMMARY = "turn a DeNS checkpoint into a plain fairchem EquiformerV2/eSCN checkpoint"
EPILOG = """\
examples:
  fairchem-dens export runs/demo/oc20/eqv2_dens/checkpoints/<id>/best_checkpoint.pt eqv2_plain.pt
  # then, with fairchem alone:
  fairchem --mode predict --config-yml configs/oc20/s2ef/demo/eqv2_cpu.yml --cpu \\
      --checkpoint eqv2_plain.pt --dataset.test.src=/data/s2ef/test_id
  python -c "from fairchem.core.common.relaxation.ase_utils import OCPCalculator; \\
      calc = OCPCalculator(checkpoint_path='eqv2_plain.pt', cpu=True)"
"""


class ExportError(ValueError):
    """The checkpoint cannot be exported (not a DeNS Hydra model, inconsistent state)."""


def _plain_registry_name(cls: type, mixin: type) -> str:
    """fairchem registry name of the first non-DeNS base class of ``cls``."""
    from fairchem.core.common.registry import registry

    names = registry.mapping["model_name_mapping"]
    for base in cls.__mro__[1:]:
        if isinstance(base, type) and issubclass(base, mixin):
            continue
        for name, registered in names.items():
            if registered is base and "." not in name:
                return name
    raise ExportError(f"{cls.__module__}.{cls.__qualname__} has no fairchem base class "
                      "registered under a name; cannot name a plain equivalent")


def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def _plain_config(config: dict) -> tuple[dict, list[str]]:
    """The config of the plain model (see the module docstring) and the noise-head names."""
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports

    from fairchem_dens.models.dens import DeNSBackboneMixin, DeNSNoiseHeadMixin

    setup_imports()
    config = copy.deepcopy(config)
    model = config.get("model") or {}
    if not isinstance(model, dict) or model.get("name") != "hydra" or "backbone" not in model:
        name = model if isinstance(model, str) else model.get("name")
        raise ExportError(f"not a DeNS model: the checkpoint's model is {name!r}, a legacy "
                          "(non-Hydra) fairchem model without DeNS parts; DeNS checkpoints are "
                          "Hydra models (model.name: hydra with a backbone). It is a plain "
                          "fairchem checkpoint already: use it without exporting")
    backbone = model["backbone"]
    backbone_cls = registry.get_model_class(backbone["model"])
    if issubclass(backbone_cls, DeNSBackboneMixin):
        backbone["model"] = _plain_registry_name(backbone_cls, DeNSBackboneMixin)
    noise = [name for name, head in (model.get("heads") or {}).items()
             if issubclass(registry.get_model_class(head["module"]), DeNSNoiseHeadMixin)]
    for name in noise:
        del model["heads"][name]
    if not issubclass(backbone_cls, DeNSBackboneMixin) and not noise:
        raise ExportError(f"not a DeNS model: backbone {backbone['model']!r} has no force "
                          "encoding and model.heads has no DeNS noise head. It is a plain "
                          "fairchem checkpoint already: use it without exporting (export is for "
                          "checkpoints of fairchem_dens.trainer.DenoisingForcesTrainer runs)")
    trainer = config.get("trainer")
    if trainer is not None and trainer.startswith("fairchem_dens."):
        config["trainer"] = PLAIN_TRAINER
    config.get("optim", {}).pop("dens", None)
    config.pop("dens_rng", None)
    config.pop("rng_state", None)  # the DeNS trainer's saved generator states
    return config, noise


def _build(model_config: dict):
    from fairchem.core.common.registry import registry

    kwargs = copy.deepcopy(model_config)
    return registry.get_model_class(kwargs.pop("name"))(**kwargs)


def export_checkpoint(checkpoint: dict, ema: str = "apply") -> dict:
    """Export an in-memory DeNS checkpoint (as written by fairchem's trainer) to a plain one.

    Returns a new checkpoint dict; ``checkpoint`` is left unchanged. The result carries an
    ``export`` entry listing what was removed. Raises :class:`ExportError` on anything
    inconsistent (unknown keys, EMA length mismatch), after checking that fairchem's plain model
    built from the new config loads the weights strictly.
    """
    import torch

    if ema not in ("apply", "keep"):
        raise ExportError(f"ema must be 'apply' or 'keep', got {ema!r}")
    if "state_dict" not in checkpoint:
        raise ExportError(f"not a fairchem checkpoint: no 'state_dict' entry (keys: "
                          f"{sorted(checkpoint)})")
    require_config(checkpoint, "the checkpoint to export")  # CheckpointMismatchError
    config, noise_heads = _plain_config(checkpoint["config"])

    with torch.random.fork_rng(devices=[]):  # building models must not move the caller's RNG
        dens_model = _build(checkpoint["config"]["model"])
        plain_model = _build(config["model"])
    dens_prefixes = ("backbone.force_encoding.", *(f"output_heads.{n}." for n in noise_heads))

    def is_dens(name: str) -> bool:
        return _strip(name).startswith(dens_prefixes)

    # weights that do not fit the stored config: an error naming the cause
    check_checkpoint_matches(checkpoint["config"]["model"], checkpoint, dens_model)
    state = checkpoint["state_dict"]
    expected = set(dens_model.state_dict())
    found = {_strip(k) for k in state}
    if found != expected:
        raise ExportError(
            "the checkpoint's weights do not match the model its config builds: missing "
            f"{sorted(expected - found)[:10]}, unexpected {sorted(found - expected)[:10]}")
    new_state = {k: v.clone() for k, v in state.items() if not is_dens(k)}
    removed = sorted(_strip(k) for k in state if is_dens(k))

    out: dict[str, Any] = {k: v for k, v in checkpoint.items()
                           if k not in (*TRAINING_STATE, "state_dict", "config", "ema")}
    ema_state = checkpoint.get("ema")
    if ema_state is not None:
        # fairchem's EMA: shadow_params in the order of model.parameters() with requires_grad
        names = [n for n, p in dens_model.named_parameters() if p.requires_grad]
        shadow = ema_state["shadow_params"]
        if len(shadow) != len(names):
            raise ExportError(f"EMA has {len(shadow)} parameters, the model {len(names)}")
        prefix = "module." if next(iter(state)).startswith("module.") else ""
        if ema == "apply":
            for name, value in zip(names, shadow):
                if not is_dens(name):
                    target = new_state[prefix + name]
                    new_state[prefix + name] = value.detach().clone().to(target.dtype)
        else:
            keep = [i for i, n in enumerate(names) if not is_dens(n)]
            collected = ema_state.get("collected_params") or []
            out["ema"] = {
                **{k: v for k, v in ema_state.items()
                   if k not in ("shadow_params", "collected_params")},
                "shadow_params": [shadow[i] for i in keep],
                "collected_params": [collected[i] for i in keep] if collected else [],
            }
            if "epoch" in checkpoint:  # same weights as the source: its counters still apply
                out["step"], out["epoch"] = checkpoint.get("step"), checkpoint["epoch"]

    # fairchem's plain model must take the weights strictly, and the EMA must fit it
    plain_model.load_state_dict({_strip(k): v for k, v in new_state.items()}, strict=True)
    if "ema" in out and len(out["ema"]["shadow_params"]) != sum(
            p.requires_grad for p in plain_model.parameters()):
        raise ExportError("pruned EMA does not fit the plain model")

    out["state_dict"] = new_state
    out["config"] = config
    out["export"] = {
        "from_trainer": checkpoint["config"].get("trainer"),
        "from_backbone": checkpoint["config"]["model"]["backbone"]["model"],
        "removed_heads": noise_heads,
        "removed_keys": removed,
        "ema": ema if ema_state is not None else None,
    }
    return out


def export_file(src: str | Path, dst: str | Path, ema: str = "apply") -> dict:
    """Export the checkpoint file ``src`` to ``dst``; returns the written checkpoint's
    ``export`` summary."""
    import torch

    checkpoint = torch.load(str(src), map_location="cpu")
    out = export_checkpoint(checkpoint, ema=ema)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, str(dst))
    return out["export"]


def run_export(args: argparse.Namespace) -> int:
    if Path(args.output).resolve() == Path(args.checkpoint).resolve():
        print("fairchem-dens export: error: OUT must differ from CKPT", file=sys.stderr)
        return 2
    if Path(args.output).exists() and not args.overwrite:
        print(f"fairchem-dens export: error: {args.output} exists (use --overwrite)",
              file=sys.stderr)
        return 2
    try:
        summary = export_file(args.checkpoint, args.output, ema=args.ema)
    except (ExportError, CheckpointMismatchError, FileNotFoundError) as err:
        print(f"fairchem-dens export: error: {err}", file=sys.stderr)
        return 2
    removed = summary["removed_keys"]
    logging.info("export: removed %s", removed)
    print(f"wrote {args.output}: backbone {summary['from_backbone']} -> plain, removed heads "
          f"{summary['removed_heads']}, {len(removed)} DeNS-only tensors; EMA: "
          f"{summary['ema'] or 'none in checkpoint'}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``export`` on the subparsers of the ``fairchem-dens`` command."""
    parser = subparsers.add_parser(
        "export", help=SUMMARY, description=__doc__.split("\n\n", 1)[1].strip() + "\n",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT", help="DeNS checkpoint (.pt) written by "
                        "fairchem's trainer (checkpoint.pt or best_checkpoint.pt)")
    parser.add_argument("output", metavar="OUT", help="path of the plain checkpoint to write")
    parser.add_argument("--ema", choices=("apply", "keep"), default="apply",
                        help="apply (default): write the EMA weights into state_dict, as "
                        "best_checkpoint.pt; keep: raw weights plus the pruned EMA state")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=run_export)
