"""Command line, input formats (traj, extxyz(.gz), ASE db), units and molecule boxes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
import yaml
from ase import units
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from fairchem.core.datasets import LmdbDataset

from fairchem_dens import cli
from fairchem_dens.data import ConversionOptions, convert
from fairchem_dens.data.extxyz_io import write_extxyz
from fairchem_dens.data.options import parse_split_fractions
from fairchem_dens.data.reading import assign_system_ids, discover_input_files

from .conftest import make_frames


def test_top_level_help_lists_convert(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "convert" in capsys.readouterr().out


def test_convert_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in (
        "--out",
        "--split",
        "--seed",
        "--val-systems",
        "--test-systems",
        "--stride",
        "--energy-unit",
        "--force-unit",
        "--box-padding",
        "radius_graph_pbc",
        "kcal/mol",
        "element_references.npz",
    ):
        assert needle in text, needle


def test_no_command_prints_help(capsys: pytest.CaptureFixture) -> None:
    assert cli.main([]) == 2
    assert "convert" in capsys.readouterr().out


def test_python_dash_m_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fairchem_dens.data", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--box-padding" in result.stdout
    assert "python -m fairchem_dens.data" in result.stdout


def test_cli_convert_prints_usable_yaml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for sid in (5, 6, 7):
        ase.io.write(tmp_path / f"slab_{sid}.traj", make_frames(seed=sid))
    out = tmp_path / "out"
    status = cli.main(
        [
            "convert",
            str(tmp_path / "slab_*.traj"),
            "--out",
            str(out),
            "--split",
            "0.34,0.33,0.33",
            "--seed",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    config = yaml.safe_load(captured.out)["dataset"]
    assert [config[name]["src"] for name in ("train", "val", "test")] == [
        str(out.resolve() / name) for name in ("train", "val", "test")
    ]
    for entry in config["train"]["transforms"]["normalizer"].values():
        assert Path(entry["file"]).is_file()
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["sid_source"] == "file_name_digits"
    assert summary["options"]["seed"] == 3
    assert {s["split"] for s in summary["systems"].values()} == {"train", "val", "test"}


def test_cli_reports_errors_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status = cli.main(["convert", str(tmp_path / "nope.traj"), "--out", str(tmp_path / "o")])
    assert status == 2
    assert "nope.traj: no such file" in capsys.readouterr().err
    assert cli.main(["convert", "x", "--out", "o", "--energy-unit", "furlong"]) == 2


def test_formats_directory_discovery_and_index_sids(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    ase.io.write(tmp_path / "alpha.traj", make_frames(seed=1))
    write_extxyz(tmp_path / "sub" / "beta.extxyz.gz", make_frames(seed=2))
    with ase.db.connect(tmp_path / "sub" / "gamma.db") as db:
        for atoms in make_frames(seed=3):
            db.write(atoms)
    (tmp_path / "ignored.txt").write_text("x")
    files = discover_input_files([str(tmp_path)])
    assert [f.name for f in files] == ["alpha.traj", "beta.extxyz.gz", "gamma.db"]
    systems, source = assign_system_ids(files)
    assert source == "index"
    assert [s.sid for s in systems] == [0, 1, 2]
    summary = convert(ConversionOptions([str(tmp_path)], tmp_path / "out", split=(1, 0, 0)))
    dataset = LmdbDataset({"src": str(tmp_path / "out" / "train")})
    assert len(dataset) == 9
    for index, path in enumerate(files):
        frames = ase.io.read(path, index=":")
        entries = [dataset[i] for i in range(len(dataset)) if dataset[i].sid == index]
        assert [e.fid for e in entries] == [0, 1, 2]
        for atoms, data in zip(frames, entries):
            assert data.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
            np.testing.assert_allclose(
                data.forces, atoms.get_forces(apply_constraint=False), atol=1e-6
            )
            assert data.fixed.tolist() == [1, 1, 0, 0]
    assert summary["systems"]["2"]["path"].endswith("gamma.db")


def test_molecules_go_into_a_padded_cubic_box_in_ev(tmp_path: Path) -> None:
    frames = []
    for shift in (0.0, 0.05):
        atoms = molecule("CH3CH2OH")
        atoms.positions[0] += shift
        atoms.calc = SinglePointCalculator(
            atoms, energy=-97195.0 + shift, forces=np.full((len(atoms), 3), 2.0)
        )
        frames.append(atoms)
    ase.io.write(tmp_path / "ethanol.xyz", frames)
    convert(
        ConversionOptions(
            [str(tmp_path / "ethanol.xyz")],
            tmp_path / "out",
            energy_unit="kcal/mol",
            box_padding=13.0,
        )
    )
    dataset = LmdbDataset({"src": str(tmp_path / "out" / "train")})
    for atoms, data in zip(frames, (dataset[0], dataset[1])):
        kcal = units.kcal / units.mol
        assert data.energy == pytest.approx(atoms.get_potential_energy() * kcal, rel=1e-12)
        np.testing.assert_allclose(data.forces, 2.0 * kcal, rtol=1e-6)
        extent = np.ptp(atoms.positions, axis=0).max()
        np.testing.assert_allclose(data.cell[0], np.eye(3) * (extent + 13.0), rtol=1e-6)
        assert data.pbc.tolist() == [[True, True, True]]
        pos = data.pos.double().numpy()
        assert pos.min() > 6.4
        assert pos.max() < extent + 6.6
        np.testing.assert_allclose(pos - pos[0], atoms.positions - atoms.positions[0], atol=1e-5)


@pytest.mark.parametrize(
    ("text", "expected"), [("0.8,0.1,0.1", (0.8, 0.1, 0.1)), ("0.9, 0.1", (0.9, 0.1, 0.0))]
)
def test_parse_split(text: str, expected: tuple) -> None:
    assert parse_split_fractions(text) == expected


@pytest.mark.parametrize(
    ("energy", "force", "factor"),
    [
        ("eV", "eV/A", 1.0),
        ("ev", "eV/Ang", 1.0),
        ("kcal/mol", None, units.kcal / units.mol),
        ("kJ/mol", "kJ/mol/Å", units.kJ / units.mol),
        ("Ha", "Ha/Bohr", units.Hartree / units.Bohr),
    ],
)
def test_unit_spellings(energy: str, force: str | None, factor: float) -> None:
    options = ConversionOptions(["x"], Path("o"), energy_unit=energy, force_unit=force)
    assert options.force_factor == pytest.approx(factor)
