"""Per-element linear energy references and normaliser statistics of the train split.

OC20-style trajectories carry *total* DFT energies (-50 to -1200 eV), dominated by the
composition. A linear model ``E ≈ Σ_Z n_Z · e_Z`` (least squares over the train frames,
exactly like fairchem's ``fit_linear_references``: ``numpy.linalg.lstsq`` restricted to
elements present, minimum-norm when rank deficient) is subtracted before training.

The files equal what fairchem's own ``fit_linear_references`` and ``fit_normalizers`` give on
the written train LMDB when those run in float64 (tested: 5e-14 eV per element on the bundled
OC20 data). They are fitted here, while the frames stream into the LMDB, because fairchem's
functions build their matrices in torch's default float32 (per-structure references then
differ by up to 2e-5 eV on the bundled data) and need a second pass over the LMDB with a dense
frames x 119 matrix.

Files written (all loaded by fairchem-core 1.10's own loaders, see :func:`config_snippet`):

``element_references.npz``
    key ``element_references``: float64 array of shape (119,), eV per atom of atomic
    number Z at index Z (index 0 unused, elements absent from train are 0). Loaded by
    ``fairchem.core.modules.normalization.element_references.create_element_references``.
``energy_normalizer.npz`` / ``forces_normalizer.npz``
    keys ``mean`` and ``rmsd`` (0-d float32, eV resp. eV/Å). Loaded by
    ``fairchem.core.modules.normalization.normalizer.create_normalizer``. Energy: mean and
    standard deviation (ddof=1) of the train energies *after* subtracting the references.
    Forces: mean 0 and ``rmsd = sqrt(Σ_atoms |F|² / N_atoms)``, the value fairchem's
    ``fit_normalizers`` gives with the forces mean overridden to 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "ELEMENT_REFERENCES_FILE",
    "ENERGY_NORMALIZER_FILE",
    "FORCES_NORMALIZER_FILE",
    "NUM_ELEMENT_SLOTS",
    "TrainStatistics",
    "config_snippet",
    "fit_element_references",
    "write_reference_files",
]

ELEMENT_REFERENCES_FILE = "element_references.npz"
ENERGY_NORMALIZER_FILE = "energy_normalizer.npz"
FORCES_NORMALIZER_FILE = "forces_normalizer.npz"
#: Length of the reference vector: atomic numbers 0..118 (fairchem's max_num_elements+1).
NUM_ELEMENT_SLOTS = 119


def fit_element_references(
    compositions: np.ndarray, energies: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Least-squares per-element energies.

    Parameters
    ----------
    compositions : ndarray, shape (F, 119)
        Atom count of each atomic number in each row.
    energies : ndarray, shape (F,)
        Total energies, eV.
    weights : ndarray, shape (F,), optional
        Number of frames each row stands for (rows = unique compositions with their mean
        energy give the same solution as the full per-frame system).

    Returns
    -------
    ndarray, shape (119,), float64
        eV per atom; 0 for elements that never occur.
    """
    scale = np.ones(len(energies)) if weights is None else np.sqrt(weights)
    present = compositions.sum(axis=0) != 0
    solution = np.linalg.lstsq(
        compositions[:, present] * scale[:, None], energies * scale, rcond=None
    )[0]
    references = np.zeros(NUM_ELEMENT_SLOTS, dtype=np.float64)
    references[present] = solution
    return references


@dataclass
class TrainStatistics:
    """Running record of the train frames the references and normalisers are fitted on.

    Memory grows with the number of *distinct* compositions, not frames: a frame costs
    one energy and one composition index.
    """

    unique_compositions: list[np.ndarray] = field(default_factory=list)
    composition_of_frame: list[int] = field(default_factory=list)
    energies: list[float] = field(default_factory=list)
    force_square_sum: float = 0.0
    num_atoms: int = 0
    _index: dict[bytes, int] = field(default_factory=dict, repr=False)

    def add(self, atomic_numbers: np.ndarray, energy: float, forces: np.ndarray) -> None:
        """Record one frame (atomic numbers [N], energy in eV, forces [N, 3] eV/Å)."""
        counts = np.bincount(atomic_numbers, minlength=NUM_ELEMENT_SLOTS)
        key = counts.tobytes()
        if key not in self._index:
            self._index[key] = len(self.unique_compositions)
            self.unique_compositions.append(counts)
        self.composition_of_frame.append(self._index[key])
        self.energies.append(float(energy))
        self.force_square_sum += float(np.square(forces).sum())
        self.num_atoms += len(atomic_numbers)

    def fit(self) -> dict[str, object]:
        """Fit references and normalisers.

        Returns
        -------
        dict
            ``element_references`` (ndarray (119,)), ``energy_mean``/``energy_rmsd``
            (eV, after references), ``forces_rmsd`` (eV/Å), and fit diagnostics
            ``raw_energy_std``, ``residual_energy_mae`` (eV), ``num_frames``.
        """
        if not self.energies:
            raise ValueError("no train frames recorded")
        unique = np.stack(self.unique_compositions).astype(np.float64)
        row = np.asarray(self.composition_of_frame)
        energies = np.asarray(self.energies)
        counts = np.bincount(row, minlength=len(unique)).astype(np.float64)
        mean_energies = np.bincount(row, weights=energies, minlength=len(unique)) / counts
        references = fit_element_references(unique, mean_energies, weights=counts)
        residual = energies - (unique @ references)[row]
        ddof = 1 if len(residual) > 1 else 0
        return {
            "element_references": references,
            "energy_mean": float(residual.mean()),
            "energy_rmsd": float(residual.std(ddof=ddof)),
            "forces_rmsd": float(np.sqrt(self.force_square_sum / self.num_atoms)),
            "raw_energy_std": float(energies.std(ddof=ddof)),
            "residual_energy_mae": float(np.abs(residual - residual.mean()).mean()),
            "num_frames": len(energies),
            "num_compositions": len(unique),
        }


def write_reference_files(fit: dict[str, object], paths: dict[str, Path]) -> None:
    """Write the three ``.npz`` files described in the module docstring.

    Parameters
    ----------
    fit
        Output of :meth:`TrainStatistics.fit`.
    paths
        Target path (ending in ``.npz``) for each role: ``element_references``,
        ``energy_normalizer``, ``forces_normalizer``.
    """
    np.savez(paths["element_references"], element_references=fit["element_references"])
    np.savez(
        paths["energy_normalizer"],
        mean=np.float32(fit["energy_mean"]),
        rmsd=np.float32(fit["energy_rmsd"]),
    )
    np.savez(
        paths["forces_normalizer"],
        mean=np.float32(0.0),
        rmsd=np.float32(fit["forces_rmsd"]),
    )


def config_snippet(out_dir: Path, splits: list[str]) -> str:
    """YAML for a fairchem-core 1.10 config using the converted data.

    References and normalisers sit under ``dataset.train.transforms``, where
    ``BaseTrainer.load_references_and_normalizers`` reads them (val/test inherit the
    train settings); ``LmdbDataset`` ignores these two transform keys.
    """
    root = out_dir.resolve()
    lines = ["dataset:"]
    for split in splits:
        lines += [f"  {split}:", "    format: lmdb", f"    src: {root / split}"]
        if split == "train":
            lines += [
                "    transforms:",
                "      element_references:",
                "        energy:",
                f"          file: {root / ELEMENT_REFERENCES_FILE}",
                "      normalizer:",
                "        energy:",
                f"          file: {root / ENERGY_NORMALIZER_FILE}",
                "        forces:",
                f"          file: {root / FORCES_NORMALIZER_FILE}",
            ]
    return "\n".join(lines) + "\n"
