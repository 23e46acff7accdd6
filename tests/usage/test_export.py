"""``fairchem-dens export``: a DeNS checkpoint becomes a plain fairchem EquiformerV2 checkpoint
that stock fairchem loads without this package and that predicts exactly what the DeNS model
predicts in eval mode, on real OC20 frames."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fairchem_dens.cli import main as cli_main
from fairchem_dens.export import ExportError, export_checkpoint, export_file
from tests.conftest import demo_frames

pytestmark = pytest.mark.slow  # stock fairchem CLI / subprocesses

# Runs with this package made unimportable: a meta-path finder refuses every fairchem_dens
# module, the working directory is outside the checkout, and -I drops user site/env paths.
STOCK_SCRIPT = r"""
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "fairchem_dens":
            raise ImportError(f"fairchem_dens is blocked in this process ({name})")
        return None

sys.meta_path.insert(0, Refuse())
try:
    import fairchem_dens  # noqa: F401
    raise SystemExit("fairchem_dens was importable")
except ImportError:
    pass
import numpy as np
import torch
from ase.io import read
from fairchem.core.common.relaxation.ase_utils import OCPCalculator

frames_file, *pairs = sys.argv[1:]
frames = read(frames_file, index=":")
for ckpt, out in zip(pairs[::2], pairs[1::2]):
    calc = OCPCalculator(checkpoint_path=ckpt, cpu=True, seed=0)
    assert type(calc.trainer).__module__.startswith("fairchem.core"), type(calc.trainer)
    energy, forces = [], []
    for atoms in frames:
        torch.manual_seed(0)  # EquiformerV2 draws random edge-frame roll angles
        calc.calculate(atoms, ["energy", "forces"], ["positions"])
        energy.append(calc.results["energy"])
        forces.append(calc.results["forces"])
    np.savez(out, energy=np.array(energy), forces=np.concatenate(forces))
assert not [m for m in sys.modules if m.split(".")[0] == "fairchem_dens"]
"""


def dens_predictions(ckpt: Path, frames, apply_ema: bool):
    """Eval predictions of the DeNS model itself: fairchem's OCPCalculator builds the DeNS
    trainer and model (force encoding and noise head included) from the checkpoint; with
    ``apply_ema`` the EMA weights are copied in the way fairchem's ``ema.copy_to`` does."""
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    from fairchem_dens.models.dens import noise_head_names
    from fairchem_dens.trainer import DenoisingForcesTrainer

    calc = OCPCalculator(checkpoint_path=str(ckpt), cpu=True, seed=0)
    assert isinstance(calc.trainer, DenoisingForcesTrainer)
    model = calc.trainer._unwrapped_model
    assert noise_head_names(model) == ["noise"] and hasattr(model.backbone, "force_encoding")
    if apply_ema:
        shadow = torch.load(ckpt, map_location="cpu")["ema"]["shadow_params"]
        params = [p for p in calc.trainer.model.parameters() if p.requires_grad]
        assert len(params) == len(shadow)
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s)
    energy, forces = [], []
    for atoms in frames:
        torch.manual_seed(0)
        calc.calculate(atoms, ["energy", "forces"], ["positions"])
        energy.append(calc.results["energy"])
        forces.append(calc.results["forces"])
    return np.array(energy), np.concatenate(forces)


