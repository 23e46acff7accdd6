"""Fine-tuning a DeNS model from a plain fairchem EquiformerV2 checkpoint (trained by the stock
CLI on real OC20 frames): plain weights and EMA carried over, DeNS-only weights fresh and
logged by name, anything else refused."""

from __future__ import annotations

import logging

import pytest
import torch

from fairchem_dens.finetune import FineTuneError, adapt_plain_checkpoint, dens_only_keys
from tests.conftest import build_trainer, demo_config
from tests.usage.conftest import train_tiny

pytestmark = pytest.mark.slow  # stock fairchem CLI subprocesses

DENS = {"prob": 0.5, "std": 0.05, "corrupt_ratio": 0.5, "coefficient": 10}


@pytest.fixture(scope="module")
def plain_ckpt(demo_lmdb, tmp_path_factory):
    return train_tiny("eqv2_cpu.yml", demo_lmdb, tmp_path_factory.mktemp("plain_run"))


def test_dens_trainer_fine_tunes_from_plain_checkpoint(plain_ckpt, demo_lmdb, tmp_path,
                                                        caplog) -> None:
    trainer = build_trainer(demo_config(demo_lmdb, DENS, tmp_path, first_n=8))
    model = trainer._unwrapped_model
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    plain = torch.load(plain_ckpt, map_location="cpu")
    assert "optimizer" in plain and plain["ema"] is not None
    new = dens_only_keys(model)
    assert new and all(k.startswith(("backbone.force_encoding.", "output_heads.noise."))
                       for k in new)
    with caplog.at_level(logging.INFO):
        adapted = adapt_plain_checkpoint(model, plain, trainer.ema)
    (line,) = (r.getMessage() for r in caplog.records if "new DeNS-only keys" in r.getMessage())
    assert str(new) in line and f"{len(new)} new" in line
    trainer.load_checkpoint(str(plain_ckpt), checkpoint=adapted)  # strict load, EMA included

    state = model.state_dict()
    for key, value in plain["state_dict"].items():
        assert torch.equal(state[key.removeprefix("module.")], value), key
    for key in new:
        assert torch.equal(state[key], fresh[key]), key
    assert trainer.step == 0 and trainer.epoch == 0  # fine-tuning starts its own schedule
    # the EMA: plain shadows from the checkpoint, DeNS-only ones fresh, in fairchem's order
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainer.ema.shadow_params) == len(named)
    plain_shadow = iter(plain["ema"]["shadow_params"])
    for name, shadow in zip(named, trainer.ema.shadow_params):
        expected = fresh[name] if name in new else next(plain_shadow)
        assert torch.equal(shadow, expected), name

    # a DeNS training step runs on the loaded model (real OC20 batch)
    batch = next(iter(trainer.train_loader))
    model.train()
    loss = trainer._compute_loss(trainer._forward(batch), batch)
    loss.backward()
    assert torch.isfinite(loss)
    # a DeNS checkpoint (resume) passes through unchanged
    assert adapt_plain_checkpoint(model, {"state_dict": model.state_dict()}) is not None


def test_other_mismatches_are_errors(plain_ckpt, demo_lmdb, tmp_path) -> None:
    trainer = build_trainer(demo_config(demo_lmdb, DENS, tmp_path, first_n=8))
    model = trainer._unwrapped_model
    plain = torch.load(plain_ckpt, map_location="cpu")
    key = "module.backbone.sphere_embedding.weight"
    missing = {**plain, "state_dict": {k: v for k, v in plain["state_dict"].items() if k != key}}
    with pytest.raises(FineTuneError, match="missing.*sphere_embedding"):
        adapt_plain_checkpoint(model, missing, trainer.ema)
    extra = {**plain, "state_dict": {**plain["state_dict"], "module.extra.weight": torch.ones(1)}}
    with pytest.raises(FineTuneError, match="unexpected.*extra.weight"):
        adapt_plain_checkpoint(model, extra, trainer.ema)
    wrong = dict(plain["state_dict"])
    wrong[key] = torch.zeros(3, 3)
    with pytest.raises(FineTuneError, match="shape mismatch"):
        adapt_plain_checkpoint(model, {**plain, "state_dict": wrong}, trainer.ema)
