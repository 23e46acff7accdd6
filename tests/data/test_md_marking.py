"""``--md-systems``: frames of listed systems get ``md = 1``, all others ``md = 0``; without
the option no ``md`` attribute is written (``optim.dens.skip_key: md``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fairchem.core.common.data_parallel import data_list_collater
from fairchem.core.datasets import LmdbDataset

from fairchem_dens import cli
from fairchem_dens.data import ConversionError, ConversionOptions, convert
from fairchem_dens.data.options import parse_system_id_file

#: Two bundled OC20 demo systems marked as MD, one written as OC20 names it.
MD_FILE_TEXT = "# OC20 MD systems\nrandom1000103,frame0,-1.0\n1000156\n\n999  # not an input\n"
MD_SIDS = {1000103, 1000156}


def md_flags(split_dir: Path) -> dict[int, set[int]]:
    """sid -> set of md values of its frames."""
    dataset = LmdbDataset({"src": str(split_dir)})
    flags: dict[int, set[int]] = {}
    for index in range(len(dataset)):
        data = dataset[index]
        flags.setdefault(int(data.sid), set()).add(int(data.md))
    return flags


@pytest.fixture(scope="module")
def md_conversion(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> dict:
    folder = tmp_path_factory.mktemp("md")
    md_file = folder / "md_systems.txt"
    md_file.write_text(MD_FILE_TEXT)
    out = folder / "out"
    status = cli.main(["convert", str(demo_dir), "--out", str(out), "--val-systems",
                       "1000100,1000156", "--md-systems", str(md_file), "--quiet"])
    assert status == 0
    return json.loads((out / "conversion.json").read_text())


def test_listed_systems_are_md_and_all_others_not(md_conversion: dict) -> None:
    out = Path(md_conversion["options"]["out_dir"])
    seen: dict[int, set[int]] = {}
    for split in ("train", "val"):
        seen.update(md_flags(out / split))
    assert len(seen) == 14
    assert {sid for sid, values in seen.items() if values == {1}} == MD_SIDS
    assert all(values == {0} for sid, values in seen.items() if sid not in MD_SIDS)
    assert md_conversion["options"]["md_systems"] == [999, 1000103, 1000156]
    marking = md_conversion["md_marking"]
    assert marking["listed_systems"] == 3 and marking["marked_systems"] == 2
    frames = sum(md_conversion["systems"][str(sid)]["frames"] for sid in MD_SIDS)
    assert marking["marked_frames"] == frames
    assert md_conversion["systems"]["1000103"]["md"] == 1
    assert md_conversion["systems"]["1000100"]["md"] == 0


def test_md_collates_to_one_flag_per_structure(md_conversion: dict) -> None:
    dataset = LmdbDataset({"src": str(Path(md_conversion["options"]["out_dir"]) / "train")})
    items = [dataset[i] for i in range(len(dataset))]
    batch = data_list_collater(items[:6] + [d for d in items if int(d.sid) == 1000103][:2],
                               otf_graph=True)
    assert batch.md.shape == (8,)
    assert torch.equal(batch.md, torch.tensor([int(int(s) in MD_SIDS) for s in batch.sid]))


def test_without_the_option_no_md_attribute(demo_out: Path, demo_conversion: dict) -> None:
    dataset = LmdbDataset({"src": str(demo_out / "train")})
    assert "md" not in dataset[0]
    assert demo_conversion["md_marking"] is None
    assert "md_systems" not in demo_conversion["options"] or \
        demo_conversion["options"]["md_systems"] is None


def test_python_api_accepts_ids_and_files(tmp_path: Path) -> None:
    assert ConversionOptions(["x"], tmp_path, md_systems=[5, 3, 5]).md_systems == (3, 5)
    assert ConversionOptions(["x"], tmp_path, md_systems="7,6").md_systems == (6, 7)
    assert ConversionOptions(["x"], tmp_path, md_systems=()).md_systems == ()
    assert ConversionOptions(["x"], tmp_path).md_systems is None
    path = tmp_path / "md.txt"
    path.write_text(MD_FILE_TEXT)
    assert ConversionOptions(["x"], tmp_path, md_systems=path).md_systems == (999, *sorted(MD_SIDS))


def test_empty_list_marks_every_frame_zero(tmp_path: Path, demo_dir: Path) -> None:
    inputs = [str(demo_dir / "random1000100.extxyz.xz"), str(demo_dir / "random1000103.extxyz.xz")]
    convert(ConversionOptions(inputs, tmp_path / "out", split=(1.0, 0.0, 0.0), md_systems=()))
    assert md_flags(tmp_path / "out" / "train") == {1000100: {0}, 1000103: {0}}


@pytest.mark.parametrize(
    ("text", "message"),
    [("1000100\nsystem_a\n", "line 2 'system_a' is not a system id"),
     ("random-5\n", "line 1")],
)
def test_bad_md_file_names_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "md.txt"
    path.write_text(text)
    with pytest.raises(ConversionError, match=message):
        parse_system_id_file(path)


def test_missing_md_file_is_a_clear_cli_error(tmp_path: Path, demo_dir: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    status = cli.main(["convert", str(demo_dir), "--out", str(tmp_path / "out"),
                       "--md-systems", str(tmp_path / "nope.txt")])
    assert status == 2
    assert "--md-systems" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
