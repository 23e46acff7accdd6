"""CPU stand-ins for a GPU check of the DeNS training step (issue #24), on each backbone family
(EquiformerV2, eSCN, eSEN) and a real OC20 batch:

* device placement: a float64 step (model and batch in double) whose every loss term is float64,
  run under :class:`DeviceTrap`, which fails on any tensor the DeNS code makes without an
  explicit ``device=`` (or a floating one without ``dtype=``, or in another dtype than the
  batch's): on a GPU such a tensor lands on the CPU (or in float32) and breaks or slows the step;
* host syncs: :func:`count_syncs` counts the calls that make a GPU wait for the host (``item``,
  ``tolist``, ``cpu``, ``numpy``, ``bool/int/float/index`` of a tensor, ``nonzero``, boolean
  masks, ``repeat_interleave`` with tensor repeats) in a DeNS step and in fairchem's plain step
  on the same batch and model: after the batch moves to the device, DeNS adds only the
  documented :data:`DENS_DEVICE_SYNCS`; before it, only the host-side draw runs (CPU tensors);
* AMP: a DeNS step under ``torch.autocast("cpu", dtype=torch.bfloat16)`` gives a finite loss
  and finite gradients, DeNS-only parameters included.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from fairchem.core.models.equiformer_v2.trainers.forces_trainer import EquiformerV2ForcesTrainer
from torch.overrides import TorchFunctionMode

from fairchem_dens.models.dens import dens_only_parameters
from fairchem_dens.trainer import NOISE_PRED_KEY
from tests.conftest import build_trainer, demo_config
from tests.integration.test_esen_trainer import esen_trainer

DENS = {"prob": 0.5, "corrupt_ratio": 0.5, "std": 0.1, "coefficient": 10}
FAMILIES = ("eqv2", "escn", "esen")
PACKAGE = Path(__file__).resolve().parents[2] / "fairchem_dens"

#: (file, function, kind) of each host sync a DeNS step adds to fairchem's step, the families
#: that have it, and why (docs/architecture.md, "Device placement and host syncs")
DENS_DEVICE_SYNCS: dict[tuple[str, str, str], tuple[tuple[str, ...], str]] = {
    ("loss.py", "denoising_metrics", "tolist"): (
        FAMILIES, "the denoising_* training metrics are host floats (fairchem's Evaluator adds "
        "numbers); both sums come back in one transfer"),
    ("equiformer_v2.py", "_restrict", "nonzero"): (
        ("eqv2",), "the EquiformerV2 noise head runs on the edges into corrupted atoms; the "
        "edges are built on the device (otf_graph), so their indices cannot come from the draw"),
    ("num_nodes.py", "maybe_num_nodes", "__int__"): (
        ("eqv2",), "the EquiformerV2 noise head is fairchem's attention block, whose PyG softmax "
        "reads the node count back (int(index.max()) + 1) in every block, the plain step's "
        "blocks and force head included"),
}


def documented_syncs(family: str) -> set[tuple[str, str, str]]:
    """The call sites of :data:`DENS_DEVICE_SYNCS` that ``family`` has."""
    return {site for site, (families, _) in DENS_DEVICE_SYNCS.items() if family in families}
#: functions that run on the loader's CPU batch before it moves to the device (no device sync)
HOST_FUNCTIONS = {("corruption.py", "sample_corruption"), ("corruption.py", "_structures_with"),
                  ("trainer.py", "_sample"), ("trainer.py", "_check_stress_data"),
                  ("filters.py", "filter_flags")}


# ------------------------------------------------------------------------- trainers and steps
def make_trainer(family: str, demo_lmdb: Path, run_dir: Path):
    """The DeNS trainer of ``family`` on 4 real OC20 structures (one batch; eSEN: direct)."""
    if family == "esen":
        return esen_trainer(demo_lmdb, run_dir, "direct", DENS)
    return build_trainer(demo_config(demo_lmdb, DENS, run_dir, first_n=4, model=family))


@pytest.fixture(scope="module", params=FAMILIES)
def trainer(request, demo_lmdb, tmp_path_factory):
    """One trainer per family, shared by the float32 tests (they leave the weights as they are).
    """
    trainer = make_trainer(request.param, demo_lmdb, tmp_path_factory.mktemp("device_clean"))
    with torch.no_grad():  # builds the backbones' lazy caches (eSCN's e3nn S2 grids) outside
        trainer._forward(first_batch(trainer))  # the trap and the counters
    return trainer


def first_batch(trainer):
    return next(iter(trainer.train_loader))


def mixed_step_number(trainer, batch) -> int:
    """A step whose draw mixes corrupted and plain structures and leaves free uncorrupted atoms
    (searched on the host draw only, deterministic)."""
    for step in range(1, 200):
        trainer.step = step
        c = trainer._sample(copy.copy(batch))
        if c.num_corrupted and c.num_free_uncorrupted and not bool(c.selected.all()):
            return step
    raise AssertionError("no mixed step found")


@dataclass
class StepResult:
    loss: torch.Tensor
    out: dict[str, torch.Tensor]
    metrics: dict[str, Any]


def dens_step(trainer, batch, step: int) -> StepResult:
    """One DeNS training step as fairchem's loop runs it: forward, loss, metrics, loss.item(),
    backward (no optimiser step, so the weights stay)."""
    trainer.model.train()
    trainer.step = step
    out = trainer._forward(batch)
    loss = trainer._compute_loss(out, batch)
    metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})
    return finish_step(trainer, out, loss, metrics)


def finish_step(trainer, out, loss: torch.Tensor, metrics: dict) -> StepResult:
    """The end of fairchem's step: the loss logged (``loss.item()``), backward."""
    metrics = trainer.evaluator.update("loss", loss.item(), metrics)
    loss.backward()
    return StepResult(loss, out, metrics)


