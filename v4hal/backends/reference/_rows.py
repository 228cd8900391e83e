"""Row-invariant products: the bits of each output row depend only on that row's input, never on how
many other rows share the call.

A CPU BLAS picks its kernel by the matrix shape: this machine's MKL rounds a row of a product differently
when the call has fewer than 4 rows, and with 2 threads when the row count is 5 or 7. Serving needs the
same bits for a token whatever else is in its batch (a decode token alone or beside 60 prefill tokens),
or a rounding difference flips an FP8/FP4 code or an expert choice and two runs of one request diverge.
Padding the rows with zeros to a multiple of :data:`ROW_TILE` (4) gave identical rows for every row
count, offset and thread count tried (1 and 2 threads; K, N from 4 to 4096; 8 and 16 as well). The
padding costs at most 3 zero rows a call (a one-token decode step multiplies 4 rows instead of 1).

Pointwise functions have the same problem in another form: the CPU vector kernels of ``sigmoid``,
``softplus`` (and ``log1p``, ``silu``) compute the full vector lanes with one formula and the tail of a
tensor with another, so an element's fp32 bits depend on its offset in the tensor (a token's mHC weights
changed with the chunk it came in). `pointwise64` computes in float64, where the two formulas differ far
below fp32's rounding, and rounds once.
"""
from __future__ import annotations

import torch

__all__ = ["ROW_TILE", "pad_rows", "row_matmul", "pointwise64"]

#: Rows are padded to a multiple of this.
ROW_TILE = 4


def pad_rows(x: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """``x`` with dim ``dim`` zero padded to a multiple of `ROW_TILE` (``x`` itself when it already is)."""
    n = x.shape[dim]
    extra = -n % ROW_TILE
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def row_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [..., M, K] @ b [..., K, N]`` with M padded to a multiple of `ROW_TILE` (row-invariant bits); a
    1-d ``a [K]`` is one row."""
    if a.dim() == 1:
        return row_matmul(a.unsqueeze(0), b)[0]
    m = a.shape[-2]
    return torch.matmul(pad_rows(a), b)[..., :m, :]


def pointwise64(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` (a pointwise function) computed in float64 and rounded to ``x``'s dtype: the same bits for an
    element wherever it sits in ``x`` (see the module doc)."""
    return fn(x.double()).to(x.dtype)
