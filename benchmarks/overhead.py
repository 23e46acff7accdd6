"""Cost of DeNS, measured side by side in one run (interleaved, same weights, same batches).

* eval: DeNS model in eval mode (force encoding and noise head skipped) vs fairchem's plain
  model holding the same weights — target >= 0.99x plain throughput;
* train step (forward + backward): DeNS (with corruption of the batch, force encoding and noise
  head) vs plain, same batches.

Usage (repo root, cached env):  python benchmarks/overhead.py [--model eqv2|escn] [--repeats 15]
Data: the bundled real OC20 frames (converted on the fly). Prints medians and the spread
(interquartile range) of the per-repeat time ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_batches(n_batches: int, batch_size: int):
    from fairchem.core.common.data_parallel import data_list_collater
    from fairchem.core.datasets import LmdbDataset

    from fairchem_dens.data import ConversionOptions, convert, demo_data_dir

    out = Path(tempfile.mkdtemp()) / "lmdb"
    convert(ConversionOptions(inputs=[str(demo_data_dir())], out_dir=out, split=(1.0, 0.0, 0.0)))
    ds = LmdbDataset({"src": str(out / "train")})
    step = max(len(ds) // (n_batches * batch_size), 1)
    idx = list(range(0, len(ds), step))[: n_batches * batch_size]
    return [data_list_collater([ds[i] for i in idx[b::n_batches]], otf_graph=True)
            for b in range(n_batches)]


def build_pair(model: str):
    from fairchem.core.common.utils import load_config, setup_imports
    from fairchem.core.models.base import HydraModel

    setup_imports()
    name = {"eqv2": "eqv2", "escn": "escn"}[model]
    dens_cfg, _, _ = load_config(str(REPO / f"configs/oc20/s2ef/demo/{name}_dens_cpu.yml"))
    plain_cfg, _, _ = load_config(str(REPO / f"configs/oc20/s2ef/demo/{name}_cpu.yml"))
    models = []
    for cfg in (dens_cfg, plain_cfg):
        m = copy.deepcopy(cfg["model"])
        m.pop("name")
        torch.manual_seed(0)
        models.append(HydraModel(**m))
    dens, plain = models
    missing = dens.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert all("force_encoding" in k or "noise" in k for k in missing)
    return dens, plain, dens_cfg


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("eqv2", "escn"), default="eqv2")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--phases", default="eval,train", help="comma-separated: eval,train")
    args = parser.parse_args()

    from fairchem_dens.config import DeNSConfig
    from fairchem_dens.corruption import (
        DENS_FORCES_KEY,
        DENS_MASK_KEY,
        sample_corruption,
        step_generator,
    )

    batches = load_batches(args.batches, args.batch_size)
    dens, plain, cfg = build_pair(args.model)
    dens_cfg = DeNSConfig.from_optim(cfg["optim"])

    def eval_pass(model):
        with torch.no_grad():
            for b in batches:
                model(copy.copy(b))

    def train_pass(model, corrupt: bool):
        for i, b in enumerate(batches):
            x = copy.copy(b)
            if corrupt:
                c = sample_corruption(dens_cfg, b.natoms, b.fixed, step_generator(0, i))
                x.pos = b.pos + c.noise
                x[DENS_MASK_KEY], x[DENS_FORCES_KEY] = c.mask, b.forces
            out = model(x)
            loss = out["energy"].sum() + out["forces"].sum()
            if "noise" in out:
                loss = loss + out["noise"].sum()
            loss.backward()

    torch.set_num_threads(torch.get_num_threads())
    results = {}
    for phase in args.phases.split(","):
        for m in (dens, plain):
            m.train(phase == "train")
        ratios, controls, t_dens, t_plain = [], [], [], []
        for r in range(args.repeats + 1):  # first repeat is warm-up
            # A/A control: the plain model timed twice gives the noise floor of the ratio
            runs = [("dens", dens), ("plain", plain), ("plain_again", plain)]
            runs = runs[r % 3:] + runs[: r % 3]  # rotate the order
            times = {}
            for name, m in runs:
                torch.manual_seed(r)
                if phase == "eval":
                    times[name] = timed(lambda m=m: eval_pass(m))
                else:
                    times[name] = timed(lambda m=m, n=name: train_pass(m, corrupt=n == "dens"))
            if r:
                t_dens.append(times["dens"])
                t_plain.append(times["plain"])
                ratios.append(times["dens"] / times["plain"])
                controls.append(times["plain_again"] / times["plain"])
        q = statistics.quantiles(ratios, n=4)
        results[phase] = (statistics.median(ratios), q[0], q[2], statistics.median(t_dens),
                          statistics.median(t_plain), statistics.median(controls))
    n_frames = args.batches * args.batch_size
    print(f"\nmodel {args.model}, {n_frames} real OC20 frames per pass, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads")
    for phase, (med, q1, q3, td, tp, aa) in results.items():
        print(f"{phase:>5}: time ratio DeNS/plain median {med:.3f} (IQR {q1:.3f}-{q3:.3f}), "
              f"A/A control plain/plain {aa:.3f}; DeNS {td:.3f} s, plain {tp:.3f} s per pass")
    if "eval" in results:
        print(f"eval throughput DeNS/plain: {1 / results['eval'][0]:.3f}x")


if __name__ == "__main__":
    main()
