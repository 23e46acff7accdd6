"""``--forces-normalizer energy_std``: forces scaled by sigma_E of the training energies (the
authors' MD17 scale) instead of their own RMS, on real MD17 ethanol frames."""

from __future__ import annotations

import lzma

import numpy as np
import pytest

from fairchem_dens.data import ConversionError, ConversionOptions, convert
from tests.data.conftest import MD17_ETHANOL, require_shared


@pytest.fixture(scope="module")
def ethanol_files(tmp_path_factory):
    from ase.io import read, write

    with lzma.open(require_shared(MD17_ETHANOL), "rt") as handle:
        frames = read(handle, index=":30", format="extxyz")
    folder = tmp_path_factory.mktemp("ethanol_files")
    for chunk in range(3):
        write(folder / f"ethanol_{chunk}.extxyz", frames[10 * chunk:10 * chunk + 10])
    return folder, frames


@pytest.mark.parametrize("mode", ["rms", "energy_std"])
def test_forces_normalizer_file_holds_the_chosen_scale(ethanol_files, tmp_path, mode) -> None:
    from ase import units

    folder, frames = ethanol_files
    out = tmp_path / mode
    convert(ConversionOptions(inputs=[str(folder / "*.extxyz")], out_dir=out,
                              energy_unit="kcal/mol", val_systems=(2,), forces_normalizer=mode))
    kcal = units.kcal / units.mol
    train = frames[:20]  # files 0 and 1
    energies = np.array([a.get_potential_energy() for a in train]) * kcal
    forces = np.concatenate([a.get_forces() for a in train]) * kcal
    expected = {"rms": np.sqrt((forces**2).sum() / len(forces)),  # sqrt(sum |F|^2 / N_atoms)
                "energy_std": energies.std(ddof=1)}[mode]  # one molecule: sigma_E itself
    stored = np.load(out / "forces_normalizer.npz")
    assert float(stored["mean"]) == 0.0
    assert float(stored["rmsd"]) == pytest.approx(expected, rel=1e-5)
    assert float(np.load(out / "energy_normalizer.npz")["rmsd"]) == pytest.approx(
        energies.std(ddof=1), rel=1e-5)


def test_unknown_forces_normalizer_is_refused(tmp_path) -> None:
    with pytest.raises(ConversionError, match="--forces-normalizer 'std'.*energy_std"):
        ConversionOptions(inputs=["x.extxyz"], out_dir=tmp_path, forces_normalizer="std")
