"""A DeNS training step with the noise head restricted to corrupted atoms (the default) gives
the loss and gradients of the step with the full head (``restrict_to_corrupted: false``)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_trainer, demo_config
from tests.integration.test_device_clean import cast_batch, double_model
from tests.integration.test_trainer import DENS, first_batch, mixed_step


@pytest.mark.parametrize("model", ["eqv2", "escn"])
def test_training_step_loss_and_gradients_equal_the_full_head(model, demo_lmdb,
                                                               tmp_path) -> None:
    """Both steps in float64: the same arithmetic per corrupted atom, only the order of the
    per-edge/per-atom sums may differ. (In float32 that rounding reached 2.5e-4 of the largest
    gradient entry of a few tiny eSCN encoder gradients on one machine and 2.7e-5 on another, so
    a float32 tolerance tracked the machine, not the code; a wrong edge/atom subset gives O(1)
    differences.)"""
    losses, grads = [], []
    for restrict in (True, False):
        config = demo_config(demo_lmdb, DENS, tmp_path / str(restrict), first_n=16, model=model)
        config["model"]["heads"]["noise"]["restrict_to_corrupted"] = restrict
        trainer = build_trainer(config)
        assert trainer._unwrapped_model.output_heads["noise"].restrict_to_corrupted is restrict
        with double_model(trainer):
            batch = cast_batch(first_batch(trainer), torch.float64)
            batch, out, step = mixed_step(trainer, batch=batch)
            loss = trainer._compute_loss(out, batch)
            loss.backward()
        assert loss.dtype == torch.float64
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in trainer._unwrapped_model.named_parameters()})
    assert step.num_corrupted < len(step.mask)  # some atoms were left out of the head
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    for name, grad in grads[1].items():
        if grad is None:
            assert grads[0][name] is None, name
        else:
            torch.testing.assert_close(grads[0][name], grad, rtol=1e-9,
                                       atol=1e-9 * grad.abs().max().item() + 1e-30)
