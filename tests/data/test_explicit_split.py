"""Explicit split assignment: ``--val-systems`` / ``--test-systems``."""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import pytest

from fairchem_dens import cli
from fairchem_dens.data import ConversionError, ConversionOptions, convert
from fairchem_dens.data.options import parse_system_ids
from fairchem_dens.data.splits import assign_systems

from .conftest import make_frames

#: Held-out demo systems whose elements (Au Na O, H In N O Pt) all occur in the other 12.
DEMO_VAL_SYSTEMS = (1000100, 1000161)


def write_systems(folder: Path, sids: tuple[int, ...] = (5, 6, 7, 8)) -> str:
    """One small trajectory per sid (``slab_<sid>.traj``); returns their glob."""
    for sid in sids:
        ase.io.write(folder / f"slab_{sid}.traj", make_frames(seed=sid))
    return str(folder / "slab_*.traj")


def test_assign_systems_puts_the_rest_in_train() -> None:
    assert assign_systems([8, 5, 7, 6], val_systems=[7], test_systems=[5]) == {
        "train": [6, 8],
        "val": [7],
        "test": [5],
    }
    assert assign_systems([1, 2, 3], val_systems=[3, 2], test_systems=[]) == {
        "train": [1],
        "val": [2, 3],
        "test": [],
    }


def test_explicit_systems_go_exactly_to_val_and_test(tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = convert(
        ConversionOptions([write_systems(tmp_path)], out, val_systems=(8,), test_systems=[5, 6])
    )
    splits = {name: report["systems"] for name, report in summary["splits"].items()}
    assert splits == {"train": [7], "val": [8], "test": [5, 6]}
    assert {sid: s["split"] for sid, s in summary["systems"].items()} == {
        "5": "test",
        "6": "test",
        "7": "train",
        "8": "val",
    }
    assert summary["split_mode"] == "explicit"
    assert summary["options"]["split"] is None
    assert summary["options"]["val_systems"] == [8]
    assert summary["options"]["test_systems"] == [5, 6]
    assert json.loads((out / "conversion.json").read_text())["split_mode"] == "explicit"


def test_only_val_systems_leaves_test_empty(tmp_path: Path) -> None:
    summary = convert(
        ConversionOptions([write_systems(tmp_path)], tmp_path / "out", val_systems="6")
    )
    assert list(summary["splits"]) == ["train", "val"]
    assert summary["splits"]["train"]["systems"] == [5, 7, 8]
    assert not (tmp_path / "out" / "test").exists()


def test_fraction_mode_is_recorded(demo_conversion: dict) -> None:
    assert demo_conversion["split_mode"] == "fractions"
    assert demo_conversion["options"]["val_systems"] == []
    assert demo_conversion["options"]["test_systems"] == []


def test_demo_val_systems_have_no_elements_missing_from_train(
    demo_dir: Path, tmp_path: Path
) -> None:
    summary = convert(
        ConversionOptions([str(demo_dir)], tmp_path / "out", val_systems=DEMO_VAL_SYSTEMS)
    )
    assert summary["splits"]["val"]["systems"] == list(DEMO_VAL_SYSTEMS)
    assert summary["splits"]["train"]["num_systems"] == 12
    assert "test" not in summary["splits"]
    assert not summary["elements_missing_from_train"].get("val")
    for symbol in ("Au", "Na", "O", "H", "In", "N", "Pt"):
        assert symbol in summary["element_references"]["eV_per_atom"]


def test_unknown_sid_is_named_with_the_available_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = ConversionOptions([write_systems(tmp_path)], out, val_systems=(6, 1234))
    with pytest.raises(ConversionError, match=r"unknown system id\(s\) 1234 .*sids 5, 6, 7, 8"):
        convert(options)
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"val_systems": (1,), "split": "0.8,0.1,0.1"}, "--split and --val-systems.* exclusive"),
        ({"test_systems": "3", "split": (0.5, 0.5, 0.0)}, "exclusive"),
        ({"val_systems": (1, 2), "test_systems": (2, 3)}, r"system\(s\) 2 are in both"),
        ({"val_systems": (1.5,)}, "must be integers"),
        ({"val_systems": (True,)}, "must be integers"),
        ({"test_systems": "1,x"}, "--test-systems '1,x' is not a comma-separated list"),
    ],
)
def test_bad_explicit_options(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(ConversionError, match=message):
        ConversionOptions(["x.traj"], tmp_path / "out", **options)


def test_all_systems_held_out_leaves_no_train(tmp_path: Path) -> None:
    options = ConversionOptions(
        [write_systems(tmp_path, (5, 6))], tmp_path / "out", val_systems=[5], test_systems=[6]
    )
    with pytest.raises(ConversionError, match="at least one system for train"):
        convert(options)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1000100,1000161", (1000100, 1000161)), (" 3, 1 ,", (3, 1)), ("", ())],
)
def test_parse_system_ids(text: str, expected: tuple) -> None:
    assert parse_system_ids(text) == expected


def test_explicit_options_are_normalised(tmp_path: Path) -> None:
    options = ConversionOptions(["x"], tmp_path, val_systems="7, 5,5", test_systems=[9])
    assert (options.val_systems, options.test_systems) == ((5, 7), (9,))
    assert options.split is None
    assert options.split_mode == "explicit"
    default = ConversionOptions(["x"], tmp_path)
    assert default.split == (0.8, 0.1, 0.1)
    assert default.split_mode == "fractions"


def test_cli_val_and_test_systems(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = ["convert", write_systems(tmp_path), "--out", str(out)]
    status = cli.main([*args, "--val-systems", "5,8", "--test-systems", "6", "--quiet"])
    assert status == 0, capsys.readouterr().err
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["split_mode"] == "explicit"
    assert {name: report["systems"] for name, report in summary["splits"].items()} == {
        "train": [7],
        "val": [5, 8],
        "test": [6],
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--val-systems", "5", "--split", "0.5,0.5"], "exclusive"),
        (["--test-systems", "99"], "unknown system id(s) 99"),
        (["--val-systems", "5;6"], "not a comma-separated list"),
    ],
)
def test_cli_explicit_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    out = tmp_path / "out"
    status = cli.main(["convert", write_systems(tmp_path), "--out", str(out), *extra])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