def plain_step(trainer, batch, step: int) -> StepResult:
    """fairchem's own step (EquiformerV2ForcesTrainer's methods) on the same model: the DeNS
    modules are inactive without corruption inputs."""
    plain = EquiformerV2ForcesTrainer
    trainer.model.train()
    trainer.step = step
    out = plain._forward(trainer, batch)
    loss = plain._compute_loss(trainer, out, batch)
    metrics = plain._compute_metrics(trainer, out, batch, trainer.evaluator, {})
    return finish_step(trainer, out, loss, metrics)


def zero_grads(trainer) -> None:
    for p in trainer.model.parameters():
        p.grad = None


def cast_batch(batch, dtype: torch.dtype):
    """A shallow copy of ``batch`` with every floating attribute but the cell in ``dtype``
    (fairchem's graph builder, ``radius_graph_pbc``, multiplies the cell by its float32 unit
    cells: it needs a float32 cell)."""
    cast = copy.copy(batch)
    for key in batch.keys():  # noqa: SIM118 - iterating a PyG batch yields (key, value)
        value = batch[key]
        if torch.is_tensor(value) and value.is_floating_point() and key != "cell":
            cast[key] = value.to(dtype)
    return cast


@contextlib.contextmanager
def double_model(trainer) -> Iterator[None]:
    """The model (and the normalisers, element references) in float64. The default dtype is
    float64 meanwhile: fairchem's own model code makes float tensors without a dtype (its step
    is not float64-clean); the DeNS code is checked by :class:`DeviceTrap`, whatever the
    default. fairchem's EquiformerV2 caches some of them (``rotate_inv_rescale_cache``): the
    trainer stays float64, use a trainer of its own."""
    modules = [trainer.model, *trainer.normalizers.values(), *trainer.elementrefs.values()]
    default = torch.get_default_dtype()
    for module in modules:
        module.double()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


# ------------------------------------------------------------------------- the device trap
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor,
             torch.as_tensor, torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye,
             torch.randperm}


def _package_caller(depth: int = 2) -> str | None:
    """``file:function:line`` of the frame ``depth`` up when it is in fairchem_dens, else None."""
    frame = sys._getframe(depth)
    path = Path(frame.f_code.co_filename)
    if PACKAGE not in path.parents:
        return None
    return f"{path.name}:{frame.f_code.co_name}:{frame.f_lineno}"


class DeviceTrap(TorchFunctionMode):
    """Records each torch call made directly from fairchem_dens code that makes a tensor
    without ``device=`` (a factory), a floating one without ``dtype=``, or a floating result in
    another dtype than ``dtype`` (the batch's) outside the host-side draw.

    ``float_ok``: functions whose float results may differ from ``dtype``: the host-side draw
    (float32 coins, float64 noise, by design: the stream is the same whatever the batch dtype).
    """

    def __init__(self, dtype: torch.dtype,
                 float_ok: frozenset[str] = frozenset({"sample_corruption", "sigma_schedule"})
                 ) -> None:
        super().__init__()
        self.dtype, self.float_ok = dtype, float_ok
        self.violations: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        site = _package_caller()
        if site is None:  # not DeNS code: run as without the mode (the mode is off inside
            return func(*args, **kwargs)  # its own handler)
        result = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if func in FACTORIES and "device" not in kwargs:
            self.violations.append(f"{site}: torch.{name} without device=")
        floating = torch.is_tensor(result) and result.is_floating_point()
        if floating and func in FACTORIES and "dtype" not in kwargs:
            self.violations.append(f"{site}: torch.{name} of floats without dtype=")
        elif floating and result.dtype != self.dtype and site.split(":")[1] not in self.float_ok:
            self.violations.append(f"{site}: {name} gives {result.dtype}, batch is {self.dtype}")
        return result


