"""Cost of DeNS vs depth, measured side by side in one run (interleaved, same weights, same
batches, same corruption).

Models per backbone family and depth, all holding the plain model's weights:

* ``plain``: fairchem's EquiformerV2 / eSCN;
* ``dens``: fairchem-dens, noise head computed for corrupted atoms only (the default);
* ``dens_full``: fairchem-dens with ``restrict_to_corrupted: false`` (the noise head over every
  atom and edge, as before);
* ``port`` (EquiformerV2 only): fairchem 1.10's built-in DeNS EquiformerV2
  (``equiformer_v2_dens_backbone`` + ``eqV2_DeNS_*`` heads).

Phases:

* eval: forward passes in eval mode (no corruption; our force encoding and noise head are
  skipped, the port still runs its force embedding and denoising block) -> throughput;
* train: forward + backward on the same batches. DeNS models see the corrupted copy a trainer
  feeds them, drawn with p (``prob``), r (``corrupt_ratio``) at the OC20 paper values (0.5, 0.5)
  and at the MD17 values (0.25, 0.25); as in both trainers, a batch without corrupted atoms is
  a plain forward. ``dens_full`` and ``port`` run their noise block on every atom whatever p, r,
  so they are timed at the OC20 values only;
* memory: bytes autograd saves for backward in one training forward (activation memory; on the
  CPU there is no allocator peak to read), OC20 values.

Every repeat times all variants in rotated order, plus ``plain`` a second time (A/A control:
the noise floor of a ratio). Reports the median and interquartile range of per-repeat ratios
time(variant)/time(plain); writes every raw time to ``--out`` (JSON) and a plot of the training
overhead vs depth to ``--plot``.

Usage (repo root, cached env):
    python benchmarks/overhead.py                       # eqv2 and escn at 2, 4, 8, 12 blocks
    python benchmarks/overhead.py --families eqv2 --depths 2 --repeats 10
Data: the bundled real OC20 frames (converted on the fly)."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {"oc20": {"prob": 0.5, "corrupt_ratio": 0.5},  # paper, OC20 S2EF-2M
            "md17": {"prob": 0.25, "corrupt_ratio": 0.25}}  # paper, MD17
LABELS = {"dens@oc20": "fairchem-dens DeNS, p=r=0.5 (OC20)",
          "dens@md17": "fairchem-dens DeNS, p=r=0.25 (MD17)",
          "dens_full@oc20": "fairchem-dens, full noise head (before)",
          "port@oc20": "fairchem 1.10 built-in DeNS port",
          "dens": "fairchem-dens DeNS", "port": "fairchem 1.10 built-in DeNS port",
          "plain_again": "A/A control (plain again)"}


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


def build_models(model: str, num_layers: int | None = None
                 ) -> tuple[dict[str, torch.nn.Module], dict]:
    """Models holding the same weights: ``plain`` (fairchem's own), ``dens`` and ``dens_full``
    (ours, noise head restricted to corrupted atoms / over all atoms) and, for EquiformerV2,
    ``port`` (fairchem 1.10's built-in DeNS EquiformerV2: backbone
    ``equiformer_v2_dens_backbone``, heads ``eqV2_DeNS_scalar_head``/``eqV2_DeNS_vector_head``).
    Each model's DeNS-only modules keep their fresh initialisation."""
    from fairchem.core.common.utils import load_config, setup_imports
    from fairchem.core.models.base import HydraModel

    from fairchem_dens.models.dens import attach_dens_trainer

    setup_imports()
    dens_cfg, _, _ = load_config(str(REPO / f"configs/oc20/s2ef/demo/{model}_dens_cpu.yml"))
    plain_cfg, _, _ = load_config(str(REPO / f"configs/oc20/s2ef/demo/{model}_cpu.yml"))
    if num_layers is not None:  # deeper backbones: the fixed cost of the DeNS parts shrinks
        for cfg in (dens_cfg, plain_cfg):
            cfg["model"]["backbone"]["num_layers"] = num_layers
    full = copy.deepcopy(dens_cfg["model"])
    full["heads"]["noise"]["restrict_to_corrupted"] = False
    cfgs = {"plain": plain_cfg["model"], "dens": dens_cfg["model"], "dens_full": full}
    if model == "eqv2":
        port = copy.deepcopy(plain_cfg["model"])
        port["backbone"]["model"] = "equiformer_v2_dens_backbone"
        port["heads"] = {"energy": {"module": "eqV2_DeNS_scalar_head"},
                         "forces": {"module": "eqV2_DeNS_vector_head"}}
        cfgs["port"] = port
    models = {}
    for name, cfg in cfgs.items():
        m = copy.deepcopy(cfg)
        m.pop("name")
        torch.manual_seed(0)
        models[name] = HydraModel(**m)
        # driven like DenoisingForcesTrainer drives it (steps without corruption included)
        attach_dens_trainer(models[name])
    plain_state = models["plain"].state_dict()
    # the port names its head blocks scalar_block/vector_block (fairchem: energy/force_block)
    port_names = {".energy_block.": ".scalar_block.", ".force_block.": ".vector_block."}
    models["dens_full"].load_state_dict(models["dens"].state_dict())  # same DeNS weights too
    for name, m in models.items():
        state = plain_state
        if name == "port":
            state = {}
            for key, value in plain_state.items():
                for old, new in port_names.items():
                    key = key.replace(old, new)
                state[key] = value
        result = m.load_state_dict(state, strict=False)
        new = {"dens": ("force_encoding", "noise"), "dens_full": ("force_encoding", "noise"),
               "port": ("force_embedding", "denoising_pos_block")}.get(name, ())
        odd = [k for k in result.missing_keys if not any(t in k for t in new)]
        assert not result.unexpected_keys and not odd, (name, result.unexpected_keys[:5], odd[:5])
    return models, dens_cfg


def saved_activation_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs: the
    activation memory of a training step, a deterministic stand-in for peak memory on the CPU
    (where there is no ``torch.cuda.max_memory_allocated``)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device.index or 0)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


