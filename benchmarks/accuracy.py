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

Full suite: OC20 trajectories split by system (benchmarks/datasets.py), plain vs DeNS with 3
seeds, plus one-seed ablations (no force encoding; multi-scale sigma normalised by sigma and by
sigma_high; one DeNS coin per batch instead of per structure); MD17 ethanol,
plain vs DeNS with 3 seeds. Results (JSON, a Markdown table and learning-curve PNGs) go to
``--results`` (default ``benchmarks/results``); runs (logs, checkpoints) to
``runs/benchmarks/accuracy``. Finished runs are reused (see ``runner.py``).
"""

from __future__ import annotations

import argparse
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
    eval_interval,
    execute_all,
    load_result,
    steps_per_epoch,
)

DEMO_CONFIGS = REPO / "configs" / "oc20" / "s2ef" / "demo"
BENCH_CONFIGS = REPO / "benchmarks" / "configs"
CONFIGS = {  # (dataset, plain|dens) -> config
    ("oc20", "plain"): DEMO_CONFIGS / "eqv2_cpu.yml",
    ("oc20", "dens"): DEMO_CONFIGS / "eqv2_dens_cpu.yml",
    ("md17", "plain"): BENCH_CONFIGS / "md17_eqv2_cpu.yml",
    ("md17", "dens"): BENCH_CONFIGS / "md17_eqv2_dens_cpu.yml",
}
BATCH_SIZE = {"oc20": 4, "md17": 8}


@dataclass(frozen=True)
class Variant:
    """A training recipe: ``dens`` overrides on top of the DeNS config (``None``: plain run)."""

    name: str
    dens: dict | None = None
    description: str = ""

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


@dataclass
class Suite:
    name: str
    epochs: dict[str, int]
    seeds: tuple[int, ...]
    variants: dict[str, tuple[Variant, ...]]  # dataset -> variants run with all seeds
    ablations: dict[str, tuple[Variant, ...]] = field(default_factory=dict)  # seed 0 only
    evals_per_epoch: dict[str, int] = field(default_factory=lambda: {"oc20": 2, "md17": 1})
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)  # dataset -> overrides


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
}


def plan(suite: Suite, out: Path) -> tuple[list[Run], dict[str, datasets.Dataset]]:
    data = {name: datasets.DATASETS[name]() for name in suite.epochs}
    runs = []
    for name, ds in data.items():
        summary = json.loads((ds.lmdb_dir / "conversion.json").read_text())
        n_train = summary["splits"]["train"]["num_frames"]
        extra = suite.extra.get(name, ())
        for override in extra:  # a smaller training set
            if override.startswith("--dataset.train.first_n="):
                n_train = min(n_train, int(override.split("=")[1]))
        per_epoch = steps_per_epoch(n_train, BATCH_SIZE[name])
        every = eval_interval(per_epoch, suite.evals_per_epoch[name])
        jobs = [(v, s) for v in suite.variants[name] for s in suite.seeds]
        jobs += [(v, suite.seeds[0]) for v in suite.ablations.get(name, ())]
        for variant, seed in jobs:
            runs.append(Run(
                name=f"{name}/{variant.name}/seed{seed}",
                config=CONFIGS[name, variant.kind],
                out=out / name / variant.name / f"seed{seed}",
                seed=seed,
                overrides=[*ds.overrides(), f"--optim.max_epochs={suite.epochs[name]}",
                           f"--optim.batch_size={BATCH_SIZE[name]}", "--optim.ema_decay=0.99",
                           *extra,
                           *variant.overrides()],
                eval_every=every,
            ))
    return runs, data


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarise(suite: Suite, results: dict[str, Result],
              floors: dict[str, float] | None = None) -> tuple[str, dict]:
    """Markdown table and a JSON-able summary: final validation metrics per variant, and the
    DeNS/plain ratio of force MAE paired by seed (same initial weights and data order)."""
    lines, summary = [], {}
    for dataset in suite.epochs:
        variants = [*suite.variants[dataset], *suite.ablations.get(dataset, ())]
        plain = {s: results[f"{dataset}/plain/seed{s}"].final for s in suite.seeds
                 if f"{dataset}/plain/seed{s}" in results}
        if not plain:
            continue
        steps = next(r for n, r in results.items() if n.startswith(f"{dataset}/")).steps[-1]
        floor = (floors or {}).get(dataset)
        floor_text = f"; predicting zero forces gives {floor:.4f} eV/Å" if floor else ""
        lines += [f"\n**{dataset}** ({suite.epochs[dataset]} epochs, {steps} steps"
                  f"{floor_text})\n",
                  "| variant | seeds | val force MAE (eV/Å) | val energy MAE (eV) | force MAE "
                  "ratio to plain (per seed) | force cos | minutes/run |",
                  "|---|---|---|---|---|---|---|"]
        for v in variants:
            runs = {s: results[f"{dataset}/{v.name}/seed{s}"] for s in suite.seeds
                    if f"{dataset}/{v.name}/seed{s}" in results}
            if not runs:
                continue
            forces = [r.final["forces_mae"] for r in runs.values()]
            energy = [r.final["energy_mae"] for r in runs.values()]
            ratios = [r.final["forces_mae"] / plain[s]["forces_mae"] for s, r in runs.items()
                      if s in plain]
            cos = [r.final.get("forces_cosine_similarity", float("nan")) for r in runs.values()]
            minutes = statistics.mean(r.minutes for r in runs.values())
            ratio_text = ("—" if v.kind == "plain" or not ratios else
                          f"{statistics.mean(ratios):.3f} ({', '.join(f'{x:.3f}' for x in ratios)})")
            lines.append(f"| {v.name}: {v.description} | {len(runs)} | {_spread(forces)} | "
                         f"{_spread(energy)} | {ratio_text} | {statistics.mean(cos):.3f} | "
                         f"{minutes:.1f} |")
            summary[f"{dataset}/{v.name}"] = {
                "seeds": list(runs), "forces_mae": forces, "energy_mae": energy,
                "forces_mae_ratio": ratios, "forces_cosine_similarity": cos,
                "minutes": minutes, "overrides": v.dens}
    return "\n".join(lines), summary


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

    names = list(suite.epochs)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke check (< 5 min)")
    parser.add_argument("--suite", choices=sorted(SUITES), default="full",
                        help="full (default), quick (= --quick) or regime (MD17 with 200 "
                        "training frames, 40 epochs: DeNS as a regulariser when data are few)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: summarise the finished runs of the suite")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (default 1)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "accuracy")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)

    suite = SUITES["quick" if args.quick else args.suite]
    start = time.time()
    runs, data = plan(suite, args.out / suite.name)
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
        results = execute_all(runs, jobs=args.jobs, threads=args.threads)
    table, summary = summarise(suite, results, floors)
    args.results.mkdir(parents=True, exist_ok=True)
    png = args.results / f"accuracy_{suite.name}.png"
    plot(suite, results, png, floors)
    curves = {name: {"steps": r.steps, "curve": r.curve, "minutes": r.minutes,
                     "command": r.command} for name, r in results.items()}
    (args.results / f"accuracy_{suite.name}.json").write_text(
        json.dumps({"summary": summary, "zero_force_mae": floors, "runs": curves}, indent=1))
    (args.results / f"accuracy_{suite.name}.md").write_text(table + "\n")
    print(table)
    print(f"\nlearning curves: {png}\nwall time: {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