@pytest.fixture(scope="module")
def exported(dens_ckpt, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exported")
    paths = {"apply": out / "last_apply.pt", "keep": out / "last_keep.pt",
             "best": out / "best.pt"}
    assert cli_main(["export", str(dens_ckpt["last"]), str(paths["apply"])]) == 0
    assert cli_main(["export", str(dens_ckpt["last"]), str(paths["keep"]), "--ema", "keep"]) == 0
    export_file(dens_ckpt["best"], paths["best"])
    return paths


def test_exported_checkpoint_is_plain_fairchem(dens_ckpt, exported) -> None:
    src = torch.load(dens_ckpt["last"], map_location="cpu")
    for mode in ("apply", "keep"):
        ck = torch.load(exported[mode], map_location="cpu")
        cfg = ck["config"]
        assert cfg["trainer"] == "equiformerv2_forces"
        assert cfg["model"]["backbone"]["model"] == "equiformer_v2_backbone"
        assert set(cfg["model"]["heads"]) == {"energy", "forces"}
        assert "dens" not in cfg["optim"] and "dens_rng" not in cfg
        assert not [k for k in ck["state_dict"]
                    if "force_encoding" in k or ".output_heads.noise." in k]
        plain_keys = {k for k in src["state_dict"]
                      if "force_encoding" not in k and ".output_heads.noise." not in k}
        assert set(ck["state_dict"]) == plain_keys
        assert "optimizer" not in ck and "scheduler" not in ck
        for group in ("normalizers", "elementrefs"):
            assert ck[group].keys() == src[group].keys()
            for key in ck[group]:
                for name, value in ck[group][key].items():
                    assert torch.equal(value, src[group][key][name])
        assert ck["export"]["removed_heads"] == ["noise"]
    keep = torch.load(exported["keep"], map_location="cpu")
    apply = torch.load(exported["apply"], map_location="cpu")
    assert "ema" not in apply
    n_dens = len(src["ema"]["shadow_params"]) - len(keep["ema"]["shadow_params"])
    assert n_dens > 0  # force encoding + noise head parameters left the EMA
    # keep: raw weights unchanged; apply: EMA weights written into state_dict
    key = "module.backbone.sphere_embedding.weight"
    assert torch.equal(keep["state_dict"][key], src["state_dict"][key])
    assert torch.equal(apply["state_dict"][key], src["ema"]["shadow_params"][0])
    assert not torch.equal(apply["state_dict"][key], src["state_dict"][key])


def test_export_refuses_a_plain_checkpoint(exported) -> None:
    plain = torch.load(exported["best"], map_location="cpu")
    with pytest.raises(ExportError, match="not a DeNS model"):
        export_checkpoint(plain)


def test_stock_fairchem_loads_export_and_predicts_like_dens(dens_ckpt, exported,
                                                              tmp_path) -> None:
    from ase.io import write

    frames = demo_frames(max_systems=2)  # real OC20 adsorbate + slab systems
    frames_file = tmp_path / "frames.extxyz"
    write(frames_file, frames)
    cases = {"apply": (dens_ckpt["last"], True), "keep": (dens_ckpt["last"], False)}
    args = []
    for mode in cases:
        args += [str(exported[mode]), str(tmp_path / f"{mode}.npz")]
    proc = subprocess.run([sys.executable, "-I", "-c", STOCK_SCRIPT, str(frames_file), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    for mode, (ckpt, apply_ema) in cases.items():
        stock = np.load(tmp_path / f"{mode}.npz")
        energy, forces = dens_predictions(ckpt, frames, apply_ema)
        np.testing.assert_allclose(stock["energy"], energy, rtol=1e-5, atol=1e-5, err_msg=mode)
        np.testing.assert_allclose(stock["forces"], forces, rtol=1e-5, atol=1e-5, err_msg=mode)
    # EMA applied == the weights fairchem writes into best_checkpoint.pt at the same step
    best = torch.load(exported["best"], map_location="cpu")["state_dict"]
    apply = torch.load(exported["apply"], map_location="cpu")["state_dict"]
    assert best.keys() == apply.keys()
    assert all(torch.equal(best[k], apply[k]) for k in best)


def test_escn_export_builds_fairchems_escn_with_equal_outputs() -> None:
    """eSCN: the exported config builds fairchem's ``escn_backbone`` Hydra model, whose eval
    outputs with the exported weights equal the DeNS eSCN model's on real OC20 frames."""
    import copy

    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import load_config

    from tests.conftest import REPO, atoms_to_batch

    config, _, _ = load_config(str(REPO / "configs/oc20/s2ef/demo/escn_dens_cpu.yml"))

    def build(model_config):
        kwargs = copy.deepcopy(model_config)
        return registry.get_model_class(kwargs.pop("name"))(**kwargs)

    dens = build(config["model"])
    ckpt = {"state_dict": {f"module.{k}": v for k, v in dens.state_dict().items()},
            "config": config, "normalizers": {}, "elementrefs": {}}
    out = export_checkpoint(ckpt)
    assert out["config"]["model"]["backbone"]["model"] == "escn_backbone"
    assert set(out["config"]["model"]["heads"]) == {"energy", "forces"}
    plain = build(out["config"]["model"])
    plain.load_state_dict({k.removeprefix("module."): v for k, v in out["state_dict"].items()})
    batch = atoms_to_batch(demo_frames(max_systems=2))
    dens.eval()
    plain.eval()
    torch.manual_seed(0)
    expected = dens(batch.clone())
    torch.manual_seed(0)
    got = plain(batch.clone())
    for key in ("energy", "forces"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6)
