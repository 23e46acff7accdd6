"""Why direct-force EquiformerV2 does not learn MD17 energies at the demo's length (issue 23).

Plain EquiformerV2 (fairchem's backbone, heads and trainer; ``benchmarks/configs/md17_demo/
eqv2_cpu.yml``, the direct-force MD17 demo config before issue 23 moved it out of ``configs/``)
on the bundled MD17 ethanol data, the demo's length (3 epochs, 375 steps), seed 0, one thread,
one arm per suspected cause, each changing one thing:

* ``demo``: the config as shipped (lambda_E 1, lambda_F 80, fairchem's default
  ``avg_num_nodes`` 77.81 of OC20 in the energy head);
* ``energy_only``: lambda_F 0 (can this network fit the energy at all in 375 steps?);
* ``lambda_e_20``: lambda_E 20 (the relative weight of the energy term);
* ``avg_nodes_9``: ``model.backbone.avg_num_nodes: 9`` (ethanol has 9 atoms: the energy head
  sums 9 atom outputs and divides by avg_num_nodes, so 77.81 shrinks the head's output 8.6x);
* ``avg_nodes_9_lambda_e_20``: both;
* ``escn_reduce_mean`` (``--model escn`` only): fairchem's ``escn_energy_head`` with
  ``reduce: mean`` (atom energies averaged) instead of its default ``sum``, which multiplies the
  sum by 0.001 (9 ethanol atoms: the head's output is 0.009x its atom outputs).

Prints each arm's last validation energy and force MAE against the mean predictor's
(``fairchem_dens.data.baselines.zero_output_errors``) and writes ``benchmarks/results/
energy_probe.{json,md}``. About 3-5 minutes per arm on one free core.

    python benchmarks/energy_probe.py [--arms demo avg_nodes_9 ...] [--steps-epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fairchem_dens.demo import DATA, convert_demo_data  # noqa: E402
from fairchem_dens.runs import parse_val_metrics, train_command  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from runner import write_results  # noqa: E402

#: direct-force MD17 configs (not shipped: they do not learn the energy) and the shipped eSEN one
PROBE_CONFIG_DIR = {"eqv2": REPO / "benchmarks" / "configs" / "md17_demo",
                    "escn": REPO / "benchmarks" / "configs" / "md17_demo",
                    "esen": DATA["md17"].config_dir}


def probe_config(model: str) -> Path:
    """The plain MD17 demo-data config of ``model``."""
    return PROBE_CONFIG_DIR[model] / f"{model}_cpu.yml"


#: arm -> the YAML it adds on top of the shipped plain config (fairchem's merge replaces lists)
LOSSES = "loss_functions:\n  - energy: {{fn: mae, coefficient: {e}}}\n  - forces: {{fn: mae, coefficient: {f}}}\n"
AVG_NODES_9 = "model:\n  backbone:\n    avg_num_nodes: 9\n"
ARMS: dict[str, str] = {
    "demo": "",
    "energy_only": LOSSES.format(e=1, f=0),
    "lambda_e_20": LOSSES.format(e=20, f=80),
    "avg_nodes_9": AVG_NODES_9,
    "avg_nodes_9_lambda_e_20": AVG_NODES_9 + LOSSES.format(e=20, f=80),
    # eSCN only: fairchem's escn_energy_head sums the atom energies and multiplies by 0.001
    # ("reduce: sum"); "mean" divides by the atom count instead (9 for every ethanol frame)
    "escn_reduce_mean": "model:\n  heads:\n    energy:\n      reduce: mean\n",
}


def prepare(out: Path, model: str) -> tuple[Path, dict[str, float]]:
    """The demo's conversion of the bundled MD17 data for ``model`` and its mean/zero
    baseline."""
    from fairchem_dens.data.baselines import zero_output_errors

    lmdb_dir = convert_demo_data(DATA["md17"], model, out, reuse=True)
    return lmdb_dir, zero_output_errors(lmdb_dir)


def run_arm(name: str, lmdb_dir: Path, out: Path, epochs: int, model: str) -> dict:
    cached = out / name / "metrics.json"
    overrides = [f"--optim.max_epochs={epochs}"]
    (out / name).mkdir(parents=True, exist_ok=True)
    config = out / name / "config.yml"
    config.write_text(f"includes:\n  - {probe_config(model)}\n{ARMS[name]}")
    key = {"overrides": overrides, "config": config.read_text()}
    if cached.exists() and all(json.loads(cached.read_text()).get(k) == v for k, v in key.items()):
        return json.loads(cached.read_text())
    cmd = train_command(config, lmdb_dir, out / name, name, 0, overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    log = proc.stdout + proc.stderr
    (out / name / "train.log").write_text(log)
    if proc.returncode != 0:
        raise SystemExit(f"arm {name} failed:\n{log[-3000:]}")
    curve = parse_val_metrics(log)
    result = {**key, "curve": curve, "minutes": (time.time() - start) / 60}
    cached.write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    parser.add_argument("--epochs", type=int, default=3, help="3 = 375 steps (the EquiformerV2 "
                        "demo's length)")
    parser.add_argument("--model", choices=("eqv2", "escn", "esen"), default="eqv2",
                        help="benchmarks/configs/md17_demo/<model>_cpu.yml; esen: configs/md17/demo/"
                        "esen_cpu.yml (conservative; only the demo and energy_only arms apply)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "energy_probe")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    out = args.out / args.model
    lmdb_dir, baseline = prepare(out, args.model)
    rows, summary = [], {}
    for name in args.arms:
        result = run_arm(name, lmdb_dir, out, args.epochs, args.model)
        last = result["curve"][-1]
        summary[name] = {**result, "last": last}
        rows.append(f"| {name} | {ARMS[name].replace(chr(10), ' ').strip() or '(as shipped)'} | "
                    f"{last['energy_mae']:.4f} | {last['energy_mae'] / baseline['energy_mae']:.2f} | "
                    f"{last['forces_mae']:.4f} | {result['minutes']:.1f} |")
        print(rows[-1], flush=True)
    head = [f"{args.model}, MD17 demo data, {args.epochs} epochs, seed 0; mean predictor: energy "
            f"MAE {baseline['energy_mae']:.4f} eV, zero forces {baseline['forces_mae']:.4f} eV/Å",
            "", "| arm | overrides | val energy MAE (eV) | / mean predictor | val force MAE (eV/Å) "
            "| minutes |", "|---|---|---|---|---|---|"]
    table = "\n".join([*head, *rows])
    print(table)
    write_results(args.results, f"energy_probe_{args.model}_{args.epochs}ep", table,
                  {"baseline": baseline, "epochs": args.epochs, "arms": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
