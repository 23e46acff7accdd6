"""Denoising pre-training through the stock ``fairchem`` CLI on real relaxed OC20 structures,
then fine-tuning from its checkpoint through fairchem's two mechanisms: heads kept or
re-initialised (and logged), training state dropped, wrong combinations refused."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from fairchem_dens.config import DeNSConfigError
from fairchem_dens.runs import data_overrides
from tests.conftest import REPO, build_trainer, demo_config
from tests.integration.test_pretrain import relaxed_lmdb  # noqa: F401 (fixture)
from tests.usage.conftest import FAIRCHEM, run

pytestmark = pytest.mark.slow  # stock fairchem CLI subprocess

PRETRAIN_YML = REPO / "configs" / "oc20" / "pretrain" / "eqv2_denoise_relaxed_cpu.yml"
FINETUNE_YML = REPO / "configs" / "oc20" / "s2ef" / "demo" / "eqv2_dens_finetune_cpu.yml"


@pytest.fixture(scope="module")
def pretrained(relaxed_lmdb, tmp_path_factory):  # noqa: F811
    """``checkpoint.pt`` of 3 epochs (21 steps) of denoising pre-training on 28 relaxed structures."""
    out = tmp_path_factory.mktemp("pretrain_run")
    log = run([FAIRCHEM, "--mode", "train", "--config-yml", PRETRAIN_YML, "--cpu",
               "--run-dir", out, "--identifier", "pretrain", *data_overrides(relaxed_lmdb)[:-1],
               "--optim.max_epochs=3"], cwd=out)
    assert "denoising_noise_l2mae" in log and "(equilibrium)" in log
    (ckpt,) = out.glob("checkpoints/*/checkpoint.pt")
    return ckpt


def finetune_config(demo_lmdb, tmp_path, ckpt, **model):
    from fairchem.core.common.utils import load_config

    base = demo_config(demo_lmdb, {"prob": 0.5, "std": 0.05, "corrupt_ratio": 0.5}, tmp_path,
                       first_n=8)
    config, _, _ = load_config(str(FINETUNE_YML))
    config["dataset"] = base["dataset"]
    config["optim"]["scheduler_params"]["warmup_epochs"] = 1
    config["run_dir"] = str(tmp_path)
    config["model"]["finetune_config"]["starting_checkpoint"] = str(ckpt)
    config["model"].update(model)
    return config


def test_heads_kept_from_checkpoint(pretrained, demo_lmdb, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        trainer = build_trainer(finetune_config(demo_lmdb, tmp_path, pretrained))
    assert any("backbone and heads kept from the checkpoint" in r.getMessage()
               for r in caplog.records)
    saved = torch.load(pretrained, map_location="cpu")["state_dict"]
    state = trainer._unwrapped_model.state_dict()
    assert set(state) == {k.removeprefix("module.") for k in saved}
    for key, value in saved.items():
        assert torch.equal(state[key.removeprefix("module.")], value), key
    batch = next(iter(trainer.train_loader))  # a DeNS fine-tuning step runs
    trainer.model.train()
    trainer._compute_loss(trainer._forward(batch), batch).backward()


def test_heads_reinitialised_when_configured(pretrained, demo_lmdb, tmp_path, caplog):
    heads = copy.deepcopy(demo_config(demo_lmdb, {"std": 0.05}, tmp_path / "d")["model"]["heads"])
    with caplog.at_level(logging.INFO):
        trainer = build_trainer(finetune_config(demo_lmdb, tmp_path, pretrained, heads=heads))
    (line,) = (r.getMessage() for r in caplog.records if "re-initialised" in r.getMessage())
    assert "['energy', 'forces', 'noise']" in line and "equiformer_v2_backbone" in line
    saved = {k.removeprefix("module."): v
             for k, v in torch.load(pretrained, map_location="cpu")["state_dict"].items()}
    state = trainer._unwrapped_model.state_dict()
    for key, value in state.items():
        if key.startswith("backbone."):
            assert torch.equal(value, saved[key]), key
    head_weights = [k for k in state if k.startswith("output_heads.") and k.endswith("weight")]
    assert any(not torch.equal(state[k], saved[k]) for k in head_weights)


def test_wrong_combinations_are_refused(pretrained, demo_lmdb, tmp_path):
    backbone = demo_config(demo_lmdb, {"std": 0.05}, tmp_path / "d")["model"]["backbone"]
    with pytest.raises(DeNSConfigError, match="model.backbone are both set"):
        build_trainer(finetune_config(demo_lmdb, tmp_path / "a", pretrained, backbone=backbone))
    escn_heads = {"energy": {"module": "escn_energy_head"}, "forces": {"module": "escn_force_head"}}
    with pytest.raises(DeNSConfigError, match="another architecture.*equiformer_v2_backbone"):
        build_trainer(finetune_config(demo_lmdb, tmp_path / "b", pretrained, heads=escn_heads))


def test_checkpoint_flag_starts_a_new_schedule(pretrained, demo_lmdb, tmp_path, caplog):
    trainer = build_trainer(demo_config(demo_lmdb, {"prob": 0.5, "std": 0.05}, tmp_path,
                                        first_n=8))
    saved = torch.load(pretrained, map_location="cpu")
    assert saved["step"] > 0
    with caplog.at_level(logging.INFO):
        trainer.load_checkpoint(str(pretrained))
    assert trainer.step == 0 and trainer.epoch == 0
    assert any("denoising pre-training checkpoint" in r.getMessage() and "'optimizer'" in
               r.getMessage() for r in caplog.records)
    for key, value in saved["state_dict"].items():
        assert torch.equal(trainer._unwrapped_model.state_dict()[key.removeprefix("module.")],
                           value), key


IS2RE = REPO.parent / "shared" / "data" / "oc20_tutorial_lmdb" / "is2re" / "val_20"


@pytest.mark.skipif(not IS2RE.exists(), reason="shared OC20 IS2RE LMDB not present")
def test_pretrain_on_is2re_relaxed_positions_through_stock_cli(tmp_path):
    import shutil

    src = shutil.copytree(IS2RE, tmp_path / "is2re")
    log = run([FAIRCHEM, "--mode", "train", "--config-yml",
               REPO / "configs" / "oc20" / "pretrain" / "eqv2_denoise_is2re_cpu.yml", "--cpu",
               "--run-dir", tmp_path, "--identifier", "is2re", f"--dataset.train.src={src}",
               "--optim.max_epochs=2"], cwd=tmp_path)  # 20 structures: 10 steps
    assert "the data have no 'forces'" in log and "denoising_noise_l2mae" in log
    assert "positions_key='pos_relaxed'" in log
    assert list(tmp_path.glob("checkpoints/*/checkpoint.pt"))


def test_fine_tuning_run_resumes_from_its_own_checkpoint(pretrained, demo_lmdb, tmp_path):
    """A fine-tuning run (backbone from finetune_config, model.backbone null) reloads its own
    checkpoint, e.g. after preemption: no settings to compare, the weights fit."""
    trainer = build_trainer(finetune_config(demo_lmdb, tmp_path, pretrained))
    model = trainer._unwrapped_model
    trainer.is_debug, trainer.config["cmd"]["checkpoint_dir"] = False, str(tmp_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    trainer.step = 3
    path = trainer.save(checkpoint_file="own.pt")  # fairchem's own checkpoint layout
    saved = torch.load(path, map_location="cpu")
    assert saved["config"]["model"]["backbone"] is None
    fresh = build_trainer(finetune_config(demo_lmdb, tmp_path / "again", pretrained))
    fresh.load_checkpoint(path)
    assert fresh.step == 3
    for key, value in saved["state_dict"].items():
        assert torch.equal(fresh._unwrapped_model.state_dict()[key.removeprefix("module.")],
                           value), key
