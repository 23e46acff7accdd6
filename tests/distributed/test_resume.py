"""Preemption/resume exactness: a run killed after k steps and resumed from fairchem's periodic
training-state checkpoint gives the same per-step losses and learning rates as the uninterrupted
run (same seed), because the checkpoint carries the global RNG states that EquiformerV2's random
edge-frame rolls draw from, and the loader realigns the LR scheduler that fairchem saves one step
behind. Each test runs for DeNS (``DenoisingForcesTrainer``) and for plain EquiformerV2 with
``fairchem_dens.resume.ExactResumeForcesTrainer`` (``eqv2_exact_resume_cpu.yml``)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from fairchem_dens.rng import RNG_STATE_KEY
from tests.conftest import REPO, demo_config

# Bitwise equality needs deterministic kernels: with several intra-op threads, torch's CPU
# backward accumulates scatter sums in a varying order, so two runs of the same step can differ
# in the last bits (seen once here: 78.118324 vs 78.118332 at the 4th step). One thread here; on
# GPUs the same holds with deterministic algorithms only.
pytestmark = pytest.mark.usefixtures("_single_thread")

DENS = {"prob": 0.5, "corrupt_ratio": 0.5, "std": 0.1, "coefficient": 10}
# 2 steps of 4 structures per epoch, no validation, fairchem's periodic checkpoint every step
KW = {"first_n": 8, "eval_every": 1000, "checkpoint_every": 1}
DEMO = REPO / "configs" / "oc20" / "s2ef" / "demo"
VARIANTS = ("dens", "plain")  # DeNS trainer; plain EquiformerV2 + ExactResumeForcesTrainer


def resume_config(variant: str, demo_lmdb, run_dir, **optim) -> dict:
    """The DeNS demo config, or the plain one with eqv2_exact_resume_cpu.yml's trainer."""
    if variant == "dens":
        return demo_config(demo_lmdb, DENS, run_dir, **optim)
    from fairchem.core.common.utils import load_config

    config = demo_config(demo_lmdb, None, run_dir, **optim)  # eqv2_cpu.yml
    config["trainer"] = load_config(str(DEMO / "eqv2_exact_resume_cpu.yml"))[0]["trainer"]
    return config


def test_exact_resume_config_is_the_plain_config_with_its_trainer() -> None:
    from fairchem.core.common.utils import load_config

    exact = load_config(str(DEMO / "eqv2_exact_resume_cpu.yml"))[0]
    plain = load_config(str(DEMO / "eqv2_cpu.yml"))[0]
    assert exact.pop("trainer") == "fairchem_dens.resume.ExactResumeForcesTrainer"
    assert plain.pop("trainer") == "equiformerv2_forces"
    assert exact == plain


def make_trainer(config: dict, seed: int = 3):
    """As ``tests.conftest.build_trainer`` but not in debug mode, so ``save`` writes files."""
    from fairchem.core.common.registry import registry

    return registry.get_trainer_class(config["trainer"])(
        task=config.get("task", {}), model=config["model"], outputs=config["outputs"],
        dataset=config["dataset"], optimizer=config["optim"],
        loss_functions=config["loss_functions"], evaluation_metrics=config["evaluation_metrics"],
        identifier="resume", run_dir=config["run_dir"], is_debug=False, print_every=1000,
        seed=seed, logger="tensorboard", local_rank=0, cpu=True, name="s2ef",
    )


class Killed(Exception):
    """The training process dies (node failure, preemption) at the start of a step."""


