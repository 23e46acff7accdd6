"""Does DeNS lower the validation error? Plain vs DeNS EquiformerV2 on real data, side by side.

Every pair of runs trains the same CPU-sized EquiformerV2 (2 blocks, lmax 3; 0.47M parameters, DeNS adds
0.13M for the force encoding and noise head)
with the same seed, hence the same initial weights (the DeNS-only modules are initialised
under a forked RNG) and the same data order, for the same number of steps, through the stock
``fairchem --mode train``. The plain run is fairchem's own model and trainer
(``equiformerv2_forces``); the DeNS run is ours. Validation (EMA weights, fairchem's evaluator)
runs several times per epoch, giving learning curves.

Suites::

    python benchmarks/accuracy.py --quick      # smoke check, < 5 min: OC20, 1 seed, 40 steps
    python benchmarks/accuracy.py              # the full suite (BENCHMARKS.md), ~60 min on 2 cores
    python benchmarks/accuracy.py --suite regime  # MD17, 200 training frames, 40 epochs
    python benchmarks/accuracy.py --suite faithful  # the authors' MD17 recipe, to the plateau
    python benchmarks/accuracy.py --suite mlearn    # mlearn Si and Mo (bulk), to the plateau
    python benchmarks/accuracy.py --suite mlearn_stress  # + stress: EquiformerV2 and eSEN
    python benchmarks/accuracy.py --suite mlearn --smoke  # any suite shrunk to one tiny run each

Full suite: OC20 trajectories split by system (benchmarks/datasets.py), plain vs DeNS with 3
seeds, plus one-seed ablations (no force encoding; multi-scale sigma normalised by sigma and by
sigma_high; one DeNS coin per batch instead of per structure); MD17 ethanol,
plain vs DeNS with 3 seeds. Results (JSON, a Markdown table and learning-curve PNGs) go to
``--results`` (default ``benchmarks/results``); runs (logs, checkpoints) to
``runs/benchmarks/accuracy``. Finished runs are reused (see ``runner.py``).

``faithful`` (issue 14): MD17 ethanol with the authors' MD17 recipe (forces / sigma_E, L2MAE,
lambda_DeNS decayed linearly to 0), 1000 and 200 training frames, 3 seeds, plus one ablation per
fixed item (force RMS normaliser, constant lambda, MAE loss, the OC shared denominator), each
with the plain run it is compared with. ``mlearn``: Si and Mo (periodic bulk; test split
evaluated after training), 3 seeds. Both report whether the plain model's validation force MAE
has plateaued (:func:`plateau`), the plain model's training force MAE and the zero-force floor.
Every report also gives the time to accuracy (:func:`time_to_accuracy`): the step and wall time
at which each DeNS run first reaches its plain run's best validation force MAE, as ratios.

``mlearn_stress`` (issue 17): mlearn Si and Mo converted with stress, trained on energy, forces
and stress with the configs of ``configs/mlearn``: EquiformerV2 (stress from fairchem's
decomposed rank-2 head) and the conservative eSEN (forces and stress as gradients), each plain
vs DeNS (the MD17 recipe; a corrupted structure trains no stress), 3 seeds, to the plateau of
each plain model; the stress MAE (validation and the mlearn test split, GPa) stands next to the
force MAE, with the zero-stress floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets
from runner import (
    REPO,
    Result,
    Run,
    checkpoint_interval,
    eval_interval,
    execute_all,
    load_result,
    steps_per_epoch,
)

DEMO_CONFIGS = REPO / "configs" / "oc20" / "s2ef" / "demo"
BENCH_CONFIGS = REPO / "benchmarks" / "configs"
MLEARN_CONFIGS = REPO / "configs" / "mlearn"
CONFIGS = {  # (dataset, plain|dens) -> config
    ("oc20", "plain"): DEMO_CONFIGS / "eqv2_cpu.yml",
    ("oc20", "dens"): DEMO_CONFIGS / "eqv2_dens_cpu.yml",
    ("md17", "plain"): BENCH_CONFIGS / "md17_eqv2_cpu.yml",
    ("md17", "dens"): BENCH_CONFIGS / "md17_eqv2_dens_cpu.yml",
    **{(name, kind): BENCH_CONFIGS / f"md17_eqv2{'_dens' if kind == 'dens' else ''}_faithful_cpu.yml"
       for name in ("md17_sigma_e", "md17_sigma_e_200") for kind in ("plain", "dens")},
    **{(name, kind): BENCH_CONFIGS / f"mlearn_eqv2{'_dens' if kind == 'dens' else ''}_cpu.yml"
       for name in ("mlearn_si", "mlearn_mo") for kind in ("plain", "dens")},
    **{(name, kind): MLEARN_CONFIGS / f"eqv2{'_dens' if kind == 'dens' else ''}_cpu.yml"
       for name in ("mlearn_si_stress", "mlearn_mo_stress") for kind in ("plain", "dens")},
}
BATCH_SIZE = {"oc20": 4, "md17": 8, "md17_sigma_e": 8, "md17_sigma_e_200": 8, "mlearn_si": 4,
              "mlearn_mo": 4, "mlearn_si_stress": 4, "mlearn_mo_stress": 4,
              **{f"md17_scaling_{n}": 8 for n in datasets.MD17_SCALING_SIZES}}
#: 1 eV/A^3 in GPa: stress MAEs are reported in GPa (fairchem logs eV/A^3)
EV_PER_A3_IN_GPA = 160.21766208
#: Published mlearn test force MAEs (eV/A) of Zuo et al., J. Phys. Chem. A 124, 731 (2020), for
#: context, printed next to our results when known. Empty: the paper's table was not available to
#: check here, and numbers from memory are not evidence. Add them as {"GAP": 0.xx, ...}.
MLEARN_PUBLISHED_FORCE_MAE: dict[str, dict[str, float]] = {"mlearn_si": {}, "mlearn_mo": {}}
#: Wall seconds per training step of one 1-thread run on the 2-core machine (minutes/run of the
#: result tables over their steps, rounded up); sets the steps between checkpoints
#: (CHECKPOINT_MINUTES apart). Only the checkpoint spacing depends on it, never the training.
STEP_SECONDS = {"oc20": 3.0, "md17": 0.5, "md17_sigma_e": 0.5, "md17_sigma_e_200": 0.5,
                "mlearn_si": 3.0, "mlearn_mo": 3.0, "mlearn_si_stress": 3.0,
                "mlearn_mo_stress": 3.0, **{f"md17_scaling_{n}": 0.3 for n in datasets.MD17_SCALING_SIZES}}
CHECKPOINT_MINUTES = 5.0
MLEARN_PUBLISHED_FORCE_MAE["mlearn_si_stress"] = MLEARN_PUBLISHED_FORCE_MAE["mlearn_si"]
MLEARN_PUBLISHED_FORCE_MAE["mlearn_mo_stress"] = MLEARN_PUBLISHED_FORCE_MAE["mlearn_mo"]


@dataclass(frozen=True)
class Variant:
    """A training recipe: ``dens`` overrides on top of the DeNS config (``None``: plain run)."""

    name: str
    dens: dict | None = None
    description: str = ""
    config: Path | None = None  # instead of CONFIGS[dataset, kind]
    data: str | None = None  # another dataset than the suite's (e.g. another normaliser)
    baseline: str = "plain"  # the variant its force MAE ratio is taken against

    @property
    def kind(self) -> str:
        return "plain" if self.dens is None else "dens"

    def overrides(self) -> list[str]:
        return [f"--optim.dens.{k}={v}" for k, v in (self.dens or {}).items()]


PLAIN = Variant("plain", None, "fairchem's EquiformerV2 and trainer")
DENS = Variant("dens", {}, "config defaults")
# Ablations change one thing of the OC20 DeNS config (p 0.5, r 0.5, fixed sigma 0.05 A,
# normalised by sigma, one coin per structure, lambda 10, force encoding on).
OC20_ABLATIONS = (
    Variant("no_encoding", {"encode_forces": False}, "no force encoding"),
    Variant("multiscale", {"std": "None", "std_low": 0.01, "std_high": 0.1},
            "multi-scale sigma 0.01-0.1 A (50 steps), target eps/sigma"),
    Variant("multiscale_std_high", {"std": "None", "std_low": 0.01, "std_high": 0.1,
                                    "normalize_by": "std_high"},
            "multi-scale sigma 0.01-0.1 A, target eps/sigma_high (official code)"),
    Variant("per_batch", {"selection": "batch"}, "one DeNS coin per batch (official code)"),
)
# mlearn_stress: the conservative eSEN pair next to the EquiformerV2 pair (PLAIN, DENS), run
# with every seed (Suite.ablation_seeds).
ESEN_STRESS = (
    Variant("esen_plain", None, "fairchem's conservative eSEN (gradient forces and stress)",
            config=MLEARN_CONFIGS / "esen_cpu.yml"),
    Variant("esen_dens", {}, "conservative eSEN + DeNS", config=MLEARN_CONFIGS / "esen_dens_cpu.yml",
            baseline="esen_plain"),
)
# The authors' MD17 recipe with one of issue 14's fixes undone (each next to its own baseline).
FAITHFUL_ABLATIONS = (
    Variant("plain_rms", None, "plain, forces / their RMS (old scale)", data="md17",
            config=BENCH_CONFIGS / "md17_eqv2_faithful_cpu.yml"),
    Variant("dens_rms", {}, "forces / their RMS instead of sigma_E (item 1)", data="md17",
            config=BENCH_CONFIGS / "md17_eqv2_dens_faithful_cpu.yml", baseline="plain_rms"),
    Variant("dens_constant", {"coefficient_schedule": "constant"},
            "lambda_DeNS constant instead of decayed (item 2)"),
    Variant("dens_shared", {"reduction": "shared_free_atoms"},
            "OC shared denominator instead of per-term means (item 3)"),
    Variant("plain_mae", None, "plain, MAE forces loss (old loss)",
            config=BENCH_CONFIGS / "md17_eqv2_cpu.yml"),
    Variant("dens_mae", {"coefficient_schedule": "linear"}, "MAE instead of L2MAE (item 4)",
            config=BENCH_CONFIGS / "md17_eqv2_dens_cpu.yml", baseline="plain_mae"),
    # Not a fix undone but the model class: the authors' MD17 model takes forces as -dE/dpos.
    Variant("esen_plain", None, "plain conservative eSEN (forces = -dE/dpos)",
            config=BENCH_CONFIGS / "md17_esen_faithful_cpu.yml"),
    Variant("esen_dens", {}, "conservative eSEN + DeNS (gradient forces, as the authors' MD17 "
            "model)", config=BENCH_CONFIGS / "md17_esen_dens_faithful_cpu.yml",
            baseline="esen_plain"),
)
# issue 22, data scaling: the conservative eSEN pair of the authors' MD17 recipe (forces =
# -dE/dpos as their MD17 model; it learns the energy, the direct-force EquiformerV2 does not).
ESEN_MD17 = (
    Variant("plain", None, "conservative eSEN (forces = -dE/dpos), authors' MD17 recipe",
            config=BENCH_CONFIGS / "md17_esen_faithful_cpu.yml"),
    Variant("dens", {}, "the same + DeNS (Table 9 ethanol: sigma 0.05 A, p 0.25, r 0.25, "
            "lambda 5 decayed)", config=BENCH_CONFIGS / "md17_esen_dens_faithful_cpu.yml"),
)


@dataclass
class Suite:
    name: str
    epochs: dict[str, int]
    seeds: tuple[int, ...]
    variants: dict[str, tuple[Variant, ...]]  # dataset -> variants run with all seeds
    ablations: dict[str, tuple[Variant, ...]] = field(default_factory=dict)  # seed 0 only
    evals_per_epoch: dict[str, int] = field(default_factory=lambda: {"oc20": 2, "md17": 1})
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)  # dataset -> overrides
    ablation_seeds: tuple[int, ...] | None = None  # default: the first seed
    plateau_tail: float = 0.25  # fraction of the last evaluations the plateau criterion reads


SUITES = {
    # 160 training frames, 1 epoch = 40 steps; 48 validation frames
    "quick": Suite("quick", {"oc20": 1}, (0,), {"oc20": (PLAIN, DENS)},
                   evals_per_epoch={"oc20": 2},
                   extra={"oc20": ("--dataset.train.first_n=160", "--dataset.val.first_n=48")}),
    "full": Suite("full", {"md17": 8, "oc20": 2}, (0, 1, 2),
                  {"md17": (PLAIN, DENS), "oc20": (PLAIN, DENS)},
                  {"oc20": OC20_ABLATIONS}),
    # data-limited regime: 200 MD17 training frames (2 chunks), 40 epochs = 1000 steps
    "regime": Suite("regime", {"md17": 40}, (0, 1), {"md17": (PLAIN, DENS)},
                    evals_per_epoch={"md17": 1},
                    extra={"md17": ("--dataset.train.first_n=200",)}),
    # issue 14. Lengths are first guesses (the paper's MD17 runs: 1500 epochs); the summary
    # says whether the plain model plateaued, else rerun with more epochs (--epochs NAME=N).
    "faithful": Suite("faithful", {"md17_sigma_e": 60, "md17_sigma_e_200": 300}, (0, 1, 2),
                      {"md17_sigma_e": (PLAIN, DENS), "md17_sigma_e_200": (PLAIN, DENS)},
                      {"md17_sigma_e": FAITHFUL_ABLATIONS},
                      evals_per_epoch={"md17_sigma_e": 1, "md17_sigma_e_200": 0.2},
                      extra={"md17_sigma_e_200": ("--dataset.train.first_n=200",)}),
    # issue 22: 40 epochs (1960 steps of 4 cells on Si), fixed before any run: 100 epochs were
    # ~4 h per run on one shared core (3 s per step), 60+ CPU-hours for the suite. The cosine
    # schedule reaches its floor at the last epoch; the summary says whether plain plateaued.
    "mlearn": Suite("mlearn", {"mlearn_si": 40, "mlearn_mo": 40}, (0, 1, 2),
                    {"mlearn_si": (PLAIN, DENS), "mlearn_mo": (PLAIN, DENS)},
                    evals_per_epoch={"mlearn_si": 0.5, "mlearn_mo": 0.5}),
    # issue 17: energy + forces + stress (configs/mlearn, the shipped recipe); the eSEN pair as
    # seeded "ablations" (every seed). 40 epochs as the mlearn suite (issue 22, fixed before
    # any run): the summary says whether each plain model plateaued.
    "mlearn_stress": Suite("mlearn_stress", {"mlearn_si_stress": 40, "mlearn_mo_stress": 40},
                           (0, 1, 2),
                           {"mlearn_si_stress": (PLAIN, DENS), "mlearn_mo_stress": (PLAIN, DENS)},
                           {"mlearn_si_stress": ESEN_STRESS, "mlearn_mo_stress": ESEN_STRESS},
                           evals_per_epoch={"mlearn_si_stress": 0.5, "mlearn_mo_stress": 0.5},
                           ablation_seeds=(0, 1, 2)),
    # issue 22: MD17 ethanol with 100, 200 and 1000 training frames, the same 500 validation
    # frames, a test part of 500 frames no other suite used (benchmarks/datasets.md17_scaling).
    # Lengths (6500, 7500, 18750 steps of 8 frames) chosen for a plateau: the cosine schedule
    # ends at its floor (lr_min_factor 0.02), and the plateau criterion asks < 1 % gain of the
    # best val force MAE over the last 10 % of 50 evaluations. Warm-up ~6 steps at every size
    # (fairchem's warm-up steps are int(warmup_epochs x steps per epoch); 0 divides by zero).
    "scaling": Suite("scaling", {"md17_scaling_100": 500, "md17_scaling_200": 300,
                                 "md17_scaling_1000": 150}, (0, 1, 2),
                     {f"md17_scaling_{n}": ESEN_MD17 for n in datasets.MD17_SCALING_SIZES},
                     evals_per_epoch={"md17_scaling_100": 0.1, "md17_scaling_200": 1 / 6,
                                      "md17_scaling_1000": 1 / 3},
                     extra={"md17_scaling_100": ("--optim.scheduler_params.warmup_epochs=0.5",),
                            "md17_scaling_200": ("--optim.scheduler_params.warmup_epochs=0.25",)},
                     plateau_tail=0.1),
}


def smoke(suite: Suite) -> Suite:
    """``suite`` shrunk to a check that every run starts, trains and evaluates: one seed, one
    epoch of 16 training frames, 8 validation frames, ablations kept (each one tiny run). The
    warm-up lasts the one epoch (fairchem's cosine schedule divides by int(warmup_epochs x steps
    per epoch), 0 for the configs' fractional warm-ups over so few steps)."""
    tiny = ("--dataset.train.first_n=16", "--dataset.val.first_n=8",
            "--optim.scheduler_params.warmup_epochs=1")
    return Suite(f"{suite.name}_smoke", {name: 1 for name in suite.epochs}, suite.seeds[:1],
                 suite.variants, suite.ablations, {name: 1 for name in suite.epochs},
                 {name: (*[o for o in suite.extra.get(name, ())
                           if not o.startswith("--dataset.train.first_n=")], *tiny)
                  for name in suite.epochs})


