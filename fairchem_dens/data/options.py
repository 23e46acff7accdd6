"""Conversion options, unit handling and the converter's error type.

Everything a conversion needs to know is held by :class:`ConversionOptions`, a
validated dataclass shared by the command line (``fairchem-dens convert``) and the
Python API (:func:`fairchem_dens.data.convert`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ase import units

__all__ = [
    "ConversionError",
    "ConversionOptions",
    "ENERGY_UNITS_IN_EV",
    "FORCE_UNITS_IN_EV_PER_ANGSTROM",
    "SPLIT_NAMES",
    "parse_split_fractions",
]

#: Names of the splits written by the converter, in output order.
SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")

#: Energy units accepted by ``--energy-unit``: size of one unit in eV.
ENERGY_UNITS_IN_EV: dict[str, float] = {
    "eV": 1.0,
    "meV": 1.0e-3,
    "kcal/mol": units.kcal / units.mol,
    "kJ/mol": units.kJ / units.mol,
    "Hartree": units.Hartree,
    "Ry": units.Ry,
}

#: Force units accepted by ``--force-unit``: size of one unit in eV/Å.
FORCE_UNITS_IN_EV_PER_ANGSTROM: dict[str, float] = {
    "eV/Å": 1.0,
    "meV/Å": 1.0e-3,
    "kcal/mol/Å": units.kcal / units.mol,
    "kJ/mol/Å": units.kJ / units.mol,
    "Hartree/Bohr": units.Hartree / units.Bohr,
    "Ry/Bohr": units.Ry / units.Bohr,
}


class ConversionError(ValueError):
    """Input data or options that cannot be converted.

    The message names the offending file (and frame, where there is one) and says how
    to fix the problem.
    """


def _canonical_unit(name: str) -> str:
    """Spelling-tolerant key for unit names: ``"eV/A"``, ``"ev/ang"`` → ``"ev/å"``."""
    key = name.strip().replace(" ", "").lower()
    for alias in ("angstrom", "ang"):
        key = key.replace(alias, "å")
    key = key.replace("/a", "/å").replace("ha/", "hartree/")
    return "hartree" if key == "ha" else key


def _lookup_unit(name: str, table: dict[str, float], option: str) -> tuple[str, float]:
    """Return the canonical spelling of ``name`` in ``table`` and its factor."""
    wanted = _canonical_unit(name)
    for known, factor in table.items():
        if _canonical_unit(known) == wanted:
            return known, factor
    raise ConversionError(
        f"unknown {option} {name!r}; use one of: {', '.join(table)} "
        "(spelling 'A' or 'Ang' for Å also works)"
    )


def parse_split_fractions(text: str) -> tuple[float, float, float]:
    """Parse ``"0.8,0.1,0.1"`` into (train, val, test) fractions.

    Two values mean (train, val) with no test split.
    """
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ConversionError(
            f"--split {text!r} is not a comma-separated list of numbers, e.g. 0.8,0.1,0.1"
        ) from err
    if len(values) == 2:
        values.append(0.0)
    if len(values) != 3:
        raise ConversionError(
            f"--split {text!r} needs 2 or 3 fractions (train,val[,test]), e.g. 0.8,0.1,0.1"
        )
    return values[0], values[1], values[2]


@dataclass
class ConversionOptions:
    """Validated settings of one conversion.

    Parameters
    ----------
    inputs
        Files, directories (searched recursively for known extensions) or glob patterns.
        Each file holds one system (one trajectory).
    out_dir
        Output directory; receives ``train/``, ``val/``, ``test/`` (each ``data.lmdb`` +
        ``metadata.npz``), the reference/normaliser files and ``conversion.json``.
    split
        Fractions of *systems* (files) per split (train, val, test); sum to 1.
    seed
        Seed of the system shuffle that assigns systems to splits.
    stride
        Keep every ``stride``-th frame of each file (frames 0, stride, 2*stride, ...).
    energy_unit
        Unit of the energies in the input files (converted to eV).
    force_unit
        Unit of the forces in the input (converted to eV/Å). ``None`` means
        "``energy_unit``/Å" (e.g. kcal/mol → kcal/mol/Å).
    box_padding
        Vacuum in Å between a non-periodic molecule and its periodic images when it is
        placed in a cubic box. Keep it above the model's cutoff radius.
    energy_key, forces_key
        Read energy from ``atoms.info[energy_key]`` / forces from
        ``atoms.arrays[forces_key]`` instead of the attached calculator.
    overwrite
        Replace existing converter outputs in ``out_dir``.
    """

    inputs: list[str]
    out_dir: Path
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    stride: int = 1
    energy_unit: str = "eV"
    force_unit: str | None = None
    box_padding: float = 15.0
    energy_key: str | None = None
    forces_key: str | None = None
    overwrite: bool = False
    energy_factor: float = field(init=False, default=1.0)
    force_factor: float = field(init=False, default=1.0)

    def __post_init__(self) -> None:
        self.inputs = [str(item) for item in self.inputs]
        self.out_dir = Path(self.out_dir)
        if not self.inputs:
            raise ConversionError("no inputs given: pass files, directories or globs")
        if isinstance(self.split, str):
            self.split = parse_split_fractions(self.split)
        self.split = tuple(float(value) for value in self.split)  # type: ignore[assignment]
        if len(self.split) != 3 or any(
            not math.isfinite(value) or value < 0 for value in self.split
        ):
            raise ConversionError(f"split fractions {self.split} must be three finite numbers >= 0")
        if abs(sum(self.split) - 1.0) > 1e-6:
            raise ConversionError(f"split fractions {self.split} sum to {sum(self.split):g}, not 1")
        if self.split[0] <= 0:
            raise ConversionError("the train fraction must be > 0")
        if int(self.stride) != self.stride or self.stride < 1:
            raise ConversionError(f"stride must be an integer >= 1, got {self.stride}")
        self.stride = int(self.stride)
        if not math.isfinite(self.box_padding) or self.box_padding <= 0:
            raise ConversionError(f"box padding must be > 0 Å, got {self.box_padding}")
        self.energy_unit, self.energy_factor = _lookup_unit(
            self.energy_unit, ENERGY_UNITS_IN_EV, "energy unit"
        )
        force_unit = self.force_unit or f"{self.energy_unit}/Å"
        self.force_unit, self.force_factor = _lookup_unit(
            force_unit, FORCE_UNITS_IN_EV_PER_ANGSTROM, "force unit"
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable view of the options (for ``conversion.json``)."""
        values = asdict(self)
        values["out_dir"] = str(self.out_dir)
        values["split"] = dict(zip(SPLIT_NAMES, self.split))
        return values
