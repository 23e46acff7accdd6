"""Validated DeNS hyper-parameters (the ``optim.dens`` section of a fairchem config).

Names follow the DeNS paper (Liao, Smidt, Das, TMLR 2024): ``prob`` = p_DeNS,
``corrupt_ratio`` = r_DeNS, ``coefficient`` = lambda_DeNS, ``std`` = a fixed sigma (Angstrom),
``std_low``/``std_high``/``num_steps`` = the geometric multi-scale schedule of Eq. 7.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

SELECTIONS = ("structure", "batch")
# Values pre-training by denoising (``pretrain: true``) needs; unset keys default to them.
PRETRAIN_FIXED = {"prob": 1.0, "corrupt_ratio": 1.0, "encode_forces": False}
NORMALIZE_BY = ("sigma", "std_high")
# How the forces and DeNS terms are reduced (see fairchem_dens.loss.shared_free_atom_loss).
REDUCTIONS = ("per_term", "shared_free_atoms")
SCHEDULES = ("constant", "linear", "cosine")  # lambda_DeNS over training (fairchem_dens.schedule)
SCHEDULE_UNITS = ("epoch", "step")

# Keys of the official DeNS code / fairchem's own port; we refuse them rather than guess.
_LEGACY_KEYS = {
    "use_denoising_pos": "set optim.dens.prob (0 disables DeNS)",
    "denoising_pos_params": "move its entries to optim.dens (fixed_noise_std/std -> std, "
    "std_low/std_high/num_steps unchanged, corrupt_ratio unchanged, prob unchanged)",
    "denoising_pos_coefficient": "use optim.dens.coefficient",
}


class DeNSConfigError(ValueError):
    """An invalid ``optim.dens`` entry; the message names the key, the value and the fix."""


@dataclass(frozen=True)
class DeNSConfig:
    """DeNS hyper-parameters.

    Attributes
    ----------
    prob: probability p_DeNS that a structure (or, with ``selection="batch"``, a whole batch)
        is corrupted and used for denoising. 0 disables DeNS.
    selection: ``"structure"`` (paper, Algorithm 1: DeNS and plain structures share one
        forward/backward) or ``"batch"`` (one coin per batch, as the official code does).
    corrupt_ratio: r_DeNS, probability that an eligible atom of a selected structure is corrupted.
    std: fixed noise standard deviation sigma in Angstrom (mutually exclusive with ``std_high``).
    std_low, std_high, num_steps: multi-scale noise; sigma_k = exp(log std_low + (k-1)/(T-1)
        (log std_high - log std_low)), k = 1..T, one sigma drawn uniformly per structure.
    normalize_by: noise target is eps/sigma of the structure (``"sigma"``, Eq. 4) or
        eps/std_high (``"std_high"``, official multi-scale code). Unset: ``"std_high"`` for
        multi-scale noise with ``reduction: shared_free_atoms`` (the authors' OC trainer),
        ``"sigma"`` otherwise.
    reduction: ``"per_term"`` (default; the authors' MD17 rule): the forces term is the mean over
        free uncorrupted atoms and the DeNS term the mean over corrupted atoms, each over all
        ranks. ``"shared_free_atoms"`` (the authors' OC20/OC22 trainer): per-atom L2 errors of
        the forces of free uncorrupted atoms (times lambda_F) and of the noise of corrupted atoms
        (times lambda_DeNS) summed and divided by one count, the free (or corrupted) atoms of
        the batch over all ranks. Needs ``l2mae``.
    all_atoms: also corrupt fixed atoms (``fixed == 1``); default only free atoms.
    coefficient: lambda_DeNS, weight of the denoising loss (its value at the start of training).
    coefficient_schedule: lambda_DeNS over training: ``"constant"``, ``"linear"`` (decay to 0 at
        the end of training, as the authors' MD17 runs) or ``"cosine"`` (half cosine to 0).
    coefficient_schedule_by: ``"epoch"`` (lambda changes once per epoch, as the authors' code:
        lambda (1 - e / max_epochs), e = 0, 1, ...) or ``"step"`` (every step, over
        ``optim.max_steps`` if set, else max_epochs x steps per epoch).
    loss_fn: fairchem loss name for the denoising term (``l2mae``, ``mse``, ...); ``None`` uses
        the loss function configured for the forces target, as the official code does.
    skip_key: optional per-structure data attribute (e.g. ``md``); structures where it is
        non-zero are never corrupted.
    encode_forces: encode the original forces of corrupted atoms (paper default); ``False`` is
        the "no force encoding" ablation.
    forces_key: name of the forces target in ``outputs``/``loss_functions``.
    pretrain: pre-training by denoising equilibrium structures (Zaidi et al. 2023): every
        eligible atom of every structure is noised (``prob`` and ``corrupt_ratio`` are 1), no
        forces are encoded, and the loss is ``coefficient * L_DeNS`` plus the energy term when
        the data has energies; the forces term is dropped (the data need no forces).
    positions_key: with ``pretrain``, the data attribute holding the equilibrium positions
        (e.g. ``pos_relaxed`` of OC20 IS2RE LMDBs); they replace ``pos``. ``None``: ``pos``.
    equilibrium_force_tol: with ``pretrain``, warn when the training structures carry forces of
        mean magnitude above this (eV/Angstrom): they are then not equilibrium structures.
    max_force_norm: skip DeNS (train the structure as a plain one) for structures whose largest
        per-atom force norm exceeds this, in eV/Angstrom on the raw forces (before any
        normaliser). ``None``: off. See :mod:`fairchem_dens.filters`.
    min_num_atoms: skip DeNS for structures with fewer atoms than this. ``None``: off.
    max_stress: skip DeNS for structures whose largest absolute stress component exceeds this,
        in the units of the data's stress target (``stress_key``; eV/Angstrom^3 as written by
        ``fairchem-dens convert``). ``None``: off.
    stress_key: name of the per-structure stress ``[B, 3, 3]`` in the training data, read by
        ``max_stress`` and by the stress data check (``max_plausible_stress``).
    uncorrupted_structure_targets: per-structure loss targets that a corrupted structure does
        not contribute: their labels belong to the unperturbed structure and, unlike the energy,
        are not a target of the paper's DeNS loss (e.g. stress, a derivative over every atom of
        the cell, see docs/esen.md). Their loss terms and training metrics are taken over the
        batch's uncorrupted structures only. ``None`` (default): every ``loss_functions``
        target whose name starts with ``stress`` (``stress``, or the decomposed
        ``stress_isotropic`` / ``stress_anisotropic`` of fairchem's OMat configs); ``[]``: none.
    max_plausible_stress: the stress data check: a training batch whose ``stress_key`` holds a
        component larger in magnitude than this (eV/Angstrom^3; 5 eV/Angstrom^3 = 801 GPa) is
        refused as a unit error (VASP's kBar or GPa instead of eV/Angstrom^3). ``None``: off.
    """

    prob: float = 0.5
    selection: Literal["structure", "batch"] = "structure"
    corrupt_ratio: float = 1.0
    std: float | None = None
    std_low: float = 0.01
    std_high: float | None = None
    num_steps: int = 50
    normalize_by: Literal["sigma", "std_high"] | None = None
    reduction: Literal["per_term", "shared_free_atoms"] = "per_term"
    all_atoms: bool = False
    coefficient: float = 10.0
    coefficient_schedule: Literal["constant", "linear", "cosine"] = "constant"
    coefficient_schedule_by: Literal["epoch", "step"] = "epoch"
    loss_fn: str | None = None
    skip_key: str | None = None
    encode_forces: bool = True
    forces_key: str = "forces"
    pretrain: bool = False
    positions_key: str | None = None
    equilibrium_force_tol: float = 0.1
    max_force_norm: float | None = None
    min_num_atoms: int | None = None
    max_stress: float | None = None
    stress_key: str = "stress"
    uncorrupted_structure_targets: tuple[str, ...] | None = None
    max_plausible_stress: float | None = 5.0
    _sigmas: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> DeNSConfigError:
            return DeNSConfigError(
                f"optim.dens.{key}={getattr(self, key)!r} is invalid: {why}"
            )

        for key in ("prob", "corrupt_ratio", "coefficient", "std_low", "num_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(key, "expected a number")
            if not math.isfinite(value):
                raise bad(key, "expected a finite number")
        if not 0.0 <= self.prob <= 1.0:
            raise bad("prob", "p_DeNS is a probability; use a value in [0, 1]")
        if not 0.0 < self.corrupt_ratio <= 1.0:
            raise bad("corrupt_ratio", "r_DeNS must be in (0, 1]; 1.0 corrupts every eligible atom")
        if self.coefficient < 0:
            raise bad("coefficient", "lambda_DeNS must be >= 0")
        if self.selection not in SELECTIONS:
            raise bad("selection", f"use one of {SELECTIONS}")
        if self.reduction not in REDUCTIONS:
            raise bad("reduction", f"use one of {REDUCTIONS}")
        if self.coefficient_schedule not in SCHEDULES:
            raise bad("coefficient_schedule", f"use one of {SCHEDULES}")
        if self.coefficient_schedule_by not in SCHEDULE_UNITS:
            raise bad("coefficient_schedule_by", f"use one of {SCHEDULE_UNITS}")
        shared = self.reduction == "shared_free_atoms"
        if self.normalize_by is None:  # the authors' choice for the reduction mode
            faithful = "std_high" if shared and self.std is None else "sigma"
            object.__setattr__(self, "normalize_by", faithful)
        if self.normalize_by not in NORMALIZE_BY:
            raise bad("normalize_by", f"use one of {NORMALIZE_BY}")
        if shared and self.std is None and self.normalize_by != "std_high":
            raise bad("normalize_by", "reduction: shared_free_atoms reproduces the authors' OC "
                      "trainer, which divides multi-scale noise by std_high; remove "
                      "normalize_by (or set it to std_high), or use reduction: per_term")
        if shared and self.loss_fn not in (None, "l2mae"):
            raise bad("loss_fn", "reduction: shared_free_atoms sums per-atom L2 errors (the "
                      "authors' hybrid loss); remove loss_fn or set it to l2mae")
        if shared and self.pretrain:
            raise bad("reduction", "pre-training has no forces term to share a denominator "
                      "with; remove optim.dens.reduction")
        for key in ("all_atoms", "encode_forces", "pretrain"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "expected true or false")
        if self.pretrain:
            for key, value in PRETRAIN_FIXED.items():
                if getattr(self, key) != value:
                    raise bad(key, f"pre-training (pretrain: true) needs {key}={value}: it noises "
                              "every eligible atom of every structure and has no forces to "
                              f"encode; remove optim.dens.{key}")
        if self.positions_key is not None and not self.pretrain:
            raise bad("positions_key", "only pre-training (pretrain: true) reads other positions; "
                      "DeNS needs the positions its force labels belong to")
        if not (isinstance(self.equilibrium_force_tol, (int, float)) and
                self.equilibrium_force_tol > 0):
            raise bad("equilibrium_force_tol", "expected a positive number of eV/Angstrom")
        self._check_filters(bad)
        if (self.std is None) == (self.std_high is None):
            raise DeNSConfigError(
                f"optim.dens needs exactly one noise setting, got std={self.std!r} and "
                f"std_high={self.std_high!r}: set std (fixed sigma, Angstrom) or std_high "
                "(multi-scale, with optional std_low and num_steps)"
            )
        if self.std is not None:
            if not (isinstance(self.std, (int, float)) and self.std > 0 and math.isfinite(self.std)):
                raise bad("std", "the fixed noise sigma must be a positive number of Angstrom")
            if self.normalize_by == "std_high":
                raise bad("normalize_by", "'std_high' needs multi-scale noise; with a fixed std use 'sigma'")
            sigmas: tuple[float, ...] = (float(self.std),)
        else:
            if not (isinstance(self.std_high, (int, float)) and math.isfinite(self.std_high)):
                raise bad("std_high", "expected a positive number of Angstrom")
            if not 0 < self.std_low < self.std_high:
                raise bad("std_low", f"need 0 < std_low < std_high={self.std_high}")
            if int(self.num_steps) != self.num_steps or self.num_steps < 2:
                raise bad("num_steps", "the multi-scale schedule needs an integer T >= 2")
            t = int(self.num_steps)
            lo, hi = math.log(self.std_low), math.log(self.std_high)
            sigmas = tuple(math.exp(lo + k / (t - 1) * (hi - lo)) for k in range(t))
        object.__setattr__(self, "_sigmas", sigmas)

    def _check_filters(self, bad) -> None:
        """``max_force_norm`` / ``max_stress``: positive finite numbers; ``min_num_atoms``: a
        positive integer; each may be ``None`` (filter off)."""
        for key, unit in (("max_force_norm", "eV/Angstrom"), ("max_stress", "stress units")):
            value = getattr(self, key)
            if value is None:
                continue
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value <= 0):
                raise bad(key, f"expected a positive number of {unit} (structures above it are "
                          f"not corrupted), or null to switch the filter off")
        value = self.min_num_atoms
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise bad("min_num_atoms", "expected a positive integer (structures with fewer "
                      "atoms are not corrupted), or null to switch the filter off")
        if not isinstance(self.stress_key, str) or not self.stress_key:
            raise bad("stress_key", "expected the name of the stress attribute, e.g. stress")
        value = self.max_plausible_stress
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise bad("max_plausible_stress", "expected a positive number of eV/Angstrom^3 "
                      "(the stress data check), or null to switch the check off")
        targets = self.uncorrupted_structure_targets
        if targets is not None:
            if isinstance(targets, str) or not all(isinstance(t, str) and t for t in targets):
                raise bad("uncorrupted_structure_targets", "expected a list of loss target "
                          "names, e.g. [stress], or null for every stress target")
            object.__setattr__(self, "uncorrupted_structure_targets", tuple(targets))

    @property
    def enabled(self) -> bool:
        return self.prob > 0

    @property
    def multi_scale(self) -> bool:
        return self.std is None

    def sigma_schedule(self, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> torch.Tensor:
        """Noise scales in Angstrom, shape ``[T]`` (``[1]`` for a fixed std), increasing; on the
        host unless ``device`` says otherwise (the corruption is drawn there)."""
        return torch.tensor(self._sigmas, dtype=dtype, device=device)

    @property
    def target_scale(self) -> float | None:
        """Fixed divisor of the noise target, or ``None`` when it is each structure's sigma."""
        return float(self.std_high) if self.normalize_by == "std_high" else None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> DeNSConfig:
        """Build from the ``optim.dens`` mapping, naming unknown keys and their fix."""
        cfg = dict(cfg or {})
        known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise DeNSConfigError(
                f"optim.dens has unknown key(s) {unknown}; known keys are {sorted(known)}"
            )
        if cfg.get("pretrain") is True:  # unset keys take the values pre-training needs
            cfg = {**PRETRAIN_FIXED, **cfg}
        return cls(**cfg)

    @classmethod
    def from_optim(cls, optim: dict[str, Any]) -> DeNSConfig:
        """Read ``optim.dens``; refuse the official code's keys with a translation."""
        legacy = [k for k in _LEGACY_KEYS if k in optim]
        if legacy:
            fixes = "; ".join(f"{k}: {_LEGACY_KEYS[k]}" for k in legacy)
            raise DeNSConfigError(
                f"optim has the official DeNS key(s) {legacy}, which fairchem-dens does not "
                f"read (they would be silently ignored). Fix: {fixes}."
            )
        if "dens" not in optim:
            raise DeNSConfigError(
                "optim.dens is missing: the DenoisingForcesTrainer needs DeNS settings, e.g. "
                "optim: {dens: {prob: 0.5, std: 0.1, corrupt_ratio: 0.5, coefficient: 10}}"
            )
        cfg = cls.from_dict(optim["dens"])
        cfg.check_schedule_end(optim)
        return cfg

    def check_schedule_end(self, optim: dict[str, Any]) -> None:
        """A decaying lambda_DeNS needs the end of training: ``optim.max_epochs`` (or, by step,
        ``optim.max_steps``)."""
        if self.coefficient_schedule == "constant":
            return
        end = {"epoch": ["max_epochs"], "step": ["max_steps", "max_epochs"]}
        keys = end[self.coefficient_schedule_by]
        if all(optim.get(k) is None for k in keys):
            fix = ("set optim.max_epochs" if self.coefficient_schedule_by == "epoch" else
                   "set optim.max_epochs or optim.max_steps (the step the decay reaches 0)")
            raise DeNSConfigError(
                f"optim.dens.coefficient_schedule={self.coefficient_schedule!r} decays lambda_DeNS "
                f"to 0 at the end of training, but optim has none of {keys}: {fix}, or use "
                "coefficient_schedule: constant")
        for k in keys:
            value = optim.get(k)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise DeNSConfigError(
                    f"optim.{k}={value!r} is invalid as the end of the lambda_DeNS "
                    f"decay: expected a positive integer")
