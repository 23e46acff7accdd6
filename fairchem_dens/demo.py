"""The README's main job (``make demo``): train EquiformerV2 + DeNS on the bundled real OC20 data.

1. converts the bundled OC20 trajectories (split by system) to fairchem LMDBs with
   ``fairchem_dens.data.convert``;
2. trains ``configs/oc20/s2ef/demo/eqv2_dens_cpu.yml`` through the stock ``fairchem`` console
   script (``--mode train --cpu``), streaming its log;
3. prints the validation energy and force MAE of the last evaluation.

``--compare`` also trains the plain baseline (``eqv2_cpu.yml``: same model, data order and seed)
and prints both; ``--model escn`` does the same with eSCN. Run ``python -m fairchem_dens.demo --help``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from fairchem_dens.runs import data_overrides, parse_val_metrics  # re-exported for callers

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs" / "oc20" / "s2ef" / "demo"
CONFIGS = {  # (model, variant) -> demo config
    ("eqv2", "dens"): "eqv2_dens_cpu.yml",
    ("eqv2", "plain"): "eqv2_cpu.yml",
    ("escn", "dens"): "escn_dens_cpu.yml",
    ("escn", "plain"): "escn_cpu.yml",
}
# Validation systems whose elements all occur in the other 12 bundled systems, so the linear
# energy references (fitted on train) cover them and val energy MAE is meaningful.
DEMO_VAL_SYSTEMS = (1000100, 1000161)


def train(model: str, variant: str, lmdb_dir: Path, out: Path, seed: int,
          extra: list[str]) -> dict:
    """Run the stock fairchem CLI on one demo config; returns the last val metrics."""
    fairchem = Path(sys.executable).with_name("fairchem")
    cmd = [
        str(fairchem) if fairchem.exists() else "fairchem",
        "--mode", "train",
        "--config-yml", str(CONFIG_DIR / CONFIGS[model, variant]),
        "--cpu",
        "--run-dir", str(out / f"{model}_{variant}"),
        "--identifier", f"{model}_{variant}",
        "--seed", str(seed),
        *data_overrides(lmdb_dir),
        *extra,
    ]
    print(f"\n$ {' '.join(cmd)}\n", flush=True)
    start, lines = time.time(), []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=REPO, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
    log, log_file = "".join(lines), out / f"{model}_{variant}.log"
    log_file.write_text(log)
    if proc.returncode != 0:
        raise SystemExit(f"fairchem exited with {proc.returncode}; log in {log_file}")
    evaluations = parse_val_metrics(log)
    if not evaluations:
        raise SystemExit(f"no validation metrics in {log_file}")
    return {"metrics": evaluations[-1], "minutes": (time.time() - start) / 60}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo",
                        help="output directory (default: runs/demo)")
    parser.add_argument("--model", choices=("eqv2", "escn"), default="eqv2",
                        help="EquiformerV2 (default) or eSCN")
    parser.add_argument("--compare", action="store_true",
                        help="also train the plain baseline (same model, seed, data order)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*",
                        help="extra fairchem overrides, e.g. --optim.max_epochs=2 (after --)")
    return parser


def run(args: argparse.Namespace) -> int:
    if not CONFIG_DIR.is_dir():
        raise SystemExit(f"demo configs not found at {CONFIG_DIR}: run from a fairchem-dens checkout")

    from fairchem_dens.data import ConversionOptions, convert, demo_data_dir

    out = args.out.resolve()
    lmdb_dir = out / "lmdb"
    print(f"converting the bundled OC20 trajectories in {demo_data_dir()} -> {lmdb_dir}")
    convert(ConversionOptions(inputs=[str(demo_data_dir())], out_dir=lmdb_dir,
                              val_systems=DEMO_VAL_SYSTEMS, overwrite=True), log=print)

    results = {}
    for variant in ("dens", "plain") if args.compare else ("dens",):
        results[variant] = train(args.model, variant, lmdb_dir, out, args.seed, args.overrides)

    print(f"\n=== {args.model}: validation on {len(DEMO_VAL_SYSTEMS)} held-out systems "
          "(last evaluation, EMA weights) ===")
    for variant, result in results.items():
        m = result["metrics"]
        print(f"{variant:>5}: force MAE {m['forces_mae']:.4f} eV/A, energy MAE "
              f"{m['energy_mae']:.4f} eV, force cos {m.get('forces_cosine_similarity', 0):.3f} "
              f"({result['minutes']:.1f} min)")
    if "plain" in results:
        ratio = results["dens"]["metrics"]["forces_mae"] / results["plain"]["metrics"]["forces_mae"]
        print(f"force MAE ratio DeNS / plain: {ratio:.3f}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``fairchem-dens demo``."""
    parser = subparsers.add_parser(
        "demo", help="train EquiformerV2/eSCN + DeNS on the bundled real OC20 data",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser).set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairchem_dens.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
