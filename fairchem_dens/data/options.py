"""Conversion options, unit handling and the converter's error type.

Everything a conversion needs to know is held by :class:`ConversionOptions`, a
validated dataclass shared by the command line (``fairchem-dens convert``) and the
Python API (:func:`fairchem_dens.data.convert`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ase import units

from fairchem_dens.data.force_scale import FORCES_NORMALIZERS

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "DEFAULT_SPLIT",
    "ENERGY_UNITS_IN_EV",
    "ConversionError",
    "ConversionOptions",
    "FORCE_UNITS_IN_EV_PER_ANGSTROM",
    "STRESS_UNITS_IN_EV_PER_ANGSTROM3",
    "SPLIT_NAMES",
    "check_disjoint_systems",
    "parse_split_fractions",
    "parse_system_id_file",
    "parse_system_ids",
]

#: Names of the splits written by the converter, in output order.
SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")

#: Fractions of systems per split (train, val, test) when no ``split`` is given.
DEFAULT_SPLIT: tuple[float, float, float] = (0.8, 0.1, 0.1)

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


#: Stress units accepted by ``--stress-unit``: size of one unit in eV/Å^3. The sign convention
#: is ASE's (and fairchem's): stress = (1/V) dE/d(strain), positive = tensile. VASP's ``in kB``
#: line (and mlearn's ``virial_stress``) has the opposite sign: see :mod:`fairchem_dens.data.mlearn`.
STRESS_UNITS_IN_EV_PER_ANGSTROM3: dict[str, float] = {
    "eV/Å^3": 1.0,
    "GPa": units.GPa,
    "kBar": 0.1 * units.GPa,
    "bar": 1.0e-4 * units.GPa,
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
    key = key.replace("/a", "/å").replace("ha/", "hartree/").replace("**", "^").replace("³", "^3")
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


def parse_system_ids(text: str, option: str = "--val-systems") -> tuple[int, ...]:
    """Parse ``"1000100,1000161"`` into system ids ``(1000100, 1000161)``.

    Whitespace around the ids and empty items (``"1,2,"``) are ignored, so ``""`` gives
    ``()``.

    Parameters
    ----------
    text
        Comma-separated integer system ids.
    option
        Name of the option, used in the error message.

    Returns
    -------
    tuple of int
        The ids in the order given.
    """
    items = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return tuple(int(item) for item in items)
    except ValueError as err:
        raise ConversionError(
            f"{option} {text!r} is not a comma-separated list of integer system ids, "
            "e.g. 1000100,1000161"
        ) from err


def parse_system_id_file(path: str | Path, option: str = "--md-systems") -> tuple[int, ...]:
    """Read system ids from a text file: one id per line.

    An id is an integer sid (``1000100``) or an OC20 system name (``random1000100``, as in
    the first column of OC20's S2EF ``*.txt`` metadata files); anything after ``#`` and
    anything after the first comma on a line is ignored, and so are blank lines, so an
    OC20 metadata line ``random1000100,frame12,-1.23`` can be used as it is.

    Returns
    -------
    tuple of int
        The distinct ids, sorted.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ConversionError(f"{option} {path}: cannot read the file ({err})") from err
    ids: set[int] = set()
    for number, line in enumerate(lines, start=1):
        item = line.split("#", 1)[0].split(",", 1)[0].strip()
        if not item:
            continue
        digits = item[len("random"):] if item.startswith("random") else item
        if not digits.isdigit():
            raise ConversionError(
                f"{option} {path}: line {number} {line.strip()!r} is not a system id; write "
                "one integer sid (e.g. 1000100) or OC20 system name (e.g. random1000100) "
                "per line"
            )
        ids.add(int(digits))
    return tuple(sorted(ids))


def check_disjoint_systems(val_systems: Iterable[int], test_systems: Iterable[int]) -> None:
    """Raise :class:`ConversionError` when a system id is in both val and test."""
    both = sorted(set(val_systems) & set(test_systems))
    if both:
        raise ConversionError(
            f"system(s) {', '.join(map(str, both))} are in both --val-systems and "
            "--test-systems; a system can be in one split only"
        )


def _system_id_tuple(values: str | Iterable[Any], option: str) -> tuple[int, ...]:
    """Validate system ids (a comma-separated string or integers) into a sorted tuple."""
    if isinstance(values, str):
        return tuple(sorted(set(parse_system_ids(values, option))))
    if not hasattr(values, "__iter__"):
        values = [values]  # a single id
    ids = set()
    for value in values:
        try:
            if isinstance(value, bool):
                raise TypeError
            ids.add(operator.index(value))
        except TypeError as err:
            raise ConversionError(f"{option}: system ids must be integers, got {value!r}") from err
    return tuple(sorted(ids))


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
        Fractions of *systems* (files) per split (train, val, test); sum to 1. ``None``
        (the default) means :data:`DEFAULT_SPLIT`; a string like ``"0.8,0.1,0.1"`` is
        parsed. Not allowed together with ``val_systems`` / ``test_systems``; it is
        ``None`` after validation when those are used.
    seed
        Seed of the system shuffle that assigns systems to splits (not used with
        ``val_systems`` / ``test_systems``).
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
    val_systems, test_systems
        Explicit split assignment: the system ids (sids) that go to val / test; all
        other systems go to train, and ``split`` and ``seed`` are not used. Integers or
        a comma-separated string; kept sorted, and the two must be disjoint. Whether
        every id names an input system is checked by :func:`convert` once the inputs are
        read. Use this to hold out systems whose elements all occur in train (the
        energy references of elements absent from train are 0 eV).
    md_systems
        ``None`` (the default): no ``md`` attribute is written. Otherwise the system ids
        (integers, a comma-separated string, or the :class:`~pathlib.Path` of a file with one
        id per line, see :func:`parse_system_id_file`) whose frames come from molecular
        dynamics: every entry gets ``md = 1`` for these systems and ``md = 0`` for all
        others, so that ``optim.dens.skip_key: md`` keeps DeNS from corrupting MD frames
        (OC20 S2EF-All+MD, paper Appendix C). Ids that name no input system are allowed
        (a list of all OC20 MD systems can be used for any subset); ``conversion.json``
        counts the systems and frames marked.
    stress
        Also write each frame's stress as ``stress`` ``[1, 3, 3]`` in eV/Å^3, fairchem's
        convention (ASE's ``atoms.get_stress(voigt=False)``: (1/V) dE/d(strain), positive =
        tensile), read from the frame's calculator (extxyz ``stress=`` in the comment line,
        Voigt 6 or 3x3). Every frame must carry one.
    stress_unit
        Unit of the stress in the input (converted to eV/Å^3), ASE sign convention.
    forces_normalizer
        Scale written to ``forces_normalizer.npz``: ``"rms"`` (default, the force RMS) or
        ``"energy_std"`` (sigma_E of the training energies, the authors' MD17 scale; see
        :mod:`fairchem_dens.data.force_scale`).
    """

    inputs: list[str]
    out_dir: Path
    split: tuple[float, float, float] | None = None
    seed: int = 0
    stride: int = 1
    energy_unit: str = "eV"
    force_unit: str | None = None
    box_padding: float = 15.0
    energy_key: str | None = None
    forces_key: str | None = None
    overwrite: bool = False
    val_systems: tuple[int, ...] = ()
    test_systems: tuple[int, ...] = ()
    md_systems: tuple[int, ...] | None = None
    forces_normalizer: str = "rms"
    stress: bool = False
    stress_unit: str = "eV/Å^3"
    energy_factor: float = field(init=False, default=1.0)
    force_factor: float = field(init=False, default=1.0)
    stress_factor: float = field(init=False, default=1.0)

    def __post_init__(self) -> None:
        self.inputs = [str(item) for item in self.inputs]
        self.out_dir = Path(self.out_dir)
        if not self.inputs:
            raise ConversionError("no inputs given: pass files, directories or globs")
        self._validate_split()
        if self.forces_normalizer not in FORCES_NORMALIZERS:
            raise ConversionError(f"--forces-normalizer {self.forces_normalizer!r} is unknown: "
                                  f"use one of {', '.join(FORCES_NORMALIZERS)}")
        if self.md_systems is not None:
            if isinstance(self.md_systems, Path):
                self.md_systems = parse_system_id_file(self.md_systems)
            else:
                self.md_systems = _system_id_tuple(self.md_systems, "--md-systems")
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
        self.stress_unit, self.stress_factor = _lookup_unit(
            self.stress_unit, STRESS_UNITS_IN_EV_PER_ANGSTROM3, "stress unit (--stress-unit)"
        )

    @property
    def split_mode(self) -> str:
        """``"explicit"`` with ``val_systems`` / ``test_systems``, else ``"fractions"``."""
        return "explicit" if self.val_systems or self.test_systems else "fractions"

    def _validate_split(self) -> None:
        """Validate the explicit system lists, or the split fractions."""
        self.val_systems = _system_id_tuple(self.val_systems, "--val-systems")
        self.test_systems = _system_id_tuple(self.test_systems, "--test-systems")
        if self.split_mode == "explicit":
            check_disjoint_systems(self.val_systems, self.test_systems)
            if self.split is not None:
                raise ConversionError(
                    "--split and --val-systems/--test-systems are exclusive: with explicit "
                    "systems all other systems go to train and no fractions are used; drop "
                    "--split (or the explicit systems)"
                )
            return
        split = DEFAULT_SPLIT if self.split is None else self.split
        if isinstance(split, str):
            split = parse_split_fractions(split)
        self.split = tuple(float(value) for value in split)  # type: ignore[assignment]
        if len(self.split) != 3 or any(
            not math.isfinite(value) or value < 0 for value in self.split
        ):
            raise ConversionError(f"split fractions {self.split} must be three finite numbers >= 0")
        if abs(sum(self.split) - 1.0) > 1e-6:
            raise ConversionError(f"split fractions {self.split} sum to {sum(self.split):g}, not 1")
        if self.split[0] <= 0:
            raise ConversionError("the train fraction must be > 0")

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable view of the options (for ``conversion.json``)."""
        values = asdict(self)
        values["out_dir"] = str(self.out_dir)
        values["split"] = None if self.split is None else dict(zip(SPLIT_NAMES, self.split))
        values["val_systems"] = list(self.val_systems)
        values["test_systems"] = list(self.test_systems)
        if self.md_systems is not None:
            values["md_systems"] = list(self.md_systems)
        return values
