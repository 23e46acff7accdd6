"""``DenoisingForcesTrainer``: fairchem's EquiformerV2 forces trainer plus DeNS.

Use it from a fairchem config by dotted path::

    trainer: fairchem_dens.trainer.DenoisingForcesTrainer
    optim:
      dens: {prob: 0.5, std: 0.1, corrupt_ratio: 0.5, coefficient: 10}

Only four narrow methods change; the training loop, EMA, LR schedule, AMP, clipping,
checkpointing, validation and prediction are fairchem's own (with exact resume from
:class:`~fairchem_dens.resume.ExactResumeMixin`, which is not DeNS-specific):

* ``_forward``: on a training step, corrupt a copy of the batch (:mod:`fairchem_dens.corruption`)
  and attach the normalised forces of corrupted atoms for the force encoding.
* ``_compute_loss``: fairchem's energy and force terms with corrupted atoms treated like fixed
  atoms (so forces are trained only on uncorrupted free atoms), plus
  ``coefficient * L_DeNS`` on corrupted atoms. Total::

      lambda_E L_E(all structures) + lambda_F L_F(uncorrupted free atoms)
          + lambda_S L_S(uncorrupted structures) + lambda_DeNS L_DeNS(corrupted atoms)

  with L_S the terms of ``optim.dens.uncorrupted_structure_targets`` (default: the stress
  targets; a corrupted structure's stress label belongs to the unperturbed cell),
  each term reduced once, over all ranks, by fairchem's ``DDPLoss`` rule (sum / global count)
  (``reduction: per_term``); with ``reduction: shared_free_atoms`` the forces and DeNS terms
  share one denominator, the batch's free atoms (the authors' OC20/OC22 trainer, see
  :func:`~fairchem_dens.loss.shared_free_atom_loss`). lambda_DeNS follows
  ``coefficient_schedule`` (:mod:`fairchem_dens.schedule`).
* ``_compute_metrics``: S2EF metrics on uncorrupted atoms (structures with none left out of the
  threshold metric, :class:`~fairchem_dens.loss.ScoredStructuresEvaluator`) plus ``denoising_*``
  on corrupted ones, ``dens_coefficient`` (lambda_DeNS of the step) and ``dens_skipped_<filter>``
  (structures each ``optim.dens`` filter kept from DeNS).
* ``load_loss``: swaps ``DDPLoss`` for :class:`ZeroSafeDDPLoss` (finite when a term is empty).

Validation, prediction and relaxations run the model in eval mode and never see corruption.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from typing import Any

import torch
from fairchem.core.common import distutils, gp_utils
from fairchem.core.common.registry import registry
from fairchem.core.models.base import HydraModel
from fairchem.core.models.equiformer_v2.trainers.forces_trainer import (
    EquiformerV2ForcesTrainer,
)

from fairchem_dens import pretrain
from fairchem_dens.config import DeNSConfig, DeNSConfigError
from fairchem_dens.corruption import (
    DENS_FORCES_KEY,
    DENS_INDEX_KEY,
    DENS_MASK_KEY,
    Corruption,
    sample_corruption,
    step_generator,
)
from fairchem_dens.filters import filter_flags, skipped_metric
from fairchem_dens.finetune import prepare_dens_checkpoint
from fairchem_dens.loss import (
    ScoredStructuresEvaluator,
    StructureSubsetLoss,
    ZeroSafeDDPLoss,
    denoising_metrics,
    shared_free_atom_loss,
)
from fairchem_dens.models.dens import (
    DeNSBackboneMixin,
    attach_dens_trainer,
    dens_only_parameters,
    noise_head_names,
)
from fairchem_dens.optim_config import with_scheduler_params
from fairchem_dens.resume import ExactResumeMixin
from fairchem_dens.schedule import CoefficientSchedule
from fairchem_dens.setup_checks import warn_unlearnable_targets

NOISE_PRED_KEY = "dens_noise"  # key of the noise prediction added to the trainer's outputs


class DenoisingForcesTrainer(ExactResumeMixin, EquiformerV2ForcesTrainer):
    """S2EF trainer with DeNS as an auxiliary task (settings in ``optim.dens``, see
    :class:`~fairchem_dens.config.DeNSConfig`). Runs under the ``s2ef`` task name, so predictions
    are written as ``s2ef_predictions.npz``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["name"] = "s2ef"
        optim = kwargs.get("optimizer", {})
        if "dens" in optim or not kwargs.get("inference_only", False):
            self.dens: DeNSConfig | None = DeNSConfig.from_optim(optim)
        else:
            self.dens = None  # inference from a config without DeNS settings
        self._dens_step: Corruption | None = None
        self._training_step = False
        self._noise_head: str | None = None
        self._dens_params: list[torch.nn.Parameter] = []
        self._clean_only: tuple[str, ...] = ()
        if not kwargs.get("inference_only", False):
            _check_hydra_model(kwargs.get("model", {}))
            if self.dens.enabled and (kwargs.get("gp_gpus") or gp_utils.initialized()):
                raise DeNSConfigError(
                    f"graph parallelism (gp_gpus={kwargs.get('gp_gpus')}) is not supported with "
                    f"DeNS (optim.dens.prob={self.dens.prob}): the force encoding and the "
                    "per-atom corruption are not split across graph-parallel ranks. Remove "
                    "--gp-gpus / gp_gpus, or set optim.dens.prob: 0 for plain training.")
            kwargs["optimizer"] = with_scheduler_params(optim)
            pretrain.describe_finetune_config(kwargs.get("model", {}))
        if self.dens is not None and self.dens.pretrain:
            pretrain.check_pretrain_config(kwargs.get("dataset"))
        super().__init__(*args, **kwargs)  # ExactResumeMixin stores our dotted path as trainer
        seed = self.config["cmd"].get("seed")
        self._set_dens_seed(int(seed) if seed is not None else 0)
        if self.dens is not None and not kwargs.get("inference_only", False):
            self._check_dens_setup()

    # ---------------------------------------------------------------- set-up
    def load_model(self) -> None:
        super().load_model()
        attach_dens_trainer(self._unwrapped_model)

    def _set_dens_seed(self, seed: int) -> None:
        """The corruption stream of step s on rank r is drawn from SeedSequence([seed, s, r]);
        stored in the config, hence in every checkpoint, so a resume continues the stream."""
        self.dens_seed = seed
        self.config["dens_rng"] = {"seed": seed, "stream": "SeedSequence([seed, step, rank])"}

    def load_checkpoint(self, checkpoint_path: str, checkpoint: dict | None = None,
                        inference_only: bool = False) -> None:
        """Exact resume (generator states, LR schedule) comes from
        :class:`~fairchem_dens.resume.ExactResumeMixin`; here only what DeNS adds: a plain
        EquiformerV2/eSCN checkpoint gets fresh DeNS-only weights, and a resume continues the
        saved corruption stream."""
        checkpoint = self.read_checkpoint(checkpoint_path, checkpoint)
        if not inference_only and not pretrain.starts_fine_tuning(checkpoint, self.dens):
            _log_changed_dens_settings(checkpoint, self.dens)  # a resume: say what changed
        checkpoint = prepare_dens_checkpoint(self, checkpoint, inference_only)
        super().load_checkpoint(checkpoint_path, checkpoint, inference_only)
        saved = (checkpoint.get("config") or {}).get("dens_rng")
        if saved and not inference_only and saved["seed"] != self.dens_seed:
            logging.info(f"DeNS: continuing the corruption stream of seed {saved['seed']} "
                         f"from the checkpoint (config seed {self.dens_seed})")
            self._set_dens_seed(int(saved["seed"]))

    def _check_dens_setup(self) -> None:
        dens, key = self.dens, self.dens.forces_key
        if dens.pretrain:
            pretrain.check_equilibrium(self.train_dataset, dens)
        elif key not in self.output_targets:
            raise DeNSConfigError(
                f"optim.dens.forces_key={key!r} is not an output target; outputs has "
                f"{sorted(self.output_targets)}. Set forces_key to the forces target's name."
            )
        elif self.output_targets[key].get("train_on_free_atoms") is not True:
            raise DeNSConfigError(
                f"outputs.{key}.train_on_free_atoms must be true with DeNS: corrupted atoms are "
                "left out of the forces loss through the free-atom mask (on data without fixed "
                f"atoms this changes nothing). Set outputs.{key}.train_on_free_atoms: true."
            )
        self._check_normalizers()
        self._clean_only = self._uncorrupted_structure_targets()
        model = self._unwrapped_model
        heads = noise_head_names(model)
        if dens.enabled and len(heads) != 1:
            raise DeNSConfigError(
                f"DeNS (optim.dens.prob={dens.prob}) needs exactly one noise head in model.heads, "
                f"found {heads}: add e.g. `noise: {{module: "
                "fairchem_dens.models.equiformer_v2.DeNSEquiformerV2NoiseHead}`"
            )
        if dens.enabled and dens.encode_forces and not isinstance(
            getattr(model, "backbone", None), DeNSBackboneMixin
        ):
            raise DeNSConfigError(
                "optim.dens.encode_forces is true but model.backbone has no force encoding: use a "
                "DeNS backbone (e.g. fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone) "
                "or set optim.dens.encode_forces: false"
            )
        backbone = getattr(model, "backbone", None)
        if dens.enabled and getattr(backbone, "otf_graph", True) is False:
            raise DeNSConfigError(
                "model.backbone.otf_graph is false: the model would use the edges stored in the "
                "LMDB, which belong to the uncorrupted positions, for the noisy structures of DeNS "
                "(atoms moved out of or into the cutoff keep stale edges). Set "
                "model.backbone.otf_graph: true (graphs built from the positions the model sees).")
        self._noise_head = heads[0] if heads else None
        self._dens_params = dens_only_parameters(model)
        logging.info(
            f"DeNS: {dens}; noise head '{self._noise_head}', "
            f"{sum(p.numel() for p in self._dens_params)} DeNS-only parameters"
        )

    def _uncorrupted_structure_targets(self) -> tuple[str, ...]:
        """The loss targets a corrupted structure does not contribute
        (``optim.dens.uncorrupted_structure_targets``; default: the stress targets), checked:
        each is a per-structure ``loss_functions`` target other than the energy's reference."""
        dens = self.dens
        losses = [t for t, _ in self.loss_functions]
        targets = dens.uncorrupted_structure_targets
        if targets is None:
            return tuple(t for t in losses if t.startswith("stress"))
        for target in targets:
            if target not in losses:
                raise DeNSConfigError(
                    f"optim.dens.uncorrupted_structure_targets lists {target!r}, which is not a "
                    f"loss_functions target ({losses}): remove it, or add its loss term")
            if self.output_targets[target]["level"] != "system":
                raise DeNSConfigError(
                    f"optim.dens.uncorrupted_structure_targets lists {target!r}, a per-atom "
                    "target: only per-structure targets (e.g. stress) can be left out per "
                    "structure; the forces of corrupted atoms are already left out. Remove it.")
            if target in self.elementrefs:
                raise DeNSConfigError(
                    f"optim.dens.uncorrupted_structure_targets lists {target!r}, which has "
                    "element references (an energy-like target, which DeNS trains on the "
                    "original structure): remove it from the list")
        return tuple(targets)

    def _check_normalizers(self) -> None:
        """A normaliser with rmsd ~0 (energy references fitted on no more compositions than
        elements reproduce every training energy) would multiply that loss term by ~1e12."""
        for target, _ in self.loss_functions:
            norm = self.normalizers.get(target)
            if norm is not None and float(norm.rmsd) < 1e-6:
                raise DeNSConfigError(
                    f"the '{target}' normalizer has rmsd {float(norm.rmsd):.3g}: divided by it, "
                    f"the {target} loss term is meaningless (for energy: the element references "
                    "reproduce every training energy, which happens with no more training "
                    "compositions than elements). Add training structures, or remove the "
                    f"'{target}' entry from loss_functions (and its normalizer).")

    def load_loss(self) -> None:
        super().load_loss()
        warn_unlearnable_targets(self.config, self.normalizers)
        specs = [spec for entry in self.config["loss_functions"] for spec in entry.values()]
        self.loss_functions = [
            (target, {**info, "fn": ZeroSafeDDPLoss(spec["fn"], spec.get("reduction"))})
            for (target, info), spec in zip(self.loss_functions, specs)
        ]
        if self.dens is None:
            return
        forces_spec = {t: s for e in self.config["loss_functions"] for t, s in e.items()}.get(
            self.dens.forces_key
        )
        loss_name = self.dens.loss_fn or (forces_spec or {}).get("fn")
        if loss_name is None:
            raise DeNSConfigError(
                f"optim.dens.loss_fn is unset and loss_functions has no '{self.dens.forces_key}' "
                "entry to copy it from: set optim.dens.loss_fn (e.g. l2mae)"
            )
        # no isfinite() test (a host sync): non-finite noise predictions are zeroed regardless
        self.dens_loss_fn = ZeroSafeDDPLoss(loss_name, "mean", check_finite=False)
        if self.dens.reduction == "shared_free_atoms" and loss_name != "l2mae":
            raise DeNSConfigError(
                f"optim.dens.reduction: shared_free_atoms sums per-atom L2 errors of forces and "
                f"noise (the authors' OC trainer), but the '{self.dens.forces_key}' loss is "
                f"{loss_name!r}: set loss_functions.{self.dens.forces_key}.fn: l2mae, or use "
                "reduction: per_term")
        loader = getattr(self, "train_loader", None)
        self.dens_schedule = CoefficientSchedule.from_config(
            self.dens, self.config["optim"], len(loader) if loader is not None else 1)

    # ---------------------------------------------------------------- one step
    def _forward(self, batch):
        self._training_step = self.dens is not None and self._unwrapped_model.training
        self._dens_step = None
        if self._training_step:
            self._check_stress_data(batch)
        if not (self._training_step and self.dens.enabled):
            return self._model_forward(batch)

        if self.dens.positions_key is not None:
            batch.pos = self._equilibrium_positions(batch)
        step = self._sample(batch)
        batch = batch.to(self.device)  # in place, as fairchem's _forward does
        self._dens_step = step.to(self.device)
        if step.num_corrupted == 0:
            return self._model_forward(batch)

        captured: dict[str, Any] = {}
        hook = self._unwrapped_model.register_forward_hook(
            lambda _module, _args, output: captured.update(output)
        )
        try:
            out = self._model_forward(self._corrupted_copy(batch, self._dens_step))
        finally:
            hook.remove()
        model = self._unwrapped_model
        head_out = captured if model.pass_through_head_outputs else captured[self._noise_head]
        out[NOISE_PRED_KEY] = head_out[model.output_heads[self._noise_head].output_name]
        return out

    def _model_forward(self, batch):
        """fairchem's ``_forward``, with its error for a target the model does not output
        (e.g. a stress target on a model without a stress head) naming the fix."""
        try:
            return super()._forward(batch)
        except AttributeError as error:
            found = re.search(r"Output target: '(.+?)', not found in model outputs: (\[.*?\])",
                              str(error))
            if found is None:
                raise
            target, available = found.groups()
            raise DeNSConfigError(
                f"outputs.{target} is a target, but the model has no {target!r} output (it "
                f"outputs {available}). Add a head that predicts it — for stress: EquiformerV2 "
                "with rank2_symmetric_head and outputs.stress.decomposition as in fairchem's "
                "OMat24 configs (see configs/mlearn/), eSEN with esen_mlp_efs_head and "
                f"backbone regress_stress: true — or remove {target!r} from outputs, "
                "loss_functions and evaluation_metrics.") from error

    def _check_stress_data(self, batch) -> None:
        """The training batch's stress (``optim.dens.stress_key``), when it is a target: one
        3x3 tensor per structure, in eV/Angstrom^3 (``optim.dens.max_plausible_stress``)."""
        key, bound = self.dens.stress_key, self.dens.max_plausible_stress
        if key not in self.output_targets or key not in batch:
            return
        stress, num = batch[key], batch.natoms.numel()
        if stress.numel() != 9 * num:
            raise DeNSConfigError(
                f"the training data's '{key}' has shape {tuple(stress.shape)} for {num} "
                f"structures; outputs.{key} needs one 3x3 stress per structure ([B, 3, 3], as "
                "fairchem-dens convert --stress writes it). Fix the data, or name the stress "
                "attribute with optim.dens.stress_key.")
        largest = float(stress.detach().abs().max()) if stress.numel() else 0.0
        if bound is not None and largest > bound:
            raise DeNSConfigError(
                f"the training data's '{key}' reaches |{largest:.4g}| > "
                f"optim.dens.max_plausible_stress={bound} eV/Angstrom^3 "
                f"({bound * 160.21766:.0f} GPa): stress must be in eV/Angstrom^3 (the units of "
                "energy / volume). kBar (VASP) or GPa values look like this: reconvert with "
                "fairchem-dens convert --stress --stress-unit kbar|gpa. If the stresses are "
                "real, raise max_plausible_stress (or set it to null).")

    def _equilibrium_positions(self, batch) -> torch.Tensor:
        key = self.dens.positions_key
        if key not in batch:
            raise DeNSConfigError(
                f"optim.dens.positions_key={key!r} but the training data has no such attribute "
                f"(batch keys: {sorted(batch.keys())}); OC20 IS2RE LMDBs call it 'pos_relaxed'")
        return batch[key].to(batch.pos.dtype)

    def _sample(self, batch) -> Corruption:
        dens = self.dens
        if dens.forces_key not in batch and not dens.pretrain:
            raise DeNSConfigError(
                f"DeNS needs per-atom forces in the training data under '{dens.forces_key}', but "
                f"the batch has {sorted(batch.keys())}. If your LMDB stores them under another "
                f"name (old OC20 LMDBs use 'force'), add dataset.train.key_mapping: "
                f"{{force: {dens.forces_key}}}."
            )
        skip = None
        if dens.skip_key is not None:
            if dens.skip_key not in batch:
                raise DeNSConfigError(
                    f"optim.dens.skip_key={dens.skip_key!r} but the training data has no such "
                    f"attribute (batch keys: {sorted(batch.keys())}); mark the structures in the "
                    "data or remove skip_key"
                )
            skip = batch[dens.skip_key]
        flags = self._filter_flags(batch)
        if flags:  # the filters only widen skip: the random draws stay the same
            filtered = torch.stack(list(flags.values())).any(0)
            if skip is None:
                skip = filtered
            elif skip.numel() == filtered.numel():  # else sample_corruption names the mismatch
                skip = (skip.detach().cpu().view(-1) != 0) | filtered
        generator = step_generator(self.dens_seed, self.step, distutils.get_rank())
        step = sample_corruption(
            dens,
            batch.natoms,
            batch.fixed if "fixed" in batch else None,
            generator,
            skip=skip,
            dtype=batch.pos.dtype,
        )
        step.skipped = {key: int(flag.sum()) for key, flag in flags.items()}
        return step

    def _filter_flags(self, batch) -> dict[str, torch.Tensor]:
        """Structures kept out of DeNS by ``max_force_norm`` / ``min_num_atoms`` /
        ``max_stress`` (:func:`~fairchem_dens.filters.filter_flags`), on the CPU batch (raw
        forces, before normalisation)."""
        dens = self.dens
        forces = getattr(batch, dens.forces_key, None)
        stress = getattr(batch, dens.stress_key, None)
        return filter_flags(dens, batch.natoms, forces, stress)

    def _corrupted_copy(self, batch, step: Corruption):
        """Shallow copy of ``batch`` with noisy positions and the force-encoding inputs."""
        noisy = copy.copy(batch)
        noisy.pos = batch.pos + step.noise
        noisy[DENS_MASK_KEY] = step.mask
        noisy[DENS_INDEX_KEY] = step.index  # the noise heads gather rows without a sync
        if self.dens.encode_forces:
            forces = batch[self.dens.forces_key]
            if self.dens.forces_key in self.normalizers:
                forces = self.normalizers[self.dens.forces_key].norm(forces)
            noisy[DENS_FORCES_KEY] = forces
        return noisy

    def _uncorrupted_view(self, batch, step: Corruption | None):
        """``batch`` with corrupted atoms flagged as fixed, so fairchem's free-atom masks skip
        them in the forces loss and metrics."""
        if step is None or step.num_corrupted == 0:
            return batch
        view = copy.copy(batch)
        view.fixed = (batch.fixed.bool() | step.mask).to(batch.fixed.dtype)
        return view

    def _compute_loss(self, out, batch) -> torch.Tensor:
        if not self._training_step:
            return super()._compute_loss(out, batch)
        step = self._dens_step
        if not self._clean_only or step is None or step.num_corrupted == 0:
            return self._dens_loss(out, batch, step)
        # the uncorrupted-structure targets (stress) over the uncorrupted structures only; the
        # terms keep their order, so DDP all-reduces match across ranks
        all_terms, keep = self.loss_functions, step.clean_structures  # host-built indices
        self.loss_functions = [
            (t, {**info, "fn": StructureSubsetLoss(info["fn"], keep, step.num_structures)}
             if t in self._clean_only else info) for t, info in all_terms]
        try:
            return self._dens_loss(out, batch, step)
        finally:
            self.loss_functions = all_terms

    def _dens_loss(self, out, batch, step: Corruption | None) -> torch.Tensor:
        """The loss of a training step (see the module docstring)."""
        shared = self.dens.reduction == "shared_free_atoms"
        if self.dens.pretrain or shared:
            loss = self._label_loss(out, batch)  # every term but the forces
        elif step is not None and step.num_free_uncorrupted == 0:
            loss = self._loss_without_free_atoms(out, self._uncorrupted_view(batch, step))
        else:
            loss = super()._compute_loss(out, self._uncorrupted_view(batch, step))
        # Zero-valued link to every DeNS-only parameter: DDP sees them used on every rank even
        # when this rank's batch has no corrupted atom (or DeNS is off), and gradients are exact.
        loss = loss + 0.0 * sum(p.sum() for p in self._dens_params)
        if shared:
            return loss + self._shared_free_atom_term(out, batch, step)
        if step is None:  # DeNS disabled (prob = 0): plain training
            return loss
        if step.num_corrupted > 0:
            pred, target = (x.index_select(0, step.index) for x in (out[NOISE_PRED_KEY],
                                                                    step.target))
        else:
            pred = target = batch.pos.new_zeros((0, 3))
        denoising = self.dens_loss_fn(pred, target, natoms=batch.natoms)
        return loss + self.dens_coefficient() * denoising

    def dens_coefficient(self) -> float:
        """lambda_DeNS of the current step (``optim.dens.coefficient_schedule``)."""
        return self.dens_schedule(self.step)

    def _shared_free_atom_term(self, out, batch, step: Corruption | None) -> torch.Tensor:
        """``optim.dens.reduction: shared_free_atoms``: forces and DeNS over one free-atom count
        (:func:`~fairchem_dens.loss.shared_free_atom_loss`)."""
        key = self.dens.forces_key
        target = batch[key]
        if key in self.normalizers:
            target = self.normalizers[key].norm(target)
        lambda_f = next(info["coefficient"] for t, info in self.loss_functions if t == key)
        corrupted = step.mask if step is not None else torch.zeros_like(batch.fixed, dtype=bool)
        noisy = step is not None and step.num_corrupted > 0
        return shared_free_atom_loss(
            out[key], target.view(-1, 3), out[NOISE_PRED_KEY] if noisy else None,
            step.target if noisy else target, batch.fixed == 0, corrupted.view(-1).bool(),
            lambda_f, self.dens_coefficient(),
            # host counts of the draw: corrupted and free uncorrupted atoms are disjoint
            None if step is None else step.num_corrupted + step.num_free_uncorrupted,
            # host-built row indices (no boolean indexing on the device)
            None if step is None else step.free_uncorrupted_index,
            None if step is None else step.index)

    def _free_atom_target(self, target: str) -> bool:
        spec = self.output_targets[target]
        return spec["level"] == "atom" and bool(spec.get("train_on_free_atoms"))

    def _loss_without_free_atoms(self, out, batch) -> torch.Tensor:
        """fairchem's loss terms when no free atom is left uncorrupted on this rank (every free
        atom corrupted, e.g. ``corrupt_ratio: 1``): fairchem cannot reshape an empty target, so
        each free-atom term is reduced here on empty tensors (0, and the same all-reduce of its
        count as on the other ranks, in the same order); the other terms are fairchem's."""
        terms, all_terms = [], self.loss_functions
        try:
            for target, info in all_terms:
                if self._free_atom_target(target):
                    pred = out[target][:0]
                    empty = batch[target][:0].to(pred.dtype).view_as(pred)
                    terms.append(info["coefficient"] * info["fn"](pred, empty, natoms=batch.natoms))
                else:
                    self.loss_functions = [(target, info)]
                    terms.append(super()._compute_loss(out, batch))
        finally:
            self.loss_functions = all_terms
        return sum(terms)

    def _label_loss(self, out, batch) -> torch.Tensor:
        """fairchem's loss terms for the labels the data have, forces excluded (pre-training:
        every eligible atom is noised; ``shared_free_atoms``: the forces are reduced with the
        DeNS term); zero when there are none."""
        kept = [(t, info) for t, info in self.loss_functions
                if t != self.dens.forces_key and t in batch]
        # zero-valued link to every output left out (heads without a loss term here), so DDP
        # sees all parameters used
        names = {t for t, _ in kept} | {NOISE_PRED_KEY}
        loss = sum((0.0 * value.sum() for key, value in out.items()
                    if key not in names and torch.is_tensor(value) and value.requires_grad),
                   batch.pos.new_zeros(()))
        if not kept:
            return loss
        all_terms, self.loss_functions = self.loss_functions, kept
        try:
            return loss + super()._compute_loss(out, batch)
        finally:
            self.loss_functions = all_terms

    def _compute_metrics(self, out, batch, evaluator, metrics=None):
        step = self._dens_step if self._training_step else None
        if self._training_step:  # logged every step next to the loss terms
            metrics = evaluator.update("dens_coefficient", self.dens_coefficient(),
                                       {} if metrics is None else metrics)
        for name, count in (step.skipped if step is not None else {}).items():
            metrics = evaluator.update(skipped_metric(name), count, metrics)  # host ints
        if self._training_step and self.dens.pretrain:  # no S2EF labels to score
            metrics = {} if metrics is None else metrics
        elif step is None or step.num_corrupted == 0:
            return super()._compute_metrics(out, batch, evaluator, metrics)
        else:
            plain_out = {k: v for k, v in out.items() if k != NOISE_PRED_KEY}
            metrics = self._scored_metrics(plain_out, batch, evaluator, metrics,
                                           step.num_free_uncorrupted)
        if step is not None and step.num_corrupted > 0:
            stats = denoising_metrics(out[NOISE_PRED_KEY].index_select(0, step.index),
                                      step.target.index_select(0, step.index))
            for name, stat in stats.items():
                metrics = evaluator.update(name, stat, metrics)
        return metrics

    def _scored_metrics(self, out, batch, evaluator, metrics, num_scored: int):
        """fairchem's S2EF metrics of a DeNS step: atom-level targets on the free uncorrupted
        atoms; per-structure targets on every structure (the uncorrupted-structure targets on
        the uncorrupted ones) with fairchem's free-atom counts, as on a plain step. Structures
        with no scored atom are left out of ``energy_forces_within_threshold`` (fairchem takes
        a max over each structure's atoms); with none at all on this rank the atom-level
        targets are not scored this step (fairchem cannot reshape an empty target)."""
        step, view = self._dens_step, self._uncorrupted_view(batch, self._dens_step)
        free_atom_targets = {t for t in self.output_targets if self.output_targets[t]["level"] ==
                             "atom" and self.output_targets[t].get("eval_on_free_atoms", True)}
        free_atoms = torch.zeros_like(batch.natoms).index_add_(
            0, batch.batch, (batch.fixed == 0).to(batch.natoms.dtype))
        structure_targets = {t for t, s in self.output_targets.items() if s["level"] == "system"}
        scored = ScoredStructuresEvaluator(
            evaluator, skip=free_atom_targets if num_scored == 0 else (),
            structure_rows=dict.fromkeys(self._clean_only_metrics(), step.clean_structures),
            structure_natoms=(structure_targets, free_atoms), scored_rows=step.scored_structures)
        if num_scored > 0:
            return super()._compute_metrics(out, view, scored, metrics)
        targets = self.output_targets
        self.output_targets = {t: s for t, s in targets.items() if t not in free_atom_targets}
        try:
            return super()._compute_metrics(
                {k: v for k, v in out.items() if k not in free_atom_targets},
                view, scored, metrics)
        finally:
            self.output_targets = targets

    def _clean_only_metrics(self) -> set[str]:
        """Metric properties of the uncorrupted-structure targets: the targets themselves,
        and the full tensor of a decomposed one (``stress`` of ``stress_isotropic``) or its
        parts."""
        names = set(self._clean_only)
        for target, spec in self.output_targets.items():
            parts = set(spec.get("decomposition") or ())
            if parts & names or (target in names and parts):
                names |= {target, *parts}
        return names


