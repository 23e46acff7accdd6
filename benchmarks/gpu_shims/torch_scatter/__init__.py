"""Stand-in for ``torch_scatter`` on a bare GPU image (see ../README.md), on native torch ops.

Shapes as in torch_scatter: ``index`` [N] (or broadcastable to ``src``) along ``dim``; the
output has ``dim_size`` (default ``index.max() + 1``) entries along ``dim``."""

from __future__ import annotations

import torch

__version__ = "0.0+native"
_NATIVE = {"sum": "sum", "add": "sum", "mean": "mean", "min": "amin", "max": "amax"}


def _broadcast(index: torch.Tensor, src: torch.Tensor, dim: int) -> torch.Tensor:
    dim = dim % src.dim()
    if index.dim() == 1:
        shape = [1] * src.dim()
        shape[dim] = -1
        index = index.view(shape)
    return index.expand_as(src)


def scatter(src: torch.Tensor, index: torch.Tensor, dim: int = -1,
            out: torch.Tensor | None = None, dim_size: int | None = None,
            reduce: str = "sum") -> torch.Tensor:
    if reduce not in _NATIVE:
        raise ValueError(f"torch_scatter stand-in: reduce={reduce!r} not in {sorted(_NATIVE)}")
    dim = dim % src.dim()
    index = _broadcast(index, src, dim)
    if out is None:
        size = list(src.shape)
        size[dim] = dim_size if dim_size is not None else (
            int(index.max()) + 1 if index.numel() else 0)
        out = src.new_zeros(size)
    # include_self=False: empty outputs stay 0, as torch_scatter leaves them
    return out.scatter_reduce(dim, index, src, _NATIVE[reduce], include_self=False)


def scatter_sum(src, index, dim=-1, out=None, dim_size=None):
    return scatter(src, index, dim, out, dim_size, "sum")


scatter_add = scatter_sum


def scatter_mean(src, index, dim=-1, out=None, dim_size=None):
    return scatter(src, index, dim, out, dim_size, "mean")


def _scatter_arg(src, index, dim, dim_size, reduce: str):
    values = scatter(src, index, dim, None, dim_size, reduce)
    dim = dim % src.dim()
    full = _broadcast(index, src, dim)
    hit = src == values.gather(dim, full)
    position = torch.arange(src.shape[dim], device=src.device).view(
        [-1 if d == dim else 1 for d in range(src.dim())]).expand_as(src)
    fill = src.shape[dim]  # torch_scatter's arg for an empty output
    candidates = torch.where(hit, position, torch.full_like(position, fill))
    arg = torch.full(values.shape, fill, dtype=torch.long, device=src.device)
    return values, arg.scatter_reduce(dim, full, candidates, "amin", include_self=True)


def scatter_max(src, index, dim=-1, out=None, dim_size=None):
    return _scatter_arg(src, index, dim, dim_size, "max")


def scatter_min(src, index, dim=-1, out=None, dim_size=None):
    return _scatter_arg(src, index, dim, dim_size, "min")


def segment_csr(src: torch.Tensor, indptr: torch.Tensor, out: torch.Tensor | None = None,
                reduce: str = "sum") -> torch.Tensor:
    """Reduce ``src`` [..., N, ...] over the segments ``indptr`` [S + 1] of its first
    dimension after ``indptr``'s own batch dimensions (1-D ``indptr`` only)."""
    if indptr.dim() != 1:
        raise ValueError("torch_scatter stand-in: segment_csr takes a 1-D indptr only")
    dim = 0
    lengths = indptr[1:] - indptr[:-1]
    result = torch.segment_reduce(src, _NATIVE[reduce].removeprefix("a"), lengths=lengths,
                                  axis=dim, unsafe=True)
    empty = (lengths == 0).view([-1] + [1] * (src.dim() - 1))
    return torch.where(empty, torch.zeros((), dtype=result.dtype, device=result.device), result)
