"""Prepared GPU check (issue #24): does DeNS train on a GPU as it does on the CPU, and what does
it cost there? One script, one JSON, under 8 minutes on one GPU. Sections:

1. ``eval_equal``: per family (EquiformerV2, eSCN on the bundled OC20 frames; eSEN on mlearn Si
   with stress), the DeNS model holding the plain fairchem model's weights gives the plain
   model's eval outputs (max |difference| of energy, forces, stress; beside it the same plain
   model run twice, the floor set by non-deterministic GPU reductions).
2. ``train``: per family, DeNS training steps through the trainer's own step code (``_forward``,
   ``_compute_loss``, ``_compute_metrics``, ``_backward``: what ``fairchem --mode train`` runs),
   fp32 and with AMP (fairchem's ``--amp``: fp16 autocast + GradScaler on CUDA; bf16 autocast
   on the CPU): every loss finite, every parameter finite afterwards; and the host-device
   syncs one step makes (``torch.cuda.set_sync_debug_mode``), DeNS vs plain fairchem.
3. ``cost``: the paper's OC20 S2EF-2M EquiformerV2 (``configs/oc20/s2ef/2M/
   eqv2_dens_N@12_L@6_M@2_e12.yml``: 12 blocks, L=6, M=2, batch 4 per GPU) vs the same network
   under fairchem's plain trainer, on the bundled OC20 frames: training-step time (interleaved,
   same batches), peak GPU memory, eval throughput; fp32 and AMP.
4. ``ddp``: with two or more GPUs, the DeNS demo config through ``fairchem --num-gpus 2``.

Usage:
    python benchmarks/gpu_check.py --out gpu_check.json          # on a GPU machine
    python benchmarks/gpu_check.py --smoke --out /tmp/check.json # CPU, tiny sizes (CI test)
``--smoke`` runs every section on the CPU with the demo-sized networks, 2 steps and 2 repeats,
so the script's plumbing is tested where no GPU exists; its numbers mean nothing. On a bare GPU
image see ``benchmarks/gpu_check.sh`` (carried wheels for fairchem-core 1.10 and friends).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fairchem_dens.runs import build_trainer, data_overrides  # noqa: E402

DEMO = REPO / "configs" / "oc20" / "s2ef" / "demo"
CONFIGS = {  # family: (plain config, DeNS config, dataset)
    "eqv2": (DEMO / "eqv2_cpu.yml", DEMO / "eqv2_dens_cpu.yml", "oc20"),
    "escn": (DEMO / "escn_cpu.yml", DEMO / "escn_dens_cpu.yml", "oc20"),
    "esen": (REPO / "configs/mlearn/esen_cpu.yml", REPO / "configs/mlearn/esen_dens_cpu.yml",
             "mlearn_si"),
}
PAPER_2M = REPO / "configs/oc20/s2ef/2M/eqv2_dens_N@12_L@6_M@2_e12.yml"
OC20_DEMO_VAL_SYSTEMS = (1000100, 1000161)  # two of the bundled systems validate
# fairchem's own names for the plain network of each DeNS backbone/trainer
PLAIN_BACKBONE = {"fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone":
                  "equiformer_v2_backbone"}
PLAIN_TRAINER = "equiformerv2_forces"


# ------------------------------------------------------------------------------- data
def oc20_lmdb(out: Path) -> Path:
    """The bundled real OC20 frames as fairchem LMDBs (``fairchem-dens convert``)."""
    from fairchem_dens.data import ConversionOptions, convert, demo_data_dir

    convert(ConversionOptions(inputs=[str(demo_data_dir())], out_dir=out, overwrite=True,
                              val_systems=OC20_DEMO_VAL_SYSTEMS), log=lambda *a: None)
    return out


def mlearn_si_lmdb(out: Path, given: Path | None) -> Path:
    """mlearn Si with stress: ``given`` (a converted directory carried to a bare machine) or
    converted from the shared data beside the checkout."""
    if given is not None:
        return given
    from benchmarks.datasets import mlearn

    return mlearn("Si", cache=out, stress=True).lmdb_dir


def load(config_path: Path, lmdb_dir: Path, run_dir: Path, first_n: int | None,
         device_workers: int, batch_size: int | None = None) -> dict:
    """``config_path`` resolved by fairchem's loader, pointed at ``lmdb_dir`` (the same
    overrides as the CLI's ``--dataset...`` flags), with the data loader settings of this run."""
    from fairchem.core.common.utils import create_dict_from_args, load_config, merge_dicts

    config, _, _ = load_config(str(config_path))
    config, _ = merge_dicts(config, create_dict_from_args(data_overrides(lmdb_dir, config_path)))
    if first_n is not None:
        config["dataset"]["train"]["first_n"] = first_n
        config["dataset"]["val"]["first_n"] = first_n
    config["optim"]["num_workers"] = device_workers
    # a handful of steps per epoch: warm up over one epoch (fairchem's cosine schedule divides
    # by int(warmup_epochs * steps_per_epoch))
    config["optim"].setdefault("scheduler_params", {})["warmup_epochs"] = 1
    if batch_size is not None:
        config["optim"]["batch_size"] = config["optim"]["eval_batch_size"] = batch_size
    config["logger"] = "tensorboard"
    run_dir.mkdir(parents=True, exist_ok=True)
    config["run_dir"] = str(run_dir)
    return config


