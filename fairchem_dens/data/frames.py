"""Validate one ASE frame and turn it into a fairchem S2EF ``Data`` object.

Molecules (no periodic direction) are placed in a cubic periodic box whose edge is the
molecule's largest extent plus ``box_padding`` Å, so the vacuum between the molecule and
its periodic images is at least ``box_padding``. With the padding above the model's
cutoff no atom sees an image, and fairchem's ``radius_graph_pbc`` (``use_pbc: True``)
builds the graph, so torch-cluster is never needed and every entry of a dataset has the
same ``pbc`` (fairchem cannot batch mixed ``pbc``). Partially periodic frames (e.g. a
slab with ``pbc=(T, T, F)``) keep their cell and ``pbc``; they need three non-degenerate
cell vectors and should not share a dataset with fully periodic frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms, FixCartesian
from ase.stress import voigt_6_to_full_3x3_stress
from torch_geometric.data import Data

from fairchem_dens.data.options import ConversionError, ConversionOptions

__all__ = ["FrameRecord", "build_data", "fixed_mask", "frame_record"]


@dataclass
class FrameRecord:
    """Validated arrays of one frame, in eV and Å.

    Attributes
    ----------
    atomic_numbers : ndarray, shape (N,), int
    positions : ndarray, shape (N, 3), Å
    cell : ndarray, shape (3, 3), Å (a cubic box for molecules)
    pbc : ndarray, shape (3,), bool
    energy : float, eV (total energy as in the file, unit-converted)
    forces : ndarray, shape (N, 3), eV/Å (raw forces on all atoms, constraints ignored)
    fixed : ndarray, shape (N,), int (1 = atom fixed by ``FixAtoms``)
    tags : ndarray, shape (N,), int
    stress : ndarray, shape (3, 3), eV/Å^3, or None (not converted). ASE/fairchem sign
        convention: (1/V) dE/d(strain), positive = tensile.
    """

    atomic_numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float
    forces: np.ndarray
    fixed: np.ndarray
    tags: np.ndarray
    stress: np.ndarray | None = None


def fixed_mask(atoms: Atoms) -> np.ndarray:
    """Per-atom 0/1 mask of atoms fixed by ``FixAtoms`` (or ``FixCartesian`` on x, y, z).

    Returns
    -------
    ndarray, shape (N,), int64
    """
    mask = np.zeros(len(atoms), dtype=np.int64)
    for constraint in atoms.constraints:
        fixes_xyz = isinstance(constraint, FixCartesian) and np.all(constraint.mask)
        if isinstance(constraint, FixAtoms) or fixes_xyz:
            mask[constraint.index] = 1
    return mask


def _where(path: Path, fid: int, position: int | None = None) -> str:
    """Name a frame; when the file stores its own frame ids (``info['fid']``, e.g. pre-strided
    files) and they differ from the frame's place in the file, name both."""
    if position is None or position == fid:
        return f"{path}: frame {fid}"
    return (f"{path}: frame {fid} (its stored info['fid']; it is frame {position} of the file, "
            f"counting from 0)")


def _calculator_result(atoms: Atoms, name: str, where: str, fix: str) -> object:
    """Raw ``energy`` / ``forces`` of the frame's calculator (constraints not applied).

    Files read by ASE carry a ``SinglePointCalculator``; its stored results are taken
    as they are (that skips ASE's per-call state comparison). Other calculators are
    asked through ``get_potential_energy`` / ``get_forces(apply_constraint=False)``.
    """
    calc = atoms.calc
    if isinstance(calc, SinglePointCalculator):
        if calc.results.get(name) is None:
            raise ConversionError(f"{where}: frame has no {name}; {fix}")
        return calc.results[name]
    try:
        if name == "energy":
            return atoms.get_potential_energy(apply_constraint=False)
        if name == "stress":
            return atoms.get_stress(voigt=False, apply_constraint=False)
        return atoms.get_forces(apply_constraint=False)
    except (PropertyNotImplementedError, RuntimeError, AttributeError) as err:
        raise ConversionError(f"{where}: frame has no {name} ({err}); {fix}") from err


