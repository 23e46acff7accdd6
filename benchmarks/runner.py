"""Run training jobs of the benchmarks through the stock ``fairchem --mode train`` console script.

Each :class:`Run` is one subprocess with ``OMP_NUM_THREADS`` threads; :func:`execute_all` runs
``jobs`` of them at a time (on 2 cores, two 1-thread runs beat one 2-thread run for these small
models). A finished run stores ``result.json`` next to its log and is reused when the same
command is asked for again, so an interrupted suite continues where it stopped.

Runs that outlive a session: every run writes a training-state checkpoint every
``checkpoint_every`` steps (fairchem's ``optim.checkpoint_every``; ``None``: at the end of each
epoch) to a fixed folder, ``<out>/checkpoints/<identifier>/checkpoint.pt`` (``--timestamp-id``
is the run's identifier), next to the job's fingerprint (``job.json``: the command and the
flattened resolved config, YAML content + overrides). Asked for again, a run without
``result.json`` whose checkpoint exists resumes from it (``--checkpoint``, same timestamp id, so
logs and checkpoints continue in place); each resumed segment logs to
``train.resume-<step>.log`` and the learning curve joins the segments (:func:`join_curves`).
A job whose config changed since its checkpoint is refused (:class:`JobChanged`, naming the
keys); ``restart=True`` (``accuracy.py --restart``) discards the checkpoint and starts over.
Plain runs with fairchem's ``equiformerv2_forces`` trainer run with
``fairchem_dens.resume.ExactResumeForcesTrainer`` (the same trainer plus exact resume; the same
numbers when uninterrupted), so a resumed run, plain or DeNS, continues bit for bit.

Validation runs every ``eval_every`` steps (fairchem evaluates when ``step % eval_every == 0``),
so the k-th evaluation of a log is at step ``k * eval_every``: that gives the learning curves.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fairchem_dens.runs import fairchem_executable, parse_val_metrics  # noqa: E402

#: fairchem's plain trainer and the same trainer with exact resume, which the runner uses
STOCK_TRAINER = "equiformerv2_forces"
EXACT_TRAINER_OVERRIDE = "--trainer=fairchem_dens.resume.ExactResumeForcesTrainer"
#: config keys that do not change the training: a resume may change them
RESUMABLE_CHANGES = ("optim.checkpoint_every",)
RESUME_LOG = re.compile(r"train\.resume-(\d+)\.log")


class JobChanged(SystemExit):
    """A run's checkpoint belongs to another job (config, overrides or seed changed)."""


@dataclass
class Run:
    """One training job. ``overrides`` are fairchem command-line overrides (``--a.b=c``)."""

    name: str
    config: Path
    out: Path
    seed: int
    overrides: list[str] = field(default_factory=list)
    eval_every: int | None = None  # steps between validations; None: no validation split
    checkpoint_every: int | None = None  # steps between checkpoints; None: each epoch's end

    @property
    def identifier(self) -> str:
        return self.name.replace("/", "_")

    def config_overrides(self) -> list[str]:
        """The ``--a.b=c`` overrides of the command (what changes the YAML's config)."""
        trainer = ([EXACT_TRAINER_OVERRIDE]
                   if _resolved_trainer(str(self.config), tuple(self.overrides)) == STOCK_TRAINER
                   else [])
        return [*([f"--optim.eval_every={self.eval_every}"] if self.eval_every else []),
                f"--optim.checkpoint_every={self.checkpoint_every or -1}", *self.overrides,
                *trainer]

    def command(self) -> list[str]:
        return [fairchem_executable(), "--mode", "train",
                "--config-yml", str(self.config), "--cpu", "--run-dir", str(self.out),
                "--identifier", self.identifier, "--timestamp-id", self.identifier,
                "--seed", str(self.seed), *self.config_overrides()]

    def key(self) -> str:
        """Identity of the job: its command without the interpreter path (a result stays
        valid when the environment moves) and what only changes the checkpoints
        (:func:`_canonical`)."""
        return hashlib.sha256(json.dumps(_canonical(self.command())).encode()).hexdigest()[:16]

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints" / self.identifier

    @property
    def checkpoint(self) -> Path:
        return self.checkpoint_dir / "checkpoint.pt"

    def logs(self) -> list[tuple[int, Path]]:
        """(first step, log) of each segment of the run, in order: ``train.log`` from step 0,
        ``train.resume-<s>.log`` from the checkpoint of step s."""
        segments = [(0, self.out / "train.log")] if (self.out / "train.log").exists() else []
        for path in self.out.glob("train.resume-*.log"):
            segments.append((int(RESUME_LOG.fullmatch(path.name).group(1)), path))
        return sorted(segments)


@dataclass
class Result:
    """Validation metrics of one run at steps ``steps`` (EMA weights, fairchem's evaluator)."""

    name: str
    steps: list[int]
    curve: list[dict[str, float]]
    minutes: float
    command: list[str]

    @property
    def final(self) -> dict[str, float]:
        return self.curve[-1]