# ------------------------------------------------------------------------- the sync counter
@dataclass
class SyncLog:
    """Host syncs of one step, as ``(file, function, kind)`` of the calling frame."""

    host: list[tuple[str, str, str]] = field(default_factory=list)  # before batch.to(device)
    device: list[tuple[str, str, str]] = field(default_factory=list)  # after
    moved: bool = False
    paused: bool = False

    def record(self, kind: str) -> None:
        if self.paused:
            return
        frame = sys._getframe(2)  # the caller of the patched method
        site = (Path(frame.f_code.co_filename).name, frame.f_code.co_name, kind)
        (self.device if self.moved else self.host).append(site)


SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__",
                "__index__", "nonzero", "masked_select")


def _bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


class _BoolIndexCounter(TorchFunctionMode):
    """Records indexing with a boolean tensor (``x[mask]``, ``x[mask] = v``). A mode, not a
    patched ``Tensor.__getitem__``: assigning ``__getitem__`` on ``torch.Tensor`` changes its C
    sequence slot for good (``torch.tensor([0-d tensors])`` then fails with ``len() of a 0-d
    tensor``)."""

    def __init__(self, log: SyncLog) -> None:
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1
                and _bool_index(args[1])):
            self.log.record("bool-index")
        # a patched method dispatched here again is the same call: counted once, at its caller
        paused, self.log.paused = self.log.paused, True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.log.paused = paused


