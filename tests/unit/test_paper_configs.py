"""The paper / official-release configs (docs/configs.md): each full-size model has the paper's
parameter count, the DeNS settings are the ones its comments cite, and each config, scaled down
(1 block, small channels, lmax 2) on real OC20 frames (eSEN MPtrj: real mlearn Si with stress),
trains one step with a finite loss."""

from __future__ import annotations

import json
import lzma
import math
import shutil
from functools import cache
from pathlib import Path

import pytest
import torch
from fairchem.core.common.utils import load_config
from fairchem.core.models.base import HydraModel

from fairchem_dens.config import DeNSConfig
from tests.conftest import DEMO_VAL_SYSTEMS, REPO, SHARED, build_trainer

CONFIG_DIR = REPO / "configs"
MD17_ETHANOL = SHARED / "data" / "md17_ethanol" / "ethanol_sampledata.xyz.xz"

#: full-size config -> parameters the paper reports for its model (Table 1d: 89M / 52M,
#: Section 4.1.2: 160M, Table 3: 127M).
PAPER_PARAMS = {
    "oc20/s2ef/2M/eqv2_dens_N@12_L@6_M@2_e12.yml": 89e6,
    "oc20/s2ef/2M/eqv2_dens_N@12_L@6_M@2_e12_official.yml": 89e6,
    "oc20/s2ef/2M/eqv2_dens_N@12_L@6_M@2_e20_paper.yml": 89e6,
    "oc20/s2ef/2M/eqv2_dens_N@12_L@6_M@2_e30_paper.yml": 89e6,
    "oc20/s2ef/2M/escn_dens_L@6_M@2_Lay@12_e20.yml": 52e6,
    "oc20/s2ef/all_md/eqv2_dens_N@20_L@6_M@3_e2_paper.yml": 160e6,
    "oc22/s2ef/eqv2_dens_N@18_L@6_M@2_e6_paper.yml": 127e6,
    "oc22/s2ef/eqv2_dens_N@18_L@6_M@2_e6_official.yml": 127e6,
}
MD17 = "md17/esen_dens_ethanol.yml"  # conservative eSEN (issue 23)
#: eSEN (conservative) + DeNS on MPtrj: DeNS values of fairchem's EquiformerV2 + DeNS MPtrj
#: release (no eSEN config ships with fairchem 1.10; see the config's header)
ESEN_MPTRJ = "omat24/mptrj/esen_dens_mptrj.yml"

