"""Fine-tuning a DeNS model from stock checkpoints in more layouts:

* fairchem's legacy (non-Hydra) EquiformerV2 (``model: equiformer_v2``, keys without
  ``backbone.`` / ``output_heads.``), converted by fairchem's own converter on load;
* a plain eSCN Hydra checkpoint written by the stock CLI, into the eSCN DeNS model.

Each: the DeNS-only keys logged by name, every plain weight equal after load, one DeNS training
step on a real OC20 batch."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from fairchem_dens.finetune import dens_only_keys
from tests.conftest import build_trainer, demo_config
from tests.usage.conftest import train_tiny
from tests.usage.test_checkpoint_errors import DENS, load

NEW_KEYS = "new DeNS-only keys initialised fresh"


def legacy_checkpoint(layout: str) -> dict:
    """What a pre-Hydra fairchem run wrote: fairchem's deprecated ``equiformer_v2`` model with
    the hyper-parameters of eqv2_cpu.yml, its weights under ``module.``, EMA and optimizer
    state, and the config in the old layout (``model: name`` + ``model_attributes``, or
    ``model: {name: equiformer_v2, ...}``)."""
    from fairchem.core.common.registry import registry

    config = load("eqv2_cpu.yml")
    attributes = copy.deepcopy(config["model"]["backbone"])
    attributes.pop("model")
    torch.manual_seed(7)  # not the DeNS trainer's initialisation
    model = registry.get_model_class("equiformer_v2")(**attributes)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    if layout == "model_attributes":
        config["model"], config["model_attributes"] = "equiformer_v2", attributes
    else:
        config["model"] = {"name": "equiformer_v2", **attributes}
    return {
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "config": config, "epoch": 3, "step": 120,
        "optimizer": optimizer.state_dict(), "scheduler": None, "amp": None,
        "ema": {"decay": 0.999, "num_updates": 120, "collected_params": [],
                "shadow_params": [p.detach() + 0.01 for p in params]},
        "normalizers": {}, "elementrefs": {},
    }


def hydra_key(legacy_key: str) -> str:
    """Where a legacy EquiformerV2 weight lives in the Hydra model (the test's own oracle)."""
    key = legacy_key.removeprefix("module.")
    for block, head in (("energy_block", "energy"), ("force_block", "forces")):
        if key.startswith(block):
            return f"output_heads.{head}.{key}"
    return f"backbone.{key}"


def assert_fine_tuned(trainer, plain_state: dict, key_map, fresh: dict, log: str) -> None:
    """Plain weights from the checkpoint, DeNS-only ones fresh and logged, a training step."""
    model = trainer._unwrapped_model
    new = dens_only_keys(model)
    assert new and f"{len(new)} {NEW_KEYS}: {new}" in log
    state = model.state_dict()
    assert len(plain_state) + len(new) == len(state)
    for key, value in plain_state.items():
        assert torch.equal(state[key_map(key)], value), key
    for key in new:
        assert torch.equal(state[key], fresh[key]), key
    assert trainer.step == 0 and trainer.epoch == 0
    batch = next(iter(trainer.train_loader))
    model.train()
    loss = trainer._compute_loss(trainer._forward(batch), batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert trainer._dens_step is not None  # a DeNS (corrupting) training step ran


@pytest.mark.parametrize("layout", ["model_attributes", "model_dict"])
def test_fine_tune_from_legacy_equiformer_v2(layout, demo_lmdb, tmp_path, caplog) -> None:
    trainer = build_trainer(demo_config(demo_lmdb, DENS, tmp_path, first_n=8))
    fresh = {k: v.clone() for k, v in trainer._unwrapped_model.state_dict().items()}
    legacy = legacy_checkpoint(layout)
    path = tmp_path / "legacy.pt"
    torch.save(legacy, path)
    with caplog.at_level(logging.INFO):
        trainer.load_checkpoint(str(path))  # as `fairchem --mode train --checkpoint` does
    assert "converted a legacy 'equiformer_v2' checkpoint" in caplog.text
    assert_fine_tuned(trainer, legacy["state_dict"], hydra_key, fresh, caplog.text)
    # fairchem's converter drops the legacy EMA; the run's EMA starts from the loaded weights
    # (rather than being switched off, which is what fairchem does without a checkpoint EMA)
    named = [(n, p) for n, p in trainer._unwrapped_model.named_parameters() if p.requires_grad]
    assert trainer.ema is not None and trainer.ema.num_updates in (None, 0)
    assert len(trainer.ema.shadow_params) == len(named)
    # (the training step above moved the parameters; compare with the loaded state)
    loaded = {hydra_key(k): v for k, v in legacy["state_dict"].items()}
    for (name, _), shadow in zip(named, trainer.ema.shadow_params):
        assert torch.equal(shadow, loaded.get(name, fresh[name])), name


@pytest.mark.slow()  # stock fairchem CLI subprocess
def test_fine_tune_escn_dens_from_stock_escn(demo_lmdb, tmp_path_factory, caplog) -> None:
    plain_ckpt = train_tiny("escn_cpu.yml", demo_lmdb, tmp_path_factory.mktemp("escn_plain"))
    run = tmp_path_factory.mktemp("escn_ft")
    trainer = build_trainer(demo_config(demo_lmdb, DENS, run, first_n=8, model="escn"))
    assert type(trainer._unwrapped_model.backbone).__name__ == "DeNSeSCNBackbone"
    fresh = {k: v.clone() for k, v in trainer._unwrapped_model.state_dict().items()}
    plain = torch.load(plain_ckpt, map_location="cpu")
    assert plain["config"]["model"]["backbone"]["model"] == "escn_backbone"
    with caplog.at_level(logging.INFO):
        trainer.load_checkpoint(str(plain_ckpt))
    assert_fine_tuned(trainer, plain["state_dict"], lambda k: k.removeprefix("module."), fresh,
                      caplog.text)
    assert all(k.startswith(("backbone.force_encoding.", "output_heads.noise."))
               for k in dens_only_keys(trainer._unwrapped_model))
