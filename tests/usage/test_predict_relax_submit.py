"""Using a DeNS checkpoint with fairchem's own tools, on real OC20 data:

* ``fairchem --mode predict`` (the stock console script) and fairchem's ASE ``OCPCalculator``
  agree to float precision (EquiformerV2 and eSCN + DeNS), and the exported plain checkpoint
  predicts the same file;
* an ASE relaxation driven by ``OCPCalculator`` on a real OC20 structure;
* EvalAI files: ``s2ef_predictions.npz`` on the tutorial S2EF LMDB joined by fairchem's
  ``make_submission_file.py`` for the four OC20 splits, and IS2RE from ``--mode run-relaxations``
  trajectories joined with ``--is2re-relaxations``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import fairchem.core
import numpy as np
import pytest
import torch

from fairchem_dens.export import export_file
from fairchem_dens.runs import data_overrides
from tests.conftest import SHARED
from tests.usage.conftest import CONFIGS, FAIRCHEM, run

pytestmark = pytest.mark.slow  # stock fairchem CLI subprocesses

TUTORIAL = SHARED / "data" / "oc20_tutorial_lmdb"
SUBMISSION_SCRIPT = Path(fairchem.core.__file__).parent / "scripts" / "make_submission_file.py"
# the tutorial LMDBs carry no metadata.npz (atom counts) for fairchem's atom-balanced sampler
NO_METADATA = "--optim.load_balancing_on_error=warn_and_no_balance"
SPLITS = ("id", "ood_ads", "ood_cat", "ood_both")
# fairchem's own entry point, with the global RNG seeded before every model forward (EquiformerV2
# draws random edge-frame roll angles), so that its outputs can be compared to float precision
SEEDED_FAIRCHEM = r"""
import sys, torch
from fairchem.core.models.base import HydraModel
forward = HydraModel.forward
def seeded(self, data):
    torch.manual_seed(0)
    return forward(self, data)