def plain_twin(dens_config: dict) -> dict:
    """The same network and data under fairchem's plain trainer: fairchem's backbone, no
    noise head, no ``optim.dens``."""
    config = copy.deepcopy(dens_config)
    backbone = config["model"]["backbone"]
    backbone["model"] = PLAIN_BACKBONE[backbone["model"]]
    config["model"]["heads"].pop("noise")
    config["optim"].pop("dens")
    config["trainer"] = PLAIN_TRAINER
    return config


# ---------------------------------------------------------------------------- helpers
def cycle(loader) -> Iterator:
    while True:
        yield from loader


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, amp: bool):
    """fairchem's ``--amp``: fp16 autocast on CUDA (with its GradScaler); bf16 on the CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=amp)


def train_step(trainer, batch, amp: bool) -> tuple[torch.Tensor, dict]:
    """One step of fairchem's ``OCPTrainer.train`` loop body (forward, loss, metrics, scaled
    backward with clipping, optimiser and EMA updates). Returns the unscaled loss and the
    model's outputs (detached)."""
    with autocast(trainer.device, amp):
        out = trainer._forward(batch)
        loss = trainer._compute_loss(out, batch)
    trainer.metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})
    trainer._backward(trainer.scaler.scale(loss) if trainer.scaler else loss)
    return loss.detach(), {k: v.detach() for k, v in out.items() if torch.is_tensor(v)}


def nonfinite(out: dict) -> dict[str, int]:
    """Non-finite entries per output: fairchem's loss zeroes them with only a log warning
    ("Found nans while computing loss"), so a finite loss alone proves nothing."""
    return {k: int((~torch.isfinite(v)).sum()) for k, v in out.items()}


def count_syncs(device: torch.device, fn: Callable[[], object]) -> int | None:
    """Synchronising CUDA calls ``fn`` makes (``torch.cuda.set_sync_debug_mode('warn')``);
    None on the CPU, where nothing synchronises."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def finite_parameters(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --------------------------------------------------------------------------- sections
def eval_equal(family: str, ctx: dict) -> dict:
    """DeNS model with the plain model's weights: the same eval outputs."""
    plain_path, dens_path, data = CONFIGS[family]
    run = ctx["tmp"] / f"eval_{family}"
    plain = build_trainer(load(plain_path, ctx[data], run / "plain", 8, 0), cpu=ctx["cpu"])
    dens = build_trainer(load(dens_path, ctx[data], run / "dens", 8, 0), cpu=ctx["cpu"])
    result = dens._unwrapped_model.load_state_dict(plain._unwrapped_model.state_dict(),
                                                   strict=False)
    assert not result.unexpected_keys, result.unexpected_keys[:5]
    assert all("force_encoding" in k or "noise" in k for k in result.missing_keys), \
        result.missing_keys[:5]
    outputs = {}
    for name, trainer in (("plain", plain), ("plain_again", plain), ("dens", dens)):
        trainer.model.eval()
        outs = []
        for batch in plain.val_loader:
            torch.manual_seed(0)  # EquiformerV2/eSCN draw random edge roll angles
            out = trainer._forward(batch.to(trainer.device))
            outs.append({k: v.detach().double().cpu() for k, v in out.items()})
        outputs[name] = outs

    def max_diff(a: str, b: str) -> dict[str, float]:
        return {k: max(float((x[k] - y[k]).abs().max()) for x, y in
                       zip(outputs[a], outputs[b])) for k in outputs[a][0]}

    return {"dens_vs_plain": max_diff("dens", "plain"),
            "plain_vs_plain_again": max_diff("plain_again", "plain"),
            "frames": sum(len(o["energy"]) for o in outputs["plain"])}


