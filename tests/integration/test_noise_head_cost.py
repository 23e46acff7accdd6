"""A DeNS training step with the noise head restricted to corrupted atoms (the default) gives
the loss and gradients of the step with the full head (``restrict_to_corrupted: false``)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_trainer, demo_config
from tests.integration.test_trainer import DENS, mixed_step


@pytest.mark.parametrize("model", ["eqv2", "escn"])
def test_training_step_loss_and_gradients_equal_the_full_head(model, demo_lmdb,
                                                               tmp_path) -> None:
    losses, grads = [], []
    for restrict in (True, False):
        config = demo_config(demo_lmdb, DENS, tmp_path / str(restrict), first_n=16, model=model)
        config["model"]["heads"]["noise"]["restrict_to_corrupted"] = restrict
        trainer = build_trainer(config)
        assert trainer._unwrapped_model.output_heads["noise"].restrict_to_corrupted is restrict
        batch, out, step = mixed_step(trainer)
        loss = trainer._compute_loss(out, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in trainer._unwrapped_model.named_parameters()})
    assert step.num_corrupted < len(step.mask)  # some atoms were left out of the head
    # same float32 arithmetic per corrupted atom; only kernel blocking and the order of the
    # per-edge/per-atom sums may differ (rounding): gradients agree to 1e-4 of each parameter's
    # largest gradient entry (measured: up to 2.7e-5 of it, eSCN, after the encoder's U(+-0.001)
    # init made some entries tiny; a wrong edge/atom subset gives O(1) differences)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    for name, grad in grads[1].items():
        if grad is None:
            assert grads[0][name] is None, name
        else:
            torch.testing.assert_close(grads[0][name], grad, rtol=1e-4,
                                       atol=1e-4 * grad.abs().max().item() + 1e-12)