def _read_energy(atoms: Atoms, key: str | None, where: str) -> float:
    if key is not None:
        if key not in atoms.info:
            raise ConversionError(
                f"{where}: no energy under atoms.info[{key!r}]; keys present: "
                f"{sorted(atoms.info)}; fix --energy-key or the file"
            )
        value = atoms.info[key]
    else:
        value = _calculator_result(
            atoms,
            "energy",
            where,
            "every frame needs a DFT energy and forces (remove the frame, or name the "
            "atoms.info key holding it with --energy-key)",
        )
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{where}: energy {value!r} is not a number") from err


def _read_forces(atoms: Atoms, key: str | None, where: str) -> np.ndarray:
    if key is not None:
        if key not in atoms.arrays:
            raise ConversionError(
                f"{where}: no forces under atoms.arrays[{key!r}]; arrays present: "
                f"{sorted(atoms.arrays)}; fix --forces-key or the file"
            )
        value = atoms.arrays[key]
    else:
        value = _calculator_result(
            atoms,
            "forces",
            where,
            "every frame needs DFT forces (remove the frame, or name the per-atom "
            "array holding them with --forces-key)",
        )
    forces = np.asarray(value, dtype=np.float64)
    if forces.shape != (len(atoms), 3):
        raise ConversionError(
            f"{where}: forces have shape {forces.shape} but the frame has "
            f"{len(atoms)} atoms (expected ({len(atoms)}, 3)); the file is inconsistent"
        )
    return forces


def _read_stress(atoms: Atoms, where: str) -> np.ndarray:
    """The frame's calculator stress as a 3x3 matrix (as stored: Voigt 6 in ASE's order
    xx, yy, zz, yz, xz, xy, or 3x3, or 9 values row by row)."""
    fix = ("--stress needs a stress on every frame (extxyz: stress=\"...\" in the comment "
           "line, or a calculator that computes it); remove the frame or drop --stress")
    value = np.asarray(_calculator_result(atoms, "stress", where, fix), dtype=np.float64)
    if value.shape == (6,):
        return voigt_6_to_full_3x3_stress(value)
    if value.shape in ((3, 3), (9,), (1, 3, 3)):
        return value.reshape(3, 3)
    raise ConversionError(
        f"{where}: stress has shape {value.shape}; expected one stress per frame, as 6 Voigt "
        "values (ASE order xx, yy, zz, yz, xz, xy) or a 3x3 matrix (9 values), in the unit of "
        "--stress-unit; fix the file (a per-atom stress cannot be converted)")


def _check_finite(name: str, values: np.ndarray | float, where: str) -> None:
    if not np.all(np.isfinite(values)):
        raise ConversionError(f"{where}: {name} contain NaN or inf; remove or fix this frame")


