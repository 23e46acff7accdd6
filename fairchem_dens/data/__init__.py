"""Convert ASE-readable DFT trajectories into fairchem-1.x S2EF LMDBs.

Use :func:`convert` with :class:`ConversionOptions`, or the command line
``fairchem-dens convert`` / ``python -m fairchem_dens.data``. See
:mod:`fairchem_dens.data.conversion` for the output layout and
:mod:`fairchem_dens.data.references` for the reference/normaliser file formats.
Importing this package does not import torch or fairchem.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fairchem_dens.data.demo import demo_data_dir
from fairchem_dens.data.options import ConversionError, ConversionOptions

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["ConversionError", "ConversionOptions", "convert", "demo_data_dir"]


def convert(options: ConversionOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a conversion; see :func:`fairchem_dens.data.conversion.convert`."""
    from fairchem_dens.data.conversion import convert as _convert

    return _convert(options, log=log)
