"""``python -m fairchem_dens.data``: the converter (same options as ``fairchem-dens convert``)."""

from __future__ import annotations

from fairchem_dens.data.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
