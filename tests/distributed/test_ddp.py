"""Two gloo ranks in-process (torch.multiprocessing): the DeNS loss is normalised by the global
number of corrupted atoms, gradients average to the single-process mean, and a rank whose batch
has no corrupted atom while the other's has every free atom corrupted (no forces term left)
does not hang or desynchronise DDP."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
COUNTS = {"uneven": (3, 5), "one_empty": (0, 4)}  # corrupted atoms on rank 0, rank 1


def _init(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)


@pytest.fixture(scope="module")
def ddp_run(demo_lmdb, tmp_path_factory) -> list[dict]:
    """Both ranks' results; a hang fails the requesting test through its timeout."""
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "init"), str(demo_lmdb), str(tmp)), nprocs=WORLD)
    return [torch.load(tmp / f"out.{r}") for r in range(WORLD)]


def _all_atoms(counts: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = sum(counts)
    return torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)


SHARED_COUNTS = (7, 5)  # atoms on rank 0, rank 1 for the shared free-atom reduction


def _shared_inputs() -> tuple[torch.Tensor, ...]:
    """Forces/noise predictions and targets, free and corrupted masks of all ranks' atoms."""
    g = torch.Generator().manual_seed(1)
    n = sum(SHARED_COUNTS)
    f_pred, f_true, n_pred, n_true = (torch.randn(n, 3, generator=g) for _ in range(4))
    idx = torch.arange(n)
    free = idx % 4 != 0
    return f_pred, f_true, n_pred, n_true, free, free & (idx % 3 == 0)


def _shared_check(rank: int) -> torch.Tensor:
    from fairchem_dens.loss import shared_free_atom_loss

    lo = sum(SHARED_COUNTS[:rank])
    part = [x[lo:lo + SHARED_COUNTS[rank]] for x in _shared_inputs()]
    return shared_free_atom_loss(*part, forces_coefficient=100.0, dens_coefficient=10.0)


# structures whose stress is trained (uncorrupted), per rank: rank 1's are all corrupted
STRESS_KEPT = ((True, False, True), (False, False))


def _stress_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    n = sum(len(k) for k in STRESS_KEPT)
    return torch.randn(n, 9, generator=g), torch.randn(n, 9, generator=g)


def _stress_check(rank: int) -> torch.Tensor:
    from fairchem_dens.loss import StructureSubsetLoss, ZeroSafeDDPLoss

    lo, n = sum(len(k) for k in STRESS_KEPT[:rank]), len(STRESS_KEPT[rank])
    pred, target = (x[lo:lo + n] for x in _stress_inputs())
    loss = StructureSubsetLoss(ZeroSafeDDPLoss("mae", "mean"), torch.tensor(STRESS_KEPT[rank]))
    return loss(pred, target, natoms=torch.full((n,), 8))


def _loss_checks(rank: int) -> dict:
    from fairchem_dens.loss import ZeroSafeDDPLoss

    results = {"shared": _shared_check(rank), "stress": _stress_check(rank)}
    for case, counts in COUNTS.items():
        pred_all, target_all = _all_atoms(counts)
        lo = sum(counts[:rank])
        pred = pred_all[lo:lo + counts[rank]].clone().requires_grad_(True)
        target = target_all[lo:lo + counts[rank]]
        loss = ZeroSafeDDPLoss("l2mae", "mean")(pred, target, natoms=None)
        local_sum = (pred - target).norm(dim=-1).sum()
        loss.backward()
        # what DDP does with gradients: average them over ranks
        grad = torch.zeros_like(pred_all)
        grad[lo:lo + counts[rank]] = pred.grad
        dist.all_reduce(grad)
        grad /= WORLD
        results[case] = {"loss": loss.detach(), "local_sum": local_sum.detach(), "grad": grad}
    return results


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", sorted(COUNTS))
def test_dens_loss_is_normalised_by_the_global_count(case, ddp_run) -> None:
    counts = COUNTS[case]
    res = [r["loss_checks"][case] for r in ddp_run]
    total = sum(counts)
    for r in range(WORLD):  # per rank: local sum * world / global count
        assert torch.allclose(res[r]["loss"], res[r]["local_sum"] * WORLD / total)
    pred_all, target_all = _all_atoms(counts)
    pred_all.requires_grad_(True)
    single = (pred_all - target_all).norm(dim=-1).mean()  # one process, mean over all atoms
    single.backward()
    assert torch.allclose(sum(x["loss"] for x in res) / WORLD, single.detach())
    assert torch.allclose(res[0]["grad"], res[1]["grad"])
    assert torch.allclose(res[0]["grad"], pred_all.grad, atol=1e-7)