def record_losses(trainer, lrs: list[float] | None = None,
                  kill_at: int | None = None, rng_states: list | None = None) -> list[float]:
    """Run ``trainer.train()``; return each step's loss, recording its LR and the global torch
    generator state at its loss (after the forward, which draws EquiformerV2's edge rolls)."""
    losses: list[torch.Tensor] = []
    lrs = [] if lrs is None else lrs
    rng_states = [] if rng_states is None else rng_states
    compute = trainer._compute_loss

    def recording(out, batch):
        if trainer.step == kill_at:
            raise Killed
        lrs.append(trainer.scheduler.get_lr())
        rng_states.append(torch.get_rng_state())
        losses.append(compute(out, batch))
        return losses[-1]

    trainer._compute_loss = recording
    with contextlib.suppress(Killed):
        trainer.train(disable_eval_tqdm=True)
    return [x.item() for x in losses]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_from_training_checkpoint_is_exact(variant, demo_lmdb, tmp_path) -> None:
    straight_lrs: list[float] = []
    straight_rng: list[torch.Tensor] = []
    straight = record_losses(make_trainer(
        resume_config(variant, demo_lmdb, tmp_path / "straight", max_epochs=2, **KW)),
        straight_lrs, rng_states=straight_rng)
    assert len(straight) == 4

    # the same run killed during step 3; resume from the checkpoint fairchem's loop wrote after
    # step 2 (before that step's scheduler.step())
    first = make_trainer(resume_config(variant, demo_lmdb, tmp_path / "first", max_epochs=2, **KW))
    head = record_losses(first, kill_at=3)
    assert len(head) == 2
    assert RNG_STATE_KEY not in first.config  # only in the files, not left in the live config
    ckpt = next((tmp_path / "first").glob("checkpoints/*/checkpoint.pt"))
    state = torch.load(ckpt, map_location="cpu")
    assert state["step"] == 2 and RNG_STATE_KEY in state["config"]
    assert state["scheduler"]["last_epoch"] == 1  # one behind: the loader catches up

    resumed = make_trainer(
        resume_config(variant, demo_lmdb, tmp_path / "resumed", max_epochs=2, **KW))
    torch.manual_seed(1234)  # whatever the resuming process did before: the checkpoint rules
    resumed.load_checkpoint(str(ckpt))
    lrs: list[float] = []
    resumed_rng: list[torch.Tensor] = []
    tail = record_losses(resumed, lrs, rng_states=resumed_rng)
    assert lrs == straight_lrs[2:]  # the LR schedule is not shifted by the resume
    assert head + tail == straight  # bitwise: same floats, step for step
    # the generators continue where the killed run stood: same edge rolls, same dropout
    assert all(torch.equal(a, b) for a, b in zip(resumed_rng, straight_rng[2:], strict=True))

    # the control: a stock checkpoint (no RNG states) resumes with other generator states, hence
    # other edge-frame rolls (EquiformerV2 is equivariant up to its grid error, so the losses
    # themselves may agree to float32 precision: the generator state is the sensitive check)
    del state["config"][RNG_STATE_KEY]
    stock = make_trainer(resume_config(variant, demo_lmdb, tmp_path / "stock", max_epochs=2, **KW))
    stock.load_checkpoint(str(ckpt), checkpoint=state)
    stock_rng: list[torch.Tensor] = []
    record_losses(stock, rng_states=stock_rng)
    assert len(stock_rng) == 2
    assert not any(torch.equal(a, b) for a, b in zip(stock_rng, straight_rng[2:]))


def test_inference_load_leaves_the_generators_alone(demo_lmdb, tmp_path) -> None:
    first = make_trainer(demo_config(demo_lmdb, DENS, tmp_path / "a", max_epochs=2, **KW))
    ckpt = first.save(checkpoint_file="checkpoint.pt", training_state=True)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first.load_checkpoint(ckpt, inference_only=True)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generators_restored_when_training_starts_not_on_load(variant, demo_lmdb, tmp_path,
                                                               monkeypatch) -> None:
    """fairchem's task set-up loads the checkpoint (not inference-only) in every --mode, so
    predict/validate/run-relaxations must not inherit the training run's generator states
    (their outputs would depend on the checkpoint, not on --seed); train() restores them."""
    from fairchem.core.trainers.ocp_trainer import OCPTrainer

    trainer = make_trainer(resume_config(variant, demo_lmdb, tmp_path / "t", max_epochs=2, **KW))
    ckpt = trainer.save(checkpoint_file="checkpoint.pt", training_state=True)
    saved_next = torch.rand(3)  # the draw the saved run makes next
    torch.manual_seed(7)
    seeded = torch.rand(3)
    torch.manual_seed(7)
    trainer.load_checkpoint(ckpt)  # what TrainTask and PredictTask both do
    assert torch.equal(torch.rand(3), seeded)  # --seed rules until training starts
    first_draw = []
    monkeypatch.setattr(OCPTrainer, "train",
                        lambda self, disable_eval_tqdm=False: first_draw.append(torch.rand(3)))
    trainer.train()
    assert torch.equal(first_draw[0], saved_next)
    first_draw.clear()
    trainer.train()  # restored once: a second call continues from where the first left off
    assert not torch.equal(first_draw[0], saved_next)


