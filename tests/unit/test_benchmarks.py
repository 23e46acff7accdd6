"""The benchmark scripts stay importable and their bookkeeping is right: paired plain/DeNS runs
differ only in the config (same seed, data, steps, evaluation points), evaluation steps land
on epoch ends, and ratios are paired by seed. (The runs themselves are not executed here.)"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import accuracy
import datasets
from runner import Result, eval_interval, steps_per_epoch


@pytest.mark.parametrize(("per_epoch", "evals", "expected"),
                         [(204, 2, 102), (125, 1, 125), (125, 2, 25), (7, 2, 1), (3, 5, 1)])
def test_eval_interval_divides_the_epoch(per_epoch, evals, expected) -> None:
    every = eval_interval(per_epoch, evals)
    assert every == expected and per_epoch % every == 0


def test_steps_per_epoch() -> None:
    assert steps_per_epoch(814, 4) == 204 and steps_per_epoch(1000, 8) == 125


def test_paired_runs_differ_only_in_config(demo_lmdb, monkeypatch, tmp_path) -> None:
    fake = datasets.Dataset("oc20", demo_lmdb, "oc20")
    monkeypatch.setitem(datasets.DATASETS, "oc20", lambda: fake)
    suite = accuracy.Suite("t", {"oc20": 2}, (0, 1), {"oc20": (accuracy.PLAIN, accuracy.DENS)},
                           {"oc20": accuracy.OC20_ABLATIONS[:1]})
    runs, _ = accuracy.plan(suite, tmp_path)
    by_name = {r.name: r for r in runs}
    assert sorted(by_name) == ["oc20/dens/seed0", "oc20/dens/seed1", "oc20/no_encoding/seed0",
                               "oc20/plain/seed0", "oc20/plain/seed1"]
    plain, dens = by_name["oc20/plain/seed1"], by_name["oc20/dens/seed1"]
    assert plain.config.name == "eqv2_cpu.yml" and dens.config.name == "eqv2_dens_cpu.yml"
    assert plain.overrides == dens.overrides and plain.seed == dens.seed == 1
    assert plain.eval_every == dens.eval_every
    assert by_name["oc20/no_encoding/seed0"].overrides[-1] == "--optim.dens.encode_forces=False"
    assert "--optim.max_epochs=2" in plain.overrides and f"--dataset.train.src={demo_lmdb}/train" \
        in plain.overrides
    assert plain.key() != dens.key()


def test_summary_ratios_are_paired_by_seed() -> None:
    def result(name, forces):
        return Result(name, [10], [{"forces_mae": forces, "energy_mae": 1.0}], 1.0, [])

    suite = accuracy.Suite("t", {"oc20": 1}, (0, 1), {"oc20": (accuracy.PLAIN, accuracy.DENS)})
    results = {"oc20/plain/seed0": result("a", 0.10), "oc20/plain/seed1": result("b", 0.20),
               "oc20/dens/seed0": result("c", 0.09), "oc20/dens/seed1": result("d", 0.22)}
    table, summary = accuracy.summarise(suite, results)
    assert summary["oc20/dens"]["forces_mae_ratio"] == pytest.approx([0.9, 1.1])
    assert "1.000 (0.900, 1.100)" in table
