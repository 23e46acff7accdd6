"""The prepared GPU check (benchmarks/gpu_check.py) in its CPU mode (``--smoke``): every section
runs and reports what it should, so the script works the first time a GPU is lent. Its torch
stand-in for bare GPU images (benchmarks/gpu_shims/torch_scatter) equals the real package."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.conftest import REPO


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory) -> dict:
    from benchmarks.gpu_check import main

    out = tmp_path_factory.mktemp("gpu_check") / "report.json"
    report = main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))  # written as it ran
    return report


def test_every_section_runs_without_error(smoke_report) -> None:
    sections = [k for k in smoke_report if "/" in k or k in ("cost", "ddp")]
    assert sorted(sections) == sorted(
        [f"{s}/{f}" for s in ("eval_equal", "train") for f in ("eqv2", "escn", "esen")]
        + ["cost", "ddp"])
    errors = {k: smoke_report[k]["error"][-800:] for k in sections if "error" in smoke_report[k]}
    assert not errors, errors


@pytest.mark.parametrize("family", ["eqv2", "escn", "esen"])
def test_dens_model_evaluates_exactly_as_plain(smoke_report, family) -> None:
    section = smoke_report[f"eval_equal/{family}"]
    assert section["frames"] > 0
    expected = {"energy", "forces"} | ({"stress"} if family == "esen" else set())
    assert set(section["dens_vs_plain"]) == expected
    assert all(v == 0.0 for v in section["dens_vs_plain"].values())  # CPU: bit-equal


@pytest.mark.parametrize("family", ["eqv2", "escn", "esen"])
def test_dens_steps_are_finite_in_fp32_and_bf16(smoke_report, family) -> None:
    section = smoke_report[f"train/{family}"]
    for precision in ("fp32", "amp"):
        run = section[precision]
        assert len(run["losses"]) == 2 and run["finite_losses"] and run["finite_parameters"]
        # outputs that are non-finite under DeNS are non-finite under plain fairchem too (eSEN's
        # gradient forces and stress under CPU bf16 autocast are, in fairchem 1.10 itself)
        ours = {k for k, n in run["nonfinite_outputs"].items() if n}
        assert ours <= {k for k, n in run["plain_nonfinite_outputs"].items() if n}, run
    assert not any(section["fp32"]["nonfinite_outputs"].values())
    assert section["syncs_per_step"] == {"plain": [None] * 3, "dens": [None] * 3}  # CPU


def test_cost_section_compares_dens_with_plain_on_the_same_batches(smoke_report) -> None:
    cost = smoke_report["cost"]
    assert cost["parameters"]["dens"] > cost["parameters"]["plain"]  # encoding + noise head
    for precision in ("fp32", "amp"):
        run = cost[precision]
        assert len(run["step_time_ratios"]) == 2 and all(r > 0 for r in run["step_time_ratios"])
        assert set(run["eval_frames_per_second"]) == {"plain", "dens"}
    assert smoke_report["ddp"] == {"skipped": "smoke (CPU)"}


def _shim():
    path = REPO / "benchmarks" / "gpu_shims" / "torch_scatter" / "__init__.py"
    spec = importlib.util.spec_from_file_location("torch_scatter_shim", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min"])
def test_torch_scatter_stand_in_equals_torch_scatter(reduce) -> None:
    import torch_scatter

    shim = _shim()
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(40, 3, generator=gen)
    index = torch.randint(0, 6, (40,), generator=gen)
    index[index == 2] = 3  # an empty output row
    assert torch.allclose(shim.scatter(src, index, 0, dim_size=8, reduce=reduce),
                          torch_scatter.scatter(src, index, 0, dim_size=8, reduce=reduce))
    ptr = torch.tensor([0, 10, 10, 25, 40])  # an empty segment
    assert torch.allclose(shim.segment_csr(src, ptr, reduce=reduce),
                          torch_scatter.segment_csr(src, ptr, reduce=reduce))
    if reduce in ("max", "min"):
        real = getattr(torch_scatter, f"scatter_{reduce}")(src, index, 0, dim_size=8)
        ours = getattr(shim, f"scatter_{reduce}")(src, index, 0, dim_size=8)
        assert torch.equal(real[0], ours[0]) and torch.equal(real[1], ours[1])
