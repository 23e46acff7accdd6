"""Bad input gives a ConversionError naming file and frame, and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest

from fairchem_dens.data import ConversionError, ConversionOptions, convert
from fairchem_dens.data.splits import split_systems

from .conftest import make_frames, set_results


def assert_nothing_written(out: Path) -> None:
    leftovers = sorted(str(p) for p in out.rglob("*")) if out.exists() else []
    assert not out.exists(), f"output left behind: {leftovers}"


def convert_good_and_bad(tmp_path: Path, bad_frames: list, suffix: str = ".traj") -> str:
    """Convert a good system plus ``bad_frames``; return the error message."""
    ase.io.write(tmp_path / f"sys1{suffix}", make_frames(seed=1))
    bad_path = tmp_path / f"sys2{suffix}"
    ase.io.write(bad_path, bad_frames)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as error:
        convert(ConversionOptions(inputs=[str(tmp_path)], out_dir=out))
    assert_nothing_written(out)
    message = str(error.value)
    assert str(bad_path) in message
    return message


def test_frame_without_energy(tmp_path: Path) -> None:
    frames = make_frames()
    set_results(frames[2], forces=frames[2].get_forces())
    message = convert_good_and_bad(tmp_path, frames)
    assert "frame 2" in message
    assert "no energy" in message


def test_frame_without_forces(tmp_path: Path) -> None:
    frames = make_frames()
    set_results(frames[1], energy=-3.0)
    message = convert_good_and_bad(tmp_path, frames)
    assert "frame 1" in message
    assert "no forces" in message


def test_frame_without_calculator_in_extxyz(tmp_path: Path) -> None:
    frames = make_frames()
    frames[1].calc = None
    message = convert_good_and_bad(tmp_path, frames, suffix=".extxyz")
    assert "frame 1" in message
    assert "energy" in message


def set_nan_position(atoms):
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.positions[0, 1] = np.nan
    return set_results(atoms, energy=energy, forces=forces)


@pytest.mark.parametrize(
    ("what", "corrupt"),
    [
        ("energy", lambda a: set_results(a, energy=np.nan, forces=a.get_forces())),
        ("energy", lambda a: set_results(a, energy=np.inf, forces=a.get_forces())),
        ("forces", lambda a: set_results(a, energy=-1.0, forces=np.full((4, 3), np.inf))),
        ("positions", lambda a: set_nan_position(a)),
    ],
)
def test_non_finite_values(tmp_path: Path, what: str, corrupt) -> None:
    frames = make_frames()
    corrupt(frames[2])
    message = convert_good_and_bad(tmp_path, frames)
    assert "frame 2" in message
    assert f"{what} contain NaN or inf" in message


def test_forces_of_wrong_length(tmp_path: Path) -> None:
    frames = make_frames(num_atoms=5)
    set_results(frames[1], energy=-1.0, forces=np.zeros((4, 3)))
    message = convert_good_and_bad(tmp_path, frames)
    assert "frame 1" in message
    assert "(4, 3)" in message
    assert "5 atoms" in message


def test_error_in_last_split_rolls_back_finished_splits(tmp_path: Path) -> None:
    sids = [11, 12, 13]
    test_sid = split_systems(sids, (0.34, 0.33, 0.33), seed=0)["test"][0]
    for sid in sids:
        frames = make_frames(seed=sid)
        if sid == test_sid:
            set_results(frames[-1], forces=frames[-1].get_forces())
        ase.io.write(tmp_path / f"system{sid}.traj", frames)
    out = tmp_path / "existing_out"
    out.mkdir()
    with pytest.raises(ConversionError, match=rf"system{test_sid}\.traj: frame 2"):
        convert(ConversionOptions([str(tmp_path / "*.traj")], out, split=(0.34, 0.33, 0.33)))
    assert out.is_dir(), "a pre-existing --out directory is kept"
    assert not any(out.iterdir()), "and left empty"


def test_no_input_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a trajectory")
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="holds no input files"):
        convert(ConversionOptions([str(tmp_path / "empty")], out))
    with pytest.raises(ConversionError, match="matched no input files"):
        convert(ConversionOptions([str(tmp_path / "*.traj")], out))
    with pytest.raises(ConversionError, match="no such file"):
        convert(ConversionOptions([str(tmp_path / "missing.traj")], out))
    assert_nothing_written(out)


def test_file_without_frames(tmp_path: Path) -> None:
    ase.io.write(tmp_path / "good.traj", make_frames())
    (tmp_path / "empty.extxyz").write_text("")
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"empty\.extxyz"):
        convert(ConversionOptions([str(tmp_path)], out))
    assert_nothing_written(out)


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "broken.traj").write_bytes(b"this is not a trajectory")
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"broken\.traj: ASE could not read"):
        convert(ConversionOptions([str(tmp_path)], out))
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"energy_unit": "furlong"}, "unknown energy unit 'furlong'"),
        ({"force_unit": "N"}, "unknown force unit 'N'"),
        ({"split": "0.5,0.1,0.1"}, "sum to 0.7"),
        ({"split": "0.8;0.2"}, "comma-separated"),
        ({"split": (0.0, 0.5, 0.5)}, "train fraction"),
        ({"stride": 0}, "stride"),
        ({"box_padding": -1.0}, "box padding"),
    ],
)
def test_bad_options(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(ConversionError, match=message):
        ConversionOptions(["x.traj"], tmp_path / "out", **options)


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    ase.io.write(tmp_path / "a1.traj", make_frames())
    options = ConversionOptions([str(tmp_path / "a1.traj")], tmp_path / "out")
    convert(options)
    before = (tmp_path / "out" / "train" / "data.lmdb").stat().st_mtime_ns
    with pytest.raises(ConversionError, match="--overwrite"):
        convert(options)
    assert (tmp_path / "out" / "train" / "data.lmdb").stat().st_mtime_ns == before
    options.overwrite = True
    convert(options)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == sorted(
        [
            "train",
            "data.lmdb",
            "metadata.npz",
            "conversion.json",
            "element_references.npz",
            "energy_normalizer.npz",
            "forces_normalizer.npz",
        ]
    )


def test_stored_frame_ids_and_the_place_in_the_file_are_both_named(tmp_path: Path) -> None:
    """Pre-strided files (the bundled demo data) store the original frame id in info['fid']:
    an error in the file's 2nd frame, stored fid 20, names both."""
    frames = make_frames()
    for position, atoms in enumerate(frames):
        atoms.info["fid"] = 10 * position
    set_results(frames[2], forces=frames[2].get_forces())
    message = convert_good_and_bad(tmp_path, frames, suffix=".extxyz")
    assert "frame 20 (its stored info['fid']; it is frame 2 of the file, counting from 0)" in (
        message), message
