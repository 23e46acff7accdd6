"""Write fairchem-1.x LMDBs atomically.

Layout (what ``fairchem.core.datasets.LmdbDataset`` reads): keys ``b"0"``, ``b"1"``, ...
hold ``pickle.dumps(Data)``; key ``b"length"`` holds the pickled entry count. The LMDB
is a single file (``subdir=False``). It is written to a hidden temporary file next to
its final path and moved there with ``os.replace`` only by :meth:`LmdbWriter.commit`,
so an error never leaves a half-written ``data.lmdb`` behind.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from typing import TYPE_CHECKING

import lmdb
import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

    from torch_geometric.data import Data

__all__ = ["LmdbWriter", "write_metadata"]

_INITIAL_MAP_SIZE = 1 << 26  # 64 MiB, doubled whenever full


class LmdbWriter:
    """Append ``Data`` entries to a temporary LMDB, then publish it at ``final_path``.

    Parameters
    ----------
    final_path
        Where the finished LMDB goes (e.g. ``out/train/data.lmdb``).

    Attributes
    ----------
    natoms : list of int
        Atom count of every entry written, in key order (for ``metadata.npz``).
    """

    def __init__(self, final_path: Path) -> None:
        self.final_path = final_path
        self.temp_path = final_path.with_name(f".{final_path.name}.{os.getpid()}.tmp")
        self.natoms: list[int] = []
        self._map_size = _INITIAL_MAP_SIZE
        self._env: lmdb.Environment | None = lmdb.open(
            str(self.temp_path),
            map_size=self._map_size,
            subdir=False,
            lock=False,
            meminit=False,
            sync=False,  # one fsync in close() instead of one per entry
        )

    def __len__(self) -> int:
        return len(self.natoms)

    def _put(self, key: bytes, value: bytes) -> None:
        assert self._env is not None, "writer already closed"
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    txn.put(key, value)
                return
            except lmdb.MapFullError:
                self._map_size *= 2
                self._env.set_mapsize(self._map_size)

    def append(self, data: Data) -> None:
        """Store ``data`` under the next integer key."""
        self._put(str(len(self.natoms)).encode("ascii"), pickle.dumps(data, protocol=-1))
        self.natoms.append(int(data.natoms))

    def commit(self) -> None:
        """Write the ``length`` key, close, and move the LMDB to its final path."""
        self._put(b"length", pickle.dumps(len(self.natoms), protocol=-1))
        self.close()
        os.replace(self.temp_path, self.final_path)

    def close(self) -> None:
        """Close the environment (idempotent)."""
        if self._env is not None:
            self._env.sync(True)
            self._env.close()
            self._env = None

    def discard(self) -> None:
        """Close and delete the temporary file (after an error)."""
        self.close()
        for path in (self.temp_path, self.temp_path.with_name(self.temp_path.name + "-lock")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def write_metadata(path: Path, natoms: list[int]) -> None:
    """Write fairchem's ``metadata.npz``: ``natoms`` (int64, one per entry, key order).

    ``BaseDataset`` looks for it next to the LMDB (``<src dir>/metadata.npz``) and uses
    it for ``optim.load_balancing: atoms`` and ``max_atoms`` filtering. ``path`` must
    end in ``.npz`` (``numpy.savez`` appends it otherwise).
    """
    np.savez(path, natoms=np.asarray(natoms, dtype=np.int64))