#: DeNS settings each config must carry (paper Tables 1, 7, 8, 9 or the official release).
EXPECTED_DENS = {
    "oc20/s2ef/2M/eqv2_dens_N@12_L@6_M@2_e12.yml":
        {"prob": 0.5, "corrupt_ratio": 1.0, "std": None, "std_high": 0.5, "coefficient": 10,
         "selection": "structure", "reduction": "shared_free_atoms", "normalize_by": "std_high"},
    "oc20/s2ef/2M/eqv2_dens_N@12_L@6_M@2_e20_paper.yml":
        {"prob": 0.5, "corrupt_ratio": 1.0, "std": None, "std_high": 0.75, "coefficient": 10,
         "selection": "structure", "reduction": "shared_free_atoms", "normalize_by": "std_high"},
    "oc20/s2ef/2M/eqv2_dens_N@12_L@6_M@2_e30_paper.yml":
        {"prob": 0.5, "corrupt_ratio": 1.0, "std": None, "std_high": 0.75, "coefficient": 10,
         "selection": "structure", "reduction": "shared_free_atoms", "normalize_by": "std_high"},
    "oc20/s2ef/2M/eqv2_dens_N@12_L@6_M@2_e12_official.yml":
        {"prob": 0.5, "corrupt_ratio": 0.5, "std": 0.1, "std_high": None, "coefficient": 10,
         "selection": "batch", "reduction": "shared_free_atoms", "normalize_by": "sigma"},
    "oc20/s2ef/all_md/eqv2_dens_N@20_L@6_M@3_e2_paper.yml":
        {"prob": 0.25, "corrupt_ratio": 1.0, "std": None, "std_high": 0.75, "coefficient": 10,
         "selection": "structure", "skip_key": "md", "reduction": "shared_free_atoms",
         "normalize_by": "std_high"},
    "oc22/s2ef/eqv2_dens_N@18_L@6_M@2_e6_paper.yml":
        {"prob": 0.5, "corrupt_ratio": 0.5, "std": None, "std_high": 0.5, "coefficient": 100,
         "selection": "structure", "reduction": "shared_free_atoms", "normalize_by": "std_high"},
    "oc22/s2ef/eqv2_dens_N@18_L@6_M@2_e6_official.yml":
        {"prob": 0.5, "corrupt_ratio": 0.5, "std": 0.15, "std_high": None, "coefficient": 25,
         "selection": "batch", "reduction": "shared_free_atoms", "normalize_by": "sigma"},
    "oc20/s2ef/2M/escn_dens_L@6_M@2_Lay@12_e20.yml":
        {"prob": 0.5, "corrupt_ratio": 0.5, "std": 0.15, "std_high": None, "coefficient": 10,
         "selection": "structure", "reduction": "shared_free_atoms", "normalize_by": "sigma"},
    ESEN_MPTRJ:  # eqV2_31M_dens_mptrj.yml: prob 0.5, fixed std 0.1, coefficient 10, every
    # atom of a DeNS batch corrupted (no corrupt_ratio), one coin per batch
        {"prob": 0.5, "corrupt_ratio": 1.0, "std": 0.1, "std_high": None, "coefficient": 10,
         "selection": "batch", "reduction": "per_term", "normalize_by": "sigma",
         "max_force_norm": None, "min_num_atoms": None, "max_stress": None},
    MD17:  # the authors' MD17 rule: per-term means, lambda_DeNS decayed linearly by epoch
        {"prob": 0.25, "corrupt_ratio": 0.25, "std": 0.05, "std_high": None, "coefficient": 5,
         "selection": "structure", "reduction": "per_term", "normalize_by": "sigma",
         "coefficient_schedule": "linear", "coefficient_schedule_by": "epoch"},
}

#: optimiser values of Tables 7 / 8 (lr, epochs, lambda_E, lambda_F, clip, drop path).
EXPECTED_OPTIM = {
    "oc20/s2ef/2M/eqv2_dens_N@12_L@6_M@2_e20_paper.yml": (4e-4, 20, 2, 100, 100, 0.05),
    "oc20/s2ef/2M/eqv2_dens_N@12_L@6_M@2_e30_paper.yml": (4e-4, 30, 2, 100, 100, 0.05),
    "oc20/s2ef/2M/eqv2_dens_N@12_L@6_M@2_e12_official.yml": (2e-4, 12, 2, 100, 100, 0.05),
    "oc20/s2ef/all_md/eqv2_dens_N@20_L@6_M@3_e2_paper.yml": (4e-4, 2, 4, 100, 100, 0.1),
    "oc22/s2ef/eqv2_dens_N@18_L@6_M@2_e6_paper.yml": (2e-4, 6, 4, 100, 50, 0.1),
    "oc22/s2ef/eqv2_dens_N@18_L@6_M@2_e6_official.yml": (2e-4, 6, 4, 100, 50, 0.1),
    MD17: (5e-4, 1500, 1, 80, 100, 0.0),
}

ALL = sorted({*PAPER_PARAMS, *EXPECTED_DENS})
#: train systems of the bundled data marked as MD in the converted test data
MD_SYSTEMS = (1000103, 1000120, 1000142, 1000167, 1000170, 1000193)


def load(rel: str) -> dict:
    config, _, duplicates_error = load_config(str(CONFIG_DIR / rel))
    assert not duplicates_error
    return config


