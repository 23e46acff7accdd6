"""submitit, as ``fairchem --submit`` uses it, minus SLURM: fairchem's own ``Runner`` is submitted
through ``submitit.LocalExecutor`` on a DeNS config, preempted mid-training with the signal SLURM
sends to a preempted job's tasks (SIGUSR2), checkpoints through ``Runner.checkpoint`` (a
``DelayedSubmission`` of a fresh Runner whose config points at the checkpoint), is requeued by
submitit and resumes from that checkpoint to completion.

What is disabled: ``config["submit"] = False``. ``fairchem --submit`` sets it True, which makes
``distutils.setup`` read ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST``, call ``scontrol`` and
start an NCCL process group; without SLURM variables it silently starts none, and inside a SLURM
allocation (e.g. a CI runner) it would need GPUs. With ``submit`` False the job process takes
fairchem's local path instead: a one-rank gloo group (``--cpu``), exactly as ``fairchem --cpu``
without ``--submit``. Everything else (Runner, new_trainer_context, TrainTask, checkpoint and
requeue) is fairchem's and submitit's own code.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from fairchem_dens.runs import data_overrides
from tests.conftest import REPO

CONFIG = REPO / "configs" / "oc20" / "s2ef" / "demo" / "eqv2_dens_cpu.yml"
STEPS_PER_EPOCH, EPOCHS = 2, 2


def build_config(lmdb, run_dir) -> dict:
    """The config ``fairchem --mode train --cpu`` would build, through fairchem's own parser."""
    from fairchem.core.common.flags import flags
    from fairchem.core.common.utils import build_config as fairchem_build_config

    args, overrides = flags.get_parser().parse_known_args([
        "--mode", "train", "--config-yml", str(CONFIG), "--cpu", "--run-dir", str(run_dir),
        "--identifier", "submitit", "--print-every", "1", *data_overrides(lmdb),
        f"--dataset.train.first_n={4 * STEPS_PER_EPOCH}", "--dataset.val.first_n=4",
        f"--optim.max_epochs={EPOCHS}", "--optim.scheduler_params.warmup_epochs=1",
    ])
    config = fairchem_build_config(args, overrides)
    config["submit"] = False  # see the module docstring
    return config


def _children(pid: int) -> list[int]:
    """Child pids on Linux (``/proc/<pid>/task/<pid>/children``)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        pytest.skip("needs Linux /proc to find the job's task process")
    return [int(x) for x in path.read_text().split()]


def _log(job) -> str:
    return "".join(p.read_text() for p in (job.paths.stdout, job.paths.stderr) if p.exists())


@pytest.mark.timeout(240)
def test_runner_preempted_checkpoints_requeues_and_resumes(demo_lmdb, tmp_path,
                                                           monkeypatch) -> None:
    import submitit
    from fairchem.core._cli import Runner
    from submitit.helpers import DelayedSubmission

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var)
    run = tmp_path / "run"
    config = build_config(demo_lmdb, run)
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=4)
    job = executor.submit(Runner(), config)

    deadline = time.time() + 150
    while "step: 2.00e+00" not in _log(job):  # trainer built, training under way
        assert job.state not in ("FAILED", "DONE", "FINISHED"), _log(job)[-4000:]
        assert time.time() < deadline, _log(job)[-4000:]
        time.sleep(0.2)
    # SIGUSR2 to the job's task process, as SLURM signals the tasks of a job it preempts
    # (submitit's own LocalJob._interrupt signals the local controller, which ignores USR2)
    task_pids = _children(int(job.job_id))
    assert len(task_pids) == 1, task_pids
    os.kill(task_pids[0], signal.SIGUSR2)
    job.result()  # raises if the requeued job failed
    log = _log(job)

    # (submitit's local environment reports any USR2 as "timed-out"; either way it calls
    # Runner.checkpoint and requeues, on SLURM a preemption does not use up a timeout)
    assert "Caught signal SIGUSR2" in log and "Checkpointing callback is triggered" in log
    assert "Requeued job" in log
    resubmitted = job.submission()  # submitit re-pickled what Runner.checkpoint returned
    assert isinstance(resubmitted, DelayedSubmission)
    assert isinstance(resubmitted.function, Runner)
    resume_config = resubmitted.args[0]
    ckpt = resume_config["checkpoint"]
    assert ckpt.startswith(str(run / "checkpoints")) and os.path.isfile(ckpt)
    assert "Attemping to load user specified checkpoint" in log  # the requeued run resumed
    assert log.count("Total time taken") == 1  # ... and only it ran to the end

    def steps(text: str) -> list[int]:
        return [int(float(x)) for x in re.findall(r", step: ([0-9.]+e\+[0-9]+)", text)]

    split = log.index("Attemping to load user specified checkpoint")
    before, after = steps(log[:split]), steps(log[split:])
    k = len(before)
    assert before == list(range(1, k + 1)) and k >= 2
    # Runner.checkpoint saves whatever the trainer holds when the signal lands: the last
    # finished step k, or step k + 1 when it landed mid-step (that step is then not redone)
    assert after and after[0] in (k + 1, k + 2), (before, after)
    assert after == list(range(after[0], STEPS_PER_EPOCH * EPOCHS + 1))
    state = torch.load(ckpt, map_location="cpu")
    assert state["step"] == STEPS_PER_EPOCH * EPOCHS
    assert state["config"]["trainer"] == "fairchem_dens.trainer.DenoisingForcesTrainer"
    assert "rng_state" in state["config"]
    assert list(run.glob("logs/tensorboard/*/events.*"))