def write_results(results_dir: Path, stem: str, table: str, payload: dict[str, Any]) -> None:
    """``results_dir/<stem>.md`` (the Markdown ``table``) and ``<stem>.json`` (``payload``)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{stem}.md").write_text(table + "\n")
    (results_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1))


def steps_per_epoch(num_frames: int, batch_size: int) -> int:
    return math.ceil(num_frames / batch_size)


def eval_interval(per_epoch: int, evals_per_epoch: int) -> int:
    """Largest divisor of ``per_epoch`` not above ``per_epoch / evals_per_epoch``, so the last
    step of every epoch is evaluated."""
    target = max(per_epoch // max(evals_per_epoch, 1), 1)
    return max(d for d in range(1, target + 1) if per_epoch % d == 0)


def checkpoint_interval(eval_every: int | None, seconds_per_step: float,
                        minutes: float = 5.0) -> int:
    """Steps between checkpoints for one every ``minutes`` of wall time at ``seconds_per_step``:
    a multiple of ``eval_every`` (checkpoints at evaluations), at least one evaluation."""
    steps = max(1, int(minutes * 60 / seconds_per_step))
    if not eval_every:
        return steps
    return eval_every * max(1, steps // eval_every)


@functools.lru_cache(maxsize=256)
def _resolved_trainer(config: str, overrides: tuple[str, ...]) -> str | None:
    for override in reversed(overrides):
        if override.startswith("--trainer="):
            return override.split("=", 1)[1]
    from fairchem.core.common.utils import load_config

    return load_config(config)[0].get("trainer")


def _canonical(command: list[str]) -> list[str]:
    """``command`` without the interpreter path and what does not change the training: the
    ``--timestamp-id`` (the checkpoints' folder), ``optim.checkpoint_every`` (written as -1,
    the runner's former constant, so results of older runs keep their identity) and the exact
    resume trainer standing in for fairchem's own (:data:`EXACT_TRAINER_OVERRIDE`)."""
    out = []
    for i, arg in enumerate(command):
        if i == 0 or arg == "--timestamp-id" or command[i - 1] == "--timestamp-id":
            continue
        if arg == EXACT_TRAINER_OVERRIDE:
            continue
        out.append("--optim.checkpoint_every=-1" if arg.startswith("--optim.checkpoint_every=")
                   else arg)
    return out


def _same_job(command: list[str]) -> list[str]:
    """``command`` (:func:`_canonical`) without the ``--run-dir`` value: it does not change the
    training, so a result stays valid when the environment or the runs' folder moves (e.g.
    ``--out`` pointing to an archived copy of a suite's runs)."""
    canonical = _canonical(command)
    return [arg for i, arg in enumerate(canonical) if i == 0 or canonical[i - 1] != "--run-dir"]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def fingerprint(run: Run) -> dict[str, Any]:
    """What identifies ``run``'s training: the flattened resolved config (the YAML file with its
    includes, as fairchem reads it, merged with the command's overrides) plus the seed, and the
    command (:func:`_same_job`, for information)."""
    from fairchem.core.common.utils import create_dict_from_args, load_config, merge_dicts

    config = load_config(str(run.config))[0]
    config = merge_dicts(config, create_dict_from_args(run.config_overrides()))[0]
    flat = {k: v for k, v in _flatten(config).items() if k not in RESUMABLE_CHANGES}
    flat["seed"] = run.seed
    return json.loads(json.dumps({"name": run.name, "command": _same_job(run.command()),
                                  "config": flat}, default=str))


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: stored -> current`` for every config key that differs (added or removed too)."""
    old, new = stored.get("config", {}), current["config"]
    missing = "<unset>"
    return [f"{key}: {old.get(key, missing)!r} -> {new.get(key, missing)!r}"
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)]


def join_curves(segments: list[tuple[int, str]], eval_every: int) -> tuple[list[int], list[dict]]:
    """The learning curve of a run from the logs of its segments, ``(first step, log text)`` in
    order. A segment resumed from the checkpoint of step c evaluates at the multiples of
    ``eval_every`` after c; a segment's evaluations after the next segment's start are dropped
    (that segment was killed later; the next one redid them). Raises ``ValueError`` if the joined
    steps are not ``eval_every, 2 eval_every, ...`` (an evaluation missing or repeated)."""
    steps, curve = [], []
    for i, (start, text) in enumerate(segments):
        end = segments[i + 1][0] if i + 1 < len(segments) else math.inf
        for j, metrics in enumerate(parse_val_metrics(text), start=1):
            step = (start // eval_every + j) * eval_every
            if step <= end:
                steps.append(step)
                curve.append(metrics)
    if steps != [eval_every * (k + 1) for k in range(len(steps))]:
        raise ValueError(f"evaluation steps {steps} are not every {eval_every} steps from "
                         f"{eval_every}: an evaluation is missing or repeated")
    return steps, curve


def load_result(run: Run) -> Result | None:
    """The stored result of ``run`` (same job, :func:`_same_job`), or ``None`` if it has not
    finished."""
    stored = run.out / "result.json"
    if not stored.exists():
        return None
    data = json.loads(stored.read_text())
    data.pop("key", None)
    if _same_job(data["command"]) != _same_job(run.command()):
        return None
    return Result(**data)


def discard(run: Run) -> None:
    """Remove what the runner and fairchem wrote for an unfinished ``run`` (its checkpoints,
    fingerprint, logs and fairchem's logs/results of its timestamp id)."""
    for path in (run.checkpoint_dir, run.out / "logs" / "tensorboard" / run.identifier,
                 run.out / "results" / run.identifier):
        shutil.rmtree(path, ignore_errors=True)
    for _, log in run.logs():
        log.unlink()


def _checkpoint_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])