def plateau(values: list[float], tail: float = 0.25, tol: float = 0.01) -> tuple[bool, float]:
    """Plateau criterion of a validation curve: the best value of its last ``tail`` fraction of
    evaluations improves on the best before it by less than ``tol`` (relative). Returns
    (plateaued, relative improvement). Fewer than 4 evaluations: not plateaued."""
    k = max(1, round(len(values) * tail))
    if len(values) < 4:
        return False, float("nan")
    before, last = min(values[:-k]), min(values[-k:])
    gain = (before - last) / before
    return gain < tol, gain


def time_to_accuracy(baseline: Result, other: Result) -> dict[str, float | int | None]:
    """How soon ``other`` first reaches ``baseline``'s best validation force MAE (eV/A), next to
    the step at which ``baseline`` first reached it: ``step_ratio`` = other's step / baseline's
    step, ``minutes_ratio`` the same in wall time, each run's minutes spread evenly over its
    steps. ``step`` and both ratios are None when ``other`` never gets there."""
    forces = [m["forces_mae"] for m in baseline.curve]
    target = min(forces)
    baseline_step = baseline.steps[forces.index(target)]
    step = next((s for s, m in zip(other.steps, other.curve) if m["forces_mae"] <= target), None)
    if step is None:
        return {"target": target, "baseline_step": baseline_step, "step": None,
                "step_ratio": None, "minutes_ratio": None}
    minutes = other.minutes * step / other.steps[-1]
    baseline_minutes = baseline.minutes * baseline_step / baseline.steps[-1]
    return {"target": target, "baseline_step": baseline_step, "step": step,
            "step_ratio": step / baseline_step, "minutes_ratio": minutes / baseline_minutes}


