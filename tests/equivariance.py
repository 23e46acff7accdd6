"""One rotation-equivariance helper for every equivariant piece (dtype-aware tolerances)."""

from __future__ import annotations

import torch


def random_rotation(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A proper rotation matrix ``[3, 3]`` (det +1) from a seeded QR decomposition."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 2e-4}.get(dtype, 1e-2)


def assert_rotates(actual: torch.Tensor, reference: torch.Tensor, rot: torch.Tensor,
                   scale: float | None = None) -> None:
    """``actual == reference @ rot.T`` up to a tolerance relative to the reference's size."""
    expected = reference @ rot.T.to(reference.dtype)
    scale = scale if scale is not None else max(reference.abs().max().item(), 1e-6)
    err = (actual - expected).abs().max().item()
    assert err <= tolerance(reference.dtype) * 10 * scale, f"max error {err:.3e} (scale {scale:.3e})"


def assert_invariant(actual: torch.Tensor, reference: torch.Tensor) -> None:
    scale = max(reference.abs().max().item(), 1e-6)
    err = (actual - reference).abs().max().item()
    assert err <= tolerance(reference.dtype) * 10 * scale, f"max error {err:.3e} (scale {scale:.3e})"
