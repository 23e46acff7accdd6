"""Stress in fairchem's convention from real mlearn data: unit, sign and component order are
checked numerically (energy differences along strain paths = the work integral of the stress),
through the converter into the LMDB, plus the errors on bad stress input."""

from __future__ import annotations

import json
import lzma
import re
from collections import defaultdict
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.stress import full_3x3_to_voigt_6_stress

from fairchem_dens.data import ConversionError, ConversionOptions, convert
from fairchem_dens.data.mlearn import (
    KBAR,
    VOIGT_ORDER,
    mlearn_atoms,
    read_mlearn,
    virial_to_stress,
    write_mlearn_extxyz,
)

from .conftest import SHARED, make_frames, require_shared, set_results
from .test_convert_roundtrip import read_lmdb

MLEARN = SHARED / "data" / "mlearn"


def work_error(path_frames, stress_of) -> float:
    """Relative error of the work integral along strain paths: sum |dE - W| / sum |dE| over
    consecutive frames, W = 1/2 (V_a sigma_a + V_b sigma_b) : sym(F_ab - 1), with sigma =
    ``stress_of(frame)`` in eV/Å^3 and ASE's definition sigma = (1/V) dE/d(strain)."""
    err = total = 0.0
    for path in path_frames:
        for a, b in zip(path, path[1:]):
            grad = np.linalg.solve(a.cell.array, b.cell.array).T - np.eye(3)
            strain = (grad + grad.T) / 2
            work = 0.5 * (a.get_volume() * np.sum(stress_of(a) * strain)
                          + b.get_volume() * np.sum(stress_of(b) * strain))
            d_energy = b.get_potential_energy() - a.get_potential_energy()
            err, total = err + abs(d_energy - work), total + abs(d_energy)
    return err / total


def elastic_paths(element: str, order: tuple[str, ...] | None = None) -> list[list]:
    """mlearn ``element``'s Elastic group as strain paths: for each mode, the ground state and
    the strained cells in order of strain (positions are scaled with the cell). ``order``:
    read ``virial_stress`` in this component order instead of the element's."""
    records = []
    for split in ("training", "test"):
        path = require_shared(MLEARN / element / f"{split}.json.xz")
        with lzma.open(path, "rt") as handle:
            records += [r for r in json.load(handle) if r["group"] == "Elastic"]
    ground = next(r for r in records if r["description"] == "Ground state crystal")
    modes = defaultdict(list)
    for r in records:
        match = re.search(r"mode (\d+), strain (\S+)", r["description"])
        if match and r["num_atoms"] == ground["num_atoms"]:
            modes[match.group(1)].append((float(match.group(2)), r))

    def frame(record: dict):
        atoms = mlearn_atoms(record)
        if order is not None:
            stress = virial_to_stress(record["outputs"]["virial_stress"], order)
            set_results(atoms, energy=atoms.get_potential_energy(),
                        stress=full_3x3_to_voigt_6_stress(stress))
        return atoms

    return [[frame(r) for _, r in sorted([*steps, (0.0, ground)], key=lambda t: t[0])]
            for steps in modes.values()]


def _stress(atoms) -> np.ndarray:
    return atoms.get_stress(voigt=False)


def test_work_integral_check_is_ases_definition_of_stress() -> None:
    """The check itself, on ASE's EMT (whose stress is ASE's convention by definition)."""
    cu = bulk("Cu", "fcc", a=3.7, cubic=True)
    path = []
    for shear in np.linspace(-0.04, 0.04, 9):
        atoms = cu.copy()
        grad = np.array([[0.02, shear, 0], [0, -0.01, 0], [0, 0, 0.03]])  # F - 1
        atoms.set_cell(cu.cell.array @ (np.eye(3) + grad).T, scale_atoms=True)
        atoms.calc = EMT()
        path.append(atoms)
    assert work_error([path], _stress) < 0.01
    assert work_error([path], lambda a: -_stress(a)) > 1.0