def _counted(log: SyncLog, kind: str, original: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        log.record(kind)
        return original(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def count_syncs(batch, monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncLog]:
    """Counts host syncs while active; ``batch``'s class marks the move to the device."""
    log = SyncLog()
    with monkeypatch.context() as patch, _BoolIndexCounter(log):
        for name in SYNC_METHODS:
            patch.setattr(torch.Tensor, name, _counted(log, name, getattr(torch.Tensor, name)))
        patch.setattr(torch, "nonzero", _counted(log, "nonzero", torch.nonzero))
        patch.setattr(torch, "masked_select", _counted(log, "masked_select",
                                                       torch.masked_select))
        repeat = torch.repeat_interleave

        def repeat_interleave(x, repeats=None, *args, **kwargs):
            if torch.is_tensor(repeats) and repeats.numel() > 1 and "output_size" not in kwargs:
                log.record("repeat_interleave")
            return repeat(x, repeats, *args, **kwargs)

        owner = next(c for c in type(batch).__mro__ if "to" in vars(c))
        to = owner.to

        def moved(self, *args, **kwargs):
            log.moved = True
            return to(self, *args, **kwargs)

        patch.setattr(torch, "repeat_interleave", repeat_interleave)
        patch.setattr(owner, "to", moved)
        yield log


def extra_syncs(dens: list, plain: list) -> collections.Counter:
    """The DeNS step's syncs beyond the plain step's, by call site (multiset difference)."""
    return collections.Counter(dens) - collections.Counter(plain)


# ------------------------------------------------------------------------- tests
@pytest.mark.parametrize("family", FAMILIES)
def test_float64_dens_step_keeps_every_tensor_on_the_batch_device_and_dtype(
        family, demo_lmdb, tmp_path) -> None:
    trainer = make_trainer(family, demo_lmdb, tmp_path)
    batch = cast_batch(first_batch(trainer), torch.float64)
    step = mixed_step_number(trainer, batch)
    dtypes: list[torch.dtype] = []
    fns = [info["fn"] for _, info in trainer.loss_functions] + [trainer.dens_loss_fn]
    hooks = [fn.register_forward_hook(lambda _m, _a, out: dtypes.append(out.dtype))
             for fn in fns]
    trap = DeviceTrap(torch.float64)
    try:
        with double_model(trainer), trap:
            result = dens_step(trainer, batch, step)
            grads = [None if p.grad is None else p.grad.dtype
                     for p in dens_only_parameters(trainer.model)]
    finally:
        for hook in hooks:
            hook.remove()
    assert trap.violations == [], "\n".join(trap.violations)
    assert trainer._dens_step.num_corrupted > 0
    assert result.loss.dtype == torch.float64
    assert dtypes == [torch.float64] * len(fns)  # energy, forces, DeNS terms
    assert result.out[NOISE_PRED_KEY].dtype == torch.float64
    assert grads == [torch.float64] * len(grads)  # every DeNS-only weight, in float64


def patch_uncorrupted_view(monkeypatch: pytest.MonkeyPatch, extra: Callable) -> None:
    """Make the DeNS loss call ``extra(trainer)`` (a stand-in for a careless edit)."""
    from fairchem_dens.trainer import DenoisingForcesTrainer

    view = DenoisingForcesTrainer._uncorrupted_view

    def patched(self, batch, step):
        extra(self)
        return view(self, batch, step)

    monkeypatch.setattr(DenoisingForcesTrainer, "_uncorrupted_view", patched)


def test_device_trap_catches_a_tensor_made_without_device(trainer, monkeypatch) -> None:
    """The trap is live: a DeNS loss that makes ``torch.zeros(())`` (no device, no dtype)
    fails."""
    batch = first_batch(trainer)
    step = mixed_step_number(trainer, batch)
    patch_uncorrupted_view(monkeypatch, lambda _trainer: _implicit_zero())
    trap = DeviceTrap(torch.float32)
    with trap:
        dens_step(trainer, batch, step)
    zero_grads(trainer)
    assert any("torch.zeros without device=" in v for v in trap.violations), trap.violations


def _implicit_zero() -> torch.Tensor:
    """What the trap must catch, as DeNS code would write it (this file is not fairchem_dens:
    the call is attributed to it by running it through the package's namespace)."""
    scope: dict[str, Any] = {"torch": torch}
    code = compile("result = torch.zeros(())", str(PACKAGE / "trainer.py"), "exec")
    exec(code, scope)
    return scope["result"]


def family_of(trainer) -> str:
    """``eqv2``, ``escn`` or ``esen``, from the trainer's backbone."""
    name = type(trainer._unwrapped_model.backbone).__module__.rsplit(".", 1)[-1]
    return {"equiformer_v2": "eqv2", "escn": "escn", "esen": "esen"}[name]


def test_dens_step_adds_only_the_documented_host_syncs(trainer, monkeypatch) -> None:
    batch = first_batch(trainer)
    step = mixed_step_number(trainer, batch)
    with count_syncs(batch, monkeypatch) as plain:
        plain_step(trainer, copy.copy(batch), step)
    with count_syncs(batch, monkeypatch) as dens:
        dens_step(trainer, copy.copy(batch), step)
    zero_grads(trainer)
    assert trainer._dens_step.num_corrupted > 0
    assert plain.host == []  # fairchem moves the batch first
    assert {site[:2] for site in dens.host} <= HOST_FUNCTIONS, dens.host
    documented = documented_syncs(family_of(trainer))
    extra = extra_syncs(dens.device, plain.device)
    assert set(extra) <= documented, extra
    assert all(count == 1 for count in extra.values()), extra
    assert len(dens.device) <= len(plain.device) + len(documented)
    print(f"\n{family_of(trainer)}: host syncs plain {len(plain.device)}, DeNS "
          f"{len(dens.device)} (+{sum(extra.values())}: {sorted(extra)}); DeNS host-side "
          f"calls on CPU tensors before the move {len(dens.host)}")


def test_sync_counter_sees_a_boolean_mask_on_the_device(trainer, monkeypatch) -> None:
    """The counter is live: indexing the noise prediction with the device mask (what the DeNS
    loss did before it used the host-built indices) counts as one more sync."""
    batch = first_batch(trainer)
    step = mixed_step_number(trainer, batch)
    with count_syncs(batch, monkeypatch) as clean:
        dens_step(trainer, copy.copy(batch), step)
    patch_uncorrupted_view(monkeypatch, lambda t: t._dens_step.target[t._dens_step.mask])
    with count_syncs(batch, monkeypatch) as masked:
        dens_step(trainer, copy.copy(batch), step)
    zero_grads(trainer)
    assert len(masked.device) > len(clean.device)


def test_bfloat16_autocast_dens_step_gives_finite_loss_and_gradients(trainer) -> None:
    batch = first_batch(trainer)
    step = mixed_step_number(trainer, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = dens_step(trainer, batch, step)
    params = [(n, p) for n, p in trainer.model.named_parameters() if p.grad is not None]
    dens_params = {id(p) for p in dens_only_parameters(trainer.model)}
    try:
        assert trainer._dens_step.num_corrupted > 0
        assert torch.isfinite(result.loss)
        assert result.metrics["denoising_noise_mae"]["metric"] < float("inf")
        assert all(torch.isfinite(p.grad).all() for _, p in params), [
            n for n, p in params if not torch.isfinite(p.grad).all()]
        assert dens_params <= {id(p) for _, p in params}  # the DeNS-only weights are trained
        assert any(p.grad.abs().sum() > 0 for _, p in params if id(p) in dens_params)
    finally:
        zero_grads(trainer)
