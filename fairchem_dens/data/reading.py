"""Find input files, name their systems and read their frames with ASE.

One input file is one system (one trajectory). Files are given as paths, directories
(searched recursively for :data:`KNOWN_SUFFIXES`) or glob patterns.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import lzma
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ase.io
import numpy as np

from fairchem_dens.data.options import ConversionError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from ase import Atoms

__all__ = [
    "KNOWN_SUFFIXES",
    "SystemFile",
    "assign_system_ids",
    "discover_input_files",
    "read_frames",
]

_COMPRESSIONS = ("", ".gz", ".xz", ".bz2")
#: File endings picked up when a directory is given (extxyz/xyz may be compressed).
KNOWN_SUFFIXES: tuple[str, ...] = (
    ".traj",
    ".db",
    *(f"{base}{comp}" for base in (".extxyz", ".xyz") for comp in _COMPRESSIONS),
)
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class SystemFile:
    """One input file (= one system) and the integer system id (``sid``) it got."""

    path: Path
    sid: int


def _has_known_suffix(path: Path) -> bool:
    return path.name.lower().endswith(KNOWN_SUFFIXES)


def _files_in_directory(directory: Path) -> list[Path]:
    return sorted(
        path for path in directory.rglob("*") if path.is_file() and _has_known_suffix(path)
    )


def discover_input_files(inputs: Sequence[str]) -> list[Path]:
    """Expand paths, directories and glob patterns into a sorted list of files.

    Parameters
    ----------
    inputs
        Explicit files (any format ASE reads), directories (searched recursively for
        :data:`KNOWN_SUFFIXES`) or glob patterns (``**`` allowed).

    Returns
    -------
    list of Path
        Unique resolved files, sorted by path.

    Raises
    ------
    ConversionError
        If an input does not exist, a pattern matches nothing, or no file is found.
    """
    found: set[Path] = set()
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            found.add(path.resolve())
        elif path.is_dir():
            in_dir = _files_in_directory(path)
            if not in_dir:
                raise ConversionError(
                    f"{path}: directory holds no input files (looked for "
                    f"{', '.join(KNOWN_SUFFIXES)}); pass the files explicitly if they "
                    "have another extension"
                )
            found.update(file.resolve() for file in in_dir)
        elif _GLOB_CHARS.search(item):
            matches = [Path(match) for match in glob.glob(str(path), recursive=True)]
            files = [m for m in matches if m.is_file()]
            for directory in (m for m in matches if m.is_dir()):
                files.extend(_files_in_directory(directory))
            if not files:
                raise ConversionError(
                    f"{item}: glob pattern matched no input files; check the pattern "
                    "(quote it so the shell does not expand it)"
                )
            found.update(file.resolve() for file in files)
        else:
            raise ConversionError(f"{item}: no such file or directory")
    if not found:
        raise ConversionError("no input files found; pass files, directories or globs")
    return sorted(found)


def _name_digits(path: Path) -> int | None:
    """Last run of digits in the file name without extensions (``random12.traj`` → 12)."""
    stem = path.name.split(".")[0]
    runs = re.findall(r"\d+", stem)
    return int(runs[-1]) if runs else None


def assign_system_ids(files: Sequence[Path]) -> tuple[list[SystemFile], str]:
    """Give every file an integer system id.

    The id is taken from the digits of the file name (``random1234.traj`` → 1234) when
    every file has digits and they are unique; otherwise files are numbered
    0, 1, 2, ... in sorted path order.

    Returns
    -------
    systems
        One :class:`SystemFile` per input file, sorted by ``sid``.
    sid_source
        ``"file_name_digits"`` or ``"index"``: how the ids were made.
    """
    digits = [_name_digits(path) for path in files]
    if all(d is not None for d in digits) and len(set(digits)) == len(digits):
        systems = [SystemFile(path, int(d)) for path, d in zip(files, digits)]  # type: ignore[arg-type]
        return sorted(systems, key=lambda s: s.sid), "file_name_digits"
    return [SystemFile(path, index) for index, path in enumerate(files)], "index"


_DECOMPRESSORS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


def _read_with_ase(path: Path, index: slice) -> list[Atoms]:
    """``ase.io.read`` that decompresses (ext)xyz into memory first.

    ASE's extxyz reader seeks back and forth, and seeking in a compressed stream restarts
    decompression, which makes reading compressed files quadratic in their length.
    """
    opener = _DECOMPRESSORS.get(path.suffix.lower())
    if opener is not None and Path(path.stem).suffix.lower() in (".extxyz", ".xyz"):
        with opener(path, "rt") as handle:
            text = io.StringIO(handle.read())
        return ase.io.read(text, index=index, format="extxyz")
    return ase.io.read(path, index=index)


def read_frames(path: Path, stride: int = 1) -> Iterator[tuple[int, Atoms]]:
    """Yield ``(frame_index, atoms)`` for every ``stride``-th frame of a file.

    ``frame_index`` is the position of the frame in the file (0-based), so strided
    output keeps the original frame numbers. A frame that carries an integer
    ``atoms.info["fid"]`` (as the bundled, pre-strided demo files do) keeps that value
    instead, so it still points into the original trajectory.

    Raises
    ------
    ConversionError
        If ASE cannot read the file or it holds no frames.
    """
    try:
        frames = _read_with_ase(path, slice(None, None, stride))
    except Exception as err:  # ASE raises many types for unreadable files
        raise ConversionError(
            f"{path}: ASE could not read the file ({type(err).__name__}: {err}); "
            "check the file is complete and its extension matches its format"
        ) from err
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise ConversionError(f"{path}: file holds no frames; remove it from the inputs")
    for position, atoms in enumerate(frames):
        stored = atoms.info.get("fid")
        is_int = isinstance(stored, (int, np.integer)) and not isinstance(stored, bool)
        yield (int(stored) if is_int else position * stride), atoms