@pytest.mark.parametrize(("element", "tolerance"), [("Si", 0.01), ("Mo", 0.03)])
def test_mlearn_stress_is_ase_convention_in_ev_per_a3(element: str, tolerance: float) -> None:
    paths = elastic_paths(element)
    assert sum(len(p) - 1 for p in paths) >= 50  # normal and shear strains up to +-10 %
    assert work_error(paths, _stress) < tolerance
    # the same check refutes the other readings: VASP's sign, kBar taken as 0.01 GPa or
    # 1 GPa, and the other element's order of the shear components
    assert work_error(paths, lambda a: -_stress(a)) > 1.5
    assert work_error(paths, lambda a: 10 * _stress(a)) > 5
    assert work_error(paths, lambda a: 0.1 * _stress(a)) > 0.5
    other = VOIGT_ORDER["default"] if element == "Mo" else VOIGT_ORDER["Mo"]
    assert work_error(elastic_paths(element, order=other), _stress) > 0.1


def test_si_ground_state_is_at_zero_pressure_and_compression_is_negative() -> None:
    from ase import units

    src = require_shared(MLEARN / "Si" / "training.json.xz")
    with lzma.open(src, "rt") as handle:
        records = [r for r in json.load(handle) if r["group"] == "Elastic"]
    ground = next(r for r in records if r["description"] == "Ground state crystal")
    assert abs(np.trace(_stress(mlearn_atoms(ground))) / 3) < 0.01 * units.GPa
    compressed = next(r for r in records if r["description"].endswith("mode 0, strain -0.1"))
    stress = _stress(mlearn_atoms(compressed))  # cell 10 % shorter along x
    assert stress[0, 0] < stress[1, 1] < 0  # compressive = negative, most along the strain
    assert stress[0, 0] == pytest.approx(-compressed["outputs"]["virial_stress"][0] * KBAR)


def test_converter_writes_fairchem_stress_and_it_satisfies_the_work_check(tmp_path: Path
                                                                          ) -> None:
    """Si's uniaxial path (mode 0) through extxyz and ``convert(stress=True)``: the LMDB holds
    ``stress`` [1, 3, 3] eV/Å^3 equal to fairchem's AtomsToGraphs(r_stress=True) of the frame,
    equal to -virial_stress * 0.1 GPa, and energies/stresses of the LMDB pass the work check."""
    from fairchem.core.modules.transforms import decompose_tensor
    from fairchem.core.preprocessing import AtomsToGraphs

    path = elastic_paths("Si")[0]
    (tmp_path / "raw").mkdir()
    for sid, atoms in enumerate(path):
        ase.io.write(tmp_path / "raw" / f"Si_{sid:05d}.extxyz", atoms)
    convert(ConversionOptions(inputs=[str(tmp_path / "raw")], out_dir=tmp_path / "out",
                              val_systems=(1,), stress=True))
    entries = {int(e.sid): e for split in ("train", "val")
               for e in read_lmdb(tmp_path / "out" / split / "data.lmdb")}
    a2g = AtomsToGraphs(r_energy=True, r_forces=True, r_stress=True, r_edges=False)
    frames = []
    for sid, atoms in enumerate(path):
        entry = entries[sid]
        assert entry.stress.shape == (1, 3, 3) and entry.stress.dtype == torch.float32
        torch.testing.assert_close(entry.stress.view(3, 3), a2g.convert(atoms).stress.view(3, 3))
        frame = atoms.copy()
        frame.calc = type(atoms.calc)(frame, energy=float(entry.energy),
                                      stress=full_3x3_to_voigt_6_stress(
                                          entry.stress.view(3, 3).double().numpy()))
        frames.append(frame)
    # the most compressed cell (strain -0.1 along x): mlearn's virial xx is +169.41 kBar,
    # fairchem's stress xx is -16.941 GPa = -16.941 / 160.2177 eV/Å^3
    assert float(entries[0].stress[0, 0, 0]) == pytest.approx(-16.941 / 160.2177, rel=1e-4)
    assert work_error([frames], _stress) < 0.02  # 1.2 %: trapezoid over 2 % strain steps
    assert work_error([frames], lambda a: -_stress(a)) > 1.5
    # fairchem's OMat transform (decompose_tensor) reads the entry: isotropic part trace/sqrt 3
    parts = {"stress_isotropic": {"irrep_dim": 0}, "stress_anisotropic": {"irrep_dim": 2}}
    decomposed = decompose_tensor(entries[0].clone(), {"tensor": "stress", "rank": 2,
                                                       "decomposition": parts})
    trace = float(entries[0].stress.view(3, 3).trace())
    assert float(decomposed.stress_isotropic) == pytest.approx(trace / 3**0.5, rel=1e-5)
    assert trace < 0 and decomposed.stress_anisotropic.shape == (1, 5)


