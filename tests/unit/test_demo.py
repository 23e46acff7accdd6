"""The demo's log parsing and data overrides (the training itself runs in tests/e2e)."""

from __future__ import annotations

from pathlib import Path

from fairchem_dens.cli import build_parser
from fairchem_dens.runs import data_overrides, parse_val_metrics

LOG = """\
2026-11-21 14:35:00 base_trainer.py:863: (INFO): Evaluating on val.
2026-11-21 14:35:01 ocp_trainer.py:194: (INFO): energy_mae: 4.39e-01, forces_mae: 8.01e-02, loss: 3.81e+01, step: 2.30e+02
2026-11-21 14:35:07 base_trainer.py:905: (INFO): energy_mae: 24.8390, forces_mae: 0.0844, loss: 66.6774, epoch: 1.0000
2026-11-21 14:36:00 base_trainer.py:863: (INFO): Evaluating on val.
2026-11-21 14:36:07 base_trainer.py:905: (INFO): energy_mae: 24.8220, forces_mae: 0.0845, loss: 66.6586, epoch: 2.0000
"""


def test_parse_val_metrics_reads_each_validation_block() -> None:
    evaluations = parse_val_metrics(LOG)
    assert [e["forces_mae"] for e in evaluations] == [0.0844, 0.0845]
    assert evaluations[-1]["energy_mae"] == 24.8220
    assert evaluations[0]["epoch"] == 1.0


def test_data_overrides_point_every_path_at_the_converted_data() -> None:
    args = data_overrides(Path("/d"))
    assert "--dataset.train.src=/d/train" in args
    assert "--dataset.val.src=/d/val" in args
    assert "--dataset.train.transforms.normalizer.forces.file=/d/forces_normalizer.npz" in args
    assert "--dataset.train.transforms.element_references.energy.file=/d/element_references.npz" in args


def test_demo_is_a_subcommand() -> None:
    args = build_parser().parse_args(["demo", "--model", "escn", "--compare"])
    assert (args.model, args.compare) == ("escn", True)
