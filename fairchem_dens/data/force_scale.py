"""Which scale the forces normaliser file carries (``--forces-normalizer``).

``rms`` (default): the root mean square of the training forces, sqrt(sum |F|^2 / N_atoms), as
fairchem's ``fit_normalizers`` gives with the mean fixed at 0. ``energy_std``: the standard
deviation sigma_E of the training energies after the element references (for one molecule, the
plain energy std), the scale of the authors' MD17 code (``main_md17_dens.py`` divides force
targets by ``task_std``, the energy std), which their lambda_F / lambda_DeNS were tuned with.
"""

from __future__ import annotations

FORCES_NORMALIZERS = ("rms", "energy_std")


def forces_normalizer_fit(fit: dict[str, object], mode: str) -> dict[str, object]:
    """``fit`` (from ``ReferenceStatistics.fit``) with ``forces_rmsd`` set for ``mode``; the
    measured force RMS is kept as ``forces_rms`` (eV/Angstrom)."""
    if mode not in FORCES_NORMALIZERS:
        raise ValueError(f"forces normaliser {mode!r}: use one of {FORCES_NORMALIZERS}")
    fit = {**fit, "forces_rms": fit["forces_rmsd"]}
    if mode == "energy_std":
        fit["forces_rmsd"] = fit["energy_rmsd"]
    return fit
