"""fairchem-dens: DeNS (denoising non-equilibrium structures) for fairchem-core 1.x."""
from __future__ import annotations

__version__ = "0.1.0"
