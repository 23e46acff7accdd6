"""Bad checkpoints give errors that name the cause and the fix, through the paths a user takes:
``DenoisingForcesTrainer.load_checkpoint`` (what ``fairchem --checkpoint`` and ``OCPCalculator``
call) and ``fairchem-dens export``. Checkpoints are built in-process from the demo configs
(fairchem's models, fairchem's checkpoint layout); the trainer runs on the bundled OC20 data."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from fairchem_dens.checkpoints import (
    CheckpointMismatchError,
    backbone_family,
    check_checkpoint_matches,
)
from fairchem_dens.cli import main as cli_main
from fairchem_dens.export import ExportError, export_checkpoint
from tests.conftest import REPO, build_trainer, demo_config

DEMO = REPO / "configs" / "oc20" / "s2ef" / "demo"
DENS = {"prob": 0.5, "std": 0.05, "corrupt_ratio": 0.5, "coefficient": 10}


def load(name: str) -> dict:
    from fairchem.core.common.utils import load_config

    return load_config(str(DEMO / name))[0]


def fairchem_checkpoint(config: dict, seed: int = 1) -> dict:
    """A checkpoint as fairchem's trainer writes it (DDP-style ``module.`` keys), of the model
    ``config['model']`` builds."""
    from fairchem.core.common.registry import registry

    kwargs = copy.deepcopy(config["model"])
    torch.manual_seed(seed)
    model = registry.get_model_class(kwargs.pop("name"))(**kwargs)
    return {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "config": config, "normalizers": {}, "elementrefs": {}, "amp": None}


@pytest.fixture(scope="module")
def eqv2_trainer(demo_lmdb, tmp_path_factory):
    """The EquiformerV2 + DeNS trainer of eqv2_dens_cpu.yml on the bundled data."""
    return build_trainer(demo_config(demo_lmdb, DENS, tmp_path_factory.mktemp("t"), first_n=8))


def load_into(trainer, checkpoint: dict, tmp_path: Path) -> None:
    """Load as ``--checkpoint PATH`` does: the trainer reads the file."""
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint, path)
    trainer.load_checkpoint(str(path))


def test_backbone_family_resolves_dens_classes_and_registry_names() -> None:
    assert backbone_family("fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone") == (
        "equiformer_v2_backbone")
    assert backbone_family("fairchem_dens.models.escn.DeNSeSCNBackbone") == "escn_backbone"
    assert backbone_family("escn_backbone") == "escn_backbone"
    assert backbone_family("no.such.Backbone") == "no.such.Backbone"


def test_other_architecture_is_named(eqv2_trainer, tmp_path) -> None:
    """A plain eSCN checkpoint for the EquiformerV2 + DeNS config."""
    escn = fairchem_checkpoint(load("escn_cpu.yml"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_into(eqv2_trainer, escn, tmp_path)
    msg = str(err.value)
    assert "another architecture" in msg and "'escn_backbone'" in msg
    assert ("DeNSEquiformerV2Backbone' (the DeNS variant of 'equiformer_v2_backbone')" in msg)
    assert "escn_dens_cpu.yml" in msg  # the fix: a config of the checkpoint's family
    assert len(msg) < 1500 and "layer_blocks" not in msg  # not a wall of state-dict keys
    # the DeNS eSCN checkpoint the other way round: named as the DeNS variant of escn_backbone
    dens_escn = fairchem_checkpoint(load("escn_dens_cpu.yml"))
    with pytest.raises(CheckpointMismatchError, match=r"DeNSeSCNBackbone' \(the DeNS variant "
                       r"of 'escn_backbone'\)"):
        check_checkpoint_matches(eqv2_trainer.config["model"], dens_escn)


def test_missing_config_is_named(eqv2_trainer, tmp_path, capsys) -> None:
    bare = {"state_dict": fairchem_checkpoint(load("eqv2_dens_cpu.yml"))["state_dict"]}
    with pytest.raises(CheckpointMismatchError) as err:
        load_into(eqv2_trainer, bare, tmp_path)
    msg = str(err.value)
    assert "no training config" in msg and "['state_dict']" in msg
    assert "ckpt['config'] = fairchem.core.common.utils.load_config(YAML)[0]" in msg
    with pytest.raises(CheckpointMismatchError, match="the checkpoint to export has no training "
                       "config"):
        export_checkpoint(bare)
    src = tmp_path / "bare.pt"
    torch.save(bare, src)
    assert cli_main(["export", str(src), str(tmp_path / "out.pt")]) == 2
    assert "has no training config" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_disagreeing_hyper_parameters_are_listed(eqv2_trainer, tmp_path) -> None:
    """A DeNS checkpoint of a larger EquiformerV2 for the demo config (fairchem's strict load
    would print a page of size mismatches)."""
    config = load("eqv2_dens_cpu.yml")
    backbone = config["model"]["backbone"]
    backbone.update(num_layers=3, sphere_channels=32, lmax_list=[4])
    with pytest.raises(CheckpointMismatchError) as err:
        load_into(eqv2_trainer, fairchem_checkpoint(config), tmp_path)
    msg = str(err.value)
    assert "num_layers: 3 in the checkpoint, 2 in the config" in msg
    assert "sphere_channels: 32 in the checkpoint, 24 in the config" in msg
    assert "lmax_list: [4] in the checkpoint, [3] in the config" in msg
    assert "Set these to the checkpoint's values" in msg
    assert "max_radius" not in msg  # only what differs
    assert len(msg) < 3000


def test_same_architecture_loads(eqv2_trainer, tmp_path, caplog) -> None:
    """No false alarms: settings that change no weight may differ (logged), and a plain
    checkpoint of the same family is fine-tuning (DeNS-only weights absent)."""
    config = load("eqv2_dens_cpu.yml")
    config["model"]["backbone"]["max_radius"] = 5.0
    ckpt = fairchem_checkpoint(config)
    with caplog.at_level(logging.INFO):
        load_into(eqv2_trainer, ckpt, tmp_path)
    assert "'max_radius': (5.0, 6.0)" in caplog.text
    state = eqv2_trainer._unwrapped_model.state_dict()
    assert all(torch.equal(state[k.removeprefix("module.")], v)
               for k, v in ckpt["state_dict"].items())
    plain = fairchem_checkpoint(load("eqv2_cpu.yml"))
    check_checkpoint_matches(eqv2_trainer.config["model"], plain, eqv2_trainer._unwrapped_model)


def test_export_names_plain_and_legacy_checkpoints() -> None:
    escn = fairchem_checkpoint(load("escn_cpu.yml"))
    with pytest.raises(ExportError, match="not a DeNS model: backbone 'escn_backbone'.*plain "
                       "fairchem checkpoint already: use it without exporting"):
        export_checkpoint(escn)
    legacy = copy.deepcopy(escn)
    legacy["config"]["model"] = "equiformer_v2"
    with pytest.raises(ExportError, match="'equiformer_v2', a legacy \\(non-Hydra\\)"):
        export_checkpoint(legacy)


def test_export_names_weights_that_do_not_fit_their_config() -> None:
    """Weights of a larger model under the demo config: the hyper-parameters are the same, so
    the error says the weights differ (shape examples), briefly."""
    config = load("eqv2_dens_cpu.yml")
    bigger = copy.deepcopy(config)
    bigger["model"]["backbone"]["sphere_channels"] = 32
    ckpt = {**fairchem_checkpoint(bigger), "config": config}
    with pytest.raises(CheckpointMismatchError) as err:
        export_checkpoint(ckpt)
    msg = str(err.value)
    assert "no model.backbone hyper-parameter differs, but the weights do" in msg
    assert "scalar_mlp.0.weight: (48, 32) in the checkpoint, (48, 24) in the model" in msg
    assert len(msg) < 1500
