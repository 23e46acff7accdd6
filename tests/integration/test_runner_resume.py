"""Benchmark runs that outlive a session (benchmarks/runner.py): a run killed mid-way and asked
for again resumes from its last checkpoint and ends with the same validation curve and the same
final weights, bit for bit, as the uninterrupted run; a job whose config changed since its
checkpoint is refused, naming the changed keys.

The runs are real ``fairchem --mode train`` subprocesses on the bundled OC20 frames (8 training
frames, 2 per step: 4 steps per epoch, 2 epochs; validation every 2 steps, a checkpoint every 3,
so one checkpoint is mid-epoch and one falls on a validation step). The kill is a SIGKILL the
training process sends itself at the start of a step's backward (a ``sitecustomize`` on
``PYTHONPATH``), i.e. a crash between two checkpoints, deterministic."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys

import pytest
import torch

from fairchem_dens.runs import data_overrides
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import runner

pytestmark = pytest.mark.usefixtures("_single_thread")

DEMO = REPO / "configs" / "oc20" / "s2ef" / "demo"
CONFIGS = {"dens": DEMO / "eqv2_dens_cpu.yml", "plain": DEMO / "eqv2_cpu.yml"}
KILL_ENV = "FAIRCHEM_DENS_TEST_KILL_AT_STEP"
KILL_SHIM = f"""
import os
import signal

if os.environ.get({KILL_ENV!r}):
    from fairchem.core.trainers.base_trainer import BaseTrainer

    _backward = BaseTrainer._backward

    def _dying_backward(self, loss):
        if self.step == int(os.environ[{KILL_ENV!r}]):
            os.kill(os.getpid(), signal.SIGKILL)
        return _backward(self, loss)

    BaseTrainer._backward = _dying_backward