def train(family: str, ctx: dict) -> dict:
    """Finite DeNS steps, fp32 and AMP, and host syncs per step (DeNS vs plain)."""
    plain_path, dens_path, data = CONFIGS[family]
    run = ctx["tmp"] / f"train_{family}"
    result: dict = {}
    for amp in (False, True):
        tag = "amp" if amp else "fp32"
        trainer = build_trainer(load(dens_path, ctx[data], run / tag, 16, 0), seed=0,
                                cpu=ctx["cpu"], amp=amp)
        batches = cycle(trainer.train_loader)
        losses, bad = [], {}
        for _ in range(ctx["steps"]):
            loss, out = train_step(trainer, next(batches), amp)
            losses.append(float(loss))
            for key, count in nonfinite(out).items():
                bad[key] = bad.get(key, 0) + count
        result[tag] = {"losses": losses, "finite_losses": all(map(math.isfinite, losses)),
                       "nonfinite_outputs": bad,
                       "finite_parameters": finite_parameters(trainer.model),
                       "grad_scale": float(trainer.scaler.get_scale()) if trainer.scaler
                       else None}
        # plain fairchem on one batch of the same data (its non-finite outputs, if any, are
        # fairchem's), and, in fp32, the syncs of one more step each, DeNS vs plain
        batch = next(batches)
        plain = build_trainer(load(plain_path, ctx[data], run / f"plain_{tag}", 16, 0),
                              cpu=ctx["cpu"], amp=amp)
        _, out = train_step(plain, copy.deepcopy(batch), amp)  # also the syncs' warm-up
        result[tag]["plain_nonfinite_outputs"] = nonfinite(out)
        if not amp:
            result["syncs_per_step"] = {  # 3 steps each: a DeNS step corrupts at random
                name: [count_syncs(trainer.device,
                                   lambda t=t, b=batch: train_step(t, copy.deepcopy(b), False))
                       for _ in range(3)] for name, t in (("plain", plain), ("dens", trainer))}
    return result


def cost(ctx: dict) -> dict:
    """The paper's 2M EquiformerV2, DeNS vs plain: step time, peak memory, eval throughput."""
    if ctx["cpu"]:  # smoke: the plumbing at the demo network's size
        dens_path, first_n = DEMO / "eqv2_dens_cpu.yml", 8
    else:
        dens_path, first_n = PAPER_2M, None
    device_workers = 0 if ctx["cpu"] else 4
    dens_cfg = load(dens_path, ctx["oc20"], ctx["tmp"] / "cost" / "dens", first_n,
                    device_workers)
    plain_cfg = plain_twin(dens_cfg)
    plain_cfg["run_dir"] = str(ctx["tmp"] / "cost" / "plain")
    out: dict = {"config": str(dens_path.relative_to(REPO)),
                 "batch_size": dens_cfg["optim"]["batch_size"]}
    for amp in (False, True):
        tag = "amp" if amp else "fp32"
        trainers = {name: build_trainer(cfg, seed=0, cpu=ctx["cpu"], amp=amp)
                    for name, cfg in (("plain", plain_cfg), ("dens", dens_cfg))}
        trainers["dens"]._unwrapped_model.load_state_dict(
            trainers["plain"]._unwrapped_model.state_dict(), strict=False)
        out["parameters"] = {n: sum(p.numel() for p in t.model.parameters())
                             for n, t in trainers.items()}
        batches = [b for b, _ in zip(cycle(trainers["plain"].train_loader),
                                     range(ctx["repeats"] + 2))]
        device = trainers["plain"].device
        peak, times = {}, {n: [] for n in trainers}
        for name, trainer in trainers.items():  # warm-up + peak memory of a training step
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            for batch in batches[:2]:
                train_step(trainer, copy.deepcopy(batch), amp)
            synchronize(device)
            peak[name] = (torch.cuda.max_memory_allocated(device) / 2**20
                          if device.type == "cuda" else None)
        for r, batch in enumerate(batches[2:]):  # interleaved, rotated order, same batches
            names = list(trainers)[r % 2:] + list(trainers)[:r % 2]
            for name in names:
                synchronize(device)
                start = time.perf_counter()
                train_step(trainers[name], copy.deepcopy(batch), amp)
                synchronize(device)
                times[name].append(time.perf_counter() - start)
        throughput = {}
        for name, trainer in trainers.items():
            trainer.model.eval()
            frames, start = 0, time.perf_counter()
            with torch.no_grad(), autocast(device, amp):
                for batch in batches:
                    trainer._forward(copy.deepcopy(batch))
                    frames += len(batch.natoms)
            synchronize(device)
            throughput[name] = frames / (time.perf_counter() - start)
        ratios = [d / p for d, p in zip(times["dens"], times["plain"])]
        out[tag] = {"step_seconds_median": {n: statistics.median(v) for n, v in times.items()},
                    "step_time_ratio_median": statistics.median(ratios),
                    "step_time_ratios": ratios,
                    "peak_memory_mib": peak,
                    "peak_memory_ratio": (peak["dens"] / peak["plain"] if peak["plain"]
                                          else None),
                    "eval_frames_per_second": throughput,
                    "atoms_per_batch": [int(b.natoms.sum()) for b in batches[2:]]}
        del trainers
    return out


