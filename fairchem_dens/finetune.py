"""Fine-tune a DeNS model from a plain fairchem checkpoint (EquiformerV2 / eSCN Hydra).

A DeNS model is the plain model plus DeNS-only modules (force encoding ``backbone.force_encoding``
and the noise head ``output_heads.<noise>``). :func:`adapt_plain_checkpoint` turns a plain
checkpoint into one the DeNS trainer loads strictly:

* every weight of the plain model is taken from the checkpoint;
* the DeNS-only weights keep the DeNS model's fresh initialisation, and are logged by name;
* any other difference (a missing or unexpected key, a shape mismatch) is an error;
* the EMA (if any) gets the fresh DeNS-only parameters inserted at their places in fairchem's
  parameter order; a checkpoint without EMA (``best_checkpoint.pt``) starts the trainer's EMA
  from the loaded weights (fairchem would otherwise switch EMA off for the run);
* optimizer/scheduler state and the epoch/step counters are dropped: they index the plain
  parameters only, and fine-tuning starts its own schedule.

A checkpoint that already has the DeNS weights (resuming DeNS training) is returned unchanged.
:func:`prepare_dens_checkpoint` is the one call the DeNS trainer makes on every checkpoint.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fairchem_dens import pretrain
from fairchem_dens.checkpoints import (
    _dens_prefixes,
    dens_only_keys,
    prepare_checkpoint,
    without_training_state,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FineTuneError", "adapt_plain_checkpoint", "dens_only_keys", "prepare_dens_checkpoint"]


class FineTuneError(ValueError):
    """A plain checkpoint does not fit the DeNS model beyond its DeNS-only weights."""


def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def adapt_plain_checkpoint(model: nn.Module, checkpoint: dict | None,
                           ema: Any = None) -> dict | None:
    """Return ``checkpoint`` ready for strict loading into the DeNS ``model`` (unwrapped).

    ``ema``: the trainer's ``ExponentialMovingAverage`` (or None); its presence only decides
    whether a checkpoint EMA is adapted or, without one, started from the loaded weights
    (fairchem ignores the checkpoint EMA when the trainer has none).
    Raises :class:`FineTuneError` on any mismatch other than the DeNS-only weights.
    """
    if checkpoint is None or "state_dict" not in checkpoint:
        return checkpoint
    own = model.state_dict()
    new_keys = dens_only_keys(model)
    state = checkpoint["state_dict"]
    found = {_strip(k): k for k in state}
    if not new_keys or any(k in found for k in new_keys):
        return checkpoint  # not a DeNS model, or a DeNS checkpoint: fairchem's own loading

    missing = sorted(set(own) - set(found) - set(new_keys))
    unexpected = sorted(set(found) - set(own))
    shapes = sorted(k for k in set(found) & set(own) if state[found[k]].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise FineTuneError(
            "the plain checkpoint does not match the DeNS model apart from its DeNS-only "
            f"weights: missing {missing[:10]}, unexpected {unexpected[:10]}, shape mismatch "
            f"{[(k, tuple(state[found[k]].shape), tuple(own[k].shape)) for k in shapes[:10]]}"
            " (check that the backbone/head settings match the checkpoint's config)")

    prefix = "module." if next(iter(state), "").startswith("module.") else ""
    out, dropped = without_training_state(checkpoint)
    out["state_dict"] = {**state, **{prefix + k: own[k].detach().clone() for k in new_keys}}

    ema_state = checkpoint.get("ema")
    if ema_state is not None and ema is not None:
        prefixes = _dens_prefixes(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        shadow = list(ema_state["shadow_params"])
        n_plain = sum(not n.startswith(prefixes) for n, _ in named)
        if len(shadow) != n_plain:
            raise FineTuneError(f"the checkpoint's EMA has {len(shadow)} parameters, the plain "
                                f"part of the DeNS model {n_plain}")
        it = iter(shadow)
        out["ema"] = {
            **ema_state,
            "shadow_params": [p.detach().clone() if n.startswith(prefixes) else next(it)
                              for n, p in named],
            "collected_params": [],
        }
    elif ema is not None:
        # no EMA in the checkpoint (best_checkpoint.pt, a converted legacy one): start the EMA
        # from the loaded weights, where fairchem would switch the EMA off for the whole run
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        weights = out["state_dict"]
        fresh = ema.state_dict()
        out["ema"] = {**fresh, "collected_params": [],
                      "num_updates": None if fresh.get("num_updates") is None else 0,
                      "shadow_params": [weights[prefix + n].detach().clone() for n, _ in named]}
    elif "ema" in out:
        out["ema"] = None

    logging.info(
        "DeNS fine-tuning from a plain checkpoint: %d new DeNS-only keys initialised fresh: %s; "
        "dropped training state %s", len(new_keys), new_keys, dropped)
    return out


def prepare_dens_checkpoint(trainer: Any, checkpoint: dict | None,
                            inference_only: bool) -> dict | None:
    """What :class:`~fairchem_dens.trainer.DenoisingForcesTrainer` does to every checkpoint
    before fairchem loads it: check it against the model (convert a legacy EquiformerV2 one,
    :func:`~fairchem_dens.checkpoints.prepare_checkpoint`), add fresh DeNS-only weights to a
    plain one (:func:`adapt_plain_checkpoint`; a DeNS checkpoint passes unchanged), and drop
    the training state of a denoising pre-training checkpoint that starts fine-tuning."""
    model = trainer._unwrapped_model
    checkpoint = prepare_checkpoint(model, trainer.config["model"], checkpoint,
                                    trainer.config.get("task", {}).get("strict_load", True))
    checkpoint = adapt_plain_checkpoint(model, checkpoint, trainer.ema)
    if not inference_only and pretrain.starts_fine_tuning(checkpoint, trainer.dens):
        checkpoint = pretrain.drop_training_state(checkpoint)
    return checkpoint