def plan(suite: Suite, out: Path) -> tuple[list[Run], dict[str, datasets.Dataset]]:
    data = {name: datasets.DATASETS[name]() for name in suite.epochs}
    extra_data = {v.data for vs in (*suite.variants.values(), *suite.ablations.values())
                  for v in vs if v.data and v.data not in data}
    other = {name: datasets.DATASETS[name]() for name in extra_data}
    runs = []
    for name, ds in data.items():
        summary = json.loads((ds.lmdb_dir / "conversion.json").read_text())
        n_train = summary["splits"]["train"]["num_frames"]
        extra = suite.extra.get(name, ())
        for override in extra:  # a smaller training set
            if override.startswith("--dataset.train.first_n="):
                n_train = min(n_train, int(override.split("=")[1]))
        per_epoch = steps_per_epoch(n_train, BATCH_SIZE[name])
        evals = suite.evals_per_epoch.get(name, 1)
        every = (eval_interval(per_epoch, evals) if evals >= 1 else
                 per_epoch * round(1 / evals))  # < 1: every 1/evals epochs
        # seed-major: with --jobs 2 both arms of a seed run side by side and finish together
        jobs = [(v, s) for s in suite.seeds for v in suite.variants[name]]
        jobs += [(v, s) for v in suite.ablations.get(name, ())
                 for s in (suite.ablation_seeds or suite.seeds[:1])]
        for variant, seed in jobs:
            variant_ds = other[variant.data] if variant.data else ds
            config = variant.config or CONFIGS[name, variant.kind]
            runs.append(Run(
                name=f"{name}/{variant.name}/seed{seed}",
                config=config,
                out=out / name / variant.name / f"seed{seed}",
                seed=seed,
                overrides=[*variant_ds.overrides(config), f"--optim.max_epochs={suite.epochs[name]}",
                           f"--optim.batch_size={BATCH_SIZE[name]}", "--optim.ema_decay=0.99",
                           *extra,
                           *variant.overrides()],
                eval_every=every,
                checkpoint_every=checkpoint_interval(every, STEP_SECONDS.get(name, 1.0),
                                                     CHECKPOINT_MINUTES),
            ))
    return runs, data


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _gpa(values: list[float]) -> list[float]:
    return [v * EV_PER_A3_IN_GPA for v in values]


