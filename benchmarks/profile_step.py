"""Profile one training step (``_forward`` + ``_compute_loss`` + backward) of the trainers with
``torch.profiler`` on the CPU: plain fairchem, DeNS with the full noise head, DeNS with the
noise head restricted to corrupted atoms (default). Same weights, same batch of real OC20
frames, the same DeNS step (one with corrupted atoms). Prints the wall time of a step and the
top operators by self CPU time.

Usage (repo root, cached env):  python benchmarks/profile_step.py [--model eqv2|escn]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import DEMO_VAL_SYSTEMS, build_trainer, demo_config  # noqa: E402

DENS = {"prob": 0.5, "corrupt_ratio": 0.5, "std": 0.05, "coefficient": 10}


def corrupted_step(trainer, batch) -> int:
    """The first step number whose corruption of ``batch`` moves some atoms."""
    for step in range(1, 100):
        trainer.step = step
        if trainer._sample(copy.copy(batch)).num_corrupted:
            return step
    raise AssertionError("no corrupted step in 100")


def one_step(trainer, batch) -> None:
    trainer.optimizer.zero_grad(set_to_none=True)
    b = copy.copy(batch)
    trainer._compute_loss(trainer._forward(b), b).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("eqv2", "escn"), default="eqv2")
    parser.add_argument("--steps", type=int, default=5, help="profiled repeats of the step")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    from fairchem.core.common.utils import setup_imports

    from fairchem_dens.data import ConversionOptions, convert, demo_data_dir

    setup_imports()
    work = Path(tempfile.mkdtemp())
    convert(ConversionOptions(inputs=[str(demo_data_dir())], out_dir=work / "lmdb",
                              val_systems=DEMO_VAL_SYSTEMS))
    variants = {"plain": (None, True), "dens (full head)": (DENS, False),
                "dens (restricted head)": (DENS, True)}
    trainers = {}
    for name, (dens, restrict) in variants.items():
        config = demo_config(work / "lmdb", dens, work / name.split()[0] / str(restrict),
                             first_n=16, model=args.model)
        if dens is not None:
            config["model"]["heads"]["noise"]["restrict_to_corrupted"] = restrict
        trainers[name] = build_trainer(config)
    batch = next(iter(trainers["plain"].train_loader))
    step = corrupted_step(trainers["dens (restricted head)"], batch)
    for name, trainer in trainers.items():
        trainer.step = step
        trainer.model.train()
        one_step(trainer, batch)  # warm-up
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                one_step(trainer, batch)
            seconds = (time.perf_counter() - start) / args.steps
        dens_step = getattr(trainer, "_dens_step", None)
        corrupted = dens_step.num_corrupted if dens_step else 0
        events = prof.key_averages()
        flops = sum(e.flops for e in events) / args.steps
        print(f"\n=== {args.model} {name}: {seconds:.3f} s per step under the profiler, "
              f"{flops / 1e9:.2f} GFLOP per step (matmul-type ops; not timing-noise dependent); "
              f"{int(batch.natoms.sum())} atoms, {corrupted} corrupted, {torch.get_num_threads()}"
              " threads")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top,
                                        max_name_column_width=40))


if __name__ == "__main__":
    main()
