"""Errors of a model that has learned nothing: the floor a trained model must beat.

A fairchem model whose heads output zero predicts zero forces and, after fairchem's
de-normalisation and element references, the energy ``sum_i ref[Z_i] + mean`` (the reference
and normaliser files written by ``fairchem-dens convert``, fitted on the train split). Its
validation errors are the natural baselines of a training run on converted data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fairchem_dens.data.references import (
    ELEMENT_REFERENCES_FILE,
    ENERGY_NORMALIZER_FILE,
)

__all__ = ["zero_output_errors"]


def zero_output_errors(lmdb_dir: Path, split: str = "val",
                       first_n: int | None = None) -> dict[str, float]:
    """Validation errors of the untrained (zero-output) model on a converted data set.

    Parameters
    ----------
    lmdb_dir
        Output directory of ``fairchem-dens convert`` (``<split>/`` LMDB and the fitted
        ``element_references.npz`` / ``energy_normalizer.npz``).
    split
        Which split to score (default ``val``).
    first_n
        Score only the first ``first_n`` frames (as fairchem's ``dataset.<split>.first_n``).

    Returns
    -------
    dict
        ``forces_mae`` (eV/Å): mean |F| component over free atoms (zero-force prediction);
        ``energy_mae`` (eV): mean |E - (sum of element references + normaliser mean)|.
    """
    import torch
    from fairchem.core.datasets import LmdbDataset

    references = np.load(lmdb_dir / ELEMENT_REFERENCES_FILE)["element_references"]  # [119] eV
    energy_mean = float(np.load(lmdb_dir / ENERGY_NORMALIZER_FILE)["mean"])  # eV
    dataset = LmdbDataset({"src": str(lmdb_dir / split)})
    forces, energy_errors = [], []
    for index in range(min(len(dataset), first_n or len(dataset))):
        data = dataset[index]
        free = data.fixed == 0 if "fixed" in data else slice(None)
        forces.append(data.forces[free])  # [n_free, 3] eV/Å
        constant = references[data.atomic_numbers.long().numpy()].sum() + energy_mean
        energy_errors.append(abs(float(data.energy) - constant))
    del dataset  # lmdb: one open environment per path and process
    return {
        "forces_mae": float(torch.cat(forces).abs().mean()),
        "energy_mae": float(np.mean(energy_errors)),
    }