"""


def tiny_run(out, config, lmdb, **changes) -> runner.Run:
    run = runner.Run(
        name="oc20/variant/seed0", config=config, out=out, seed=0,
        overrides=[*data_overrides(lmdb), "--dataset.train.first_n=8", "--dataset.val.first_n=4",
                   "--optim.batch_size=2", "--optim.eval_batch_size=2", "--optim.max_epochs=2",
                   "--optim.scheduler_params.warmup_epochs=1", "--optim.ema_decay=0.99"],
        eval_every=2, checkpoint_every=3)
    for key, value in changes.items():
        setattr(run, key, value)
    return run


def checkpoint_step(run: runner.Run) -> int:
    return torch.load(run.checkpoint, map_location="cpu", weights_only=False)["step"]


def assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("variant", "kills"), [("dens", (5, 7)), ("plain", (5,))])
def test_killed_run_resumes_to_the_uninterrupted_curve(variant, kills, demo_lmdb, tmp_path,
                                                       monkeypatch) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(KILL_SHIM)
    straight = runner.execute(tiny_run(tmp_path / "straight", CONFIGS[variant], demo_lmdb))
    assert straight.steps == [2, 4, 6, 8]

    run = tiny_run(tmp_path / "killed", CONFIGS[variant], demo_lmdb)
    monkeypatch.setenv("PYTHONPATH", str(shim))
    for kill, resumed_from in zip(kills, (3, 6)):  # killed in step 5 (after the validation of
        monkeypatch.setenv(KILL_ENV, str(kill))  # step 4), then in step 7 (after that of 6)
        with pytest.raises(SystemExit, match=r"failed \(exit -9\)"):
            runner.execute(run)
        assert checkpoint_step(run) == resumed_from  # 3: mid-epoch; 6: a validation step
    monkeypatch.delenv(KILL_ENV)
    resumed = runner.execute(run)

    starts = [start for start, _ in run.logs()]
    assert starts == [0, 3, 6][:len(kills) + 1]
    # the first segment validated at steps 2 and 4 before dying in step 5; its step-4 metrics
    # were redone by the segment resumed from step 3 and are taken from there once
    assert len(runner.parse_val_metrics((run.out / "train.log").read_text())) == 2
    assert resumed.steps == straight.steps
    assert resumed.curve == straight.curve
    ours, theirs = (torch.load(r.checkpoint, map_location="cpu", weights_only=False)
                    for r in (run, tiny_run(tmp_path / "straight", CONFIGS[variant], demo_lmdb)))
    assert ours["step"] == theirs["step"] == 8  # the final step is checkpointed
    for key in ("state_dict", "ema", "optimizer", "scheduler"):
        assert_same_tensors(ours[key], theirs[key], key)  # bitwise, not approximately
    assert runner.execute(run).curve == straight.curve  # finished: reused, not rerun


def fake_checkpoint(run: runner.Run, step: int = 3) -> None:
    """What an interrupted run leaves: its fingerprint and a checkpoint of ``step``."""
    run.checkpoint_dir.mkdir(parents=True)
    (run.checkpoint_dir / "job.json").write_text(json.dumps(runner.fingerprint(run)))
    torch.save({"step": step}, run.checkpoint)


@pytest.mark.parametrize(("change", "key"), [
    ({"overrides": ["--optim.lr_initial=0.001"]}, "optim.lr_initial"),
    ({"overrides": ["--optim.dens.std=0.1"]}, "optim.dens.std"),
    ({"seed": 1}, "seed"),
    ({"eval_every": 4}, "optim.eval_every"),
])
def test_a_changed_job_is_refused_naming_the_key(change, key, demo_lmdb, tmp_path) -> None:
    run = tiny_run(tmp_path / "run", CONFIGS["dens"], demo_lmdb)
    fake_checkpoint(run)
    changed = tiny_run(tmp_path / "run", CONFIGS["dens"], demo_lmdb)
    for attr, value in change.items():
        setattr(changed, attr, [*run.overrides, *value] if attr == "overrides" else value)
    with pytest.raises(runner.JobChanged, match=rf"changed since: {key}: .*--restart"):
        runner.execute(changed)
    assert run.checkpoint.exists()  # nothing discarded


def test_a_changed_yaml_file_is_refused_and_restart_discards(demo_lmdb, tmp_path,
                                                            monkeypatch) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("eqv2_cpu.yml", "eqv2_dens_cpu.yml"):  # the DeNS config includes the plain one
        shutil.copy(DEMO / name, configs / name)
    run = tiny_run(tmp_path / "run", configs / "eqv2_dens_cpu.yml", demo_lmdb)
    fake_checkpoint(run)
    text = (configs / "eqv2_dens_cpu.yml").read_text()
    (configs / "eqv2_dens_cpu.yml").write_text(text.replace("coefficient: 10", "coefficient: 5"))
    with pytest.raises(runner.JobChanged, match=r"optim\.dens\.coefficient: 10 -> 5"):
        runner.execute(run)

    commands = []

    def fake_fairchem(command, stdout, **kwargs):  # four validations, then success
        commands.append(command)
        stdout.write("Evaluating on val.\nforces_mae: 0.1, energy_mae: 1.0\n" * 4)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(runner.subprocess, "run", fake_fairchem)
    result = runner.execute(run, restart=True)
    assert "--checkpoint" not in commands[0]  # started over
    assert result.steps == [2, 4, 6, 8]
    stored = json.loads((run.checkpoint_dir / "job.json").read_text())
    assert stored["config"]["optim.dens.coefficient"] == 5  # the new job's fingerprint


def test_checkpoint_spacing_may_change_on_resume(demo_lmdb, tmp_path, monkeypatch) -> None:
    run = tiny_run(tmp_path / "run", CONFIGS["dens"], demo_lmdb)
    fake_checkpoint(run, step=3)
    (run.out / "train.log").write_text("Evaluating on val.\nforces_mae: 0.2, energy_mae: 1.0\n")
    commands = []

    def fake_fairchem(command, stdout, **kwargs):  # resumed from step 3: validates at 4, 6, 8
        commands.append(command)
        stdout.write("Evaluating on val.\nforces_mae: 0.1, energy_mae: 1.0\n" * 3)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(runner.subprocess, "run", fake_fairchem)
    result = runner.execute(tiny_run(tmp_path / "run", CONFIGS["dens"], demo_lmdb,
                                     checkpoint_every=4))
    assert commands[0][-2:] == ["--checkpoint", str(run.checkpoint)]
    assert "--timestamp-id" in commands[0] and "--optim.checkpoint_every=4" in commands[0]
    assert result.steps == [2, 4, 6, 8] and result.curve[0]["forces_mae"] == 0.2


def test_a_run_in_progress_is_not_started_twice(demo_lmdb, tmp_path) -> None:
    run = tiny_run(tmp_path / "run", CONFIGS["dens"], demo_lmdb)
    run.out.mkdir()
    with (run.out / "run.lock").open("w") as held:  # e.g. the child of a killed runner
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SystemExit, match="running in another process"):
            runner.execute(run)


def test_join_curves_takes_each_step_once() -> None:
    def log(*maes):
        return "".join(f"Evaluating on val.\nforces_mae: {m}, energy_mae: 1.0\n" for m in maes)

    # validation every 2 steps; killed in step 5 (after 2, 4), resumed from the checkpoint of
    # step 3 (redoes 4), killed in step 9, resumed from the checkpoint of step 6 (redoes 8)
    steps, curve = runner.join_curves([(0, log(1, 2)), (3, log(3, 4, 5)), (6, log(6, 7))], 2)
    assert steps == [2, 4, 6, 8, 10]
    assert [m["forces_mae"] for m in curve] == [1, 3, 4, 6, 7]
    with pytest.raises(ValueError, match="missing or repeated"):  # step 4 lost
        runner.join_curves([(0, log(1)), (4, log(3))], 2)


def test_old_results_keep_their_identity() -> None:
    """Results of the runner before checkpointing (``--optim.checkpoint_every=-1``, no
    ``--timestamp-id``, fairchem's plain trainer) stay reusable: neither changes the training."""
    run = runner.Run("md17/plain/seed0", REPO / "benchmarks/configs/md17_eqv2_cpu.yml",
                     REPO / "runs" / "x", 0, ["--optim.max_epochs=2"], eval_every=125,
                     checkpoint_every=750)
    new = run.command()
    assert runner.EXACT_TRAINER_OVERRIDE in new  # plain EquiformerV2: exact-resume trainer
    old = [a for i, a in enumerate(new) if a not in ("--timestamp-id", runner.EXACT_TRAINER_OVERRIDE)
           and new[i - 1] != "--timestamp-id"]
    old[old.index("--optim.checkpoint_every=750")] = "--optim.checkpoint_every=-1"
    assert runner._same_job(old) == runner._same_job(new)
    assert runner._canonical(old) == runner._canonical(new)  # hence the same Run.key()


@pytest.mark.parametrize(("eval_every", "seconds", "expected"),
                         [(125, 0.5, 500), (102, 3.0, 102), (None, 3.0, 100), (10, 60.0, 10)])
def test_checkpoint_interval(eval_every, seconds, expected) -> None:
    assert runner.checkpoint_interval(eval_every, seconds, minutes=5) == expected
