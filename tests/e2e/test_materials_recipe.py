"""The materials configs carry fairchem's MPtrj loss recipe through their own normalisation
(issue 23): on the data configs/mlearn/base.yml documents (mlearn Si, converted with stress and
``--split 0.9,0.1``), the loss the trainer computes on a real batch is, by hand in raw units,
fairchem's MPtrj release (configs/omat24/mptrj/eqV2_31M_mptrj.yml of fairchem 1.10):

    5 x mean_s |E_s - E_s'| / n_s                    (eV/atom, energy after the references)
  + 20 x mean_i |F_i - F_i'|_2 / F_rms               (forces / their RMS, L2MAE)
  + 5 x mean |s_iso - s_iso'| / rmsd_iso + 5 x mean |s_aniso - s_aniso'| / rmsd_aniso
                                                     (stress parts / their fitted rmsd)

EquiformerV2 predicts E / sigma_E, so its energy weight is 5 x sigma_E; the conservative eSEN
predicts energy, forces and stress on one scale F_rms, so its weights are 5 x F_rms on the
energy and 10 x F_rms / S_rms on its 9-component gradient stress (its two parts of weight 5
each, with S_rms the RMS of the training stresses). The MD17 weights used before gave the
energy ~6x less weight relative to the forces and did not learn it (docs/energy.md).

A brief real-data training check follows for the family that learns energy within a test's
budget (the conservative eSEN); the others' energies, measured at the configs' length, are in
docs/energy.md.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from fairchem.core.common.utils import load_config

from tests.conftest import REPO, SHARED, build_trainer

pytestmark = [pytest.mark.slow, pytest.mark.shared, pytest.mark.usefixtures("_single_thread")]

#: fairchem's MPtrj weights per unit error (see the module docstring)
ENERGY_PER_EV_PER_ATOM = 5.0
FORCES_ON_NORMALISED = 20.0
STRESS_PART_ON_NORMALISED = 5.0
#: the configs round their data-dependent weights to two or three digits
RTOL = 0.03


@pytest.fixture(scope="module")
def mlearn_si_full_lmdb(tmp_path_factory) -> Path:
    """mlearn Si converted exactly as configs/mlearn/base.yml's header says."""
    from fairchem_dens.data import ConversionOptions, convert
    from fairchem_dens.data.mlearn import write_mlearn_extxyz

    src = SHARED / "data" / "mlearn" / "Si" / "training.json.xz"
    if not src.exists():
        pytest.skip(f"shared mlearn data not found at {src}")
    raw = tmp_path_factory.mktemp("si_extxyz")
    write_mlearn_extxyz(src, raw)
    out = tmp_path_factory.mktemp("si_lmdb")
    convert(ConversionOptions(inputs=[str(raw)], out_dir=out, overwrite=True, stress=True,
                              split=(0.9, 0.1, 0.0)))
    return out


def config_on(rel: str, lmdb: Path, run_dir: Path) -> dict:
    """``rel`` with every file it names pointed at the file of that name in ``lmdb``."""
    config, _, _ = load_config(str(REPO / "configs" / rel))
    data = Path(shutil.copytree(lmdb, run_dir / "data"))  # lmdb: one open per path
    train = config["dataset"]["train"]
    train["src"] = str(data / "train")
    for kind in ("element_references", "normalizer"):
        for value in train["transforms"].get(kind, {}).values():
            if isinstance(value, dict) and "file" in value:
                value["file"] = str(data / Path(value["file"]).name)
    config["dataset"]["val"] = {"src": str(data / "val")}
    config["optim"].update(num_workers=0)
    config.update(run_dir=str(run_dir), logger="tensorboard")
    return config


def forward_a_real_batch(config: dict):
    trainer = build_trainer(config)
    batch = next(iter(trainer.train_loader))
    trainer.model.train()
    return trainer, batch, trainer._forward(batch)


def trainer_terms(trainer, batch, out) -> dict[str, float]:
    """Each configured loss term as the trainer computes it (coefficient included)."""
    configured = trainer.loss_functions  # [(target, {"fn": ..., "coefficient": ...}), ...]
    terms = {}
    try:
        for one in configured:
            trainer.loss_functions = [one]
            terms[one[0]] = float(trainer._compute_loss(out, batch))
    finally:
        trainer.loss_functions = configured
    return terms


def raw(trainer, target: str, prediction: torch.Tensor) -> torch.Tensor:
    """A normalised-space prediction in the target's units (before element references)."""
    normalizer = trainer.normalizers.get(target)
    return normalizer.denorm(prediction) if normalizer is not None else prediction


def energy_and_forces_by_hand(trainer, batch, out) -> dict[str, float]:
    natoms = batch.natoms.double()
    energy = raw(trainer, "energy", out["energy"].reshape(-1).double())
    target = trainer.elementrefs["energy"].dereference(batch.energy.reshape(-1).double(), batch,
                                                       reshaped=False)  # eV after the references
    energy_term = ((energy - target).abs() / natoms).mean()
    f_rms = float(trainer.normalizers["forces"].rmsd)
    forces = raw(trainer, "forces", out["forces"].reshape(-1, 3).double())
    forces_term = (forces - batch.forces.double()).norm(dim=1).mean() / f_rms
    return {"energy": ENERGY_PER_EV_PER_ATOM * float(energy_term),
            "forces": FORCES_ON_NORMALISED * float(forces_term)}


def assert_terms_match(trainer: dict[str, float], hand: dict[str, float]) -> None:
    assert trainer.keys() == hand.keys()
    for target, value in hand.items():
        assert math.isclose(trainer[target], value, rel_tol=RTOL), (target, trainer, hand)