HydraModel.forward = seeded
from fairchem.core._cli import main
sys.argv[0] = "fairchem"
main()
"""


def predict(config: Path, ckpt: Path, test_src: Path, run_dir: Path, *extra: str,
            seeded: bool = False, lmdb: Path) -> Path:
    """Run ``--mode predict`` and return its ``s2ef_predictions.npz``."""
    exe = [sys.executable, "-c", SEEDED_FAIRCHEM] if seeded else [FAIRCHEM]
    run_dir.mkdir(parents=True, exist_ok=True)
    run([*exe, "--mode", "predict", "--config-yml", config, "--cpu", "--run-dir", run_dir,
         "--identifier", "pred", "--checkpoint", ckpt, *data_overrides(lmdb),
         f"--dataset.test.src={test_src}", *extra], cwd=run_dir)
    (npz,) = run_dir.glob("results/*/s2ef_predictions.npz")
    return npz


def copy_lmdb(src: Path, dst: Path) -> Path:
    """lmdb opens a path once per process: every use gets its own copy."""
    if not src.exists():
        pytest.skip(f"{src} not available")
    return Path(shutil.copytree(src, dst))


@pytest.mark.parametrize("model", ["eqv2", "escn"])
def test_predict_equals_ase_calculator_and_export(model, request, tmp_path) -> None:
    from fairchem.core.common.data_parallel import data_list_collater
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator, batch_to_atoms
    from fairchem.core.datasets import LmdbDataset

    from fairchem_dens.trainer import DenoisingForcesTrainer

    dens_ckpt = request.getfixturevalue({"eqv2": "dens_ckpt", "escn": "dens_escn_ckpt"}[model])
    lmdb, best = dens_ckpt["lmdb"], dens_ckpt["best"]
    test_src = copy_lmdb(lmdb / "val", tmp_path / "val")
    # real held-out OC20 frames one per batch, as the ASE calculator sees them; float32 files
    # (fairchem's default is float16)
    opts = ["--dataset.test.first_n=4", "--optim.eval_batch_size=1",
            "--task.prediction_dtype=float32"]
    dens_npz = np.load(predict(CONFIGS / f"{model}_dens_cpu.yml", best, test_src, tmp_path / "p1",
                               *opts, seeded=True, lmdb=lmdb))
    plain = export_file(best, tmp_path / "plain.pt") and tmp_path / "plain.pt"
    plain_npz = np.load(predict(CONFIGS / f"{model}_cpu.yml", plain, test_src, tmp_path / "p2",
                                *opts, seeded=True, lmdb=lmdb))
    for key in ("energy", "forces", "ids"):  # the plain export writes the same file
        np.testing.assert_array_equal(dens_npz[key], plain_npz[key])

    # the same frames through fairchem's ASE calculator on the DeNS checkpoint
    frames = LmdbDataset({"src": str(test_src)})
    calc = OCPCalculator(checkpoint_path=str(best), cpu=True, seed=0)
    assert isinstance(calc.trainer, DenoisingForcesTrainer)
    assert type(calc.trainer._unwrapped_model.backbone).__name__ == {
        "eqv2": "DeNSEquiformerV2Backbone", "escn": "DeNSeSCNBackbone"}[model]
    energy, forces, ids = [], [], []
    for i in range(4):
        (atoms,) = batch_to_atoms(data_list_collater([frames[i]], otf_graph=True))
        torch.manual_seed(0)
        calc.calculate(atoms, ["energy", "forces"], ["positions"])
        energy.append(calc.results["energy"])
        forces.append(calc.results["forces"][frames[i].fixed.numpy() == 0])
        ids.append(f"{frames[i].sid}_{frames[i].fid}")
    np.testing.assert_allclose(np.array(energy), dens_npz["energy"].reshape(-1), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.concatenate(forces), dens_npz["forces"], rtol=1e-5, atol=1e-5)
    assert list(dens_npz["ids"]) == ids


def test_predict_from_training_checkpoint_equals_export_for_the_same_seed(dens_ckpt,
                                                                          tmp_path) -> None:
    """``--mode predict`` on ``checkpoint.pt`` (which carries the training run's generator
    states) depends on ``--seed`` only: bit-identical to the exported plain checkpoint under
    stock fairchem with the same seed, no re-seeding of the forwards (EquiformerV2 draws its
    edge-frame roll angles from the global generator)."""
    from fairchem_dens.rng import RNG_STATE_KEY

    lmdb, last = dens_ckpt["lmdb"], dens_ckpt["last"]
    assert RNG_STATE_KEY in torch.load(last, map_location="cpu")["config"]
    test_src = copy_lmdb(lmdb / "val", tmp_path / "val")
    opts = ["--dataset.test.first_n=4", "--task.prediction_dtype=float32", "--seed", "3"]
    dens_npz = np.load(predict(CONFIGS / "eqv2_dens_cpu.yml", last, test_src, tmp_path / "p1",
                               *opts, lmdb=lmdb))
    plain = tmp_path / "plain.pt"
    export_file(last, plain)
    plain_npz = np.load(predict(CONFIGS / "eqv2_cpu.yml", plain, test_src, tmp_path / "p2",
                                *opts, lmdb=lmdb))
    for key in ("energy", "forces", "ids"):
        np.testing.assert_array_equal(dens_npz[key], plain_npz[key])
    # the seed matters (the control that makes the equality above meaningful)
    other_npz = np.load(predict(CONFIGS / "eqv2_cpu.yml", plain, test_src, tmp_path / "p3",
                                *opts[:-1], "4", lmdb=lmdb))
    assert not np.array_equal(other_npz["forces"], plain_npz["forces"])


def test_ase_relaxation_with_dens_checkpoint(dens_ckpt) -> None:
    from ase.optimize import BFGS
    from fairchem.core.common.data_parallel import data_list_collater
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator
    from fairchem.core.preprocessing import AtomsToGraphs

    from tests.conftest import demo_frames

    atoms = demo_frames(max_systems=1)[0].copy()  # real OC20 adsorbate + slab, fixed atoms
    calc = OCPCalculator(checkpoint_path=str(dens_ckpt["best"]), cpu=True, seed=0)
    calculate = calc.calculate

    def seeded(*args, **kwargs):  # reproducible: EquiformerV2 draws random roll angles
        torch.manual_seed(0)
        return calculate(*args, **kwargs)

    calc.calculate = seeded
    atoms.calc = calc
    energies = []
    opt = BFGS(atoms, maxstep=0.04, logfile=None)
    opt.attach(lambda: energies.append(atoms.get_potential_energy()))
    opt.run(fmax=0.01, steps=4)
    assert len(energies) == 5 and np.isfinite(energies).all()
    fixed = atoms.constraints[0].get_indices()
    assert len(fixed) and np.allclose(atoms.get_forces()[fixed], 0)  # FixAtoms held
    # the calculator's numbers at the final geometry are the trainer's eval predictions
    a2g = AtomsToGraphs(r_energy=False, r_forces=False, r_pbc=True, r_edges=False)
    batch = data_list_collater([a2g.convert(atoms)], otf_graph=True)
    torch.manual_seed(0)
    out = calc.trainer.predict(batch, per_image=False, disable_tqdm=True)
    assert out["energy"].item() == pytest.approx(energies[-1], rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(out["forces"].numpy(), atoms.get_forces(apply_constraint=False),
                               rtol=1e-5, atol=1e-5)


def test_s2ef_submission_from_tutorial_lmdb(dens_ckpt, tmp_path) -> None:
    from fairchem.core.datasets import LmdbDataset

    test_src = copy_lmdb(TUTORIAL / "s2ef" / "val_20", tmp_path / "s2ef")
    npz = predict(CONFIGS / "eqv2_dens_cpu.yml", dens_ckpt["last"], test_src, tmp_path / "p",
                  "--dataset.test.key_mapping.y=energy",
                  "--dataset.test.key_mapping.force=forces", NO_METADATA, lmdb=dens_ckpt["lmdb"])
    out = tmp_path / "submission.npz"
    run([sys.executable, SUBMISSION_SCRIPT, *(f"--{s.replace('_', '-')}={npz}" for s in SPLITS),
         f"--out-path={out}"], cwd=tmp_path)
    sub = np.load(out)
    frames = LmdbDataset({"src": str(test_src)})
    ids = [f"{int(frames[i].sid)}_{int(frames[i].fid)}" for i in range(len(frames))]
    free = [int((frames[i].fixed == 0).sum()) for i in range(len(frames))]
    assert set(sub.files) == {f"{s}_{k}" for s in SPLITS
                              for k in ("ids", "energy", "forces", "chunk_idx")}
    for s in SPLITS:
        assert sorted(sub[f"{s}_ids"]) == sorted(ids)
        # as fairchem 1.10 writes them: float16, energy of shape (n, 1) for a `shape: 1` output
        assert sub[f"{s}_energy"].reshape(-1).shape == (len(frames),)
        assert sub[f"{s}_forces"].shape == (sum(free), 3)
        # chunk_idx: split points of forces between frames (cumulative free-atom counts)
        np.testing.assert_array_equal(sub[f"{s}_chunk_idx"], np.cumsum(free)[:-1])
        assert sub[f"{s}_energy"].dtype == sub[f"{s}_forces"].dtype == np.float16
        assert np.isfinite(sub[f"{s}_energy"]).all() and np.isfinite(sub[f"{s}_forces"]).all()


def test_is2re_submission_from_ase_relaxations(dens_ckpt, tmp_path) -> None:
    """IS2RE by relaxation through ASE: one ``<sid>.traj`` per system, joined by
    ``make_submission_file.py --is2re-relaxations`` (the same submission route as
    ``--mode run-relaxations``, next test, with any ASE optimizer)."""
    from ase.io import Trajectory, read
    from ase.optimize import BFGS
    from fairchem.core.common.data_parallel import data_list_collater
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator, batch_to_atoms
    from fairchem.core.datasets import LmdbDataset

    relax_src = copy_lmdb(TUTORIAL / "is2re" / "val_20", tmp_path / "is2re")
    dataset = LmdbDataset({"src": str(relax_src)})
    calc = OCPCalculator(checkpoint_path=str(dens_ckpt["best"]), cpu=True, seed=0)
    traj_dir = tmp_path / "trajs"
    traj_dir.mkdir()
    sids = []
    for i in range(2):  # two real initial structures, 3 BFGS steps each
        data = dataset[i]
        (atoms,) = batch_to_atoms(data_list_collater([data], otf_graph=True))
        atoms.calc = calc
        sids.append(str(data.sid))
        with Trajectory(str(traj_dir / f"{data.sid}.traj"), "w", atoms) as traj:
            opt = BFGS(atoms, trajectory=traj, logfile=None)
            opt.run(fmax=0.05, steps=3)
    out = tmp_path / "is2re_submission.npz"
    run([sys.executable, SUBMISSION_SCRIPT, "--is2re-relaxations",
         *(f"--{s.replace('_', '-')}={traj_dir}" for s in SPLITS), f"--out-path={out}"],
        cwd=tmp_path)
    sub = np.load(out)
    for s in SPLITS:
        assert sorted(sub[f"{s}_ids"]) == sorted(sids)
        assert sub[f"{s}_energy"].shape == (2,) and np.isfinite(sub[f"{s}_energy"]).all()
    last = read(traj_dir / f"{sids[0]}.traj", index=-1)
    i = list(sub["id_ids"]).index(sids[0])
    assert sub["id_energy"][i] == pytest.approx(last.get_potential_energy())


def test_run_relaxations_mode_to_is2re_submission(dens_ckpt, tmp_path) -> None:
    """``fairchem --mode run-relaxations`` with a DeNS checkpoint on the real IS2RE LMDB (20
    initial structures, 3 LBFGS steps each) writes one ``<sid>.traj`` per system, which
    ``make_submission_file.py --is2re-relaxations`` turns into an IS2RE submission. Needs ASE
    < 3.26 (fairchem 1.10's OptimizableBatch is abstract under newer ASE; pinned in
    pyproject.toml). fmax 0: the one-epoch test model predicts forces below any useful fmax,
    which would end every relaxation before its first step (and write empty trajectories)."""
    from ase.io import read

    relax_src = copy_lmdb(TUTORIAL / "is2re" / "val_20", tmp_path / "is2re")
    traj_dir = tmp_path / "trajs"
    (tmp_path / "r").mkdir()
    run([FAIRCHEM, "--mode", "run-relaxations", "--config-yml",
         CONFIGS / "eqv2_dens_cpu.yml", "--cpu", "--run-dir", tmp_path / "r",
         "--identifier", "relax", "--checkpoint", dens_ckpt["best"],
         *data_overrides(dens_ckpt["lmdb"]), f"--dataset.relax.src={relax_src}",
         "--dataset.relax.use_train_settings=False",
         "--dataset.relax.key_mapping.y_relaxed=energy_relaxed",
         "--task.relaxation_steps=3", "--task.relaxation_fmax=0.0",
         f"--task.relax_opt.traj_dir={traj_dir}", NO_METADATA], cwd=tmp_path)
    trajs = sorted(traj_dir.glob("*.traj"))
    assert len(trajs) == 20
    frames = read(trajs[0], index=":")
    assert len(frames) == 4  # initial + 3 steps
    assert not np.allclose(frames[0].positions, frames[-1].positions)

    out = tmp_path / "is2re_submission.npz"
    run([sys.executable, SUBMISSION_SCRIPT, "--is2re-relaxations",
         *(f"--{s.replace('_', '-')}={traj_dir}" for s in SPLITS), f"--out-path={out}"],
        cwd=tmp_path)
    sub = np.load(out)
    sids = sorted(t.stem for t in trajs)
    for s in SPLITS:
        assert sorted(sub[f"{s}_ids"]) == sids and np.isfinite(sub[f"{s}_energy"]).all()
    i = list(sub["id_ids"]).index(trajs[0].stem)
    assert sub["id_energy"][i] == pytest.approx(frames[-1].get_potential_energy())
