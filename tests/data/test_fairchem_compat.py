"""Converter outputs through stock fairchem-core 1.10 code: datasets, collater, references,
normalisers and the trainer's own loading path (driven by the printed YAML snippet)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from fairchem.core.common.data_parallel import data_list_collater
from fairchem.core.datasets import LmdbDataset
from fairchem.core.datasets.base_dataset import create_dataset
from fairchem.core.modules.normalization.element_references import (
    create_element_references,
    fit_linear_references,
)
from fairchem.core.modules.normalization.normalizer import create_normalizer, fit_normalizers
from fairchem.core.trainers.base_trainer import BaseTrainer


def full_batch(dataset: LmdbDataset):
    return data_list_collater([dataset[i] for i in range(len(dataset))], otf_graph=True)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_lmdb_dataset_reads_src_dir_with_metadata(demo_out: Path, split: str) -> None:
    dataset = LmdbDataset({"src": str(demo_out / split)})
    natoms = np.load(demo_out / split / "metadata.npz")["natoms"]
    assert len(dataset) == len(natoms) > 0
    assert dataset.metadata_hasattr("natoms")
    assert dataset.get_metadata("natoms", [0, len(dataset) - 1]) == [natoms[0], natoms[-1]]
    assert dataset[len(dataset) - 1].natoms == natoms[-1]


def test_lmdb_dataset_reads_lmdb_file_and_max_atoms(demo_out: Path) -> None:
    by_file = LmdbDataset({"src": str(demo_out / "val" / "data.lmdb")})
    length, forces = len(by_file), by_file[3].forces
    del by_file  # lmdb refuses to open one file twice in a process
    by_dir = LmdbDataset({"src": str(demo_out / "val")})
    assert len(by_dir) == length
    assert torch.equal(by_dir[3].forces, forces)
    del by_dir
    natoms = np.load(demo_out / "train" / "metadata.npz")["natoms"]
    limit = int(np.median(natoms))
    subset = create_dataset({"src": str(demo_out / "train"), "max_atoms": limit}, "train")
    assert len(subset) == int((natoms <= limit).sum())


def test_collater_batches_entries(demo_out: Path) -> None:
    dataset = LmdbDataset({"src": str(demo_out / "train")})
    items = [dataset[i] for i in (0, 1, len(dataset) - 1)]
    batch = data_list_collater(items, otf_graph=True)
    total = sum(int(d.natoms) for d in items)
    assert batch.pos.shape == (total, 3)
    assert batch.forces.shape == (total, 3)
    assert batch.energy.shape == (3,)
    assert batch.natoms.tolist() == [d.natoms for d in items]
    assert batch.cell.shape == (3, 3, 3)
    assert batch.pbc.shape == (3, 3)
    assert batch.fixed.shape == (total,)
    assert batch.sid.shape == (3,)
    assert batch.fid.shape == (3,)
    assert batch.batch.max().item() == 2


def test_element_references_load_and_shrink_energy_spread(demo_out: Path) -> None:
    references = create_element_references(file=demo_out / "element_references.npz")
    assert references.element_references.shape == (119,)
    batch = full_batch(LmdbDataset({"src": str(demo_out / "train")}))
    raw = batch.energy.double()
    residual = references.dereference(raw.view(-1, 1), batch).view(-1)  # trainer shape
    assert raw.std() > 50.0  # total OC20 energies span hundreds of eV
    assert residual.std() < 0.02 * raw.std()
    summary = json.loads((demo_out / "conversion.json").read_text())
    assert residual.std().item() == pytest.approx(
        summary["element_references"]["residual_energy_std_eV"], rel=1e-6
    )


def test_references_match_fairchem_fit(demo_out: Path) -> None:
    train = LmdbDataset({"src": str(demo_out / "train")})
    ours = create_element_references(file=demo_out / "element_references.npz")
    theirs = fit_linear_references(
        ["energy"], train, batch_size=len(train), shuffle=False, log_metrics=False
    )["energy"]
    batch = full_batch(train)
    zero = torch.zeros((len(train), 1), dtype=torch.float64)
    np.testing.assert_allclose(ours(zero, batch).numpy(), theirs(zero, batch).numpy(), atol=2e-2)


def test_normalizers_load_and_match_fairchem_fit(demo_out: Path) -> None:
    energy = create_normalizer(file=demo_out / "energy_normalizer.npz")
    forces = create_normalizer(file=demo_out / "forces_normalizer.npz")
    summary = json.loads((demo_out / "conversion.json").read_text())["normalizers"]
    assert energy.mean.item() == pytest.approx(summary["energy"]["mean"], rel=1e-6, abs=1e-6)
    assert energy.rmsd.item() == pytest.approx(summary["energy"]["rmsd"], rel=1e-6)
    assert forces.mean.item() == 0.0
    assert forces.rmsd.item() == pytest.approx(summary["forces"]["rmsd"], rel=1e-6)
    train = LmdbDataset({"src": str(demo_out / "train")})
    references = create_element_references(file=demo_out / "element_references.npz")
    fitted = fit_normalizers(
        ["energy", "forces"],
        train,
        batch_size=len(train),
        override_values={"forces": {"mean": 0.0}},
        element_references={"energy": references},
        shuffle=False,
    )
    assert energy.rmsd.item() == pytest.approx(fitted["energy"].rmsd.item(), rel=1e-3)
    assert energy.mean.item() == pytest.approx(fitted["energy"].mean.item(), abs=1e-3)
    assert forces.rmsd.item() == pytest.approx(fitted["forces"].rmsd.item(), rel=1e-4)


def test_written_files_equal_fairchem_fits_in_float64(demo_out: Path) -> None:
    """The three files are fairchem's own fit_linear_references / fit_normalizers on the same
    train LMDB, run in float64 (fairchem allocates its matrices in torch's default dtype; as
    shipped, float32, it agrees to float32 rounding: the test above), fitted while converting."""
    train = LmdbDataset({"src": str(demo_out / "train")})
    kw = {"batch_size": len(train), "shuffle": False}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        references = fit_linear_references(["energy"], train, log_metrics=False, **kw)
        energy = fit_normalizers(["energy"], train, override_values={},  # fairchem needs a dict
                                 element_references=references, **kw)
        forces = fit_normalizers(["forces"], train, override_values={"forces": {"mean": 0.0}},
                                 **kw)
    finally:
        torch.set_default_dtype(default)
    theirs = references["energy"].element_references
    assert theirs.dtype == torch.float64
    ours = np.load(demo_out / "element_references.npz")["element_references"]
    assert ours.shape == theirs.shape == (119,)
    np.testing.assert_array_equal(ours != 0, theirs.numpy() != 0)  # the same elements fitted
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=1e-8)  # eV per atom
    for name, fitted in (("energy", energy["energy"]), ("forces", forces["forces"])):
        written = np.load(demo_out / f"{name}_normalizer.npz")
        assert written["mean"].dtype == written["rmsd"].dtype == np.float32
        # the files hold float32: equal to fairchem's float64 values rounded to float32
        np.testing.assert_allclose(written["mean"], fitted.mean.item(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(written["rmsd"], fitted.rmsd.item(), rtol=1e-6)
    assert float(np.load(demo_out / "forces_normalizer.npz")["mean"]) == 0.0


def test_printed_yaml_loads_through_trainer_code_path(demo_conversion: dict) -> None:
    """The snippet, placed in a config, is what BaseTrainer reads (no refitting)."""
    dataset_config = yaml.safe_load(demo_conversion["config_snippet"])["dataset"]
    assert set(dataset_config) == {"train", "val", "test"}
    fake_trainer = SimpleNamespace(
        config={"dataset": dataset_config["train"], "cmd": {"seed": 0}},
        train_dataset=LmdbDataset(dataset_config["train"]),
        is_debug=True,
        device=torch.device("cpu"),
        elementrefs={},
        normalizers={},
    )
    BaseTrainer.load_references_and_normalizers(fake_trainer)
    assert set(fake_trainer.elementrefs) == {"energy"}
    assert set(fake_trainer.normalizers) == {"energy", "forces"}
    batch = full_batch(fake_trainer.train_dataset)
    target = fake_trainer.elementrefs["energy"].dereference(batch.energy.view(-1, 1), batch)
    normed = fake_trainer.normalizers["energy"].norm(target)
    assert abs(normed.mean().item()) < 1e-3
    assert normed.std().item() == pytest.approx(1.0, rel=1e-3)
    forces = fake_trainer.normalizers["forces"].norm(batch.forces)
    assert (forces.square().sum(dim=1).mean().sqrt().item()) == pytest.approx(1.0, rel=1e-4)
    val_config = {**dataset_config["train"], **dataset_config["val"]}
    assert len(LmdbDataset(val_config)) == demo_conversion["splits"]["val"]["num_frames"]