def test_mlearn_eqv2_loss_is_fairchems_mptrj_recipe(mlearn_si_full_lmdb, tmp_path) -> None:
    trainer, batch, out = forward_a_real_batch(
        config_on("mlearn/eqv2_cpu.yml", mlearn_si_full_lmdb, tmp_path))
    sigma_e = float(trainer.normalizers["energy"].rmsd)
    assert 15 < sigma_e < 25  # eV per 64-atom cell: the energy is normalised, not raw
    hand = energy_and_forces_by_hand(trainer, batch, out)
    for part in ("stress_isotropic", "stress_anisotropic"):  # fitted by fairchem at start-up
        target = batch[part].reshape(batch.natoms.numel(), -1).double()
        predicted = raw(trainer, part, out[part].reshape(target.shape).double())
        hand[part] = STRESS_PART_ON_NORMALISED * float(
            (predicted - target).abs().mean() / float(trainer.normalizers[part].rmsd))
    assert_terms_match(trainer_terms(trainer, batch, out), hand)


def test_mlearn_esen_loss_is_fairchems_mptrj_recipe_on_its_common_scale(
    mlearn_si_full_lmdb, tmp_path
) -> None:
    trainer, batch, out = forward_a_real_batch(
        config_on("mlearn/esen_cpu.yml", mlearn_si_full_lmdb, tmp_path))
    f_rms = float(trainer.normalizers["forces"].rmsd)
    assert float(trainer.normalizers["energy"].rmsd) == f_rms  # one scale
    stress = torch.stack([trainer.train_dataset[i].stress.reshape(9)
                          for i in range(len(trainer.train_dataset))]).double()
    s_rms = float(stress.pow(2).mean().sqrt())  # eV/A^3
    hand = energy_and_forces_by_hand(trainer, batch, out)
    predicted = raw(trainer, "stress", out["stress"].reshape(-1, 9).double())
    stress_term = (predicted - batch.stress.reshape(-1, 9).double()).abs().mean()
    hand["stress"] = 2 * STRESS_PART_ON_NORMALISED / s_rms * float(stress_term)
    assert_terms_match(trainer_terms(trainer, batch, out), hand)


#: the conservative eSEN learns the energy fastest of the materials families (it is trained by
#: every force component); measured on these cells after 40 steps, shrunk, without EMA, as the
#: fraction of the mean predictor's error: eSEN 0.64, EquiformerV2 0.99, eSCN 1.00, eSEN MPtrj
#: config 0.97 (docs/energy.md): only eSEN learns it within a test's budget
TRAINED_CELLS = 8
ESEN_LEARNED = 0.75


@pytest.fixture(scope="module")
def si_cells_lmdb(tmp_path_factory) -> Path:
    """Every 20th mlearn Si training cell of 63-64 atoms (vacancy, AIMD at several
    temperatures, strained: -5.42 to -4.57 eV/atom, ~21 eV per cell after the reference),
    TRAINED_CELLS for training and 2 more, converted with stress (references and normalisers
    fitted on the training cells)."""
    import ase.io

    from fairchem_dens.data import ConversionOptions, convert
    from fairchem_dens.data.mlearn import read_mlearn

    src = SHARED / "data" / "mlearn" / "Si" / "training.json.xz"
    if not src.exists():
        pytest.skip(f"shared mlearn data not found at {src}")
    raw_dir = tmp_path_factory.mktemp("si_cells_raw")
    cells = [a for a in read_mlearn(src) if len(a) >= 63][::20][: TRAINED_CELLS + 2]
    for sid, atoms in enumerate(cells):
        ase.io.write(raw_dir / f"Si_{sid:05d}.extxyz", atoms)
    out = tmp_path_factory.mktemp("si_cells_lmdb")
    convert(ConversionOptions(inputs=[str(raw_dir)], out_dir=out, overwrite=True, stress=True,
                              val_systems=(TRAINED_CELLS, TRAINED_CELLS + 1)))
    return out


def test_mlearn_esen_learns_the_energy_of_real_cells(si_cells_lmdb, tmp_path) -> None:
    """configs/mlearn/esen_cpu.yml (1 block, 16 channels, lmax 2; its cutoff, targets,
    normalisers and weights), 40 steps of 4 cells without EMA (the config's 0.99 averages over
    more steps than this), scored on its 8 training cells: the energy error falls well below
    the mean predictor's (the element reference alone). This checks that the recipe trains the
    energy, not generalisation: held-out numbers at the config's length are in docs/energy.md."""
    from fairchem_dens.data.baselines import zero_output_errors

    config = config_on("mlearn/esen_cpu.yml", si_cells_lmdb, tmp_path)
    config["dataset"]["val"] = {"src": config["dataset"]["train"]["src"]}  # score training cells
    config["model"]["backbone"].update(num_layers=1, sphere_channels=16, hidden_channels=16,
                                       edge_channels=16, lmax=2, mmax=2, num_distance_basis=32)
    config["optim"].update(batch_size=4, eval_batch_size=TRAINED_CELLS, ema_decay=None,
                           max_epochs=20, eval_every=10**9)  # 20 epochs of 2 steps
    config["optim"]["scheduler_params"]["warmup_epochs"] = 1
    trainer = build_trainer(config)
    trainer.train()
    metrics = trainer.validate("val", disable_tqdm=True)
    baseline = zero_output_errors(si_cells_lmdb, split="train")
    assert metrics["energy_mae"]["metric"] < ESEN_LEARNED * baseline["energy_mae"], (
        metrics["energy_mae"], baseline)
    assert metrics["forces_mae"]["metric"] < baseline["forces_mae"]