def test_every_paper_config_is_listed() -> None:
    shipped = {str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yml")
               if p.name != "base.yml" and not {"demo", "pretrain", "mlearn"} & set(p.parts)}
    assert shipped == set(ALL)


@cache
def _count(model_json: str) -> int:
    model = json.loads(model_json)
    assert model.pop("name") == "hydra"
    return sum(p.numel() for p in HydraModel(**model).parameters())


@pytest.mark.parametrize("rel", sorted(PAPER_PARAMS))
def test_parameter_count_matches_the_paper(rel: str) -> None:
    # Built for real on CPU (6-9 s each, no meta device: fairchem's GaussianSmearing calls
    # .item() at construction); configs sharing an architecture share one build.
    n = _count(json.dumps(load(rel)["model"], sort_keys=True))
    expected = PAPER_PARAMS[rel]
    assert abs(n - expected) <= 0.02 * expected, f"{rel}: {n / 1e6:.2f}M vs {expected / 1e6:.0f}M"


@pytest.mark.parametrize("rel", sorted(EXPECTED_DENS))
def test_dens_settings_are_the_cited_ones(rel: str) -> None:
    config = load(rel)
    dens = DeNSConfig.from_optim(config["optim"])
    for key, value in EXPECTED_DENS[rel].items():
        assert getattr(dens, key) == value, (rel, key)
    if rel in EXPECTED_OPTIM:
        lr, epochs, lam_e, lam_f, clip, drop_path = EXPECTED_OPTIM[rel]
        optim = config["optim"]
        assert (optim["lr_initial"], optim["max_epochs"], optim["clip_grad_norm"]) == (
            lr, epochs, clip)
        coeffs = {k: v["coefficient"] for entry in config["loss_functions"] for k, v in entry.items()}
        assert coeffs == {"energy": lam_e, "forces": lam_f}
        assert config["model"]["backbone"].get("drop_path_rate", 0.0) == drop_path


def test_esen_mptrj_values_are_the_cited_ones() -> None:
    """The optimiser, loss weights and size the eSEN MPtrj config's header cites: fairchem's
    EquiformerV2 MPtrj optimiser and energy/force weights, stress weight 5, one normaliser
    scale for the energy and its gradient forces and stress, 26.9M parameters."""
    config = load(ESEN_MPTRJ)
    optim = config["optim"]
    assert (optim["lr_initial"], optim["max_epochs"], optim["clip_grad_norm"],
            optim["ema_decay"], optim["batch_size"]) == (2e-4, 150, 100, 0.999, 4)
    assert optim["scheduler_params"] == {"lambda_type": "cosine", "warmup_factor": 0.2,
                                         "warmup_epochs": 0.1, "lr_min_factor": 0.01}
    terms = {k: (v["fn"], v["coefficient"]) for e in config["loss_functions"] for k, v in e.items()}
    assert terms == {"energy": ("per_atom_mae", 5), "forces": ("l2mae", 20),
                     "stress": ("mae", 5)}
    normalizers = config["dataset"]["train"]["transforms"]["normalizer"]
    assert {t: (n["mean"], n["rmsd"]) for t, n in normalizers.items()} == {
        t: (0.0, 1.0) for t in ("energy", "forces", "stress")}
    assert [h["module"] for h in config["model"]["heads"].values()] == [
        "esen_mlp_efs_head", "fairchem_dens.models.esen.DeNSeSENNoiseHead"]
    n = _count(json.dumps(config["model"], sort_keys=True))
    assert abs(n - 26.85e6) < 0.01e6, n