def ddp(ctx: dict) -> dict:
    """Two ranks through the stock CLI (``--num-gpus 2``) on the DeNS demo config."""
    gpus = torch.cuda.device_count()
    if ctx["cpu"] or gpus < 2:
        return {"skipped": f"{gpus} GPU(s) visible" if not ctx["cpu"] else "smoke (CPU)"}
    run = ctx["tmp"] / "ddp"
    run.mkdir()
    cmd = [sys.executable, "-c", "from fairchem.core._cli import main; main()",
           "--mode", "train", "--config-yml", str(DEMO / "eqv2_dens_cpu.yml"),
           "--num-gpus", "2", "--run-dir", str(run), "--identifier", "ddp",
           *data_overrides(ctx["oc20"]), "--dataset.train.first_n=32",
           "--optim.max_epochs=1", "--optim.num_workers=0", "--print_every=1"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=run)
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - start,
            "log_tail": (proc.stdout + proc.stderr)[-3000:]}


# ------------------------------------------------------------------------------- main
def environment() -> dict:
    import fairchem.core

    env = {"torch": torch.__version__, "fairchem_core": getattr(fairchem.core, "__version__", "?"),
           "cuda_available": torch.cuda.is_available(),
           "gpus": torch.cuda.device_count(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    for module in ("torch_scatter", "wandb"):
        env[module] = getattr(sys.modules.get(module), "__file__", None)
    return env


def run_section(report: dict, name: str, fn: Callable[[], object], out: Path | None) -> None:
    """Run one section; a failure is recorded (with its traceback) and the next section runs."""
    start = time.perf_counter()
    try:
        report[name] = fn()
    except Exception:  # a check that fails is a result to report
        report[name] = {"error": traceback.format_exc()[-2500:]}
    report.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
    print(f"== {name} ({report['seconds'][name]} s)\n{json.dumps(report[name], indent=1)}",
          flush=True)
    if out is not None:
        out.write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, demo-sized networks, 2 steps: tests the script, no numbers")
    parser.add_argument("--out", type=Path, default=None, help="report (JSON)")
    parser.add_argument("--mlearn-lmdb", type=Path, default=None,
                        help="converted mlearn Si (stress) directory; default: convert "
                             "../shared/data/mlearn/Si")
    parser.add_argument("--steps", type=int, default=None, help="DeNS steps per family and "
                        "precision (default 20; smoke 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per model in "
                        "the cost section (default 20; smoke 2)")
    parser.add_argument("--sections", default="eval_equal,train,cost,ddp")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke for the CPU check")
    from fairchem.core.common.utils import setup_imports

    setup_imports()
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = {"cpu": args.smoke, "tmp": tmp, "steps": args.steps or (2 if args.smoke else 20),
           "repeats": args.repeats or (2 if args.smoke else 20)}
    ctx["oc20"] = oc20_lmdb(tmp / "oc20")
    ctx["mlearn_si"] = mlearn_si_lmdb(tmp / "mlearn", args.mlearn_lmdb)
    report: dict = {"environment": environment(), "smoke": args.smoke}
    print(json.dumps(report["environment"]), flush=True)
    sections = args.sections.split(",")
    for family in CONFIGS:
        if "eval_equal" in sections:
            run_section(report, f"eval_equal/{family}", lambda f=family: eval_equal(f, ctx),
                        args.out)
        if "train" in sections:
            run_section(report, f"train/{family}", lambda f=family: train(f, ctx), args.out)
    if "cost" in sections:
        run_section(report, "cost", lambda: cost(ctx), args.out)
    if "ddp" in sections:
        run_section(report, "ddp", lambda: ddp(ctx), args.out)
    return report


if __name__ == "__main__":
    main()
