"""Do the OC20 demo configs learn energies where energies can be learned? (issue 23)

The OC20 demo validates on two held-out *systems*. Their energies cannot be learned from the 12
bundled training systems: the per-element references are fitted by least squares on 12
compositions with more elements than systems, so each training system's mean energy is fitted
exactly and a new composition's reference is an arbitrary extrapolation (README, *The demo*).

This script asks the within-distribution question instead: every 5th frame of each of the 12
training relaxations is held out (validation), the other frames train, so validation shares the
training compositions and what remains after the references is each relaxation's energy
profile. ``--models esen`` runs a conservative eSEN (benchmarks/configs/oc20_energy/esen_cpu.yml,
not shipped) the same way. The OC20 demo configs (``configs/oc20/s2ef/demo/{eqv2,escn}_cpu.yml``, plain, as
shipped: their length, loss weights, normalisers, EMA) are trained through the stock
``fairchem`` CLI, seed 0, one thread each, and scored against the mean predictor (the
references plus the normaliser mean) and zero forces on the held-out frames.

    python benchmarks/oc20_energy_frames.py [--models eqv2 escn] [--tag NAME] [--energy-coefficient X]
        [--forces-coefficient Y] [-- fairchem overrides]

Writes ``benchmarks/results/oc20_energy_frames[_NAME].{md,json}``. About 5-10 minutes per model.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fairchem_dens.demo import DATA  # noqa: E402
from fairchem_dens.runs import parse_val_metrics, train_command  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from runner import write_results  # noqa: E402

#: models of ``--models`` without an OC20 demo config: benchmark-only configs
BENCH_CONFIGS = {"esen": REPO / "benchmarks" / "configs" / "oc20_energy" / "esen_cpu.yml"}
#: held-out frames: every HOLD_OUT-th frame of each training relaxation (index % HOLD_OUT == 4)
HOLD_OUT = 5
#: sid offset of a relaxation's held-out frames (the converter splits by file-name sid)
VAL_SID_OFFSET = 10_000_000


def sid_of(path: Path) -> int:
    """System id of a bundled relaxation file, ``random<sid>.extxyz[.xz]``."""
    return int(path.name.removeprefix("random").split(".")[0])


def frame_split(out: Path) -> tuple[Path, tuple[int, ...]]:
    """Write each training relaxation as two files (its kept and its held-out frames) and
    return the folder and the held-out files' sids."""
    import ase.io

    from fairchem_dens.data import demo_data_dir

    raw = out / "extxyz"
    raw.mkdir(parents=True, exist_ok=True)
    val_sids = []
    for path in sorted(demo_data_dir("oc20").glob("random*.extxyz.xz")):
        sid = sid_of(path)
        if sid in DATA["oc20"].val_systems:
            continue
        with lzma.open(path, "rt") as handle:
            frames = ase.io.read(handle, index=":", format="extxyz")
        kept = [f for i, f in enumerate(frames) if i % HOLD_OUT != HOLD_OUT - 1]
        held = [f for i, f in enumerate(frames) if i % HOLD_OUT == HOLD_OUT - 1]
        ase.io.write(raw / f"random{sid}.extxyz", kept)
        ase.io.write(raw / f"random{sid + VAL_SID_OFFSET}.extxyz", held)
        val_sids.append(sid + VAL_SID_OFFSET)
    return raw, tuple(val_sids)


def convert_frames(out: Path) -> Path:
    from fairchem_dens.data import ConversionOptions, convert

    lmdb_dir = out / "lmdb"
    if (lmdb_dir / "conversion.json").exists():
        return lmdb_dir
    raw, val_sids = frame_split(out)
    convert(ConversionOptions(inputs=[str(raw)], out_dir=lmdb_dir, val_systems=val_sids,
                              overwrite=True), log=print)
    return lmdb_dir


