"""Every shipped config family learns the energy on real data (issue 23).

Each family's config (its targets, references, normalisers, loss weights, heads and trainer;
only the network shrunk, EMA off and the run short) is trained briefly on a few real structures
and scored on the same structures: its energy MAE must fall well below the mean predictor's
(the per-element references alone, :func:`fairchem_dens.data.baselines.zero_output_errors`) and
its force MAE below zero forces'. This checks that the recipe trains the energy at all (a zero
energy weight, a degenerate normaliser, an energy head whose output cannot reach the targets'
scale, or references that leave nothing to learn fail it); held-out numbers at each config's own
length are in docs/energy.md.

Data (real DFT): mlearn Si cells (vacancies, AIMD, strained; energy, forces, stress) and MD17
ethanol frames (the bundled demo frames). The OC20 configs are checked on the Si cells: after
the per-element references, the bundled OC20 relaxations leave only each relaxation's energy
profile, which a direct-force head learns slowly (docs/energy.md measures it).
:func:`test_every_shipped_config_family_is_checked` keeps the list complete.
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, build_trainer, config_on_lmdb, mlearn_si_training

pytestmark = [pytest.mark.slow, pytest.mark.shared, pytest.mark.usefixtures("_single_thread")]

#: energy MAE on the trained structures must be below this fraction of the mean predictor's
LEARNED = 0.6

SHRUNK_EQV2 = {"num_layers": 1, "sphere_channels": 16, "attn_hidden_channels": 16,
               "num_heads": 2, "attn_alpha_channels": 8, "attn_value_channels": 4,
               "ffn_hidden_channels": 16, "edge_channels": 16, "lmax_list": [2],
               "mmax_list": [2], "grid_resolution": 8, "num_sphere_samples": 16}
SHRUNK_ESCN = {"num_layers": 1, "sphere_channels": 16, "hidden_channels": 16,
               "edge_channels": 16, "lmax_list": [2], "mmax_list": [2],
               "num_sphere_samples": 16}
SHRUNK_ESEN = {"num_layers": 1, "sphere_channels": 16, "hidden_channels": 16,
               "edge_channels": 16, "lmax": 2, "mmax": 2, "num_distance_basis": 32}


@dataclass(frozen=True)
class Family:
    """A shipped config, the real data it is checked on and how it is shrunk."""

    config: str  # relative to configs/
    data: str  # fixture name
    backbone: dict  # shrunk network
    steps: int  # test-length training ...
    lr: float  # ... at a peak learning rate the shrunk network tolerates


#: family (data directory under configs/ _ model) -> how it is checked. Steps and peak lr were
#: chosen on these structures (measured ratios to the mean predictor in the comments; the energy
#: drops abruptly once learned: mlearn eSCN 0.98 after 120 steps, 0.19 after 200); the
#: shrunk networks learn the structure-dependent energy quickly only well above the configs'
#: own 5e-4 (the OC20 EquiformerV2 config: 0.97x after 150 steps at 2e-3, 0.05x after 200 at
#: 5e-3). MD17 needs the most steps: a conservative model's constant energy offset is trained
#: by the energy term alone (forces do not see it), one Adam step of the output bias at a time.
FAMILIES = {
    "md17_esen": Family("md17/demo/esen_cpu.yml", "md17_frames", SHRUNK_ESEN, 600, 2e-3),  # 0.46
    "mlearn_eqv2": Family("mlearn/eqv2_cpu.yml", "si_cells", SHRUNK_EQV2, 100, 4e-3),  # 0.12
    "mlearn_escn": Family("mlearn/escn_cpu.yml", "si_cells", SHRUNK_ESCN, 200, 5e-3),  # 0.19
    "mlearn_esen": Family("mlearn/esen_cpu.yml", "si_cells", SHRUNK_ESEN, 60, 2e-3),  # 0.24
    "omat24_esen": Family("omat24/mptrj/esen_dens_mptrj.yml", "si_cells", SHRUNK_ESEN, 70,
                          3e-3),  # 0.43
    # OC20's bundled relaxations leave only each relaxation's energy profile after the fitted
    # references (docs/energy.md, *OC20*), so the OC20 recipes are checked on the Si cells
    "oc20_eqv2": Family("oc20/s2ef/demo/eqv2_cpu.yml", "si_cells", SHRUNK_EQV2, 200, 5e-3),  # 0.05
    "oc20_escn": Family("oc20/s2ef/demo/escn_cpu.yml", "si_cells", SHRUNK_ESCN, 200, 5e-3),  # 0.16
}
#: families no test here can train briefly (no data of their kind here), and why
UNCHECKED = {"oc22_eqv2": "no OC22 data here; the OC20 EquiformerV2 recipe it shares is checked"}

STRUCTURES = 8  # trained and scored


def _convert(raw_dir: Path, out: Path, **options) -> Path:
    from fairchem_dens.data import ConversionOptions, convert

    files = sorted(raw_dir.glob("*.extxyz"))
    convert(ConversionOptions(inputs=[str(raw_dir)], out_dir=out, overwrite=True,
                              val_systems=(int(files[-1].stem.split("_")[-1]),), **options))
    return out


@pytest.fixture(scope="module")
def si_cells(tmp_path_factory) -> Path:
    """Every 20th mlearn Si training cell of 63-64 atoms (-5.42 to -4.57 eV/atom)."""
    import ase.io

    from fairchem_dens.data.mlearn import read_mlearn

    src = mlearn_si_training()
    raw = tmp_path_factory.mktemp("si_raw")
    for sid, atoms in enumerate([a for a in read_mlearn(src) if len(a) >= 63][::20][:STRUCTURES + 1]):
        ase.io.write(raw / f"Si_{sid:05d}.extxyz", atoms)
    return _convert(raw, tmp_path_factory.mktemp("si_lmdb"), stress=True)


@pytest.fixture(scope="module")
def md17_frames(tmp_path_factory) -> Path:
    """Every 40th bundled MD17 ethanol frame, each its own file, on the sigma_E scale the
    MD17 configs read (``--forces-normalizer energy_std``)."""
    import ase.io

    from fairchem_dens.data import demo_data_dir

    raw = tmp_path_factory.mktemp("md17_raw")
    with lzma.open(demo_data_dir("md17") / "ethanol_chunk0.extxyz.xz", "rt") as handle:
        frames = ase.io.read(handle, index="::40", format="extxyz")
    for sid, atoms in enumerate(frames[:STRUCTURES + 1]):
        ase.io.write(raw / f"ethanol_{sid:05d}.extxyz", atoms)
    return _convert(raw, tmp_path_factory.mktemp("md17_lmdb"), energy_unit="kcal/mol",
                    forces_normalizer="energy_std")


def family_config(family: Family, lmdb: Path, run_dir: Path) -> dict:
    config = config_on_lmdb(family.config, lmdb, run_dir)
    train = config["dataset"]["train"]
    train["format"] = "lmdb"
    train.pop("a2g_args", None)  # ase_db reading options (eSEN's MPtrj config)
    config["dataset"]["val"] = {"src": train["src"]}  # score the trained structures
    config["model"]["backbone"].update(family.backbone)
    config["optim"].update(batch_size=4, eval_batch_size=STRUCTURES, ema_decay=None,
                           max_epochs=family.steps // (STRUCTURES // 4), eval_every=10**9,
                           lr_initial=family.lr, load_balancing=None)
    config["optim"]["scheduler_params"]["warmup_epochs"] = 1
    return config


def family_name(config: Path) -> str:
    """``<data directory>_<model>`` of a shipped config, e.g. mlearn/escn_dens_cpu.yml ->
    mlearn_escn."""
    rel = config.relative_to(REPO / "configs")
    model = next(m for m in ("esen", "eqv2", "escn") if m in rel.name)
    return f"{rel.parts[0]}_{model}"


def test_every_shipped_config_family_is_checked() -> None:
    shipped = {family_name(p) for p in (REPO / "configs").rglob("*.yml") if p.name != "base.yml"}
    assert shipped == set(FAMILIES) | set(UNCHECKED)
    for name, family in FAMILIES.items():
        assert family_name(REPO / "configs" / family.config) == name


def test_a_config_without_energy_weight_fails_the_check(si_cells, tmp_path) -> None:
    """The check below discriminates: the mlearn EquiformerV2 family with its energy weight set
    to 0 (forces, stress and references unchanged) does not get below LEARNED. (A conservative
    family would not serve as this control: without an energy weight its forces still train
    the energy's shape, and the mlearn eSEN reaches 0.59x the mean predictor in its budget
    against 0.24x with the weight.)"""
    from fairchem_dens.data.baselines import zero_output_errors

    config = family_config(FAMILIES["mlearn_eqv2"], si_cells, tmp_path)
    for term in config["loss_functions"]:
        if "energy" in term:
            term["energy"]["coefficient"] = 0
    trainer = build_trainer(config)
    trainer.train()
    energy = trainer.validate("val", disable_tqdm=True)["energy_mae"]["metric"]
    ratio = energy / zero_output_errors(si_cells, split="train")["energy_mae"]
    print(f"mlearn_eqv2 without energy weight: energy {ratio:.3f} of the mean predictor")
    assert ratio > LEARNED


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_config_family_learns_the_energy_of_real_structures(name: str, request,
                                                            tmp_path) -> None:
    from fairchem_dens.data.baselines import zero_output_errors

    family = FAMILIES[name]
    lmdb = request.getfixturevalue(family.data)
    trainer = build_trainer(family_config(family, lmdb, tmp_path))
    trainer.train()
    metrics = trainer.validate("val", disable_tqdm=True)
    baseline = zero_output_errors(lmdb, split="train")
    energy = metrics["energy_mae"]["metric"] / baseline["energy_mae"]
    forces = metrics["forces_mae"]["metric"] / baseline["forces_mae"]
    print(f"{name}: energy {energy:.3f}, forces {forces:.3f} of the mean/zero predictor")
    assert energy < LEARNED, (name, metrics["energy_mae"], baseline)
    assert forces < 1.0, (name, metrics["forces_mae"], baseline)
