"""Location of the real demo data shipped with the package."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_DATASETS", "demo_data_dir"]

#: Bundled data sets: name -> directory under ``fairchem_dens/demo_data``.
DEMO_DATASETS = {"oc20": "oc20_s2ef", "md17": "md17_ethanol"}


def demo_data_dir(name: str = "oc20") -> Path:
    """Directory of one bundled demo data set (each holds a README with provenance and licence).

    * ``"oc20"`` (default): ``random<sid>.extxyz.xz``, one OC20 relaxation per file, every 2nd
      frame; total DFT energies in eV, raw forces in eV/Å, ``FixAtoms`` as ``move_mask``,
      ``info["fid"]`` = frame index in the original trajectory. CC BY 4.0.
    * ``"md17"``: ``ethanol_chunk<k>.extxyz.xz``, frames ``500k``-``500k+499`` of one MD17
      ethanol trajectory (chunks 0, 1 and 3); energies in kcal/mol, forces in kcal/mol/Å, no
      cell; ``info["fid"]`` = frame index in the source file. MIT.

    Pass the directory to the converter (``fairchem-dens convert``).

    Parameters
    ----------
    name
        ``"oc20"`` or ``"md17"``.

    Returns
    -------
    Path
        ``<site-packages>/fairchem_dens/demo_data/<oc20_s2ef|md17_ethanol>``.
    """
    if name not in DEMO_DATASETS:
        raise ValueError(f"unknown demo data set {name!r}; choose one of {sorted(DEMO_DATASETS)}")
    return Path(__file__).resolve().parent.parent / "demo_data" / DEMO_DATASETS[name]