def train(model: str, lmdb_dir: Path, out: Path, extra: list[str],
          energy_coefficient: float | None = None,
          forces_coefficient: float | None = None) -> dict:
    config = BENCH_CONFIGS.get(model) or DATA["oc20"].config(model, "plain")
    shown = config.relative_to(REPO)
    run_dir = out / model
    if energy_coefficient is not None or forces_coefficient is not None:
        # the config with only lambda_E and/or lambda_F changed
        from fairchem.core.common.utils import load_config

        losses = load_config(str(config))[0]["loss_functions"]
        assert [next(iter(term)) for term in losses] == ["energy", "forces"], losses
        for term, coefficient in zip(losses, (energy_coefficient, forces_coefficient)):
            if coefficient is not None:
                next(iter(term.values()))["coefficient"] = coefficient
        run_dir.mkdir(parents=True, exist_ok=True)
        wrapper = run_dir / "config.yml"
        wrapper.write_text(f"includes:\n  - {config}\nloss_functions: {json.dumps(losses)}\n")
        config = wrapper
    cmd = train_command(config, lmdb_dir, run_dir, model, 0, extra)
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    log = proc.stdout + proc.stderr
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.log").write_text(log)
    if proc.returncode != 0:
        raise SystemExit(f"{model} failed (rc {proc.returncode}); see {run_dir / 'train.log'}")
    return {"config": str(shown),
            "energy_coefficient": energy_coefficient,
            "forces_coefficient": forces_coefficient, "curve": parse_val_metrics(log),
            "minutes": (time.time() - start) / 60}


def main(argv: list[str] | None = None) -> int:
    from fairchem_dens.data.baselines import zero_output_errors

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("eqv2", "escn", "esen"), default=["eqv2", "escn"])
    parser.add_argument("--out", type=Path,
                        default=REPO / "runs" / "benchmarks" / "oc20_energy_frames")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tag", default="", help="names this variant's runs and result files")
    parser.add_argument("--energy-coefficient", type=float, default=None,
                        help="lambda_E instead of the config's (the paper's OC20 value, 2)")
    parser.add_argument("--forces-coefficient", type=float, default=None,
                        help="lambda_F instead of the config's (100); 0 trains on energy alone")
    parser.add_argument("overrides", nargs="*", help="fairchem overrides (after --)")
    args = parser.parse_args(argv)
    lmdb_dir = convert_frames(args.out)
    baseline = zero_output_errors(lmdb_dir)
    rows, runs = [], {}
    for model in args.models:
        runs[model] = result = train(model, lmdb_dir, args.out / (args.tag or "as_shipped"),
                                     args.overrides, args.energy_coefficient,
                                     args.forces_coefficient)
        last = result["curve"][-1]
        rows.append(f"| `{result['config']}` | {last['energy_mae']:.3f} | "
                    f"{last['energy_mae'] / baseline['energy_mae']:.2f} | "
                    f"{last['forces_mae']:.4f} | {last['forces_mae'] / baseline['forces_mae']:.2f}"
                    f" | {result['minutes']:.1f} |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"OC20 demo configs on held-out frames of their training relaxations (every {HOLD_OUT}th "
        f"frame), seed 0{', overrides ' + ' '.join(args.overrides) if args.overrides else ''}"
        f"{f', lambda_E {args.energy_coefficient:g}' if args.energy_coefficient is not None else ''}"
        f"{f', lambda_F {args.forces_coefficient:g}' if args.forces_coefficient is not None else ''}; "
        f"mean predictor: energy MAE {baseline['energy_mae']:.3f} eV, zero forces "
        f"{baseline['forces_mae']:.4f} eV/Å", "",
        "| config (plain) | val energy MAE (eV) | / mean predictor | val force MAE "
        "(eV/Å) | / zero forces | minutes |", "|---|---|---|---|---|---|", *rows])
    print(table)
    write_results(args.results, "oc20_energy_frames" + (f"_{args.tag}" if args.tag else ""),
                  table, {"baseline": baseline, "overrides": args.overrides, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
