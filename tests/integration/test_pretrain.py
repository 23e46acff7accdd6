"""Pre-training by denoising equilibrium structures (``optim.dens.pretrain``) on real OC20
relaxed structures (last frames of the bundled trajectories, and the IS2RE LMDB's pos_relaxed):
the exact loss, which atoms are noised, no force encoding, the equilibrium warning, and errors."""

from __future__ import annotations

import logging
import lzma
import shutil

import pytest
import torch
from ase.io import read, write

from fairchem_dens.config import DeNSConfig, DeNSConfigError
from fairchem_dens.corruption import DENS_FORCES_KEY, DENS_MASK_KEY
from fairchem_dens.trainer import NOISE_PRED_KEY
from tests.conftest import DEMO_DIR, SHARED, build_trainer, demo_config

PRETRAIN = {"pretrain": True, "std": 0.05, "coefficient": 10}
IS2RE = SHARED / "data" / "oc20_tutorial_lmdb" / "is2re" / "val_20"


@pytest.fixture(scope="session")
def relaxed_lmdb(tmp_path_factory):
    """The last two (relaxed) frames of each bundled OC20 trajectory (the bundled files hold
    every 2nd frame), converted by the converter (train = all 28 structures; energies and forces
    kept; two frames per composition keep the energy normaliser non-degenerate)."""
    from fairchem_dens.data import ConversionOptions, convert

    frames = tmp_path_factory.mktemp("last_frames")
    for path in sorted(DEMO_DIR.glob("*.extxyz.xz")):
        with lzma.open(path, "rt") as f:
            # .traj keeps the fixed atoms with any ASE (ASE 3.25's extxyz writer drops them)
            write(frames / path.name.replace(".extxyz.xz", ".traj"),
                  read(f, index="-2:", format="extxyz"))
    out = tmp_path_factory.mktemp("relaxed_lmdb")
    convert(ConversionOptions(inputs=[str(frames)], out_dir=out, split=(1.0, 0.0, 0.0),
                              overwrite=True))
    return out


def pretrain_config(lmdb, run_dir, **dens):
    config = demo_config(lmdb, {**PRETRAIN, **dens}, run_dir)
    config["dataset"]["val"] = None
    config["optim"]["scheduler_params"]["warmup_epochs"] = 1  # 4 steps per epoch here
    return config


def noised_forward(trainer):
    """One training forward; returns (batch, output, corruption, the batch the model saw)."""
    batch = next(iter(trainer.train_loader))
    seen = {}
    hook = trainer.model.register_forward_pre_hook(lambda _m, args: seen.update(data=args[0]))
    trainer.model.train()
    try:
        out = trainer._forward(batch)
    finally:
        hook.remove()
    return batch, out, trainer._dens_step, seen["data"]


def test_pretrain_config_fixes_prob_ratio_and_encoding() -> None:
    cfg = DeNSConfig.from_dict({"pretrain": True, "std": 0.05})
    assert (cfg.prob, cfg.corrupt_ratio, cfg.encode_forces) == (1.0, 1.0, False)
    for key, value in (("prob", 0.5), ("corrupt_ratio", 0.25), ("encode_forces", True)):
        with pytest.raises(DeNSConfigError, match=f"optim.dens.{key}=.*pretrain: true"):
            DeNSConfig.from_dict({"pretrain": True, "std": 0.05, key: value})


def test_every_free_atom_is_noised_and_loss_is_energy_plus_denoising(relaxed_lmdb, tmp_path):
    trainer = build_trainer(pretrain_config(relaxed_lmdb, tmp_path))
    batch, out, step, seen = noised_forward(trainer)
    free = batch.fixed == 0
    assert torch.equal(step.mask, free) and step.selected.all()
    assert DENS_FORCES_KEY not in seen and torch.equal(seen[DENS_MASK_KEY], free)
    moved = (seen.pos - batch.pos).norm(dim=-1)
    assert (moved[free] > 0).all() and (moved[~free] == 0).all()

    loss = trainer._compute_loss(out, batch)
    energy = trainer.normalizers["energy"].norm(
        trainer.elementrefs["energy"].dereference(batch.energy.view(-1, 1), batch))
    energy_term = 2 * (out["energy"].view(-1) - energy.view(-1)).abs().mean()  # mae, coeff 2
    noise = out[NOISE_PRED_KEY][free] - step.target[free]
    denoise_term = 10 * noise.norm(dim=-1).mean()  # l2mae (the forces loss), lambda 10
    torch.testing.assert_close(loss, energy_term + denoise_term)

    metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})
    # no S2EF labels; lambda_DeNS of the step is logged
    assert set(metrics) == {"denoising_noise_mae", "denoising_noise_l2mae", "dens_coefficient"}
    assert metrics["dens_coefficient"]["metric"] == 10
    assert metrics["denoising_noise_l2mae"]["metric"] == pytest.approx(
        float(noise.norm(dim=-1).mean()), rel=1e-5)


