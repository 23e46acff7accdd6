"""Every DeNS backbone family (EquiformerV2, eSCN, eSEN direct and conservative) against fairchem's plain model: force
encoding, noise head, eval equality with the same weights, rotation equivariance, RNG-neutral
construction. A new family is one more entry in FAMILIES."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from fairchem.core.common.utils import radius_graph_pbc
from fairchem.core.models.base import HydraModel

from fairchem_dens.corruption import DENS_FORCES_KEY, DENS_MASK_KEY
from fairchem_dens.models.dens import (
    TRAINER_PATH,
    DeNSTrainerRequired,
    attach_dens_trainer,
    dens_only_parameters,
)
from tests.conftest import TINY_EQV2, TINY_ESCN, TINY_ESEN, TINY_ESEN_CONSERVATIVE
from tests.equivariance import assert_invariant, assert_rotates, random_rotation

# bitwise comparisons of gradient forces need one intra-op thread (see tests/conftest.py)
pytestmark = pytest.mark.usefixtures("_single_thread")

@dataclass(frozen=True)
class Family:
    plain_backbone: str
    dens_backbone: str
    heads: dict
    noise_head: str
    kwargs: dict
    label: str = ""  # test id, when two families share a plain backbone
    noise_block: str = "force_block"  # noise head submodule that must not run in eval
    checkpoint_kwarg: str = "activation_checkpoint"  # backbone's activation checkpointing flag
    multi_resolution: bool = True  # backbone takes lmax_list (else one lmax by construction)
    outputs: tuple[str, ...] = ("energy", "forces")  # plain model's outputs (stress: [B, 9])

    def __str__(self) -> str:
        return self.label or self.plain_backbone


FAMILIES = [
    Family(
        "equiformer_v2_backbone",
        "fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone",
        {"energy": {"module": "equiformerV2_scalar_head"},
         "forces": {"module": "equiformerV2_vector_head"}},
        "fairchem_dens.models.equiformer_v2.DeNSEquiformerV2NoiseHead",
        TINY_EQV2,
    ),
    Family(
        "escn_backbone",
        "fairchem_dens.models.escn.DeNSeSCNBackbone",
        {"energy": {"module": "escn_energy_head"}, "forces": {"module": "escn_force_head"}},
        "fairchem_dens.models.escn.DeNSeSCNNoiseHead",
        TINY_ESCN,
    ),
    Family(
        "esen_backbone",
        "fairchem_dens.models.esen.DeNSeSENBackbone",
        {"energy": {"module": "esen_mlp_energy_head"},
         "forces": {"module": "esen_linear_force_head"}},
        "fairchem_dens.models.esen.DeNSeSENNoiseHead",
        TINY_ESEN,
        label="esen_direct",
        noise_block="linear",
        checkpoint_kwarg="activation_checkpointing",
        multi_resolution=False,
    ),
    Family(  # conservative: forces and stress are gradients of the energy (one head)
        "esen_backbone",
        "fairchem_dens.models.esen.DeNSeSENBackbone",
        {"efs": {"module": "esen_mlp_efs_head"}},
        "fairchem_dens.models.esen.DeNSeSENNoiseHead",
        TINY_ESEN_CONSERVATIVE,
        label="esen_conservative_efs",
        noise_block="linear",
        checkpoint_kwarg="activation_checkpointing",
        multi_resolution=False,
        outputs=("energy", "forces", "stress"),
    ),
]
DENS_KEYS = ("backbone.force_encoding.", "output_heads.denoise.")


@pytest.fixture(params=FAMILIES, ids=str)
def family(request) -> Family:
    return request.param


def build(family: Family, dens: bool, seed: int = 0, **overrides) -> HydraModel:
    torch.manual_seed(seed)
    heads = copy.deepcopy(family.heads)
    if dens:
        heads["denoise"] = {"module": family.noise_head}  # sorts first: its init must not shift RNG
    name = family.dens_backbone if dens else family.plain_backbone
    return HydraModel(backbone={"model": name, **family.kwargs, **overrides}, heads=heads,
                      pass_through_head_outputs=True)


def run(model: HydraModel, batch, seed: int = 0) -> dict:
    """Forward with a fixed global RNG: EquiformerV2 draws a random roll angle for each edge's
    rotation frame (fairchem's ``init_edge_rot_mat``), so outputs are reproducible only under
    the same RNG state."""
    torch.manual_seed(seed)
    b = copy.copy(batch)
    b.pos = batch.pos.detach()  # conservative eSEN sets pos.requires_grad: not on the caller's
    return model(b)


def with_dens_fields(batch, mask: torch.Tensor, forces: torch.Tensor | None = None):
    b = copy.copy(batch)
    b[DENS_MASK_KEY] = mask
    b[DENS_FORCES_KEY] = batch.forces if forces is None else forces
    return b


def test_plain_weights_are_initialised_exactly_as_in_a_plain_model(family) -> None:
    plain = build(family, dens=False)
    dens = build(family, dens=True)
    dens_state = dens.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(dens_state[key], value), key
    extra = set(dens_state) - set(plain.state_dict())
    assert extra and all(k.startswith(DENS_KEYS) for k in extra)


def test_eval_outputs_equal_the_plain_model_with_same_weights(family, oc20_batch) -> None:
    plain = build(family, dens=False, seed=1).eval()
    dens = build(family, dens=True, seed=2).eval()
    result = dens.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith(DENS_KEYS) for k in result.missing_keys)
    calls = []
    dens.output_heads["denoise"].get_submodule(family.noise_block).register_forward_hook(
        lambda *a: calls.append(1))
    dens.backbone.force_encoding.register_forward_hook(lambda *a: calls.append(2))
    mask = torch.ones(oc20_batch.natoms.sum(), dtype=torch.bool)
    for batch in (oc20_batch, with_dens_fields(oc20_batch, mask)):  # fields ignored in eval
        ref, out = run(plain, batch), run(dens, batch)
        assert set(out) == set(ref) == set(family.outputs)
        for key in family.outputs:
            assert torch.equal(out[key], ref[key]), key
    assert calls == []  # the noise block never ran


def test_force_encoding_changes_training_outputs_only_through_corrupted_atoms(
    family, oc20_batch
) -> None:
    dens = build(family, dens=True).train()
    n = int(oc20_batch.natoms.sum())
    none = torch.zeros(n, dtype=torch.bool)
    base = run(dens, with_dens_fields(oc20_batch, none))
    assert base["noise"].shape == (n, 3)
    # no corrupted atom: identical to a forward without DeNS fields (minus the noise head), the
    # DeNS trainer's step without corruption; outside that trainer such a forward is refused
    with pytest.raises(DeNSTrainerRequired, match="DenoisingForcesTrainer"):
        run(dens, oc20_batch)
    attach_dens_trainer(dens)
    plain_path = run(dens, oc20_batch)
    assert torch.equal(base["forces"], plain_path["forces"])
    assert "noise" not in plain_path
    some = torch.zeros(n, dtype=torch.bool)
    some[-5:] = True
    enc = run(dens, with_dens_fields(oc20_batch, some))
    assert not torch.allclose(enc["forces"], base["forces"])
    # encoding a different force on an uncorrupted atom changes nothing
    f = oc20_batch.forces.clone()
    f[0] += 3.0
    assert torch.equal(run(dens, with_dens_fields(oc20_batch, some, f))["forces"], enc["forces"])


@pytest.mark.parametrize("seed", [0, 1])
def test_rotation_equivariance_of_energy_forces_stress_and_noise(family, oc20_batch, seed) -> None:
    dens = build(family, dens=True).train()
    with torch.no_grad():  # eSCN's U(+-0.001) encoder would hide in float32 noise: test it at O(1)
        dens.backbone.force_encoding.linear.weight.uniform_(-1.0, 1.0)
    rot = random_rotation(seed, torch.float32)
    n = int(oc20_batch.natoms.sum())
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    batch = with_dens_fields(oc20_batch, mask)
    rotated = copy.copy(batch)
    rotated.pos = batch.pos @ rot.T
    rotated.cell = batch.cell @ rot.T
    rotated[DENS_FORCES_KEY] = batch[DENS_FORCES_KEY] @ rot.T
    out, out_rot = run(dens, batch), run(dens, rotated)
    assert_invariant(out_rot["energy"], out["energy"])
    assert_rotates(out_rot["forces"], out["forces"], rot)
    assert_rotates(out_rot["noise"], out["noise"], rot)
    if "stress" in family.outputs:  # a rank-2 tensor: S -> R S R^T
        stress = out["stress"].view(-1, 3, 3)
        assert stress.abs().max() > 0
        assert_invariant(out_rot["stress"].view(-1, 3, 3), rot @ stress @ rot.T)


def test_dens_only_parameters_are_force_encoding_and_noise_head(family) -> None:
    dens = build(family, dens=True)
    names = {id(p): n for n, p in dens.named_parameters()}
    got = {names[id(p)] for p in dens_only_parameters(dens)}
    expected = {n for n in names.values() if n.startswith(DENS_KEYS)}
    assert got == expected and got


def test_multi_resolution_is_refused_clearly(family) -> None:
    if not family.multi_resolution:
        pytest.skip(f"{family} takes a single lmax: it has no multi-resolution setting")
    with pytest.raises(ValueError, match="lmax_list=\\[2, 3\\]"):
        build(family, dens=True, lmax_list=[2, 3], mmax_list=[2, 2])


def test_activation_checkpointing_gives_the_same_gradients(family, oc20_batch) -> None:
    """The seam runs again during backward under activation checkpointing; the force encoding
    must be added again, identically."""
    grads = []
    for checkpointing in (False, True):
        model = build(family, dens=True, **{family.checkpoint_kwarg: checkpointing}).train()
        mask = torch.zeros(int(oc20_batch.natoms.sum()), dtype=torch.bool)
        mask[::3] = True
        out = run(model, with_dens_fields(oc20_batch, mask))
        (out["energy"].sum() + out["forces"].pow(2).sum() + out["noise"].pow(2).sum()).backward()
        grads.append(model.backbone.force_encoding.linear.weight.grad.clone())
        grads.append(model.backbone.sphere_embedding.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[2], rtol=1e-4, atol=1e-7)
    assert torch.allclose(grads[1], grads[3], rtol=1e-4, atol=1e-7)


def test_conservative_esen_forces_and_stress_are_derivatives_of_the_encoded_energy(
    oc20_batch,
) -> None:
    """With force encoding on corrupted atoms, esen_mlp_efs_head's forces and stress are still
    the exact derivatives of its energy (the encoding depends on the encoded forces and mask,
    never on positions or cell): central finite differences in float64."""
    family = next(f for f in FAMILIES if str(f) == "esen_conservative_efs")
    # float64 throughout: fairchem's on-the-fly graph is float32-only, so the graph (which pairs,
    # which cell offsets) is built once here and eSEN computes the edge vectors in float64
    model = build(family, dens=True, otf_graph=False).double().train()
    with torch.no_grad():  # an O(1) encoder, so the encoded energy differs from the plain one
        model.backbone.force_encoding.linear.weight.uniform_(-1.0, 1.0)
    attach_dens_trainer(model)
    batch = copy.copy(oc20_batch)
    edge_index, cell_offsets, neighbors = radius_graph_pbc(batch, 5.0, 30)
    batch.edge_index, batch.cell_offsets, batch.nedges = edge_index, cell_offsets, neighbors
    batch.atomic_numbers_full, batch.batch_full = batch.atomic_numbers.long(), batch.batch
    batch.pos, batch.cell = batch.pos.double(), batch.cell.double()
    n = int(batch.natoms.sum())
    mask = torch.zeros(n, dtype=torch.bool)
    mask[::2] = True
    batch = with_dens_fields(batch, mask, oc20_batch.forces.double())
    out = run(model, batch)
    assert not torch.allclose(out["energy"], run(model, with_dens_fields(
        batch, torch.zeros(n, dtype=torch.bool), batch[DENS_FORCES_KEY]))["energy"])

    def energy(pos: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        b = copy.copy(batch)
        b.pos, b.cell = pos, cell
        with torch.no_grad():
            return run(model, b)["energy"].detach()

    h = 1e-4
    direction = torch.tensor([0.48, -0.6, 0.64], dtype=torch.float64)  # unit, no axis
    for atom in (0, 1):  # a corrupted and an uncorrupted atom: directional derivative
        step = torch.zeros_like(batch.pos)
        step[atom] = h * direction
        fd = -(energy(batch.pos + step, batch.cell) - energy(batch.pos - step, batch.cell))
        assert torch.allclose(out["forces"][atom] @ direction, fd.sum() / (2 * h), rtol=1e-5,
                              atol=1e-9), atom
    # stress = (1/V) dE/d(strain), fairchem's convention: pos -> pos (1 + strain), same for cell
    graph = 1  # strain only the second structure
    in_graph = (batch.batch == graph).view(-1, 1)
    volume = torch.det(batch.cell[graph]).abs()
    for i, j in ((2, 2), (0, 1)):
        strain = torch.zeros(3, 3, dtype=torch.float64)
        strain[i, j] = strain[j, i] = h if i == j else h / 2  # symmetric, as fairchem's
        values = []
        for sign in (1.0, -1.0):
            deform = torch.eye(3, dtype=torch.float64) + sign * strain
            pos = torch.where(in_graph, batch.pos @ deform, batch.pos)
            cell = batch.cell.clone()
            cell[graph] = cell[graph] @ deform
            values.append(energy(pos, cell)[graph])
        fd = (values[0] - values[1]) / (2 * h) / volume
        assert torch.allclose(out["stress"].view(-1, 3, 3)[graph, i, j], fd, rtol=1e-5,
                              atol=1e-10), (i, j)


def test_export_gives_fairchems_plain_model_with_the_same_eval_outputs(family, oc20_batch) -> None:
    """``fairchem-dens export`` (export_checkpoint) on each family: the plain config names the
    family's fairchem backbone, the noise head is gone, and the plain model built from it gives
    the DeNS model's eval outputs exactly."""
    from fairchem_dens.export import export_checkpoint

    dens = build(family, dens=True).eval()
    heads = {**copy.deepcopy(family.heads), "denoise": {"module": family.noise_head}}
    model_config = {"name": "hydra", "pass_through_head_outputs": True, "heads": heads,
                    "backbone": {"model": family.dens_backbone, **family.kwargs}}
    ckpt = {"state_dict": {f"module.{k}": v for k, v in dens.state_dict().items()},
            "config": {"model": model_config, "trainer": TRAINER_PATH}}
    out = export_checkpoint(ckpt)
    plain_config = out["config"]["model"]
    assert plain_config["backbone"]["model"] == family.plain_backbone
    assert set(plain_config["heads"]) == set(family.heads)
    plain = build(family, dens=False, seed=5).eval()
    plain.load_state_dict({k[len("module."):]: v for k, v in out["state_dict"].items()})
    ref, got = run(dens, oc20_batch), run(plain, oc20_batch)
    for key in family.outputs:
        assert torch.equal(got[key], ref[key]), key
