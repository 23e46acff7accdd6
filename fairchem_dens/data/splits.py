"""Assign whole systems (never single frames) to train / val / test."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from fairchem_dens.data.options import SPLIT_NAMES

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["split_counts", "split_systems"]


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