CLOCKS = {"wall": time.perf_counter,
          # CPU time of this process: with one thread, the time spent computing, which other
          # jobs on a shared machine inflate much less than the wall time (they add waiting)
          "cpu": time.process_time}


def timed(fn, clock=time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def summarise(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per variant: [median, q1, q3] of the per-repeat ratios to ``plain``, and the ratio of
    the fastest runs (other jobs on the machine only ever add time, so the minimum is the least
    disturbed run)."""
    out = {}
    for name, values in times.items():
        if name == "plain":
            continue
        ratios = [a / b for a, b in zip(values, times["plain"])]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        out[name] = [statistics.median(ratios), q1, q3, min(values) / min(times["plain"])]
    return out


def measure(family: str, depth: int, batches: list, repeats: int, eval_repeats: int,
            clock=time.perf_counter) -> dict:
    """Eval and train times of every variant at one depth, and training activation memory."""
    from fairchem_dens.config import DeNSConfig
    from fairchem_dens.corruption import (
        DENS_FORCES_KEY,
        DENS_MASK_KEY,
        sample_corruption,
        step_generator,
    )

    models, cfg = build_models(family, depth)
    corruptions = {}
    for setting, values in SETTINGS.items():
        dens_cfg = DeNSConfig.from_optim({**cfg["optim"],
                                          "dens": {**cfg["optim"]["dens"], **values}})
        corruptions[setting] = [sample_corruption(dens_cfg, b.natoms, b.fixed,
                                                  step_generator(0, i))
                                for i, b in enumerate(batches)]

    def train_input(name: str, setting: str, i: int):
        """The batch a training step of ``name`` feeds its model (corrupted for DeNS)."""
        b = batches[i]
        x = copy.copy(b)
        if name == "plain":
            return x
        c = corruptions[setting][i]
        if c.num_corrupted == 0:  # both trainers: a plain step
            return x
        x.pos = b.pos + c.noise
        if name == "port":  # the attributes fairchem's DeNS trainer sets
            x.denoising_pos_forward, x.noise_mask = True, c.mask
        else:
            x[DENS_MASK_KEY], x[DENS_FORCES_KEY] = c.mask, b.forces
        return x

    def step_loss(name: str, setting: str, i: int) -> torch.Tensor:
        out = models[name](train_input(name, setting, i))
        loss = out["energy"].sum() + out["forces"].sum()
        if "noise" not in out:
            return loss
        return loss + out["noise"][corruptions[setting][i].mask].sum()

    def eval_pass(name: str, setting: str) -> None:
        with torch.no_grad():
            for b in batches:
                models[name](copy.copy(b))

    def train_pass(name: str, setting: str) -> None:
        for i in range(len(batches)):
            step_loss(name, setting, i).backward()

    variants = {"eval": [("plain", "-"), ("dens", "-")] + (
                    [("port", "-")] if "port" in models else []) + [("plain", "again")],
                "train": [("plain", "-"), ("dens", "oc20"), ("dens", "md17"),
                          ("dens_full", "oc20")] + (
                    [("port", "oc20")] if "port" in models else []) + [("plain", "again")]}
    # "plain" runs ignore the setting; eval runs see no corruption
    # one training step of each variant on batch 0 (doubles as warm-up): activation memory,
    # FLOPs
    memory, flops = {}, {}
    for name, m in models.items():
        m.train()
        torch.manual_seed(0)
        holder = {}
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            memory[name] = saved_activation_bytes(
                lambda n=name, holder=holder: holder.setdefault("l", step_loss(n, "oc20", 0)))
            holder["l"].backward()
        flops[name] = sum(e.flops for e in prof.key_averages())
    result: dict = {"family": family, "depth": depth, "times": {}, "ratios": {},
                    "clock": "cpu" if clock is time.process_time else "wall",
                    "activation_bytes": memory, "train_flops": flops}
    for phase, names in variants.items():
        for m in models.values():
            m.train(phase == "train")
        keys = ["plain" if n == "plain" and s == "-" else "plain_again" if s == "again"
                else n if s == "-" else f"{n}@{s}" for n, s in names]
        times: dict[str, list[float]] = {k: [] for k in keys}
        for name, _ in names if phase == "eval" else ():  # warm-up (train: the step above)
            with torch.no_grad():
                models[name](copy.copy(batches[0]))
        for r in range(1, (eval_repeats if phase == "eval" else repeats) + 1):
            shift = r % len(names)
            for (name, setting), key in list(zip(names, keys))[shift:] + list(
                    zip(names, keys))[:shift]:
                torch.manual_seed(r)  # EquiformerV2 draws random edge roll angles
                fn = eval_pass if phase == "eval" else train_pass
                times[key].append(timed(lambda n=name, s=setting, fn=fn: fn(n, s), clock))
        result["times"][phase] = times
        result["ratios"][phase] = summarise(times)

    result["corrupted_atoms"] = {s: [c.num_corrupted for c in cs]
                                 for s, cs in corruptions.items()}
    return result


def report(res: dict, n_frames: int) -> str:
    repeats = {phase: len(t["plain"]) for phase, t in res["times"].items()}
    lines = [f"\nmodel {res['family']} ({res['depth']} blocks, {res['clock']} clock), {n_frames} "
             "real OC20 frames per "
             f"pass, repeats {repeats}, {torch.get_num_threads()} threads; corrupted atoms per "
             f"batch {res['corrupted_atoms']}; ratios are time(model)/time(plain) per repeat"]
    for phase, ratios in res["ratios"].items():
        secs = {n: statistics.median(v) for n, v in res["times"][phase].items()}
        lines.append(f"{phase}: seconds per pass (median) "
                     + ", ".join(f"{n} {t:.3f}" for n, t in secs.items()))
        for name, (med, q1, q3, fastest) in ratios.items():
            extra = f" -> throughput {1 / med:.3f}x plain" if phase == "eval" else ""
            lines.append(f"  {LABELS[name]:42s} ratio median {med:.3f} "
                         f"(IQR {q1:.3f}-{q3:.3f}), fastest runs {fastest:.3f}{extra}")
    mem = res["activation_bytes"]
    lines.append("train-step activation memory (bytes saved for backward, batch 0, OC20 p, r): "
                 + ", ".join(f"{n} {b / 2**20:.1f} MiB ({b / mem['plain']:.3f}x plain)"
                             for n, b in mem.items()))
    flops = res["train_flops"]
    lines.append("train-step FLOPs (forward + backward, batch 0, OC20 p, r; torch.profiler's count "
                 "of matmul-type ops, immune to timing noise): " + ", ".join(
                     f"{n} {f / 1e9:.2f} GFLOP ({f / flops['plain']:.3f}x plain)"
                     for n, f in flops.items()))
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r["family"] for r in results})
    fig, axes = plt.subplots(2, len(families), figsize=(5.5 * len(families), 7.5),
                             squeeze=False)
    names = {"dens@oc20": ("DeNS p=r=0.5 (OC20)", "C0"),
             "dens@md17": ("DeNS p=r=0.25 (MD17)", "C1"),
             "dens_full@oc20": ("DeNS, full noise head (before)", "C2"),
             "port@oc20": ("fairchem 1.10 port", "C3"), "plain_again": ("A/A control", "grey")}
    for ax, family in zip(axes[0], families):
        rows = sorted((r for r in results if r["family"] == family), key=lambda r: r["depth"])
        depths = [r["depth"] for r in rows]
        for key, (label, colour) in names.items():
            if key not in rows[0]["ratios"]["train"]:
                continue
            med = [r["ratios"]["train"][key][0] for r in rows]
            lo = [m - r["ratios"]["train"][key][1] for m, r in zip(med, rows)]
            hi = [r["ratios"]["train"][key][2] - m for m, r in zip(med, rows)]
            ax.errorbar(depths, med, yerr=[lo, hi], marker="o", capsize=3, label=label,
                        color=colour, linestyle=":" if key == "plain_again" else "-")
        ax.axhline(1.05, color="grey", linewidth=0.8, linestyle="--")
        ax.set(title={"eqv2": "EquiformerV2", "escn": "eSCN"}[family], xlabel="blocks",
               ylabel="training step time / plain (median, IQR)", xticks=depths)
        ax.legend(fontsize=8)
    # deterministic companions of the timings, OC20 p, r, batch 0
    for ax, family in zip(axes[1], families):
        rows = sorted((r for r in results if r["family"] == family), key=lambda r: r["depth"])
        depths = [r["depth"] for r in rows]
        for key, (label, colour) in {"dens": names["dens@oc20"],
                                     "dens_full": names["dens_full@oc20"],
                                     "port": names["port@oc20"]}.items():
            if key not in rows[0]["train_flops"]:
                continue
            for field, style, what in (("train_flops", "-", "FLOPs"),
                                       ("activation_bytes", "--", "act. memory")):
                ax.plot(depths, [r[field][key] / r[field]["plain"] for r in rows], style,
                        marker="o", color=colour, label=f"{label}, {what}")
        ax.set(xlabel="blocks", ylabel="training step / plain", xticks=depths,
               title="FLOPs (solid) and activation memory (dashed)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="eqv2,escn", help="comma-separated: eqv2,escn")
    parser.add_argument("--depths", default="2,4,8,12", help="backbone blocks, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="training repeats")
    parser.add_argument("--eval-repeats", type=int, default=6, help="eval (cheaper) repeats")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (shared machines)")
    parser.add_argument("--out", type=Path, default=None, help="raw results (JSON)")
    parser.add_argument("--plot", type=Path, default=None, help="overhead vs depth (PNG)")
    args = parser.parse_args()

    batches = load_batches(args.batches, args.batch_size)
    n_frames = args.batches * args.batch_size
    results = []
    start = time.perf_counter()
    for family in args.families.split(","):
        for depth in (int(d) for d in args.depths.split(",")):
            results.append(measure(family, depth, batches, args.repeats, args.eval_repeats,
                                   CLOCKS[args.clock]))
            print(report(results[-1], n_frames), flush=True)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "threads": torch.get_num_threads(),
                                        "results": results}, indent=1))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
