"""Force encoding (Eq. 5): masking, zero forces, rotation equivariance with e3nn's Wigner D."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

from fairchem_dens.force_encoding import ForceEncoding
from tests.equivariance import assert_invariant, random_rotation


@pytest.fixture
def encoding() -> ForceEncoding:
    torch.manual_seed(0)
    enc = ForceEncoding(lmax=4, channels=8)
    with torch.no_grad():
        enc.linear.bias.normal_()  # a non-zero l = 0 bias must still be masked away
    return enc


def test_shape_and_mask_give_exact_zeros(encoding) -> None:
    f = torch.randn(6, 3)
    mask = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)
    out = encoding(f, mask)
    assert out.shape == (6, 25, 8)
    assert torch.count_nonzero(out[~mask]) == 0
    assert torch.count_nonzero(out[mask]) > 0


def test_zero_force_encodes_to_the_l0_bias_only_without_nan(encoding) -> None:
    out = encoding(torch.zeros(3, 3), torch.ones(3, dtype=torch.bool))
    assert torch.isfinite(out).all()
    bias_only = torch.zeros(3, 25, 8)
    bias_only[:, 0, :] = encoding.linear.bias.detach()
    assert torch.allclose(out, bias_only)  # |f| Y(f/|f|) = 0, only the l = 0 bias remains


def test_encoding_scales_with_force_magnitude(encoding) -> None:
    f, mask = torch.randn(4, 3), torch.ones(4, dtype=torch.bool)
    bias = torch.zeros(1, 25, 8)
    bias[:, 0, :] = encoding.linear.bias.detach()
    assert torch.allclose(encoding(2 * f, mask) - bias, 2 * (encoding(f, mask) - bias), atol=1e-5)


def test_rotating_forces_rotates_each_degree_by_its_wigner_matrix(encoding) -> None:
    f, mask = torch.randn(5, 3), torch.ones(5, dtype=torch.bool)
    rot = random_rotation(3, torch.float32)
    d = o3.Irreps.spherical_harmonics(4).D_from_matrix(rot)  # [25, 25]
    out, out_rot = encoding(f, mask), encoding(f @ rot.T, mask)
    assert_invariant(out_rot, torch.einsum("ij,njc->nic", d, out))


def test_weight_init_bound_draws_uniform_weights_and_zero_bias() -> None:
    torch.manual_seed(0)
    default = ForceEncoding(lmax=2, channels=64)
    small = ForceEncoding(lmax=2, channels=64, weight_init_bound=0.001)
    w = small.linear.weight.detach()
    assert w.abs().max() <= 0.001 and w.abs().max() > 0.0009  # fills U(-0.001, 0.001)
    assert w.std().item() == pytest.approx(0.001 / 3**0.5, rel=0.2)
    assert torch.count_nonzero(small.linear.bias) == 0
    assert default.linear.weight.abs().max() > 0.9  # SO3_LinearV2's own U(-1, 1)


def test_escn_backbone_initialises_its_encoder_like_the_authors() -> None:
    from fairchem_dens.models.equiformer_v2 import DeNSEquiformerV2Backbone
    from fairchem_dens.models.escn import DeNSeSCNBackbone
    from tests.conftest import TINY_EQV2, TINY_ESCN

    torch.manual_seed(0)
    escn = DeNSeSCNBackbone(**TINY_ESCN).force_encoding.linear.weight.detach()
    assert 0.0009 < escn.abs().max() <= 0.001  # escn_denoising.py: uniform_(weight, -1e-3, 1e-3)
    eqv2 = DeNSEquiformerV2Backbone(**TINY_EQV2).force_encoding.linear.weight.detach()
    assert eqv2.abs().max() > 0.9  # EquiformerV2 keeps SO3_LinearV2's default


def test_esen_backbone_initialises_its_encoder_like_fairchems_esen_dens() -> None:
    """fairchem's esen_dens.py encodes with its SO3_Linear(1, C): U(+-1/sqrt(1)) weights, 0 bias."""
    from fairchem_dens.models.esen import DeNSeSENBackbone
    from tests.conftest import TINY_ESEN

    torch.manual_seed(0)
    encoder = DeNSeSENBackbone(**TINY_ESEN).force_encoding
    assert (encoder.lmax, encoder.channels) == (TINY_ESEN["lmax"], TINY_ESEN["sphere_channels"])
    w = encoder.linear.weight.detach()
    assert 0.9 < w.abs().max() <= 1.0
    assert torch.count_nonzero(encoder.linear.bias) == 0
