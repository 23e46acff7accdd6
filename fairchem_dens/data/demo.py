"""Location of the real OC20 demo trajectories shipped with the package."""

from __future__ import annotations

from pathlib import Path

__all__ = ["demo_data_dir"]


def demo_data_dir() -> Path:
    """Directory of the bundled OC20 S2EF demo trajectories.

    It holds ``random<sid>.extxyz.xz`` files (one OC20 relaxation per file, every 3rd
    frame; total DFT energies in eV, raw forces in eV/Å, ``FixAtoms`` as ``move_mask``,
    ``info["fid"]`` = frame index in the original trajectory) and a README with
    provenance and the CC BY 4.0 attribution. Pass the directory to the converter.

    Returns
    -------
    Path
        ``<site-packages>/fairchem_dens/demo_data/oc20_s2ef``.
    """
    return Path(__file__).resolve().parent.parent / "demo_data" / "oc20_s2ef"
