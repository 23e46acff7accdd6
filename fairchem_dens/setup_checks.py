"""Set-up warnings for targets a run evaluates but cannot learn (issue 23).

fairchem trains what ``loss_functions`` weights and reports what ``evaluation_metrics`` lists; a
target reported but weighted 0 (or left out of the loss) is never learned, and its validation
MAE is that of the untrained head — it reads like a model that failed. A normaliser with rmsd 0
divides the target by zero (inf/NaN, which fairchem's ``DDPLoss`` zeroes with only a per-step
warning). Both are named at set-up, key and fix, by :func:`unlearnable_target_warnings`, which
the package's trainers call from ``load_loss`` (``DenoisingForcesTrainer`` additionally refuses
a degenerate normaliser of a loss target: see its ``_check_normalizers``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

#: evaluation_metrics.metrics groups that are not output targets
NON_TARGET_GROUPS = ("misc",)


def unlearnable_target_warnings(config: Mapping[str, Any],
                                normalizers: Mapping[str, Any] | None = None) -> list[str]:
    """Messages, one per problem, for the fairchem ``config`` (its ``loss_functions``,
    ``evaluation_metrics``) and the trainer's ``normalizers`` (``{target: Normalizer}``):

    * a target in ``evaluation_metrics.metrics`` whose ``loss_functions`` coefficient is 0, or
      that has no ``loss_functions`` entry while other targets do;
    * a normaliser whose ``rmsd`` is 0 or not finite.
    """
    evaluated = _evaluated(config)
    losses: dict[str, float] = {}
    messages: list[str] = []
    for index, entry in enumerate(config.get("loss_functions") or []):
        for target, spec in entry.items():
            losses[target] = float((spec or {}).get("coefficient", 1))
            if losses[target] == 0 and target in evaluated:
                messages.append(
                    f"loss_functions[{index}].{target}.coefficient is 0 while "
                    f"evaluation_metrics.metrics.{target} reports it: the model is never "
                    f"trained on {target}, and its validation {target} MAE is that of an "
                    "untrained head. Give it a weight > 0 (the energy of a force field: e.g. "
                    f"the recipe's lambda_E), or remove {target} from evaluation_metrics.metrics.")
    if losses:
        for target in evaluated:
            if target not in losses:
                messages.append(
                    f"evaluation_metrics.metrics.{target} is reported but loss_functions has no "
                    f"'{target}' entry ({sorted(losses)}): the model is never trained on it. "
                    f"Add a loss_functions entry for {target}, or remove it from "
                    "evaluation_metrics.metrics.")
    for target, normalizer in (normalizers or {}).items():
        rmsd = getattr(normalizer, "rmsd", None)
        if rmsd is None:
            continue
        value = float(rmsd)
        if value == 0 or not math.isfinite(value):
            messages.append(
                f"dataset.train.transforms.normalizer.{target}: rmsd is {value:g}, so every "
                f"normalised {target} target is divided by {value:g} (inf/NaN, which fairchem's "
                f"loss zeroes with a 'Found nans' warning: {target} is not learned). Refit the "
                f"normaliser on data where {target} varies (fairchem-dens convert writes it), or "
                "set its rmsd explicitly.")
    return messages


def _evaluated(config: Mapping[str, Any]) -> list[str]:
    metrics = (config.get("evaluation_metrics") or {}).get("metrics") or {}
    return [t for t in metrics if t not in NON_TARGET_GROUPS]


def warn_unlearnable_targets(config: Mapping[str, Any],
                             normalizers: Mapping[str, Any] | None = None) -> list[str]:
    """:func:`unlearnable_target_warnings`, each logged as a warning; returns them."""
    messages = unlearnable_target_warnings(config, normalizers)
    for message in messages:
        logging.warning(message)
    return messages