def summarise(suite: Suite, results: dict[str, Result],
              floors: dict[str, float] | None = None,
              extras: dict[str, dict[str, float]] | None = None,
              stress_floors: dict[str, float | None] | None = None) -> tuple[str, dict]:
    """Markdown table and a JSON-able summary: final validation metrics per variant, the force
    MAE ratio to the variant's baseline (plain) paired by seed (same initial weights and data
    order), whether each plain run plateaued (:func:`plateau`; every plain variant of the
    dataset), and per run ``extras`` (``train_forces_mae`` from the log, ``test_forces_mae`` and
    ``test_stress_mae`` for datasets with a test split). Datasets whose runs log ``stress_mae``
    (eV/A^3) get validation and test stress MAE columns in GPa next to the force MAE, the
    zero-stress floor (``stress_floors``, eV/A^3) and ``stress_mae`` (eV/A^3) in the JSON."""
    lines, summary, extras = [], {}, extras or {}
    for dataset in suite.epochs:
        variants = [*suite.variants[dataset], *suite.ablations.get(dataset, ())]
        finals = {(v.name, s): results[f"{dataset}/{v.name}/seed{s}"].final
                  for v in variants for s in suite.seeds if f"{dataset}/{v.name}/seed{s}" in results}
        if not any(name == "plain" for name, _ in finals):
            continue
        stress = any("stress_mae" in final for final in finals.values())
        steps = next(r for n, r in results.items() if n.startswith(f"{dataset}/")).steps[-1]
        floor = (floors or {}).get(dataset)
        floor_text = f"; predicting zero forces gives {floor:.4f} eV/Å" if floor else ""
        stress_floor = (stress_floors or {}).get(dataset)
        if stress and stress_floor:
            floor_text += f", zero stress {stress_floor * EV_PER_A3_IN_GPA:.3f} GPa"
        lines += [f"\n**{dataset}** ({suite.epochs[dataset]} epochs, {steps} steps"
                  f"{floor_text})\n"]
        flags_of = {}
        for v in (v for v in variants if v.kind == "plain"):
            flags = {}
            for s in suite.seeds:
                run = results.get(f"{dataset}/{v.name}/seed{s}")
                if run is not None:
                    flags[s] = plateau([m["forces_mae"] for m in run.curve],
                                       tail=suite.plateau_tail)
            if flags:
                flags_of[v.name] = flags
                label = "Plain" if v.name == "plain" else v.name
                lines.append(f"{label} plateau (best val force MAE of the last "
                             f"{suite.plateau_tail:.0%} of evaluations improves < 1 % on the "
                             "best before): " + ", ".join(
                                 f"seed {s} {'yes' if ok else 'NO'} ({gain:+.1%})"
                                 for s, (ok, gain) in flags.items()) + "\n")
        published = MLEARN_PUBLISHED_FORCE_MAE.get(dataset)
        if published:
            lines.append("Published test force MAE (Zuo et al. 2020, eV/Å): " + ", ".join(
                f"{k} {v:.3f}" for k, v in published.items()) + "\n")
        stress_head = " val stress MAE (GPa) | test stress MAE (GPa) |" if stress else ""
        lines += ["| variant | seeds | val force MAE (eV/Å) |" + stress_head + " val energy MAE "
                  "(eV) | force MAE ratio to baseline (per seed) | force cos | train force MAE | "
                  "test force MAE | test energy MAE | minutes/run |",
                  "|---|---|---|" + ("---|---|" if stress else "") + "---|---|---|---|---|---|---|"]
        reach_lines = []
        for v in variants:
            runs = {s: results[f"{dataset}/{v.name}/seed{s}"] for s in suite.seeds
                    if f"{dataset}/{v.name}/seed{s}" in results}
            if not runs:
                continue
            forces = [r.final["forces_mae"] for r in runs.values()]
            energy = [r.final["energy_mae"] for r in runs.values()]
            ratios = [r.final["forces_mae"] / finals[v.baseline, s]["forces_mae"]
                      for s, r in runs.items() if (v.baseline, s) in finals]
            cos = [r.final.get("forces_cosine_similarity", float("nan")) for r in runs.values()]
            minutes = statistics.mean(r.minutes for r in runs.values())
            ratio_text = ("—" if v.kind == "plain" or not ratios else
                          f"{statistics.mean(ratios):.3f} ({', '.join(f'{x:.3f}' for x in ratios)})")
            if v.kind != "plain" and v.baseline != "plain" and ratios:
                ratio_text += f" vs {v.baseline}"
            more = {key: [extras[f"{dataset}/{v.name}/seed{s}"][key] for s in runs
                          if key in extras.get(f"{dataset}/{v.name}/seed{s}", {})]
                    for key in ("train_forces_mae", "test_forces_mae", "test_energy_mae",
                                "test_stress_mae")}
            if not more["test_stress_mae"]:
                del more["test_stress_mae"]
            stress_mae = [r.final["stress_mae"] for r in runs.values() if "stress_mae" in r.final]
            stress_cells = ""
            if stress:
                stress_cells = (f" {_spread(_gpa(stress_mae)) if stress_mae else '—'} | "
                                f"{_spread(_gpa(more['test_stress_mae'])) if more.get('test_stress_mae') else '—'} |")
            lines.append(f"| {v.name}: {v.description} | {len(runs)} | {_spread(forces)} |"
                         f"{stress_cells} "
                         f"{_spread(energy)} | {ratio_text} | {statistics.mean(cos):.3f} | "
                         f"{_spread(more['train_forces_mae']) if more['train_forces_mae'] else '—'} | "
                         f"{_spread(more['test_forces_mae']) if more['test_forces_mae'] else '—'} | "
                         f"{_spread(more['test_energy_mae']) if more['test_energy_mae'] else '—'} | "
                         f"{minutes:.1f} |")
            reach = {s: time_to_accuracy(results[f"{dataset}/{v.baseline}/seed{s}"], r)
                     for s, r in runs.items()
                     if v.kind != "plain" and f"{dataset}/{v.baseline}/seed{s}" in results}
            if reach:
                reach_lines.append(_reach_line(v, reach))
            summary[f"{dataset}/{v.name}"] = {
                **({"time_to_accuracy": {str(s): t for s, t in reach.items()}} if reach else {}),
                "seeds": list(runs), "forces_mae": forces, "energy_mae": energy,
                "forces_mae_ratio": ratios, "baseline": v.baseline,
                "forces_cosine_similarity": cos, "minutes": minutes, "overrides": v.dens,
                **({"stress_mae": stress_mae} if stress_mae else {}),
                **more, **({"plateau": {str(s): list(f) for s, f in flags_of[v.name].items()}}
                           if v.name in flags_of else {})}
        if reach_lines:
            lines += ["", "Time to accuracy (validation force MAE, EMA weights; wall time "
                      "assumes each run's minutes spread evenly over its steps):", *reach_lines]
    return "\n".join(lines), summary


