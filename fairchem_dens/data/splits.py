"""Assign whole systems (never single frames) to train / val / test.

Two modes: :func:`split_systems` shuffles the systems with a seed and cuts them by
fractions; :func:`assign_systems` puts explicitly named systems into val / test and all
others into train.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from fairchem_dens.data.options import SPLIT_NAMES, ConversionError, check_disjoint_systems

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["assign_systems", "split_counts", "split_systems"]

#: At most this many available sids are listed in the unknown-sid error.
_MAX_LISTED_SIDS = 50


def split_counts(num_systems: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Number of systems per split.

    val and test get ``round(fraction * num_systems)`` systems (half rounds up), at
    least one each when their fraction is > 0 and there are enough systems to give every
    non-empty split one; train gets the rest and always at least one.

    Examples
    --------
    >>> split_counts(14, (0.8, 0.1, 0.1))
    (12, 1, 1)
    >>> split_counts(14, (0.7, 0.15, 0.15))
    (10, 2, 2)
    >>> split_counts(1, (0.8, 0.1, 0.1))
    (1, 0, 0)
    """
    wanted_splits = sum(1 for fraction in fractions if fraction > 0)
    held_out = []
    for fraction in fractions[1:]:
        count = math.floor(fraction * num_systems + 0.5)
        if fraction > 0 and num_systems >= wanted_splits:
            count = max(count, 1)
        held_out.append(count)
    while num_systems - sum(held_out) < 1 and sum(held_out) > 0:
        held_out[int(np.argmax(held_out))] -= 1
    return num_systems - sum(held_out), held_out[0], held_out[1]


def split_systems(
    sids: Sequence[int], fractions: Sequence[float], seed: int
) -> dict[str, list[int]]:
    """Shuffle system ids with ``seed`` and cut them into train / val / test.

    The result depends only on the set of ids, the fractions and the seed (ids are
    sorted before shuffling). Each split's ids are returned sorted.

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}`` of disjoint system ids.
    """
    ordered = sorted(int(sid) for sid in sids)
    permuted = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    counts = split_counts(len(ordered), fractions)
    result: dict[str, list[int]] = {}
    start = 0
    for name, count in zip(SPLIT_NAMES, counts):
        result[name] = sorted(permuted[start : start + count])
        start += count
    return result


def assign_systems(
    sids: Sequence[int], val_systems: Sequence[int], test_systems: Sequence[int]
) -> dict[str, list[int]]:
    """Put ``val_systems`` / ``test_systems`` into val / test and all other ids into train.

    Parameters
    ----------
    sids
        Ids of all input systems.
    val_systems, test_systems
        Disjoint ids of the held-out systems; each must be in ``sids``.

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}`` of disjoint, sorted system ids.

    Raises
    ------
    ConversionError
        When an id is not an input system (the message names it and lists the available
        ids), when an id is in both lists, or when no system is left for train.

    Examples
    --------
    >>> assign_systems([3, 1, 2, 4], val_systems=[2], test_systems=[4])
    {'train': [1, 3], 'val': [2], 'test': [4]}
    """
    known = sorted(int(sid) for sid in sids)
    held_out = {
        "val": sorted(set(map(int, val_systems))),
        "test": sorted(set(map(int, test_systems))),
    }
    unknown = sorted(set(held_out["val"] + held_out["test"]) - set(known))
    if unknown:
        listed = ", ".join(map(str, known[:_MAX_LISTED_SIDS]))
        if len(known) > _MAX_LISTED_SIDS:
            listed += f", ... ({len(known)} in total)"
        raise ConversionError(
            f"unknown system id(s) {', '.join(map(str, unknown))} in --val-systems/"
            f"--test-systems; the inputs have the sids {listed} (sids come from the file "
            "names' digits, or the sorted file order when those are not unique)"
        )
    check_disjoint_systems(held_out["val"], held_out["test"])
    train = sorted(set(known) - set(held_out["val"]) - set(held_out["test"]))
    if not train:
        raise ConversionError(
            "--val-systems/--test-systems name all input systems; leave at least one "
            "system for train"
        )
    return {"train": train, **held_out}