# ------------------------------------------------------------------ scaled-down training
SMALL_EQV2 = {
    "num_layers": 1, "sphere_channels": 16, "attn_hidden_channels": 16, "num_heads": 2,
    "attn_alpha_channels": 8, "attn_value_channels": 4, "ffn_hidden_channels": 16,
    "edge_channels": 16, "lmax_list": [2], "mmax_list": [2], "grid_resolution": 8,
    "num_sphere_samples": 16, "num_distance_basis": 64, "max_radius": 6.0, "max_neighbors": 8,
    "alpha_drop": 0.0, "drop_path_rate": 0.0,
}
SMALL_ESEN = {
    "num_layers": 1, "sphere_channels": 16, "hidden_channels": 16, "edge_channels": 16,
    "lmax": 2, "mmax": 2, "num_distance_basis": 32, "cutoff": 5.0, "max_neighbors": 30,
}
SMALL_ESCN = {
    "num_layers": 1, "sphere_channels": 16, "hidden_channels": 16, "lmax_list": [2],
    "mmax_list": [2], "num_sphere_samples": 16, "cutoff": 6.0, "max_neighbors": 8,
}


@pytest.fixture(scope="module")
def oc20_md_lmdb(tmp_path_factory) -> Path:
    """The bundled OC20 trajectories (every 40th frame) with six train systems marked MD."""
    from fairchem_dens.data import ConversionOptions, convert, demo_data_dir

    out = tmp_path_factory.mktemp("oc20_md")
    convert(ConversionOptions(inputs=[str(demo_data_dir())], out_dir=out, stride=40,
                              val_systems=DEMO_VAL_SYSTEMS, md_systems=MD_SYSTEMS))
    return out


@pytest.fixture(scope="module")
def molecule_lmdb(tmp_path_factory, oc20_md_lmdb) -> Path:
    """Ethanol (MD17 sample data, kcal/mol) cut into 3 files of 4 frames; OC20 without it."""
    if not MD17_ETHANOL.exists():
        return oc20_md_lmdb
    from ase.io import read, write

    from fairchem_dens.data import ConversionOptions, convert

    folder = tmp_path_factory.mktemp("ethanol")
    with lzma.open(MD17_ETHANOL, "rt") as handle:
        frames = read(handle, index=":12", format="extxyz")
    for chunk in range(3):
        write(folder / f"ethanol_{chunk}.extxyz", frames[4 * chunk:4 * chunk + 4])
    convert(ConversionOptions(inputs=[str(folder / "*.extxyz")], out_dir=folder / "lmdb",
                              energy_unit="kcal/mol", val_systems=(2,)))
    return folder / "lmdb"


def scaled_config(rel: str, data_dir: Path, run_dir: Path) -> dict:
    """``rel`` with a 1-block model and the converted test data (keys, references and
    normalisers of the converter: its LMDBs need no key_mapping)."""
    config = load(rel)
    data = Path(shutil.copytree(data_dir, run_dir / "data"))  # lmdb: one open per path
    train = config["dataset"]["train"]
    train.pop("key_mapping", None)
    train.pop("a2g_args", None)  # ase_db reading options (eSEN's MPtrj config)
    train["format"] = "lmdb"
    train["src"] = str(data / "train")
    esen = "esen" in config["model"]["backbone"]["model"]
    train["transforms"] = {
        "element_references": {"energy": {"file": str(data / "element_references.npz")}},
        # eSEN: the config's own normalisers (one scale for the energy and its gradients:
        # fixed values, or the converter's file that holds it); the others: the converter's
        "normalizer": {key: {"file": str(data / Path(value["file"]).name)} if "file" in value
                       else value for key, value in train["transforms"]["normalizer"].items()}
        if esen else {
            key: {"file": str(data / f"{key}_normalizer.npz")} for key in ("energy", "forces")},
    }
    config["dataset"]["val"] = {"src": str(data / "val")}
    backbone = config["model"]["backbone"]
    backbone.update(SMALL_ESEN if esen else SMALL_ESCN if "escn" in backbone["model"]
                    else SMALL_EQV2)
    config["optim"].update(batch_size=8, eval_batch_size=8, num_workers=0)
    config["optim"].pop("load_balancing", None)
    # a few steps per epoch: fairchem's cosine schedule divides by int(warmup_epochs * steps)
    config["optim"]["scheduler_params"]["warmup_epochs"] = 1
    config["logger"] = "tensorboard"
    config["run_dir"] = str(run_dir)
    return config


