"""Every shipped config loads through fairchem's config loader, names importable classes,
has valid DeNS settings, and builds its model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import load_config
from fairchem.core.models.base import HydraModel

from fairchem_dens.config import DeNSConfig
from fairchem_dens.models.dens import DeNSBackboneMixin, noise_head_names
from tests.conftest import REPO

CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yml") if p.name != "base.yml")


def test_configs_are_found() -> None:
    assert len(CONFIGS) >= 6


def build_model(config: dict) -> HydraModel:
    model = copy.deepcopy(config["model"])
    assert model.pop("name") == "hydra"
    torch.manual_seed(0)
    return HydraModel(**model)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_loads_and_builds(path: Path) -> None:
    config, duplicates_warning, duplicates_error = load_config(str(path))
    assert not duplicates_error
    trainer_cls = registry.get_trainer_class(config["trainer"])
    if config["model"].get("finetune_config"):  # needs a pre-trained checkpoint: built and
        # trained in tests/usage/test_pretrain_finetune.py
        assert config["model"]["backbone"] is None and config["model"]["heads"] is None
        return
    model = build_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 0
    if "fairchem_dens.trainer" in config["trainer"]:
        dens = DeNSConfig.from_optim(config["optim"])
        assert dens.enabled
        assert isinstance(model.backbone, DeNSBackboneMixin)
        assert len(noise_head_names(model)) == 1
        assert trainer_cls.__name__ == "DenoisingForcesTrainer"
    else:  # plain fairchem, or plain with fairchem_dens.resume's exact-resume trainer
        assert "dens" not in config["optim"]
        assert not isinstance(model.backbone, DeNSBackboneMixin)
        assert noise_head_names(model) == []
    print(f"{path.name}: {n_params / 1e6:.2f}M parameters")
