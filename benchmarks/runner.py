"""Run training jobs of the benchmarks through the stock ``fairchem --mode train`` console script.

Each :class:`Run` is one subprocess with ``OMP_NUM_THREADS`` threads; :func:`execute_all` runs
``jobs`` of them at a time (on 2 cores, two 1-thread runs beat one 2-thread run for these small
models). A finished run stores ``result.json`` next to its log and is reused when the same
command is asked for again, so an interrupted suite continues where it stopped.

Validation runs every ``eval_every`` steps (fairchem evaluates when ``step % eval_every == 0``),
so the k-th evaluation of a log is at step ``k * eval_every``: that gives the learning curves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fairchem_dens.runs import fairchem_executable, parse_val_metrics  # noqa: E402


@dataclass
class Run:
    """One training job. ``overrides`` are fairchem command-line overrides (``--a.b=c``)."""

    name: str
    config: Path
    out: Path
    seed: int
    overrides: list[str] = field(default_factory=list)
    eval_every: int | None = None  # steps between validations; None: no validation split

    def command(self) -> list[str]:
        return [fairchem_executable(), "--mode", "train",
                "--config-yml", str(self.config), "--cpu", "--run-dir", str(self.out),
                "--identifier", self.name.replace("/", "_"), "--seed", str(self.seed),
                *([f"--optim.eval_every={self.eval_every}"] if self.eval_every else []),
                "--optim.checkpoint_every=-1", *self.overrides]

    def key(self) -> str:
        """Identity of the job: its command without the interpreter path (a result stays
        valid when the environment moves)."""
        return hashlib.sha256(json.dumps(self.command()[1:]).encode()).hexdigest()[:16]


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


def steps_per_epoch(num_frames: int, batch_size: int) -> int:
    return math.ceil(num_frames / batch_size)


def eval_interval(per_epoch: int, evals_per_epoch: int) -> int:
    """Largest divisor of ``per_epoch`` not above ``per_epoch / evals_per_epoch``, so the last
    step of every epoch is evaluated."""
    target = max(per_epoch // max(evals_per_epoch, 1), 1)
    return max(d for d in range(1, target + 1) if per_epoch % d == 0)


def _same_job(command: list[str]) -> list[str]:
    """``command`` without the interpreter path and the ``--run-dir`` value: neither changes the
    training, so a result stays valid when the environment or the runs' folder moves (e.g.
    ``--out`` pointing to an archived copy of a suite's runs)."""
    return [arg for i, arg in enumerate(command) if i > 0 and command[i - 1] != "--run-dir"]


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


def execute(run: Run, threads: int = 1, echo=print) -> Result:
    """Run one job (or reuse its stored result); raises ``SystemExit`` with the log's tail on
    failure."""
    if run.eval_every is not None and run.eval_every < 1:
        raise ValueError(f"run {run.name}: eval_every must be a positive number of steps")
    run.out.mkdir(parents=True, exist_ok=True)
    stored = run.out / "result.json"
    reused = load_result(run)
    if reused is not None:
        echo(f"[reuse] {run.name} ({stored})")
        return reused
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    echo(f"[start] {run.name}: {' '.join(run.command())}")
    start = time.time()
    log_file = run.out / "train.log"
    with log_file.open("w") as log:
        proc = subprocess.run(run.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=run.out, check=False)
    minutes = (time.time() - start) / 60
    text = log_file.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{run.name} failed (exit {proc.returncode}); log {log_file}:\n"
                         f"{text[-3000:]}")
    curve = parse_val_metrics(text)
    if run.eval_every and not curve:
        raise SystemExit(f"{run.name}: no validation metrics in {log_file}")
    result = Result(run.name, [(run.eval_every or 0) * (k + 1) for k in range(len(curve))],
                    curve, minutes, run.command())
    stored.write_text(json.dumps({**asdict(result), "key": run.key()}, indent=1))
    final = f", final val force MAE {result.final['forces_mae']:.4f}" if curve else ""
    echo(f"[done] {run.name}: {minutes:.1f} min{final}")
    return result


def execute_all(runs: list[Run], jobs: int = 2, threads: int = 1) -> dict[str, Result]:
    """Run ``runs`` with ``jobs`` at a time; results by run name."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda r: execute(r, threads), runs))
    return {r.name: r for r in results}