@pytest.mark.parametrize("variant", VARIANTS)
def test_preemption_during_a_save_leaves_a_complete_checkpoint(variant, demo_lmdb, tmp_path,
                                                                 monkeypatch) -> None:
    """submitit's handler runs Runner.checkpoint (a nested save of the same file) while the loop
    is in its own save, then exits the process: the file on disk must be the nested save's."""
    import fairchem.core.trainers.base_trainer as base_trainer

    trainer = make_trainer(resume_config(variant, demo_lmdb, tmp_path / "t", max_epochs=1, **KW))
    write = base_trainer.save_checkpoint
    calls = []

    def interrupted_write(state, checkpoint_dir, checkpoint_file):
        calls.append(checkpoint_file)
        if len(calls) > 1:  # the handler's save completes
            return write(state, checkpoint_dir=checkpoint_dir, checkpoint_file=checkpoint_file)
        with open(f"{checkpoint_dir}/{checkpoint_file}", "wb") as f:  # the loop's torch.save
            f.write(b"PK\x03\x04 first records")
            trainer.step = 7
            trainer.save(checkpoint_file="checkpoint.pt", training_state=True)  # the handler
            f.write(b"3 rest of the zip")  # what the loop's writer flushes while unwinding
        raise SystemExit(-1)  # submitit exits after requeueing

    monkeypatch.setattr(base_trainer, "save_checkpoint", interrupted_write)
    trainer.step = 6
    with pytest.raises(SystemExit):
        trainer.save(checkpoint_file="checkpoint.pt", training_state=True)
    ckpt_dir = trainer.config["cmd"]["checkpoint_dir"]
    state = torch.load(f"{ckpt_dir}/checkpoint.pt", map_location="cpu")
    assert state["step"] == 7 and RNG_STATE_KEY in state["config"]
    assert RNG_STATE_KEY not in trainer.config


@pytest.mark.timeout(300)
def test_resumed_run_uses_the_decayed_lambda_of_the_uninterrupted_run(demo_lmdb, tmp_path) -> None:
    dens = {**DENS, "coefficient_schedule": "linear", "coefficient_schedule_by": "step"}

    def run(name: str, kill_at: int | None = None, ckpt=None) -> tuple[list[float], list[float]]:
        trainer = make_trainer(demo_config(demo_lmdb, dens, tmp_path / name, max_epochs=2, **KW))
        if ckpt is not None:
            trainer.load_checkpoint(str(ckpt))
        coefficients = []
        compute = trainer._compute_loss
        trainer._compute_loss = lambda o, b: coefficients.append(trainer.dens_coefficient()) \
            or compute(o, b)
        return record_losses(trainer, kill_at=kill_at), coefficients

    straight, straight_coeffs = run("straight")
    assert straight_coeffs == [10.0, 7.5, 5.0, 2.5]  # 10 (1 - (s - 1) / 4), s = 1..4
    run("first", kill_at=3)
    ckpt = next((tmp_path / "first").glob("checkpoints/*/checkpoint.pt"))
    tail, tail_coeffs = run("resumed", ckpt=ckpt)
    assert tail_coeffs == straight_coeffs[2:]
    assert tail == straight[2:]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_save_outside_the_loop_is_written_at_once_even_at_an_evaluation_step(
        variant, demo_lmdb, tmp_path) -> None:
    """The loop's periodic checkpoint of an evaluation step waits for that step's validation;
    any other save during training (submitit's preemption handler ``Runner.checkpoint``, which
    exits the process right after) must reach the disk at once."""
    trainer = make_trainer(resume_config(variant, demo_lmdb, tmp_path / "t", max_epochs=1,
                                         first_n=8, eval_every=2))
    trainer._in_training, trainer.step = True, 4  # mid-training, at an evaluation step
    path = trainer.save(checkpoint_file="checkpoint.pt", training_state=True)
    assert torch.load(path, map_location="cpu")["step"] == 4
    assert trainer._deferred_save is None
