"""Read the mlearn data sets (Zuo et al., J. Phys. Chem. A 124, 731 (2020); BSD-3) as ASE frames
whose stress is in ASE's and fairchem's convention, ready for ``fairchem-dens convert --stress``.

An mlearn file (``training.json[.xz]``, ``test.json[.xz]``) is a list of records: a pymatgen
``Structure`` dict and ``outputs`` with ``energy`` (eV), ``forces`` (eV/Å) and
``virial_stress``, six values from VASP's ``in kB`` line:

* unit kBar (0.1 GPa);
* sign opposite to ASE's: VASP prints the pressure-like quantity, positive when the cell is
  compressed (it pushes outward), while ASE's stress is (1/V) dE/d(strain), negative then;
* order xx, yy, zz, xy, yz, zx (VASP's) in the Si, Ge and Li sets, but xx, yy, zz, xy, zx, yz
  in the Mo set.

All three were established numerically on the sets' ``Elastic`` group (cells strained mode by
mode, positions scaled): along each strain path the DFT energy differences equal
the work integral V sigma : d(strain) of the stress read here to 0.6 % (Si), 0.9 % (Ge) and
1.7 % (Mo) of the summed |dE| (tests/data/test_mlearn_stress.py); the opposite sign gives
~200 %, VASP's order on Mo 14 % and Mo's order on Si 47 %; the Si ground state reads
-0.004 GPa. (Li's 2-atom cells strained by 0.5-1 % change the energy by ~1e-4 eV, below the
data's noise, so they decide nothing; its shear strains fit VASP's order.)
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

from fairchem_dens.data.options import ConversionError

__all__ = ["KBAR", "VOIGT_ORDER", "mlearn_atoms", "read_mlearn", "virial_to_stress",
           "write_mlearn_extxyz"]

KBAR = 0.1 * units.GPa  # one kBar in eV/Å^3
_AXIS = {"x": 0, "y": 1, "z": 2}
#: Order of the six ``virial_stress`` components, by element (see the module docstring).
VOIGT_ORDER: dict[str, tuple[str, ...]] = {
    "default": ("xx", "yy", "zz", "xy", "yz", "zx"),  # VASP's
    "Mo": ("xx", "yy", "zz", "xy", "zx", "yz"),
}


def virial_to_stress(virial, order: tuple[str, ...] = VOIGT_ORDER["default"]) -> np.ndarray:
    """mlearn ``virial_stress`` (6 values, kBar, VASP sign, ``order``) -> ASE stress.

    Returns
    -------
    ndarray, shape (3, 3), eV/Å^3: (1/V) dE/d(strain), positive = tensile.
    """
    values = np.asarray(virial, dtype=np.float64)
    if values.shape != (6,):
        raise ValueError(f"virial_stress has shape {values.shape}, expected (6,)")
    stress = np.zeros((3, 3))
    for value, (a, b) in zip(values, order):
        stress[_AXIS[a], _AXIS[b]] = stress[_AXIS[b], _AXIS[a]] = value
    return -KBAR * stress


def mlearn_atoms(record: dict, where: str = "mlearn record") -> Atoms:
    """One mlearn record as periodic ASE ``Atoms`` with a single-point calculator: energy eV,
    forces eV/Å and stress eV/Å^3 (ASE convention; ``atoms.get_stress(voigt=False)``)."""
    try:
        structure, outputs = record["structure"], record["outputs"]
        symbols = [site["species"][0]["element"] for site in structure["sites"]]
        positions = [site["xyz"] for site in structure["sites"]]
        cell = structure["lattice"]["matrix"]
        energy, forces = float(outputs["energy"]), np.asarray(outputs["forces"], float)
        virial = outputs["virial_stress"]
    except (KeyError, IndexError, TypeError) as err:
        raise ConversionError(
            f"{where}: not an mlearn record (missing {err}); expected 'structure' (pymatgen "
            "dict) and 'outputs' with energy, forces and virial_stress") from err
    element = record.get("element") or (symbols[0] if len(set(symbols)) == 1 else "default")
    try:
        stress = virial_to_stress(virial, VOIGT_ORDER.get(element, VOIGT_ORDER["default"]))
    except (ValueError, TypeError) as err:
        raise ConversionError(
            f"{where}: {err}; mlearn's virial_stress holds the 6 components of one stress "
            "(kBar, VASP's order); fix or remove the record") from err
    atoms = Atoms(symbols, positions=positions, cell=cell, pbc=True)
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces,
                                       stress=full_3x3_to_voigt_6_stress(stress))
    atoms.info["mlearn_group"] = record.get("group", "")
    return atoms


def read_mlearn(path: str | Path) -> list[Atoms]:
    """All records of an mlearn JSON file (``.json`` or ``.json.xz``) as ASE frames."""
    path = Path(path)
    opener = lzma.open if path.name.endswith(".xz") else open
    with opener(path, "rt") as handle:
        records = json.load(handle)
    if not isinstance(records, list):
        raise ConversionError(f"{path}: expected a JSON list of mlearn records")
    return [mlearn_atoms(r, f"{path}: record {i}") for i, r in enumerate(records)]


def write_mlearn_extxyz(path: str | Path, out_dir: str | Path, first_sid: int = 0) -> list[Path]:
    """Write each record of ``path`` as its own system, ``<element>_<sid:05d>.extxyz`` in
    ``out_dir`` (sids from ``first_sid``), for ``fairchem-dens convert --stress``."""
    import ase.io

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, atoms in enumerate(read_mlearn(path)):
        name = atoms.get_chemical_symbols()[0] if len(set(atoms.numbers)) == 1 else "mix"
        target = out_dir / f"{name}_{first_sid + i:05d}.extxyz"
        ase.io.write(target, atoms)
        written.append(target)
    return written