@pytest.mark.skipif(not IS2RE.exists(), reason="shared OC20 IS2RE LMDB not present")
def test_is2re_relaxed_positions_without_labels_denoising_only(demo_lmdb, tmp_path):
    src = shutil.copytree(IS2RE, tmp_path / "is2re")
    config = pretrain_config(demo_lmdb, tmp_path / "run", loss_fn="l2mae",
                             positions_key="pos_relaxed")
    config["dataset"]["train"] = {"format": "lmdb", "src": str(src)}
    config["optim"]["load_balancing"] = None  # the tutorial LMDB has no metadata.npz
    trainer = build_trainer(config)
    assert "energy" not in trainer.train_dataset[0] and "forces" not in trainer.train_dataset[0]
    batch, out, step, seen = noised_forward(trainer)
    raw = trainer.train_dataset  # initial pos and pos_relaxed, as stored
    by_sid = {int(raw[i].sid): raw[i] for i in range(len(raw))}
    first = by_sid[int(batch.sid[0])]
    n0 = int(batch.natoms[0])
    torch.testing.assert_close(batch.pos[:n0], first.pos_relaxed)  # relaxed, not initial
    assert not torch.allclose(first.pos, first.pos_relaxed)
    loss = trainer._compute_loss(out, batch)
    free = batch.fixed == 0
    expected = 10 * (out[NOISE_PRED_KEY][free] - step.target[free]).norm(dim=-1).mean()
    torch.testing.assert_close(loss, expected)


def test_warns_with_measured_forces_on_non_equilibrium_data(demo_lmdb, relaxed_lmdb, tmp_path,
                                                            caplog):
    from fairchem.core.datasets import LmdbDataset

    frames = LmdbDataset({"src": str(demo_lmdb / "train")})
    norms = torch.cat([frames[i].forces[frames[i].fixed == 0].double().norm(dim=-1)
                       for i in range(40)])
    del frames  # lmdb: one open environment per path and process
    config = pretrain_config(demo_lmdb, tmp_path / "a")
    config["dataset"]["train"]["first_n"] = 40
    with caplog.at_level(logging.INFO):
        build_trainer(config)
    (warning,) = (r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                  and "not equilibrium" in r.getMessage())
    assert f"mean |F| = {norms.mean():.3f} eV/A over {norms.numel()} free atoms of 40" in warning
    assert norms.mean() > 0.1

    caplog.clear()
    with caplog.at_level(logging.INFO):
        build_trainer(pretrain_config(relaxed_lmdb, tmp_path / "b"))
    assert not [r for r in caplog.records if "not equilibrium" in r.getMessage()]
    (line,) = (r.getMessage() for r in caplog.records if "(equilibrium)" in r.getMessage())
    assert float(line.split("mean |F| = ")[1].split()[0]) < 0.05  # OC20 relaxations: fmax 0.05


def test_validation_split_is_refused(relaxed_lmdb, demo_lmdb, tmp_path):
    config = demo_config(relaxed_lmdb, PRETRAIN, tmp_path)  # still has dataset.val
    config["dataset"]["val"]["src"] = str(demo_lmdb / "val")
    with pytest.raises(DeNSConfigError, match="dataset.val"):
        build_trainer(config)


def test_degenerate_energy_normalizer_is_flagged_and_refused(tmp_path):
    """One relaxed frame per system: the element references interpolate every training energy,
    so the energy normaliser's rmsd is ~0; the converter warns and the trainer refuses."""
    from fairchem_dens.data import ConversionOptions, convert

    frames = tmp_path / "last"
    frames.mkdir()
    for path in sorted(DEMO_DIR.glob("*.extxyz.xz")):
        with lzma.open(path, "rt") as f:
            write(frames / path.name.replace(".extxyz.xz", ".traj"),
                  read(f, index=-1, format="extxyz"))
    said = []
    summary = convert(ConversionOptions(inputs=[str(frames)], out_dir=tmp_path / "lmdb",
                                        split=(1.0, 0.0, 0.0)), log=said.append)
    assert summary["energy_normalizer_degenerate"] is True
    assert any("reproduce every training energy" in line for line in said)
    with pytest.raises(DeNSConfigError, match="'energy' normalizer has rmsd"):
        build_trainer(pretrain_config(tmp_path / "lmdb", tmp_path / "run"))
