"""The noise head computed only for corrupted atoms equals the stock (full) head there: outputs
and every parameter's gradient, on real OC20 batches, with and without activation
checkpointing, for every backbone family.

Tolerance: both heads do the same float32 arithmetic per corrupted atom, in the same order of
summation (edges keep their order), but the dense kernels (matmul, bmm) see fewer rows and may
block and vectorise their dot products differently, so results agree to float32 rounding, not
bit for bit. rtol 1e-5 is ~100 float32 ulps; atol 1e-7 covers entries near zero (outputs are
of order 1e-3 to 1). Gradients are sums over all atoms and edges of the backbone, hence an atol
scaled to each gradient's largest entry. Measured on these batches: outputs equal to 1.5e-8
(EquiformerV2) or bitwise (eSCN), gradients to 1.5e-6 of each gradient's largest entry."""

from __future__ import annotations

import pytest
import torch
from fairchem.core.models.base import HydraModel

from tests.conftest import atoms_to_batch, demo_frames
from tests.unit.test_dens_models import FAMILIES, Family, run, with_dens_fields

# bitwise comparisons of gradient forces need one intra-op thread (see tests/conftest.py)
pytestmark = pytest.mark.usefixtures("_single_thread")

RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(params=FAMILIES, ids=str)
def family(request) -> Family:
    return request.param


@pytest.fixture(scope="module")
def three_structures():
    """Three real OC20 frames (different systems, slabs with fixed atoms), collated."""
    return atoms_to_batch(demo_frames(max_systems=3))


def masks(batch) -> dict[str, torch.Tensor]:
    """``mixed``: first structure untouched, second every third free atom, third all free atoms;
    ``single``: one corrupted atom (the last free atom) in the whole batch."""
    free = batch.fixed == 0
    structure = batch.batch
    index = torch.arange(len(free))
    mixed = free & ((structure == 2) | ((structure == 1) & (index % 3 == 0)))
    single = torch.zeros_like(free)
    single[int(free.nonzero()[-1])] = True
    return {"mixed": mixed, "single": single}


def models(family: Family, **backbone) -> tuple[HydraModel, HydraModel]:
    """The restricted (default) and the full noise head on the same weights."""
    built = []
    for restrict in (True, False):
        torch.manual_seed(0)
        heads = {**family.heads, "denoise": {"module": family.noise_head,
                                             "restrict_to_corrupted": restrict}}
        built.append(HydraModel(backbone={"model": family.dens_backbone, **family.kwargs,
                                          **backbone},
                                heads=heads, pass_through_head_outputs=True).train())
    restricted, full = built
    full.load_state_dict(restricted.state_dict())  # same keys: strict load
    return restricted, full


def train_loss(out: dict, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A training loss that reads the noise prediction on corrupted atoms only (the trainer's
    contract), with weights so every output component matters."""
    return (out["energy"].sum() + (out["forces"] * weights).sum()
            + (out["noise"][mask] * weights[mask]).pow(2).sum())


@pytest.mark.parametrize("case", ["mixed", "single"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpoint"])
def test_restricted_noise_head_equals_the_full_head(family, three_structures, case,
                                                    checkpointing) -> None:
    mask = masks(three_structures)[case]
    batch = with_dens_fields(three_structures, mask)
    restricted, full = models(family, **{family.checkpoint_kwarg: checkpointing})
    assert restricted.output_heads["denoise"].restrict_to_corrupted
    weights = torch.randn(len(mask), 3, generator=torch.Generator().manual_seed(0))
    outs, grads = [], []
    for model in (restricted, full):
        out = run(model, batch)
        train_loss(out, mask, weights).backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters()})

    (ours, ref), n = outs, len(mask)
    assert ours["noise"].shape == ref["noise"].shape == (n, 3)
    assert torch.equal(ours["energy"], ref["energy"]) and torch.equal(ours["forces"], ref["forces"])
    assert ref["noise"][mask].abs().min() > 0  # a real prediction, not zeros on both sides
    torch.testing.assert_close(ours["noise"][mask], ref["noise"][mask], rtol=RTOL, atol=ATOL)
    assert torch.equal(ours["noise"][~mask], torch.zeros(n - int(mask.sum()), 3))

    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[1].items():
        if grad is None:
            assert grads[0][name] is None, name
            continue
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-4, atol=1e-4 * scale + 1e-9,
                                   msg=lambda m, name=name: f"{name}: {m}")
    noise_grads = [g for k, g in grads[0].items() if k.startswith("output_heads.denoise.")]
    assert noise_grads and all(g is not None for g in noise_grads)


def test_only_edges_into_corrupted_atoms_are_computed(three_structures) -> None:
    """EquiformerV2: the attention block sees exactly the edges whose target is corrupted,
    in their original order, with matching Wigner-D rows."""
    family = FAMILIES[0]
    mask = masks(three_structures)["mixed"]
    restricted, full = models(family)
    seen = {}
    for name, model in (("restricted", restricted), ("full", full)):
        block = model.output_heads["denoise"].force_block
        block.register_forward_hook(
            lambda module, args, output, name=name: seen.update(
                {name: (args[3], args[2], module.SO3_rotation[0].wigner)}))
        run(model, with_dens_fields(three_structures, mask))
    (edges, dist, wigner), (all_edges, all_dist, all_wigner) = seen["restricted"], seen["full"]
    into = mask[all_edges[1]]
    assert 0 < edges.shape[1] < all_edges.shape[1]
    assert torch.equal(edges, all_edges[:, into])
    assert torch.equal(dist, all_dist[into]) and torch.equal(wigner, all_wigner[into])


def test_escn_force_block_runs_on_corrupted_atoms_only(three_structures) -> None:
    family = FAMILIES[1]
    mask = masks(three_structures)["single"]
    restricted, _ = models(family)
    seen = []
    restricted.output_heads["denoise"].force_block.register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape))
    run(restricted, with_dens_fields(three_structures, mask))
    assert seen == [(family.kwargs["num_sphere_samples"], 16)]  # one atom's sphere samples


def test_no_corrupted_atom_gives_zero_rows(family, three_structures) -> None:
    n = int(three_structures.natoms.sum())
    none = torch.zeros(n, dtype=torch.bool)
    restricted, _ = models(family)
    out = run(restricted, with_dens_fields(three_structures, none))
    assert torch.equal(out["noise"], torch.zeros(n, 3))
