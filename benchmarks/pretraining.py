"""Does denoising pre-training on relaxed structures help S2EF training? (Zaidi et al. 2023)

1. **Pre-train** ``configs/oc20/pretrain/eqv2_denoise_relaxed_cpu.yml`` (noise on every free
   atom, sigma 0.05 A, no force encoding) on the last (relaxed) frame of each of the 20 OC20
   *training* trajectories (benchmarks/datasets.py; validation systems left out). Denoising
   only, as Zaidi et al.: with one frame per composition the element references reproduce
   every energy (the converter flags the energy normaliser as degenerate), so the energy loss
   term is removed (``--loss_functions`` override).
2. **Fine-tune** with ``configs/oc20/s2ef/demo/eqv2_dens_finetune_cpu.yml`` (fairchem's
   ``model.finetune_config``: backbone and heads from the pre-training checkpoint; DeNS on) on
   the OC20 S2EF training split — exactly the settings, seeds, data order and number of steps
   of the ``oc20/dens`` runs of ``accuracy.py``'s full suite.
3. **Compare** with those runs from scratch (reused when the accuracy suite has run; run here
   otherwise): validation force/energy MAE at every evaluation, learning-curve PNG.

Usage::

    python benchmarks/pretraining.py [--seeds 0 1] [--pretrain-epochs 60]

Results: ``benchmarks/results/pretraining.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy
import datasets
from runner import REPO, Run, execute, execute_all

PRETRAIN_YML = REPO / "configs" / "oc20" / "pretrain" / "eqv2_denoise_relaxed_cpu.yml"
FINETUNE_YML = REPO / "configs" / "oc20" / "s2ef" / "demo" / "eqv2_dens_finetune_cpu.yml"


def pretrain_run(out: Path, epochs: int) -> Run:
    from fairchem_dens.runs import data_overrides

    lmdb = datasets.oc20_relaxed()
    return Run(name="pretrain/oc20_relaxed", config=PRETRAIN_YML, out=out / "pretrain", seed=0,
               overrides=[*data_overrides(lmdb)[:-1],  # no validation split
                          f"--optim.max_epochs={epochs}", "--optim.ema_decay=0.99",
                          "--loss_functions=[{'forces': {'fn': 'l2mae', 'coefficient': 100}}]"])


def plot(curves: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (label, results), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        for ax, metric in zip(axes, ("forces_mae", "energy_mae")):
            per_seed = [[m[metric] for m in r.curve] for r in results]
            accuracy.plot_band(ax, results[0].steps, per_seed, color,
                               f"{label} ({len(results)} seeds)")
    axes[0].set_ylabel("validation force MAE (eV/Å)")
    axes[1].set_ylabel("validation energy MAE (eV)")
    for ax in axes:
        ax.set_xlabel("fine-tuning step (S2EF, DeNS on)")
        ax.legend()
    fig.suptitle("OC20 (split by system): from scratch vs denoising-pre-trained")
    accuracy.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pretrain-epochs", type=int, default=60,
                        help="epochs over the 20 relaxed structures (5 steps each)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-scratch", action="store_true",
                        help="only pre-train and fine-tune (e.g. while accuracy.py is running "
                        "the from-scratch runs); compare in a later call")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "pretraining")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    start = time.time()

    pre = execute(pretrain_run(args.out, args.pretrain_epochs), threads=1)
    (ckpt,) = (args.out / "pretrain").glob("checkpoints/*/checkpoint.pt")

    suite = accuracy.SUITES["full"]
    scratch_runs, _ = accuracy.plan(suite, REPO / "runs" / "benchmarks" / "accuracy" / "full")
    scratch = {r.seed: r for r in scratch_runs if r.name.startswith("oc20/dens/")
               and r.seed in args.seeds}
    finetune = [Run(name=f"finetune/dens/seed{seed}", config=FINETUNE_YML,
                    out=args.out / "finetune" / f"seed{seed}", seed=seed,
                    overrides=[*run.overrides,
                               f"--model.finetune_config.starting_checkpoint={ckpt}"],
                    eval_every=run.eval_every)
                for seed, run in sorted(scratch.items())]
    if args.no_scratch:
        execute_all(finetune, jobs=args.jobs)
        return 0
    results = execute_all([*scratch.values(), *finetune], jobs=args.jobs)
    groups = {"from scratch": [results[r.name] for r in scratch.values()],
              "pre-trained": [results[r.name] for r in finetune]}

    lines = [f"Pre-training: {pre.minutes:.1f} min "
             f"({args.pretrain_epochs} epochs over 20 relaxed structures); fine-tuning "
             f"{groups['pre-trained'][0].steps[-1]} steps per run.\n",
             "| start | seeds | val force MAE (eV/Å) | val energy MAE (eV) | force MAE ratio to "
             "scratch (per seed) |", "|---|---|---|---|---|"]
    for label, runs in groups.items():
        forces = [r.final["forces_mae"] for r in runs]
        energy = [r.final["energy_mae"] for r in runs]
        ratios = [f / s.final["forces_mae"] for f, s in zip(forces, groups["from scratch"])]
        lines.append(f"| {label} | {len(runs)} | {accuracy._spread(forces)} | "
                     f"{accuracy._spread(energy)} | "
                     f"{statistics.mean(ratios):.3f} ({', '.join(f'{x:.3f}' for x in ratios)}) |")
    table = "\n".join(lines)
    args.results.mkdir(parents=True, exist_ok=True)
    plot(groups, args.results / "pretraining.png")
    (args.results / "pretraining.md").write_text(table + "\n")
    (args.results / "pretraining.json").write_text(json.dumps(
        {label: [{"name": r.name, "steps": r.steps, "curve": r.curve, "command": r.command}
                 for r in runs] for label, runs in groups.items()}, indent=1))
    print(table)
    print(f"\nplot: {args.results / 'pretraining.png'}\nwall time: "
          f"{(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