def _check_hydra_model(model: dict) -> None:
    """DeNS needs fairchem's backbone + heads (``hydra``) model: the noise head is a head."""
    name = model.get("name")
    try:
        cls = registry.get_model_class(name) if name else None
    except Exception:  # unknown names are fairchem's to report
        return
    if cls is None or (isinstance(cls, type) and issubclass(cls, HydraModel)):
        return
    raise DeNSConfigError(
        f"model.name={name!r} is a single-module (legacy) model, but DeNS needs fairchem's "
        "backbone + heads model (model.name: hydra) to add its noise head. Write the model as "
        "`model: {name: hydra, backbone: {model: fairchem_dens.models.equiformer_v2."
        "DeNSEquiformerV2Backbone, <your equiformer_v2 keys>}, heads: {energy: {module: "
        "equiformerV2_scalar_head}, forces: {module: equiformerV2_vector_head}, noise: {module: "
        "fairchem_dens.models.equiformer_v2.DeNSEquiformerV2NoiseHead}}}` (eSCN: escn_* heads, "
        "fairchem_dens.models.escn.*). fairchem converts a legacy checkpoint and config with "
        "fairchem.core.models.utils.convert_checkpoint_and_config_to_hydra; a legacy "
        "EquiformerV2 checkpoint passed with --checkpoint is converted on load. See "
        "configs/oc20/s2ef/demo/eqv2_dens_cpu.yml.")


def _log_changed_dens_settings(checkpoint: dict, current: DeNSConfig | None) -> None:
    """Log each DeNS setting that differs between a resumed checkpoint and this run's config
    (the new value is used)."""
    saved = ((checkpoint.get("config") or {}).get("optim") or {}).get("dens")
    if saved is None or current is None:
        return
    try:
        before = DeNSConfig.from_dict(saved)
    except DeNSConfigError as err:
        logging.warning(f"DeNS: the checkpoint's optim.dens is not readable ({err}); using "
                        "this run's settings")
        return
    for key in (f.name for f in dataclasses.fields(DeNSConfig) if not f.name.startswith("_")):
        old, new = getattr(before, key), getattr(current, key)
        if old != new:
            logging.warning(f"DeNS: optim.dens.{key} changed since the checkpoint: {old!r} -> "
                            f"{new!r} (the new value is used from here on)")
