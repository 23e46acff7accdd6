"""Writing extended-XYZ files that keep fixed atoms, whatever the ASE version.

ASE >= 3.26 writes a ``FixAtoms`` constraint as the ``move_mask`` column by itself; ASE 3.25
(pinned here, see pyproject.toml) writes it only when the atoms carry a ``move_mask`` array, and
otherwise silently drops the constraint. :func:`write_extxyz` adds the array when needed.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING

import ase
import ase.io
import numpy as np
from ase.constraints import FixAtoms

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

_WRITES_MOVE_MASK = tuple(int(x) for x in ase.__version__.split(".")[:2]) >= (3, 26)


def write_extxyz(target: str | Path | IO[str], frames: Sequence[ase.Atoms]) -> None:
    """Write ``frames`` as extended XYZ with their ``FixAtoms`` as ``move_mask`` (the input
    frames are not changed)."""
    if not _WRITES_MOVE_MASK:
        copies = []
        for atoms in frames:
            copy = atoms.copy()
            copy.calc = atoms.calc  # energy/forces written from the calculator's results
            fixed = [c for c in atoms.constraints if isinstance(c, FixAtoms)]
            if fixed and "move_mask" not in copy.arrays:
                movable = np.ones(len(copy), dtype=bool)
                movable[fixed[0].index] = False
                copy.new_array("move_mask", movable)
            copies.append(copy)
        frames = copies
    ase.io.write(target, frames, format="extxyz")