@pytest.mark.timeout(180)
def test_shared_free_atom_loss_divides_by_the_global_free_atom_count(ddp_run) -> None:
    from fairchem_dens.loss import shared_free_atom_loss

    f_pred, f_true, n_pred, n_true, free, corrupted = _shared_inputs()
    single = shared_free_atom_loss(f_pred, f_true, n_pred, n_true, free, corrupted, 100.0, 10.0)
    by_hand = (100 * (f_pred - f_true)[free & ~corrupted].norm(dim=-1).sum()
               + 10 * (n_pred - n_true)[corrupted].norm(dim=-1).sum()) / free.sum()
    assert torch.allclose(single, by_hand)
    # DDP averages over ranks: the mean of the ranks' losses is the single-process loss
    ranks = [r["loss_checks"]["shared"] for r in ddp_run]
    assert torch.allclose(sum(ranks) / WORLD, single)
    assert not torch.allclose(ranks[0], ranks[1])


@pytest.mark.timeout(180)
def test_stress_of_uncorrupted_structures_is_a_global_mean(ddp_run) -> None:
    """A DeNS step's stress term over two ranks, one with every structure corrupted: the mean
    of the ranks' losses is the single-process mean over the kept structures' components."""
    pred, target = _stress_inputs()
    kept = torch.tensor([k for rank in STRESS_KEPT for k in rank])
    single = (pred[kept] - target[kept]).abs().mean()
    ranks = [r["loss_checks"]["stress"] for r in ddp_run]
    assert ranks[1].item() == 0.0
    assert torch.allclose(sum(ranks) / WORLD, single)
    assert not torch.allclose(single, (pred - target).abs().mean())


def _worker(rank: int, init_file: str, lmdb: str, run_dir: str) -> None:
    """One process per rank (one spawn for both tests: starting ranks is the slow part)."""
    from fairchem.core.common.utils import setup_imports

    from tests.conftest import build_trainer, demo_config

    setup_imports()
    _init(rank, init_file)
    loss_checks = _loss_checks(rank)
    dens = {"prob": 0.5, "corrupt_ratio": 0.5, "std": 0.1, "coefficient": 10}
    config = demo_config(Path(lmdb), dens, Path(run_dir) / f"rank{rank}", first_n=16,
                         max_epochs=1, eval_every=1000)
    trainer = build_trainer(config, seed=0)
    assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
    # rank 0 corrupts every free atom of every structure (r = 1: no forces term left there),
    # rank 1 (practically, and for this seed surely) none: DeNS stays enabled on both, so both
    # take the DeNS code path every step
    trainer.dens = dataclasses.replace(trainer.dens, prob=1.0 if rank == 0 else 1e-12,
                                       corrupt_ratio=1.0 if rank == 0 else 0.5)
    corrupted, scored, losses = [], [], []
    sample, compute = trainer._sample, trainer._compute_loss

    def recording_sample(batch):
        c = sample(batch)
        corrupted.append(c.num_corrupted)
        scored.append(c.num_free_uncorrupted)
        return c

    trainer._sample = recording_sample
    trainer._compute_loss = lambda o, b: losses.append(compute(o, b)) or losses[-1]
    trainer.train(disable_eval_tqdm=True)
    params = torch.cat([p.detach().flatten() for p in trainer._unwrapped_model.parameters()])
    gathered = [torch.zeros_like(params) for _ in range(WORLD)]
    dist.all_gather(gathered, params)
    torch.save({"corrupted": corrupted, "scored": scored, "losses": [x.item() for x in losses],
                "params": gathered, "step": trainer.step,
                "loss_checks": loss_checks}, f"{run_dir}/out.{rank}")
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_rank_without_corrupted_atoms_neither_hangs_nor_desyncs(ddp_run) -> None:
    res = ddp_run
    assert res[0]["step"] == res[1]["step"] == 2  # 16 frames, 2 ranks x batch 4
    assert len(res[0]["corrupted"]) == len(res[1]["corrupted"]) == 2
    assert all(n > 0 for n in res[0]["corrupted"])
    assert all(n == 0 for n in res[1]["corrupted"])
    assert all(n == 0 for n in res[0]["scored"])  # rank 0: no free uncorrupted atom at all
    assert all(n > 0 for n in res[1]["scored"])
    for r in range(WORLD):
        assert all(torch.isfinite(torch.tensor(res[r]["losses"])))
    p0, p1 = res[0]["params"]
    assert torch.equal(p0, p1)  # both ranks hold identical parameters after 2 DDP steps
    assert torch.equal(res[1]["params"][0], p0)