def _molecule_box(positions: np.ndarray, padding: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre ``positions`` in a cubic box of edge (largest extent + ``padding``) Å."""
    extent = positions.max(axis=0) - positions.min(axis=0)
    edge = float(extent.max()) + padding
    center = (positions.max(axis=0) + positions.min(axis=0)) / 2
    return positions - center + edge / 2, np.eye(3) * edge


def frame_record(atoms: Atoms, path: Path, fid: int, options: ConversionOptions,
                 position: int | None = None) -> FrameRecord:
    """Validate one frame (``fid``: its frame id; ``position``: its 0-based place in the file)
    and return its arrays in eV / Å.

    Raises
    ------
    ConversionError
        Missing energy or forces, NaN/inf values, mismatched array lengths, constraint
        indices out of range, or a periodic direction without a cell vector. The message
        names ``path`` and ``fid`` (and ``position`` when it differs).
    """
    where = _where(path, fid, position)
    if len(atoms) == 0:
        raise ConversionError(f"{where}: frame has no atoms; remove it")
    positions = np.array(atoms.get_positions(), dtype=np.float64)
    cell = np.array(atoms.get_cell(complete=False).array, dtype=np.float64)
    pbc = np.array(atoms.pbc, dtype=bool)
    # positions first: ASE hides the results of a frame whose positions are NaN
    _check_finite("positions", positions, where)
    _check_finite("cell vectors", cell, where)
    energy = _read_energy(atoms, options.energy_key, where) * options.energy_factor
    forces = _read_forces(atoms, options.forces_key, where) * options.force_factor
    _check_finite("energy", energy, where)
    _check_finite("forces", forces, where)
    stress = None
    if options.stress:
        stress = _read_stress(atoms, where) * options.stress_factor
        _check_finite("stress values", stress, where)
    try:
        fixed = fixed_mask(atoms)
    except IndexError as err:
        raise ConversionError(
            f"{where}: a FixAtoms constraint names an atom index >= {len(atoms)} atoms; "
            "the constraint does not match the structure"
        ) from err
    if not pbc.any():
        positions, cell = _molecule_box(positions, options.box_padding)
        pbc = np.ones(3, dtype=bool)
    elif abs(np.linalg.det(cell)) < 1e-9:
        raise ConversionError(
            f"{where}: periodic frame (pbc={pbc.tolist()}) has a degenerate cell; "
            "give all three cell vectors (add vacuum along non-periodic directions)"
        )
    return FrameRecord(
        atomic_numbers=np.array(atoms.get_atomic_numbers(), dtype=np.int64),
        positions=positions,
        cell=cell,
        pbc=pbc,
        energy=float(energy),
        forces=forces,
        fixed=fixed,
        tags=np.array(atoms.get_tags(), dtype=np.int64),
        stress=stress,
    )


def build_data(record: FrameRecord, sid: int, fid: int, md: int | None = None) -> Data:
    """Build the S2EF ``Data`` entry with fairchem's ``AtomsToGraphs``.

    Returns
    -------
    torch_geometric.data.Data
        ``atomic_numbers`` [N] float32, ``pos`` [N, 3] float32 Å (wrapped into the cell
        by AtomsToGraphs), ``cell`` [1, 3, 3] Å, ``pbc`` [1, 3] bool, ``natoms`` int,
        ``energy`` float eV, ``forces`` [N, 3] float32 eV/Å, ``fixed`` [N] int64,
        ``tags`` [N] int64, ``sid`` int, ``fid`` int, and ``md`` int (0/1) when ``md`` is
        given, and ``stress`` [1, 3, 3] float32 eV/Å^3 (fairchem's convention, as its
        ``AtomsToGraphs(r_stress=True)`` writes it) when the record has one. No edges
        (``otf_graph: True``).
    """
    from fairchem.core.preprocessing import AtomsToGraphs

    atoms = Atoms(
        numbers=record.atomic_numbers,
        positions=record.positions,
        cell=record.cell,
        pbc=record.pbc,
        tags=record.tags,
    )
    atoms.calc = SinglePointCalculator(atoms, energy=record.energy, forces=record.forces)
    converter = AtomsToGraphs(r_edges=False, r_energy=True, r_forces=True, r_fixed=True, r_pbc=True)
    data = converter.convert(atoms, sid=int(sid))
    data.atomic_numbers = data.atomic_numbers.float()
    data.pbc = data.pbc.view(1, 3)
    data.energy = float(data.energy)
    data.fixed = torch.as_tensor(record.fixed, dtype=torch.long)
    data.tags = data.tags.long()
    data.natoms = int(data.natoms)
    data.fid = int(fid)
    if md is not None:
        data.md = int(bool(md))
    if record.stress is not None:
        data.stress = torch.as_tensor(record.stress, dtype=torch.float32).view(1, 3, 3)
    return data