def test_write_mlearn_extxyz_names_one_system_per_record(tmp_path: Path) -> None:
    src = require_shared(MLEARN / "Mo" / "test.json.xz")
    written = write_mlearn_extxyz(src, tmp_path, first_sid=10000)
    frames = read_mlearn(src)
    assert [p.name for p in written[:2]] == ["Mo_10000.extxyz", "Mo_10001.extxyz"]
    assert len(written) == len(frames)
    back = ase.io.read(written[3])
    np.testing.assert_allclose(back.get_stress(voigt=False), frames[3].get_stress(voigt=False))


def test_bad_mlearn_stress_names_file_record_and_fix(tmp_path: Path) -> None:
    src = require_shared(MLEARN / "Si" / "test.json.xz")
    with lzma.open(src, "rt") as handle:
        records = json.load(handle)[:3]
    records[2]["outputs"]["virial_stress"] = records[2]["outputs"]["virial_stress"][:5]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    with pytest.raises(ConversionError, match=r"bad\.json: record 2: virial_stress has shape "
                       r"\(5,\).*6 components.*fix or remove"):
        read_mlearn(bad)


def _stressed_frames(stress) -> list:
    frames = make_frames()
    for atoms in frames:
        set_results(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                    stress=np.asarray(stress, float))
    return frames


def test_stress_unit_converts_and_voigt_or_matrix_read_alike(tmp_path: Path) -> None:
    voigt = [1.0, 2.0, 3.0, 0.4, 0.5, 0.6]  # ASE order: xx yy zz yz xz xy
    full = [[1.0, 0.6, 0.5], [0.6, 2.0, 0.4], [0.5, 0.4, 3.0]]
    (tmp_path / "in").mkdir()
    ase.io.write(tmp_path / "in" / "sys1.traj", _stressed_frames(voigt))
    ase.io.write(tmp_path / "in" / "sys2.traj", _stressed_frames(full))
    convert(ConversionOptions(inputs=[str(tmp_path / "in")], out_dir=tmp_path / "out",
                              val_systems=(2,), stress=True, stress_unit="GPa"))
    for split in ("train", "val"):
        for entry in read_lmdb(tmp_path / "out" / split / "data.lmdb"):
            np.testing.assert_allclose(entry.stress.view(3, 3).numpy(),
                                       np.array(full) / 160.21766208, rtol=1e-6)


@pytest.mark.parametrize(("stress", "message"), [
    (np.zeros(4), r"stress has shape \(4,\).*6 Voigt values.*3x3"),
    (np.zeros((4, 3, 3)), r"stress has shape \(4, 3, 3\).*per-atom stress"),
])
def test_stress_of_wrong_shape_names_file_frame_and_fix(tmp_path: Path, stress, message) -> None:
    frames = make_frames()
    for atoms in frames:
        set_results(atoms, energy=-1.0, forces=atoms.get_forces(), stress=np.zeros(6))
    frames[1].calc.results["stress"] = stress
    ase.io.write(tmp_path / "sys1.traj", frames)
    with pytest.raises(ConversionError, match=rf"sys1\.traj: frame 1: {message}"):
        convert(ConversionOptions(inputs=[str(tmp_path / "sys1.traj")], out_dir=tmp_path / "o",
                                  stress=True))


def test_missing_stress_and_unknown_unit_are_named(tmp_path: Path) -> None:
    ase.io.write(tmp_path / "sys1.traj", make_frames())
    with pytest.raises(ConversionError, match=r"sys1\.traj: frame 0: frame has no stress.*"
                       r"drop --stress"):
        convert(ConversionOptions(inputs=[str(tmp_path)], out_dir=tmp_path / "o", stress=True))
    with pytest.raises(ConversionError, match=r"unknown stress unit.*'kPa'.*eV/Å\^3, GPa, kBar"):
        ConversionOptions(inputs=[str(tmp_path)], out_dir=tmp_path / "o", stress_unit="kPa")