def _reach_line(variant: Variant, reach: dict[int, dict]) -> str:
    """One markdown bullet: per seed, the step at which ``variant`` first reaches its
    baseline's best validation force MAE, the baseline's step, and their ratios."""
    def one(seed: int, t: dict) -> str:
        if t["step"] is None:
            return (f"seed {seed}: never reaches {t['target']:.4f} "
                    f"({variant.baseline} at step {t['baseline_step']})")
        return (f"seed {seed}: step {t['step']} vs {t['baseline_step']} "
                f"(steps {t['step_ratio']:.2f}, wall time {t['minutes_ratio']:.2f})")
    return (f"- {variant.name} reaches {variant.baseline}'s best: "
            + "; ".join(one(s, t) for s, t in reach.items()))


def last_train_forces_mae(run: Run) -> float | None:
    """The last training ``forces_mae`` fairchem logged (mean over its ``print_every`` window;
    on DeNS runs over uncorrupted atoms), eV/Å, from the last log segment that has one."""
    import re

    for _, log in reversed(run.logs()):
        values = [float(m.group(1)) for line in log.read_text().splitlines() if "step:" in line
                  for m in [re.search(r"forces_mae: ([0-9.eE+-]+)", line)] if m]
        if values:
            return values[-1]
    return None


def evaluate_test(run: Run, test_src: Path, threads: int = 1) -> dict[str, float] | None:
    """Validation metrics of ``run``'s final checkpoint (EMA weights) on ``test_src``, through
    ``fairchem --mode validate``; cached in ``test_metrics.json`` next to the run."""
    import os
    import subprocess

    from fairchem_dens.runs import parse_val_metrics

    cache = run.out / "test_metrics.json"
    if cache.exists() and json.loads(cache.read_text()).get("key") == run.key():
        return json.loads(cache.read_text())["metrics"]
    if not run.checkpoint.exists():  # the runner's fixed folder: the final training state
        return None
    cmd = [*run.command(), "--checkpoint", str(run.checkpoint), f"--dataset.val.src={test_src}"]
    cmd[cmd.index("--mode") + 1] = "validate"
    # fairchem's validate mode logs under its own id, not into the training run's folders
    cmd[cmd.index("--timestamp-id") + 1] = f"{run.identifier}_test"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=run.out, check=False)
    metrics = parse_val_metrics(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not metrics:
        raise SystemExit(f"test evaluation of {run.name} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    cache.write_text(json.dumps({"key": run.key(), "metrics": metrics[-1]}, indent=1))
    return metrics[-1]


def plot_band(ax, steps: list[int], per_seed: list[list[float]], color: str, label: str) -> None:
    """Mean over seeds as a line, min-max over seeds as a shaded band."""
    ax.plot(steps, [statistics.mean(x) for x in zip(*per_seed)], color=color, label=label)
    ax.fill_between(steps, [min(x) for x in zip(*per_seed)], [max(x) for x in zip(*per_seed)],
                    color=color, alpha=0.2)


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot(suite: Suite, results: dict[str, Result], path: Path,
         floors: dict[str, float] | None = None) -> None:
    """Validation force MAE vs step (mean over seeds, min-max band) for plain and DeNS, and
    their ratio, one column per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in suite.epochs if any(k.startswith(f"{n}/") for k in results)]
    if not names:
        return
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 7), squeeze=False,
                             sharex="col", gridspec_kw={"height_ratios": [2, 1]})
    for col, dataset in enumerate(names):
        top, bottom = axes[0][col], axes[1][col]
        curves = {}
        seeds = [s for s in suite.seeds
                 if all(f"{dataset}/{v.name}/seed{s}" in results for v in suite.variants[dataset])]
        if not seeds:
            continue
        for v, color in zip(suite.variants[dataset], ("tab:gray", "tab:blue")):
            runs = [results[f"{dataset}/{v.name}/seed{s}"] for s in seeds]
            steps = runs[0].steps
            per_seed = [[m["forces_mae"] for m in r.curve] for r in runs]
            plot_band(top, steps, per_seed, color, f"{v.name} ({len(runs)} seeds)")
            curves[v.kind] = (steps, per_seed)
        steps, dens = curves["dens"]
        _, plain = curves["plain"]
        ratios = [[d / p for d, p in zip(ds, ps)] for ds, ps in zip(dens, plain)]
        plot_band(bottom, steps, ratios, "tab:blue", "DeNS / plain")
        bottom.axhline(1.0, color="k", lw=0.8, ls="--")
        if (floors or {}).get(dataset):
            top.axhline(floors[dataset], color="k", lw=0.8, ls=":", label="zero forces")
        top.set_yscale("log")
        top.set_title(f"{dataset}: validation force MAE")
        top.set_ylabel("force MAE (eV/Å)")
        top.legend()
        bottom.set_ylabel("DeNS / plain")
        bottom.set_xlabel("training step")
    save_figure(fig, path)


def plot_scaling(summary: dict, path: Path) -> Path | None:
    """DeNS/plain force MAE ratio (validation, and test where measured) against the number of
    training frames, one marker per seed and the mean, from the ``scaling`` suite's summary
    (``md17_scaling_<frames>/dens`` entries); ``None`` when none has finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(k.split("/")[0].rsplit("_", 1)[1]) for k in summary
                   if k.startswith("md17_scaling_") and k.endswith("/dens"))
    if not sizes:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label, marker in (("forces_mae", "validation", "o"), ("test_forces_mae", "test", "s")):
        for n in sizes:
            dens, plain = summary[f"md17_scaling_{n}/dens"], summary[f"md17_scaling_{n}/plain"]
            if not dens.get(key) or len(dens.get(key, [])) != len(plain.get(key, [])):
                continue
            ratios = [d / p for d, p in zip(dens[key], plain[key])]
            ax.scatter([n] * len(ratios), ratios, marker=marker, alpha=0.4,
                       color="C0" if key == "forces_mae" else "C1")
            ax.scatter([n], [statistics.mean(ratios)], marker=marker, s=80,
                       color="C0" if key == "forces_mae" else "C1",
                       label=f"{label} (mean of seeds)" if n == sizes[0] else None)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("MD17 ethanol training frames")
    ax.set_ylabel("DeNS / plain force MAE")
    ax.set_title("Data scaling, conservative eSEN, at the plateau")
    ax.legend()
    save_figure(fig, path)
    return path


def background(argv: list[str], args: argparse.Namespace) -> int:
    """Start ``accuracy.py`` with ``argv`` minus ``--background`` in a new session (``setsid``,
    immune to the shell's hang-up), output appended to ``runs/benchmarks/accuracy/<suite>.log``,
    its pid in ``<suite>.pid`` next to it."""
    import os
    import subprocess

    name = "quick" if args.quick else args.suite
    name += "_smoke" if args.smoke else ""
    log_dir = REPO / "runs" / "benchmarks" / "accuracy"
    log_dir.mkdir(parents=True, exist_ok=True)
    log, pid_file = log_dir / f"{name}.log", log_dir / f"{name}.pid"
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()),
           *[a for a in argv if a != "--background"]]
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with log.open("a") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=REPO, env=env, start_new_session=True)
    pid_file.write_text(f"{proc.pid}\n")
    print(f"started {name} in the background: pid {proc.pid}, log {log}\n"
          f"  progress: tail -f {log}\n  stop: kill -- -{proc.pid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke check (< 5 min)")
    parser.add_argument("--suite", choices=sorted(SUITES), default="full",
                        help="full (default), quick (= --quick), regime (MD17 with 200 "
                        "training frames, 40 epochs: DeNS as a regulariser when data are few), "
                        "faithful (the authors' MD17 recipe, ablations), mlearn (Si, Mo) or "
                        "mlearn_stress (Si, Mo with stress; EquiformerV2 and eSEN)")
    parser.add_argument("--smoke", action="store_true",
                        help="shrink the suite to one tiny run per variant (checks it runs)")
    parser.add_argument("--epochs", action="append", default=[], metavar="DATASET=N",
                        help="train DATASET for N epochs instead of the suite's (e.g. to go on "
                        "to a plateau); repeatable")
    parser.add_argument("--only", action="append", default=[], metavar="GLOB",
                        help="run (or report) only the runs whose name matches GLOB, e.g. "
                        "'md17_sigma_e/*/seed0' or '*/dens/*'; repeatable")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: summarise the finished runs of the suite")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (default 1)")
    parser.add_argument("--restart", action="store_true",
                        help="discard the checkpoints of unfinished runs and start them over "
                        "(needed when a run's config changed since its checkpoint); finished "
                        "runs are still reused")
    parser.add_argument("--background", action="store_true",
                        help="start this command detached from the shell (setsid nohup), "
                        "logging to runs/benchmarks/accuracy/<suite>.log; see BENCHMARKS.md, "
                        "'Long runs across sessions'")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "accuracy")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.background:
        return background(sys.argv[1:] if argv is None else argv, args)

    suite = SUITES["quick" if args.quick else args.suite]
    if args.epochs:
        epochs = dict(suite.epochs)
        for item in args.epochs:
            name, _, n = item.partition("=")
            if name not in epochs or not n.isdigit():
                parser.error(f"--epochs {item}: expected DATASET=N with DATASET in {list(epochs)}")
            epochs[name] = int(n)
        suite = dataclasses.replace(suite, epochs=epochs)
    if args.smoke:
        suite = smoke(suite)
    start = time.time()
    runs, data = plan(suite, args.out / suite.name)
    if args.only:
        import fnmatch

        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, g) for g in args.only)]
        if not runs:
            parser.error(f"--only {args.only}: no run of the {suite.name} suite matches")
    val_first_n = {name: int(o.split("=")[1]) for name in data for o in suite.extra.get(name, ())
                   if o.startswith("--dataset.val.first_n=")}
    floors = {name: datasets.zero_force_mae(ds.lmdb_dir, val_first_n.get(name))
              for name, ds in data.items()}
    print(f"{suite.name} suite: {len(runs)} runs, {args.jobs} at a time", flush=True)
    if args.report:
        results = {r.name: res for r in runs if (res := load_result(r)) is not None}
        missing = [r.name for r in runs if r.name not in results]
        if missing:
            print(f"not finished (left out): {missing}")
    else:
        results = execute_all(runs, jobs=args.jobs, threads=args.threads, restart=args.restart)
    extras = {}
    for run in runs:
        if run.name not in results:
            continue
        extras[run.name] = {}
        train_mae = last_train_forces_mae(run)
        if train_mae is not None:
            extras[run.name]["train_forces_mae"] = train_mae
        test_src = data[run.name.split("/")[0]].lmdb_dir / "test"
        if (test_src / "data.lmdb").exists():
            test = evaluate_test(run, test_src, args.threads)
            if test is not None:
                extras[run.name]["test_forces_mae"] = test["forces_mae"]
                if "energy_mae" in test:
                    extras[run.name]["test_energy_mae"] = test["energy_mae"]
                if "stress_mae" in test:
                    extras[run.name]["test_stress_mae"] = test["stress_mae"]
    stress_floors = {name: datasets.zero_stress_mae(ds.lmdb_dir, val_first_n.get(name))
                     for name, ds in data.items()}
    table, summary = summarise(suite, results, floors, extras, stress_floors)
    args.results.mkdir(parents=True, exist_ok=True)
    png = args.results / f"accuracy_{suite.name}.png"
    plot(suite, results, png, floors)
    if suite.name == "scaling":
        plot_scaling(summary, args.results / "accuracy_scaling_ratio.png")
    curves = {name: {"steps": r.steps, "curve": r.curve, "minutes": r.minutes,
                     "command": r.command} for name, r in results.items()}
    (args.results / f"accuracy_{suite.name}.json").write_text(
        json.dumps({"summary": summary, "zero_force_mae": floors,
                    "zero_stress_mae_eV_per_A3": stress_floors,
                    "stress_unit": "stress_mae in eV/A^3 (table: GPa)", "runs": curves},
                   indent=1))
    (args.results / f"accuracy_{suite.name}.md").write_text(table + "\n")
    print(table)
    print(f"\nlearning curves: {png}\nwall time: {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
