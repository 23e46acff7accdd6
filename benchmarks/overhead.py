"""Cost of DeNS, measured side by side in one run (interleaved, same weights, same batches).

Three models hold the same weights: ``plain`` (fairchem's EquiformerV2/eSCN), ``dens``
(fairchem-dens) and, for EquiformerV2, ``port`` (fairchem 1.10's built-in DeNS EquiformerV2,
``equiformer_v2_dens_backbone`` + ``eqV2_DeNS_*`` heads).

* eval: forward passes in eval mode (no corruption; our force encoding and noise head are
  skipped, the port still runs its force embedding and denoising block) — target >= 0.99x plain
  throughput;
* train: forward + backward of a training step on the same batches, DeNS models on the
  corrupted copy (same corruption for both) — target <= 5 % overhead;
* memory: bytes autograd saves for backward in one training forward (activation memory; on the
  CPU there is no allocator peak to read).

Every repeat times all models in rotated order, plus ``plain`` a second time (A/A control: the
noise floor of a ratio). Prints the median and interquartile range of the per-repeat ratios.

Usage (repo root, cached env):  python benchmarks/overhead.py [--model eqv2|escn] [--repeats 15]
Data: the bundled real OC20 frames (converted on the fly)."""

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


def build_models(model: str, num_layers: int | None = None
                 ) -> tuple[dict[str, torch.nn.Module], dict]:
    """Models holding the same weights: ``dens`` (ours), ``plain`` (fairchem's own) and, for
    EquiformerV2, ``port`` (fairchem 1.10's built-in DeNS EquiformerV2: backbone
    ``equiformer_v2_dens_backbone``, heads ``eqV2_DeNS_scalar_head``/``eqV2_DeNS_vector_head``).
    Each model's DeNS-only modules keep their fresh initialisation."""
    from fairchem.core.common.utils import load_config, setup_imports
    from fairchem.core.models.base import HydraModel

    setup_imports()
    dens_cfg, _, _ = load_config(str(REPO / f"configs/oc20/s2ef/demo/{model}_dens_cpu.yml"))
    plain_cfg, _, _ = load_config(str(REPO / f"configs/oc20/s2ef/demo/{model}_cpu.yml"))
    if num_layers is not None:  # deeper backbones: the fixed cost of the DeNS parts shrinks
        for cfg in (dens_cfg, plain_cfg):
            cfg["model"]["backbone"]["num_layers"] = num_layers
    cfgs = {"dens": dens_cfg["model"], "plain": plain_cfg["model"]}
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
    plain_state = models["plain"].state_dict()
    # the port names its head blocks scalar_block/vector_block (fairchem: energy/force_block)
    port_names = {".energy_block.": ".scalar_block.", ".force_block.": ".vector_block."}
    for name, m in models.items():
        state = plain_state
        if name == "port":
            state = {}
            for key, value in plain_state.items():
                for old, new in port_names.items():
                    key = key.replace(old, new)
                state[key] = value
        result = m.load_state_dict(state, strict=False)
        new = {"dens": ("force_encoding", "noise"), "port": ("force_embedding",
                                                           "denoising_pos_block")}.get(name, ())
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
    parser.add_argument("--num-layers", type=int, default=None,
                        help="backbone blocks (default: the demo config's 2)")
    args = parser.parse_args()

    from fairchem_dens.config import DeNSConfig
    from fairchem_dens.corruption import (
        DENS_FORCES_KEY,
        DENS_MASK_KEY,
        sample_corruption,
        step_generator,
    )

    batches = load_batches(args.batches, args.batch_size)
    models, cfg = build_models(args.model, args.num_layers)
    dens_cfg = DeNSConfig.from_optim(cfg["optim"])
    corruptions = [sample_corruption(dens_cfg, b.natoms, b.fixed, step_generator(0, i))
                   for i, b in enumerate(batches)]

    def train_input(name: str, i: int):
        """The batch a training step of ``name`` feeds its model (corrupted for DeNS)."""
        b, c = batches[i], corruptions[i]
        x = copy.copy(b)
        if name in ("dens", "port"):
            x.pos = b.pos + c.noise
        if name == "dens":
            x[DENS_MASK_KEY], x[DENS_FORCES_KEY] = c.mask, b.forces
        elif name == "port":  # the attributes fairchem's DeNS trainer sets
            x.denoising_pos_forward, x.noise_mask = True, c.mask
        return x

    def step_loss(name: str, i: int) -> torch.Tensor:
        out = models[name](train_input(name, i))
        loss = out["energy"].sum() + out["forces"].sum()
        return loss + out["noise"].sum() if "noise" in out else loss

    def eval_pass(name: str) -> None:
        with torch.no_grad():
            for b in batches:
                models[name](copy.copy(b))

    def train_pass(name: str) -> None:
        for i in range(len(batches)):
            step_loss(name, i).backward()

    timed_names = [*models, "plain_again"]  # A/A control: plain timed twice = noise floor
    results = {}
    for phase in args.phases.split(","):
        for m in models.values():
            m.train(phase == "train")
        times: dict[str, list[float]] = {n: [] for n in timed_names}
        for r in range(args.repeats + 1):  # first repeat is warm-up
            order = timed_names[r % len(timed_names):] + timed_names[: r % len(timed_names)]
            for name in order:
                model_name = "plain" if name == "plain_again" else name
                torch.manual_seed(r)  # EquiformerV2 draws random edge roll angles
                fn = eval_pass if phase == "eval" else train_pass
                t = timed(lambda n=model_name, fn=fn: fn(n))
                if r:
                    times[name].append(t)
        ratios = {n: [a / b for a, b in zip(times[n], times["plain"])] for n in timed_names
                  if n != "plain"}
        results[phase] = {n: (statistics.median(v), *statistics.quantiles(v, n=4)[::2])
                          for n, v in ratios.items()}
        results[phase]["seconds"] = {n: statistics.median(v) for n, v in times.items()}

    memory = {}
    for name, m in models.items():
        m.train()
        torch.manual_seed(0)
        holder = {}
        memory[name] = saved_activation_bytes(lambda n=name, holder=holder: holder.setdefault("l", step_loss(n, 0)))
        holder["l"].backward()

    n_frames = args.batches * args.batch_size
    layers = models["plain"].backbone.num_layers
    print(f"\nmodel {args.model} ({layers} blocks), {n_frames} real OC20 frames per pass, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads; ratios are time(model)/time(plain) per repeat")
    for phase, res in results.items():
        secs = res.pop("seconds")
        print(f"{phase}: seconds per pass (median) " +
              ", ".join(f"{n} {t:.3f}" for n, t in secs.items()))
        for name, (med, q1, q3) in res.items():
            label = {"dens": "fairchem-dens DeNS", "port": "fairchem 1.10 built-in DeNS port",
                     "plain_again": "A/A control (plain again)"}[name]
            extra = f" -> throughput {1 / med:.3f}x plain" if phase == "eval" else ""
            print(f"  {label:34s} ratio median {med:.3f} (IQR {q1:.3f}-{q3:.3f}){extra}")
    print("train-step activation memory (bytes saved for backward, batch 0): " + ", ".join(
        f"{n} {b / 2**20:.1f} MiB ({b / memory['plain']:.3f}x plain)" for n, b in memory.items()))


if __name__ == "__main__":
    main()
