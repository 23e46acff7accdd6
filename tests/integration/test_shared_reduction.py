"""``reduction: shared_free_atoms`` on a real OC20 batch with partial corruption: the loss equals
the authors' OC20/OC22 trainer formula computed by hand, term by term (their
``compute_atomwise_denoising_pos_and_force_hybrid_loss``: a hybrid force/noise vector, per-atom
L2 errors weighted lambda_F / lambda_DeNS, mean over the free atoms of the batch; multi-scale
noise targets eps/std_high)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fairchem_dens.config import DeNSConfigError
from fairchem_dens.trainer import NOISE_PRED_KEY
from tests.conftest import build_trainer, demo_config
from tests.integration.test_trainer import energy_loss, mixed_step

SHARED = {"prob": 0.5, "corrupt_ratio": 0.5, "std_high": 0.5, "std_low": 0.01, "num_steps": 5,
          "coefficient": 10, "reduction": "shared_free_atoms"}


@pytest.fixture(params=["eqv2", "escn"])
def trainer(request, demo_lmdb, tmp_path):
    return build_trainer(demo_config(demo_lmdb, SHARED, tmp_path, first_n=16,
                                     model=request.param))


def partial_step(trainer):
    """A training forward with corrupted atoms, free uncorrupted atoms and fixed atoms; returns
    the batch, the outputs and the positions the model saw."""
    batch = next(iter(trainer.train_loader))
    assert (batch.fixed == 1).any(), "the OC20 slabs must have fixed atoms"
    seen = []
    trainer._unwrapped_model.register_forward_pre_hook(lambda m, args: seen.append(args[0].pos))
    b, out, _ = mixed_step(trainer, needs_plain_structure=False)
    return b, out, seen[-1]


def test_loss_is_the_authors_hybrid_formula_over_free_atoms(trainer) -> None:
    batch, out, noisy_pos = partial_step(trainer)
    loss = trainer._compute_loss(out, batch)

    # energy: fairchem's term, unchanged (lambda_E 2, mae over structures)
    l_energy = 2 * energy_loss(trainer, batch, out)

    # the authors' forces branch, written out
    noise_mask = (noisy_pos != batch.pos).any(dim=-1).view(-1, 1)  # atoms that moved
    noise_vec = noisy_pos - batch.pos
    denoising_target = noise_vec / 0.5  # multi-scale: eps / std_high
    force_target = trainer.normalizers["forces"].norm(batch.forces)
    target = denoising_target * noise_mask + force_target * ~noise_mask
    pred = out[NOISE_PRED_KEY] * noise_mask + out["forces"] * ~noise_mask
    per_atom = torch.norm(pred - target, p=2, dim=-1, keepdim=True)
    mult = torch.where(noise_mask, torch.tensor(10.0), torch.tensor(100.0))  # lambda_DeNS, lambda_F
    free = batch.fixed == 0
    hybrid = (per_atom * mult)[free].mean()

    expected = l_energy + hybrid
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0), (loss.item(), expected.item())
    # term by term: the denominator is the free-atom count, not each term's own count
    n_free, n_noisy = int(free.sum()), int(noise_mask.sum())
    assert 0 < n_noisy < n_free
    forces_sum = (100 * per_atom[free & ~noise_mask.view(-1)]).sum()
    noise_sum = (10 * per_atom[noise_mask.view(-1)]).sum()
    assert torch.allclose(hybrid, (forces_sum + noise_sum) / n_free, rtol=1e-6)
    per_term = forces_sum / (n_free - n_noisy) + noise_sum / n_noisy
    assert abs((l_energy + per_term - loss).item()) > 1e-3 * loss.item()


def test_without_corruption_it_is_fairchem_s_forces_loss(trainer) -> None:
    """A plain step (no corrupted atom): lambda_F x mean L2 error over free atoms, i.e. exactly
    fairchem's own l2mae forces term."""
    batch = next(iter(trainer.train_loader))
    trainer.model.train()
    trainer.dens = dataclasses.replace(trainer.dens, prob=0.0)
    out = trainer._forward(batch)
    assert trainer._training_step and trainer._dens_step is None
    shared = trainer._compute_loss(out, batch)
    plain = super(type(trainer), trainer)._compute_loss(out, batch)
    assert torch.allclose(shared, plain, rtol=1e-6)


def test_shared_reduction_refuses_a_non_l2mae_forces_loss(demo_lmdb, tmp_path) -> None:
    config = demo_config(demo_lmdb, SHARED, tmp_path, first_n=8)
    config["loss_functions"][1]["forces"]["fn"] = "mae"
    with pytest.raises(DeNSConfigError, match="loss_functions.forces.fn: l2mae"):
        build_trainer(config)
