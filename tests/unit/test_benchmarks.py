"""The benchmark scripts stay importable and their bookkeeping is right: paired plain/DeNS runs
differ only in the config (same seed, data, steps, evaluation points), evaluation steps land
on epoch ends, and ratios are paired by seed. (The runs themselves are not executed here.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import accuracy
import datasets
from runner import Result, eval_interval, steps_per_epoch


@pytest.mark.parametrize(("per_epoch", "evals", "expected"),
                         [(204, 2, 102), (125, 1, 125), (125, 2, 25), (7, 2, 1), (3, 5, 1)])
def test_eval_interval_divides_the_epoch(per_epoch, evals, expected) -> None:
    every = eval_interval(per_epoch, evals)
    assert every == expected and per_epoch % every == 0


def test_steps_per_epoch() -> None:
    assert steps_per_epoch(814, 4) == 204 and steps_per_epoch(1000, 8) == 125


def test_paired_runs_differ_only_in_config(demo_lmdb, monkeypatch, tmp_path) -> None:
    fake = datasets.Dataset("oc20", demo_lmdb, "oc20")
    monkeypatch.setitem(datasets.DATASETS, "oc20", lambda: fake)
    suite = accuracy.Suite("t", {"oc20": 2}, (0, 1), {"oc20": (accuracy.PLAIN, accuracy.DENS)},
                           {"oc20": accuracy.OC20_ABLATIONS[:1]})
    runs, _ = accuracy.plan(suite, tmp_path)
    by_name = {r.name: r for r in runs}
    assert sorted(by_name) == ["oc20/dens/seed0", "oc20/dens/seed1", "oc20/no_encoding/seed0",
                               "oc20/plain/seed0", "oc20/plain/seed1"]
    plain, dens = by_name["oc20/plain/seed1"], by_name["oc20/dens/seed1"]
    assert plain.config.name == "eqv2_cpu.yml" and dens.config.name == "eqv2_dens_cpu.yml"
    assert plain.overrides == dens.overrides and plain.seed == dens.seed == 1
    assert plain.eval_every == dens.eval_every
    assert by_name["oc20/no_encoding/seed0"].overrides[-1] == "--optim.dens.encode_forces=False"
    assert "--optim.max_epochs=2" in plain.overrides and f"--dataset.train.src={demo_lmdb}/train" \
        in plain.overrides
    assert plain.key() != dens.key()


def test_finished_runs_are_found_after_their_folder_moves(tmp_path) -> None:
    import dataclasses
    import json
    import shutil

    from runner import Run, load_result

    def run(out, seed=0):
        return Run("md17/plain/seed0", REPO / "benchmarks/configs/md17_eqv2_cpu.yml",
                   tmp_path / out, seed, ["--optim.max_epochs=2"], eval_every=125)

    old = run("old")
    old.out.mkdir()
    stored = Result("md17/plain/seed0", [125], [{"forces_mae": 0.1}], 1.0, old.command())
    (old.out / "result.json").write_text(json.dumps(dataclasses.asdict(stored)))
    assert load_result(old) == stored
    shutil.move(old.out, tmp_path / "archive")
    assert load_result(run("archive")) == stored  # only --run-dir differs: same job
    assert load_result(run("archive", seed=1)) is None  # another job


def test_summary_ratios_are_paired_by_seed() -> None:
    def result(name, forces):
        return Result(name, [10], [{"forces_mae": forces, "energy_mae": 1.0}], 1.0, [])

    suite = accuracy.Suite("t", {"oc20": 1}, (0, 1), {"oc20": (accuracy.PLAIN, accuracy.DENS)})
    results = {"oc20/plain/seed0": result("a", 0.10), "oc20/plain/seed1": result("b", 0.20),
               "oc20/dens/seed0": result("c", 0.09), "oc20/dens/seed1": result("d", 0.22)}
    table, summary = accuracy.summarise(suite, results)
    assert summary["oc20/dens"]["forces_mae_ratio"] == pytest.approx([0.9, 1.1])
    assert "1.000 (0.900, 1.100)" in table


def test_plateau_criterion() -> None:
    flat_end = [1.0, 0.8, 0.7, 0.69, 0.695, 0.693, 0.6905, 0.69]
    ok, gain = accuracy.plateau(flat_end)  # last quarter (2 evals) no better than 0.69
    assert ok and gain == pytest.approx(0.0)
    ok, gain = accuracy.plateau([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    assert not ok and gain == pytest.approx((0.5 - 0.3) / 0.5)
    assert not accuracy.plateau([1.0, 0.5, 0.4])[0]  # too few evaluations to tell


def test_time_to_accuracy_is_the_first_step_at_the_baselines_best() -> None:
    """Plain's best (0.50) first comes at step 40 of 50 (60 minutes in all: 48 min to get
    there); DeNS first gets to <= 0.50 at step 20 of 50 (80 minutes: 32 min): steps 0.5, wall
    time 32 / 48. A run that never gets there says so, with no ratio."""
    def result(forces, minutes):
        return Result("r", [10, 20, 30, 40, 50],
                      [{"forces_mae": f, "energy_mae": 1.0} for f in forces], minutes, [])

    plain = result([0.9, 0.7, 0.6, 0.5, 0.5], 60.0)
    dens = result([0.8, 0.5, 0.45, 0.55, 0.4], 80.0)
    assert accuracy.time_to_accuracy(plain, dens) == pytest.approx(
        {"target": 0.5, "baseline_step": 40, "step": 20, "step_ratio": 0.5,
         "minutes_ratio": 32 / 48})
    never = accuracy.time_to_accuracy(plain, result([0.9, 0.8, 0.7, 0.6, 0.51], 60.0))
    assert never["step"] is None and never["step_ratio"] is None

    suite = accuracy.Suite("t", {"oc20": 1}, (0, 1), {"oc20": (accuracy.PLAIN, accuracy.DENS)})
    results = {"oc20/plain/seed0": plain, "oc20/dens/seed0": dens,
               "oc20/plain/seed1": plain, "oc20/dens/seed1": result([0.9] * 5, 60.0)}
    table, summary = accuracy.summarise(suite, results)
    assert summary["oc20/dens"]["time_to_accuracy"]["0"]["step"] == 20
    assert "oc20/plain" in summary and "time_to_accuracy" not in summary["oc20/plain"]
    assert ("- dens reaches plain's best: seed 0: step 20 vs 40 (steps 0.50, wall time 0.67); "
            "seed 1: never reaches 0.5000 (plain at step 40)") in table


def test_smoke_shrinks_a_suite_to_one_tiny_run_per_variant() -> None:
    tiny = accuracy.smoke(accuracy.SUITES["faithful"])
    assert tiny.name == "faithful_smoke" and tiny.seeds == (0,)
    assert set(tiny.epochs.values()) == {1}
    assert tiny.extra["md17_sigma_e_200"] == ("--dataset.train.first_n=16",
                                              "--dataset.val.first_n=8",
                                              "--optim.scheduler_params.warmup_epochs=1")
    assert tiny.ablations == accuracy.SUITES["faithful"].ablations


def test_faithful_ablations_run_next_to_their_own_baselines(demo_lmdb, monkeypatch,
                                                            tmp_path) -> None:
    for name in ("md17", "md17_sigma_e"):
        fake = datasets.Dataset(name, demo_lmdb, "md17")
        monkeypatch.setitem(datasets.DATASETS, name, lambda fake=fake: fake)
    suite = accuracy.Suite("t", {"md17_sigma_e": 2}, (0,),
                           {"md17_sigma_e": (accuracy.PLAIN, accuracy.DENS)},
                           {"md17_sigma_e": accuracy.FAITHFUL_ABLATIONS})
    runs = {r.name.split("/")[1]: r for r in accuracy.plan(suite, tmp_path)[0]}
    assert runs["plain"].config.name == "md17_eqv2_faithful_cpu.yml"
    assert runs["dens"].config.name == "md17_eqv2_dens_faithful_cpu.yml"
    assert runs["dens_rms"].config == runs["dens"].config  # same recipe, other normaliser data
    assert runs["plain_mae"].config.name == "md17_eqv2_cpu.yml"
    assert runs["dens_constant"].overrides[-1] == "--optim.dens.coefficient_schedule=constant"
    assert runs["esen_dens"].config.name == "md17_esen_dens_faithful_cpu.yml"
    by_variant = {v.name: v for v in accuracy.FAITHFUL_ABLATIONS}
    assert by_variant["dens_rms"].baseline == "plain_rms" and by_variant["dens_rms"].data == "md17"
    assert by_variant["esen_dens"].baseline == "esen_plain"

    def result(forces):
        return Result("r", [10, 20, 30, 40], [{"forces_mae": f, "energy_mae": 1.0}
                                              for f in (0.3, 0.2, 0.2, forces)], 1.0, [])

    results = {"md17_sigma_e/plain/seed0": result(0.10), "md17_sigma_e/dens/seed0": result(0.09),
               "md17_sigma_e/plain_rms/seed0": result(0.20),
               "md17_sigma_e/dens_rms/seed0": result(0.22)}
    table, summary = accuracy.summarise(suite, results, extras={
        "md17_sigma_e/plain/seed0": {"train_forces_mae": 0.05}})
    assert summary["md17_sigma_e/dens"]["forces_mae_ratio"] == pytest.approx([0.9])
    assert summary["md17_sigma_e/dens_rms"]["forces_mae_ratio"] == pytest.approx([1.1])
    assert summary["md17_sigma_e/plain"]["train_forces_mae"] == [0.05]
    assert summary["md17_sigma_e/plain"]["plateau"]["0"][0] is False  # 0.2 -> 0.1 in the tail
    assert "1.100 (1.100) vs plain_rms" in table and "seed 0 NO" in table


@pytest.mark.parametrize("model", ["eqv2", "escn"])
def test_overhead_models_share_weights_and_train_without_corruption(model, oc20_batch) -> None:
    """overhead.py times plain steps of the DeNS models too (as the trainer runs steps without a
    corrupted atom): they must be driven as the trainer drives them, and hold the plain weights."""
    import copy

    import overhead
    import torch

    models, _ = overhead.build_models(model, num_layers=1)
    plain = models["plain"].state_dict()
    for name, m in models.items():
        m.train()
        torch.manual_seed(0)
        out = m(copy.copy(oc20_batch))  # no DeNS fields: a step without corruption
        assert out["forces"].shape == (int(oc20_batch.natoms.sum()), 3), name
        if name != "port":
            state = m.state_dict()
            assert all(torch.equal(state[k], v) for k, v in plain.items()), name


def test_mlearn_stress_suite_pairs_each_family_and_reports_stress_in_gpa(
        demo_lmdb, monkeypatch, tmp_path) -> None:
    for name in ("mlearn_si_stress", "mlearn_mo_stress"):
        fake = datasets.Dataset(name, demo_lmdb, "mlearn")
        monkeypatch.setitem(datasets.DATASETS, name, lambda fake=fake: fake)
    suite = accuracy.SUITES["mlearn_stress"]
    runs = {r.name: r for r in accuracy.plan(suite, tmp_path)[0]}
    assert len(runs) == 2 * 4 * 3  # Si, Mo x (eqv2, eSEN) x (plain, DeNS) x 3 seeds
    si = {v: runs[f"mlearn_si_stress/{v}/seed2"] for v in ("plain", "dens", "esen_plain",
                                                            "esen_dens")}
    assert [si[v].config.relative_to(REPO).as_posix() for v in si] == [
        "configs/mlearn/eqv2_cpu.yml", "configs/mlearn/eqv2_dens_cpu.yml",
        "configs/mlearn/esen_cpu.yml", "configs/mlearn/esen_dens_cpu.yml"]
    assert si["plain"].overrides == si["dens"].overrides
    assert si["esen_plain"].overrides == si["esen_dens"].overrides
    # eSEN keeps its one scale for the energy and its gradients (the force normaliser file)
    shared = f"--dataset.train.transforms.normalizer.stress.file={demo_lmdb}/forces_normalizer.npz"
    assert shared in si["esen_plain"].overrides and shared not in si["plain"].overrides
    assert (f"--dataset.train.transforms.normalizer.energy.file={demo_lmdb}/forces_normalizer.npz"
            in si["esen_plain"].overrides)

    def result(forces, stress):
        return Result("r", [10], [{"forces_mae": forces, "energy_mae": 1.0,
                                   "stress_mae": stress}], 1.0, [])

    one = accuracy.Suite("t", {"mlearn_si_stress": 1}, (0,), suite.variants,
                         suite.ablations, ablation_seeds=(0,))
    results = {"mlearn_si_stress/plain/seed0": result(0.10, 0.01),
               "mlearn_si_stress/dens/seed0": result(0.09, 0.02),
               "mlearn_si_stress/esen_plain/seed0": result(0.20, 0.004),
               "mlearn_si_stress/esen_dens/seed0": result(0.10, 0.003)}
    table, summary = accuracy.summarise(
        one, results, {"mlearn_si_stress": 0.6},
        {"mlearn_si_stress/dens/seed0": {"test_stress_mae": 0.005}},
        {"mlearn_si_stress": 0.003146})
    assert "val stress MAE (GPa) | test stress MAE (GPa)" in table
    assert "zero stress 0.504 GPa" in table
    dens_row = next(line for line in table.splitlines() if line.startswith("| dens:"))
    assert "| 0.0900 | 3.2044 | 0.8011 |" in dens_row  # eV/A^3 x 160.2 = GPa
    assert summary["mlearn_si_stress/dens"]["stress_mae"] == [0.02]  # JSON: eV/A^3
    assert summary["mlearn_si_stress/esen_dens"]["forces_mae_ratio"] == pytest.approx([0.5])
    assert "esen_plain plateau" in table and "plateau" in summary["mlearn_si_stress/esen_plain"]


def test_md17_esen_pair_differs_from_the_eqv2_pair_only_in_the_network() -> None:
    """The gradient-force (eSEN) pair of the faithful suite is a standalone file (an include would
    pass EquiformerV2's backbone keys to eSEN): everything but the model must stay equal to the
    EquiformerV2 recipe, or the two pairs would not be comparable."""
    from fairchem.core.common.utils import load_config

    def pair(family: str) -> list[dict]:  # [plain, DeNS], includes resolved by fairchem
        return [load_config(str(REPO / "benchmarks" / "configs" / f"md17_{family}{kind}"
                                "_faithful_cpu.yml"))[0] for kind in ("", "_dens")]

    eqv2, esen = pair("eqv2"), pair("esen")
    for eqv2_config, esen_config in zip(eqv2, esen):
        for key in ("trainer", "outputs", "loss_functions", "evaluation_metrics", "optim"):
            assert esen_config[key] == eqv2_config[key], key
        # the files themselves are set by the runner (datasets.Dataset.overrides), for both
        assert ({k: sorted(v) for k, v in esen_config["dataset"]["train"]["transforms"].items()}
                == {k: sorted(v) for k, v in eqv2_config["dataset"]["train"]["transforms"].items()})
    assert esen[0]["model"]["backbone"]["model"] == "esen_backbone"
    assert esen[0]["model"]["heads"] == {"efs": {"module": "esen_mlp_efs_head"}}  # -dE/dpos
    assert esen[1]["model"]["backbone"]["model"] == "fairchem_dens.models.esen.DeNSeSENBackbone"


@pytest.fixture(scope="module")
def oc20_frames(tmp_path_factory) -> Path:
    """The frame split of benchmarks/oc20_energy_frames.py, converted (~15 s)."""
    import oc20_energy_frames as frames

    return frames.convert_frames(tmp_path_factory.mktemp("oc20_frames"))


def test_oc20_energy_frames_holds_out_every_fifth_frame_of_training_relaxations(
        oc20_frames) -> None:
    """The within-distribution OC20 energy check: each training relaxation is split into its
    kept frames (same sid, training) and every 5th frame (sid + offset, validation); the demo's
    own validation systems are left out; nothing is lost or duplicated."""
    import json
    import lzma

    import ase.io
    import oc20_energy_frames as frames

    from fairchem_dens.data import demo_data_dir
    from fairchem_dens.demo import DATA

    raw = oc20_frames.parent / "extxyz"
    sources = [p for p in sorted(demo_data_dir("oc20").glob("random*.extxyz.xz"))
               if frames.sid_of(p) not in DATA["oc20"].val_systems]
    assert len(sources) == 12
    n_kept = n_held = 0
    for path in sources:
        sid = frames.sid_of(path)
        with lzma.open(path, "rt") as handle:
            energies = [a.get_potential_energy()
                        for a in ase.io.read(handle, index=":", format="extxyz")]
        kept = [a.get_potential_energy() for a in ase.io.read(raw / f"random{sid}.extxyz", ":")]
        held = [a.get_potential_energy() for a in ase.io.read(
            raw / f"random{sid + frames.VAL_SID_OFFSET}.extxyz", ":")]
        assert held == energies[4::5]
        assert kept == [e for i, e in enumerate(energies) if i % 5 != 4]
        n_kept, n_held = n_kept + len(kept), n_held + len(held)
    assert not any((raw / f"random{s}.extxyz").exists() for s in DATA["oc20"].val_systems)
    splits = json.loads((oc20_frames / "conversion.json").read_text())["splits"]
    assert (splits["train"]["num_frames"], splits["val"]["num_frames"]) == (n_kept, n_held)
    assert (n_kept, n_held) == (712, 175)


def test_oc20_energy_frames_esen_arm_carries_the_oc20_weights_to_the_common_scale(
        oc20_frames) -> None:
    """lambda_E of the conservative arm is the paper's 2 on E / sigma_E moved to eSEN's common
    F_rms scale, 2 F_rms / sigma_E with the frame split's own fitted normalisers; energy and
    forces share the forces normaliser (gradients of one energy); the demo's length and batch."""
    import numpy as np
    import oc20_energy_frames as frames
    from fairchem.core.common.utils import load_config

    config = load_config(str(frames.BENCH_CONFIGS["esen"]))[0]
    weights = {next(iter(t)): next(iter(t.values())) for t in config["loss_functions"]}
    assert weights["forces"] == {"fn": "l2mae", "coefficient": 100}
    f_rms = float(np.load(oc20_frames / "forces_normalizer.npz")["rmsd"])
    sigma_e = float(np.load(oc20_frames / "energy_normalizer.npz")["rmsd"])
    assert weights["energy"]["coefficient"] == pytest.approx(2 * f_rms / sigma_e, abs=0.005)
    normalizer = config["dataset"]["train"]["transforms"]["normalizer"]
    assert normalizer["energy"]["file"].endswith("forces_normalizer.npz")
    assert config["model"]["backbone"]["direct_forces"] is False
    assert config["optim"]["max_epochs"] == 2 and config["optim"]["batch_size"] == 4