def dens_step(trainer, batch) -> int:
    """First step whose DeNS draw corrupts some atom of ``batch`` (deterministic)."""
    for step in range(1, 200):
        trainer.step = step
        if trainer._sample(batch).num_corrupted:
            return step
    raise AssertionError("no DeNS step found")


@pytest.mark.parametrize("rel", ALL)
def test_scaled_config_trains_one_step(rel: str, oc20_md_lmdb, molecule_lmdb, mlearn_si_lmdb,
                                       tmp_path) -> None:
    data = (molecule_lmdb if rel.startswith("md17") else mlearn_si_lmdb if rel == ESEN_MPTRJ
            else oc20_md_lmdb)  # eSEN's stress target: real mlearn Si with stress
    trainer = build_trainer(scaled_config(rel, data, tmp_path))
    assert trainer.dens == DeNSConfig.from_optim(load(rel)["optim"])
    batch = next(iter(trainer.train_loader))
    trainer.model.train()
    trainer.step = dens_step(trainer, batch)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    out = trainer._forward(batch)
    step = trainer._dens_step
    assert step.num_corrupted > 0
    if trainer.dens.skip_key == "md":
        md = batch.md.cpu().bool()
        assert md.any() and not (step.selected.cpu() & md).any()  # MD frames never corrupted
    loss = trainer._compute_loss(out, batch)
    assert math.isfinite(loss.item())
    metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})  # as the loop does
    assert metrics["denoising_noise_mae"]["numel"] == 3 * step.num_corrupted
    trainer._backward(loss)
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert len(changed) > 0.5 * len(before)
    assert any(f"output_heads.{trainer._noise_head}." in n for n in changed)  # denoising trained
    # a few more steps with the config's own draws (r 1.0 configs: selected structures keep no
    # free uncorrupted atom, which used to crash fairchem's loss reshape and threshold metric)
    for later in range(trainer.step + 1, trainer.step + 4):
        trainer.step = later
        fresh = batch.clone()  # eSEN's efs head leaves a strained (non-leaf) pos in its batch
        out = trainer._forward(fresh)
        loss = trainer._compute_loss(out, fresh)
        metrics = trainer._compute_metrics(out, fresh, trainer.evaluator, metrics)
        assert math.isfinite(loss.item())
        assert all(math.isfinite(m["metric"]) for m in metrics.values()), {
            k: m for k, m in metrics.items() if not math.isfinite(m["metric"])}
        trainer._backward(loss)


def test_per_atom_energy_metric_of_a_dens_step_divides_by_every_atom(mlearn_si_lmdb,
                                                                     tmp_path) -> None:
    """Every structure of a DeNS step trains its original energy, so its training energy
    metrics are fairchem's over the whole batch: ``energy_per_atom_mae`` divides each
    structure's error by all its (free) atoms, not by its uncorrupted ones. fairchem's MPtrj /
    OMat24 configs log this metric; with r 1.0 (eSEN MPtrj) every structure of a DeNS batch is
    fully corrupted."""
    from fairchem.core.trainers import OCPTrainer

    trainer = build_trainer(scaled_config(ESEN_MPTRJ, mlearn_si_lmdb, tmp_path))
    batch = next(iter(trainer.train_loader))
    trainer.model.train()
    trainer.step = dens_step(trainer, batch)
    out = trainer._forward(batch)
    trainer._compute_loss(out, batch)
    dens = trainer._compute_metrics(out, batch, trainer.evaluator, {})
    plain = OCPTrainer._compute_metrics(trainer, {k: v for k, v in out.items() if k in
                                                  trainer.output_targets}, batch,
                                        trainer.evaluator, {})
    assert dens["energy_mae"]["metric"] == pytest.approx(plain["energy_mae"]["metric"])
    assert dens["energy_per_atom_mae"]["metric"] == pytest.approx(
        plain["energy_per_atom_mae"]["metric"])
