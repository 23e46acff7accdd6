"""eSEN (direct and conservative) under the DeNS trainer on real OC20 batches: the exact loss of
a mixed step, the design of docs/esen.md (energy of the original structure, forces of free
uncorrupted atoms only — for the conservative model the gradient of the encoded energy — and
the noise of corrupted atoms), and gradients reaching the force encoding."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import TINY_ESEN, TINY_ESEN_CONSERVATIVE, build_trainer, demo_config
from tests.integration.test_trainer import dens_loss, energy_loss, mixed_step, per_term_loss

DENS = {"prob": 0.5, "corrupt_ratio": 0.5, "std": 0.1, "coefficient": 10}
NOISE_HEAD = {"module": "fairchem_dens.models.esen.DeNSeSENNoiseHead"}
VARIANTS = {
    "direct": (TINY_ESEN, {"energy": {"module": "esen_mlp_energy_head"},
                           "forces": {"module": "esen_linear_force_head"}}),
    # the demo data's outputs are energy + forces: no stress term (see docs/esen.md)
    "conservative": ({**TINY_ESEN_CONSERVATIVE, "regress_stress": False},
                     {"efs": {"module": "esen_mlp_efs_head"}}),
}


def esen_trainer(demo_lmdb, tmp_path, variant: str, dens: dict):
    config = demo_config(demo_lmdb, dens, tmp_path, first_n=16)
    backbone, heads = VARIANTS[variant]
    config["model"] = {
        "name": "hydra", "pass_through_head_outputs": True,
        "backbone": {"model": "fairchem_dens.models.esen.DeNSeSENBackbone", **backbone},
        "heads": {**heads, "noise": NOISE_HEAD},
    }
    return build_trainer(config)


@pytest.fixture(params=list(VARIANTS))
def trainer(request, demo_lmdb, tmp_path):
    return esen_trainer(demo_lmdb, tmp_path, request.param, DENS)


def test_esen_dens_loss_is_energy_plus_uncorrupted_forces_plus_denoising(trainer) -> None:
    batch, out, c = mixed_step(trainer)
    loss = trainer._compute_loss(out, batch)
    expected, _, l_forces, l_dens = per_term_loss(trainer, batch, out, c)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0), (loss.item(), expected.item())
    assert l_dens > 0 and l_forces > 0

    loss.backward()
    model = trainer._unwrapped_model
    assert model.backbone.force_encoding.linear.weight.grad.abs().sum() > 0
    assert model.output_heads["noise"].linear.weight.grad.abs().sum() > 0


def test_conservative_esen_with_every_free_atom_corrupted_trains_energy_and_noise_only(
    demo_lmdb, tmp_path
) -> None:
    """corrupt_ratio 1 (every free atom corrupted, the OMat24/eSEN style): no atom is left for
    the forces term, so a corrupted structure contributes its original energy and the noise."""
    dens = {"prob": 1.0, "corrupt_ratio": 1.0, "std": 0.1, "coefficient": 10}
    trainer = esen_trainer(demo_lmdb, tmp_path, "conservative", dens)
    batch = next(iter(trainer.train_loader))
    trainer.model.train()
    trainer.step = 1
    b = copy.copy(batch)
    out = trainer._forward(b)
    c = trainer._dens_step
    assert c.num_free_uncorrupted == 0 and torch.equal(c.mask, b.fixed == 0)
    loss = trainer._compute_loss(out, b)
    expected = 2 * energy_loss(trainer, b, out) + 10 * dens_loss(out, c)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    assert torch.isfinite(loss)