def _log_minutes(text: str) -> float:
    """Minutes between the first and last time stamps of a fairchem log (a killed segment)."""
    import datetime

    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ", text, re.MULTILINE)
    if len(stamps) < 2:
        return 0.0
    first, last = (datetime.datetime.strptime(s, "%Y-%m-%d %H:%M:%S") for s in
                   (stamps[0], stamps[-1]))
    return (last - first).total_seconds() / 60


def execute(run: Run, threads: int = 1, echo=print, restart: bool = False) -> Result:
    """Run one job (or reuse its stored result, or resume it from its checkpoint); raises
    ``SystemExit`` with the log's tail on failure, :class:`JobChanged` if its checkpoint belongs
    to another job (``restart=True``: discard the checkpoint and start over)."""
    if run.eval_every is not None and run.eval_every < 1:
        raise ValueError(f"run {run.name}: eval_every must be a positive number of steps")
    run.out.mkdir(parents=True, exist_ok=True)
    stored = run.out / "result.json"
    reused = load_result(run)
    if reused is not None:
        echo(f"[reuse] {run.name} ({stored})")
        return reused
    lock = (run.out / "run.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit(f"{run.name} is running in another process ({run.out / 'run.lock'} is "
                         "locked); wait for it or stop it first") from None
    with lock:
        return _execute_locked(run, threads, echo, restart, lock.fileno())


def _execute_locked(run: Run, threads: int, echo, restart: bool, lock_fd: int) -> Result:
    job = run.checkpoint_dir / "job.json"
    current = fingerprint(run)
    if restart:
        discard(run)
    command = run.command()
    if run.checkpoint.exists():
        saved = json.loads(job.read_text()) if job.exists() else {}
        changes = config_changes(saved, current)
        if changes:
            raise JobChanged(
                f"{run.name}: the checkpoint {run.checkpoint} was written by another job; "
                f"changed since: {'; '.join(changes)}. Refusing to continue it with the new "
                f"settings: rerun with --restart (execute(..., restart=True)) to discard it and "
                f"start over, or delete {run.checkpoint_dir}.")
        start_step = _checkpoint_step(run.checkpoint)
        log_file = run.out / f"train.resume-{start_step}.log"
        command = [*command, "--checkpoint", str(run.checkpoint)]
        echo(f"[resume] {run.name} from step {start_step} ({run.checkpoint})")
    else:
        discard(run)  # logs of an attempt that never wrote a checkpoint
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        job.write_text(json.dumps(current, indent=1))
        start_step, log_file = 0, run.out / "train.log"
        echo(f"[start] {run.name}: {' '.join(command)}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.time()
    with log_file.open("w") as log:  # the child holds the run's lock as long as it lives
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=run.out, check=False, pass_fds=(lock_fd,))
    minutes = (time.time() - start) / 60
    text = log_file.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{run.name} failed (exit {proc.returncode}); log {log_file}:\n"
                         f"{text[-3000:]}")
    segments = [(s, path.read_text()) for s, path in run.logs() if s <= start_step]
    minutes += sum(_log_minutes(t) for s, t in segments if s < start_step)
    if run.eval_every:
        try:
            steps, curve = join_curves(segments, run.eval_every)
        except ValueError as e:
            raise SystemExit(f"{run.name}: {e} (logs {[str(p) for _, p in run.logs()]})") from e
        if not curve:
            raise SystemExit(f"{run.name}: no validation metrics in {log_file}")
    else:
        steps, curve = [], []
    result = Result(run.name, steps, curve, minutes, run.command())
    (run.out / "result.json").write_text(json.dumps({**asdict(result), "key": run.key()},
                                                    indent=1))
    final = f", final val force MAE {result.final['forces_mae']:.4f}" if curve else ""
    echo(f"[done] {run.name}: {minutes:.1f} min{final}")
    return result


def execute_all(runs: list[Run], jobs: int = 2, threads: int = 1,
                restart: bool = False) -> dict[str, Result]:
    """Run ``runs`` with ``jobs`` at a time; results by run name."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda r: execute(r, threads, restart=restart), runs))
    return {r.name: r for r in results}
