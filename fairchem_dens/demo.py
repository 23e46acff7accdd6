"""The README's main job (``make demo``): train a model with and without DeNS on bundled real DFT
data and show what the models learned: by default conservative eSEN on MD17 (forces =
-dE/dpos, so the energy is learned too; docs/energy.md), EquiformerV2 on OC20.

1. converts the bundled data to fairchem LMDBs with ``fairchem_dens.data.convert``:
   by default (``--data md17``) 1500 frames sampled from the MD17 ethanol simulation
   (1000 for training, 500 other frames for validation); ``--data oc20`` the 14 OC20
   relaxations, split by system (the EvalAI-style S2EF path);
2. trains the DeNS config and the plain baseline (same model, seed and data order) through the
   stock ``fairchem`` console script (``--mode train --cpu``), side by side, streaming both logs;
3. prints the validation force/energy MAE and force cosine of both next to the zero-output
   baseline (zero forces, energy = element references), and one line on what they show;
4. writes ``learning_curves.png`` (validation force and energy MAE vs epoch of both runs, and
   the DeNS/plain ratios) next to the logs and prints its path.

``--no-compare`` trains the DeNS model only; with ``--data oc20``, ``--model escn`` uses the
direct-force eSCN instead of EquiformerV2. MD17 has only the conservative eSEN: the direct-force
models do not learn ethanol's energy at CPU length (docs/energy.md; their configs are in
``benchmarks/configs/md17_demo``). Run
``python -m fairchem_dens.demo --help``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fairchem_dens.runs import (  # data_overrides, parse_val_metrics re-exported for callers
    data_overrides,  # noqa: F401
    parse_val_metrics,
    train_command,
)

REPO = Path(__file__).resolve().parents[1]
#: A model "learned" the forces when its force MAE is below this fraction of the zero-force
#: baseline and its force cosine above LEARNED_COSINE.
LEARNED_FRACTION = 0.5
LEARNED_COSINE = 0.9
VARIANT_NAMES = {"plain": "plain", "dens": "DeNS"}


@dataclass(frozen=True)
class DemoData:
    """A bundled data set and how the demo converts and trains on it."""

    name: str  # key of fairchem_dens.data.demo.DEMO_DATASETS
    title: str
    config_dir: Path  # holds <model>{,_dens}_cpu.yml (MD17: esen; OC20: eqv2, escn)
    val_systems: tuple[int, ...]  # converter system ids (file-name digits) held out for val
    energy_unit: str
    split: str  # what the validation frames are, for the summary

    def config(self, model: str, variant: str) -> Path:
        """Config of ``model`` (``esen``/``eqv2``/``escn``) and ``variant`` (``dens``/``plain``)."""
        return self.config_dir / f"{model}{'_dens' if variant == 'dens' else ''}_cpu.yml"


DATA = {
    "md17": DemoData(
        "md17", "MD17 ethanol", REPO / "configs" / "md17" / "demo", (3,), "kcal/mol",
        "500 held-out frames (file frames 1500-1999; training: 0-999)"),
    # Validation systems whose elements all occur in the other 12 bundled systems, so the
    # linear energy references (fitted on train) cover them.
    "oc20": DemoData(
        "oc20", "OC20 S2EF", REPO / "configs" / "oc20" / "s2ef" / "demo", (1000100, 1000161),
        "eV", "2 held-out OC20 systems (sids 1000100, 1000161; training: the other 12)"),
}
MODELS = ("esen", "eqv2", "escn")
DEFAULT_MODEL = {"md17": "esen", "oc20": "eqv2"}  # --data -> model when --model is not given
#: models whose forces are energy gradients: energy and forces share one normaliser scale
CONSERVATIVE_MODELS = ("esen",)
CONSERVATIVE_FORCES_NORMALIZER = "energy_std"
DEMO_VAL_SYSTEMS = DATA["oc20"].val_systems  # kept for callers of the OC20 demo split


def val_first_n(overrides: list[str]) -> int | None:
    """The ``--dataset.val.first_n=N`` among fairchem ``overrides``, if any (the baseline must
    score the same validation frames as the runs)."""
    values = [o.split("=", 1)[1] for o in overrides if o.startswith("--dataset.val.first_n=")]
    return int(values[-1]) if values else None


def run_all(commands: dict[str, list[str]], out: Path, parallel: bool) -> dict[str, dict]:
    """Run the fairchem commands (``variant -> argv``), side by side when ``parallel``.

    Each log line is echoed with a ``[variant]`` prefix and saved to ``out/<variant>.log``.
    With several runs in parallel, each child gets an equal share of the CPU cores as
    ``OMP_NUM_THREADS`` unless the caller set it.

    Returns
    -------
    dict
        ``variant -> {"metrics": last val metrics, "curve": every val evaluation,
        "minutes": wall time}``.
    """
    env = dict(os.environ)
    if parallel and len(commands) > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(commands)))
    lock, results = threading.Lock(), {}

    def stream(variant: str, proc: subprocess.Popen, lines: list[str]) -> None:
        for line in proc.stdout:
            lines.append(line)
            with lock:
                sys.stdout.write(f"[{variant}] {line}")
        proc.wait()

    def start(variant: str) -> tuple[subprocess.Popen, list[str], threading.Thread, float]:
        print(f"\n[{variant}] $ {' '.join(commands[variant])}\n", flush=True)
        proc = subprocess.Popen(commands[variant], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=REPO, bufsize=1, env=env)
        lines: list[str] = []
        thread = threading.Thread(target=stream, args=(variant, proc, lines), daemon=True)
        thread.start()
        return proc, lines, thread, time.time()

    def finish(variant: str, proc, lines, thread, started) -> None:
        thread.join()
        log, log_file = "".join(lines), out / f"{variant}.log"
        log_file.write_text(log)
        if proc.returncode != 0:
            raise SystemExit(f"fairchem exited with {proc.returncode}; log in {log_file}")
        evaluations = parse_val_metrics(log)
        if not evaluations:
            raise SystemExit(f"no validation metrics in {log_file}")
        results[variant] = {"metrics": evaluations[-1], "curve": evaluations,
                            "minutes": (time.time() - started) / 60}

    if parallel:
        running = {variant: start(variant) for variant in commands}
        for variant, handles in running.items():
            finish(variant, *handles)
    else:
        for variant in commands:
            finish(variant, *start(variant))
    return results


def summary_table(results: dict[str, dict], baseline: dict[str, float]) -> list[str]:
    """Rows of the final table: the zero-output baseline, then each trained variant."""
    rows = [f"{'':<22}{'force MAE (eV/A)':>18}{'force cos':>11}{'energy MAE (eV)':>17}"
            f"{'minutes':>9}",
            f"{'zero-output baseline':<22}{baseline['forces_mae']:>18.4f}{'0':>11}"
            f"{baseline['energy_mae']:>17.4f}{'-':>9}"]
    for variant in ("plain", "dens"):
        if variant in results:
            m = results[variant]["metrics"]
            rows.append(f"{VARIANT_NAMES[variant]:<22}{m['forces_mae']:>18.4f}"
                        f"{m.get('forces_cosine_similarity', float('nan')):>11.3f}"
                        f"{m['energy_mae']:>17.4f}{results[variant]['minutes']:>9.1f}")
    return rows


def reading(metrics: dict[str, dict[str, float]], baseline: dict[str, float]) -> str:
    """One line on what the validation metrics (``variant -> metrics``) show against the
    zero-output ``baseline``: whether the models learned forces, and DeNS vs plain."""
    metrics = {v: metrics[v] for v in ("plain", "dens") if v in metrics}
    floor = baseline["forces_mae"]
    learned = {v: m["forces_mae"] < LEARNED_FRACTION * floor
               and m.get("forces_cosine_similarity", 0.0) > LEARNED_COSINE
               for v, m in metrics.items()}
    names = " and ".join(VARIANT_NAMES[v] for v in metrics)
    if all(learned.values()):
        parts = [f"{VARIANT_NAMES[v]} {floor / m['forces_mae']:.0f}x" for v, m in metrics.items()]
        cosines = ", ".join(f"{m['forces_cosine_similarity']:.3f}" for m in metrics.values())
        line = (f"{names} learned the forces of unseen frames: force MAE "
                f"{' / '.join(parts)} below predicting zero forces, cosine {cosines}.")
    elif not any(learned.values()):
        maes = ", ".join(f"{m['forces_mae']:.4f}" for m in metrics.values())
        cosines = ", ".join(f"{m.get('forces_cosine_similarity', float('nan')):.3f}"
                            for m in metrics.values())
        return (f"{names} did not learn forces that transfer to the validation frames (force "
                f"MAE {maes} eV/A vs {floor:.4f} for zero forces, cosine {cosines}): too little "
                "data or training for this split; compare DeNS with plain only where a model "
                "learns (e.g. the default --data md17).")
    else:
        line = "; ".join(f"{VARIANT_NAMES[v]} {'learned' if ok else 'did not learn'} the forces"
                         for v, ok in learned.items()) + "."
    if "energy_mae" in baseline and all(
            m["energy_mae"] > 0.9 * baseline["energy_mae"] for m in metrics.values()):
        line += (" Energies are not learned beyond the per-element references at this length"
                 " of training.")
    if {"dens", "plain"} <= set(metrics):
        ratio = metrics["dens"]["forces_mae"] / metrics["plain"]["forces_mae"]
        line += (f" DeNS/plain force MAE {ratio:.3f} ({'better' if ratio < 1 else 'worse'} by "
                 f"{abs(1 - ratio) * 100:.1f} %, one seed; BENCHMARKS.md has seeds and the regime"
                 " where the sign flips).")
    return line


def plot_curves(results: dict[str, dict], baseline: dict[str, float], path: Path,
                title: str) -> Path | None:
    """PNG of the validation learning curves of both runs (``variant -> {"curve": [metrics of
    each evaluation]}``): force MAE and energy MAE vs epoch beside the zero-output baseline,
    and the DeNS/plain ratios. Returns ``path``, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no learning-curve plot (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {v: results[v]["curve"] for v in ("plain", "dens") if v in results}
    panels = [("forces_mae", "force MAE (eV/A)"), ("energy_mae", "energy MAE (eV)")]
    fig, axes = plt.subplots(1, 3 if len(runs) == 2 else 2, figsize=(14, 4.2))
    for ax, (key, label) in zip(axes, panels):
        for variant, curve in runs.items():
            ax.plot([m["epoch"] for m in curve], [m[key] for m in curve], marker="o",
                    label=VARIANT_NAMES[variant])
        if key in baseline:
            ax.axhline(baseline[key], color="grey", linestyle="--",
                       label="zero forces / mean energy" if key == "forces_mae"
                       else "mean-energy baseline")
        ax.set(xlabel="epoch", ylabel=label, yscale="log", title=f"validation {label}")
        ax.legend(fontsize=8)
    if len(runs) == 2:
        ax = axes[2]
        for key, label in panels:
            pairs = list(zip(runs["dens"], runs["plain"]))
            ax.plot([d["epoch"] for d, _ in pairs], [d[key] / p[key] for d, p in pairs],
                    marker="o", label=label.split(" (")[0])
        ax.axhline(1.0, color="grey", linestyle="--")
        ax.set(xlabel="epoch", ylabel="DeNS / plain", title="DeNS / plain (below 1: DeNS better)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: one seed, minutes of CPU training (BENCHMARKS.md: seeds, plateaus)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", choices=sorted(DATA), default="md17",
                        help="md17 (default): MD17 ethanol, 1000 training and 500 validation "
                             "frames; oc20: the bundled OC20 relaxations, split by system (the "
                             "S2EF/EvalAI path)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo",
                        help="output directory (default: runs/demo); runs land in OUT/DATA/")
    parser.add_argument("--model", choices=MODELS, default=None,
                        help="md17: esen (conservative eSEN, forces = -dE/dpos as the "
                             "authors' MD17 model; the only MD17 demo model: direct-force "
                             "models do not learn its energy at CPU length, docs/energy.md); "
                             "oc20: eqv2 (default) or escn, direct-force EquiformerV2 / eSCN")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the plain model with the same seed and data order (the "
                             "default); --no-compare trains the DeNS model only")
    parser.add_argument("--sequential", action="store_true",
                        help="train DeNS and plain one after the other instead of side by side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*",
                        help="extra fairchem overrides, e.g. --optim.max_epochs=2 (after --)")
    return parser


def convert_demo_data(data: DemoData, model: str, out: Path, reuse: bool = False) -> Path:
    """Convert ``data``'s bundled frames for ``model`` into an LMDB folder under ``out`` and
    return it. Conservative models (:data:`CONSERVATIVE_MODELS`) get energy and forces on one
    scale, sigma_E of the training energies (the authors' MD17 force scale; configs/md17/demo/
    esen_cpu.yml), in a folder of their own. ``reuse``: keep a finished earlier conversion."""
    from fairchem_dens.data import ConversionOptions, convert, demo_data_dir

    forces_scale = CONSERVATIVE_FORCES_NORMALIZER if model in CONSERVATIVE_MODELS else "rms"
    lmdb_dir = out / ("lmdb" if forces_scale == "rms" else f"lmdb_{forces_scale}")
    if reuse and (lmdb_dir / "conversion.json").exists():
        return lmdb_dir
    print(f"converting the bundled {data.title} data in {demo_data_dir(data.name)} -> {lmdb_dir}")
    convert(ConversionOptions(inputs=[str(demo_data_dir(data.name))], out_dir=lmdb_dir,
                              val_systems=data.val_systems, energy_unit=data.energy_unit,
                              forces_normalizer=forces_scale, overwrite=True), log=print)
    return lmdb_dir


def run(args: argparse.Namespace) -> int:
    data = DATA[args.data]
    args.model = args.model or DEFAULT_MODEL[args.data]
    if not data.config(args.model, "plain").exists():
        raise SystemExit(f"--model {args.model} has no {data.title} demo config "
                         f"({data.config(args.model, 'plain')}); choose one of "
                         f"{sorted(m for m in MODELS if data.config(m, 'plain').exists())}")
    if not data.config_dir.is_dir():
        raise SystemExit(f"demo configs not found at {data.config_dir}: run from a fairchem-dens "
                         "checkout")

    from fairchem_dens.data.baselines import zero_output_errors

    out = args.out.resolve() / data.name
    lmdb_dir = convert_demo_data(data, args.model, out)
    first_n = val_first_n(args.overrides)
    baseline = zero_output_errors(lmdb_dir, first_n=first_n)

    variants = ("dens", "plain") if args.compare else ("dens",)
    commands = {v: train_command(data.config(args.model, v), lmdb_dir,
                                 out / f"{args.model}_{v}", f"{args.model}_{v}", args.seed,
                                 args.overrides)
                for v in variants}
    results = run_all(commands, out, parallel=not args.sequential)

    where = data.split if first_n is None else f"the first {first_n} of {data.split}"
    print(f"\n=== {data.title}, {args.model}: validation on {where} "
          "(last evaluation, EMA weights) ===")
    print("\n".join(summary_table(results, baseline)))
    print("Reading: " + reading({v: r["metrics"] for v, r in results.items()}, baseline))
    plot = plot_curves(results, baseline, out / "learning_curves.png",
                       f"{data.title}, {args.model}")
    if plot is not None:
        print(f"Learning curves (validation force and energy MAE vs epoch, DeNS/plain): {plot}")
    print(f"Logs, checkpoints and tensorboard files: {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``fairchem-dens demo``."""
    parser = subparsers.add_parser(
        "demo", help="train EquiformerV2/eSCN with and without DeNS on bundled real DFT data",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser).set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairchem_dens.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
