"""Row-invariant products and element-wise math: the bits of each output row depend only on that row's input,
never on how many other rows share the call.

A CPU BLAS picks its kernel by the matrix shape: this machine's MKL rounds a row of a product differently
when the call has fewer than 4 rows, and with 2 threads when the row count is 5 or 7. Serving needs the
same bits for a token whatever else is in its batch (a decode token alone or beside 60 prefill tokens),
or a rounding difference flips an FP8/FP4 code or an expert choice and two runs of one request diverge.
Padding the rows with zeros to a multiple of :data:`ROW_TILE` (4) gave identical rows for every row
count, offset and thread count tried (1 and 2 threads; K, N from 4 to 4096; 8 and 16 as well). The
padding costs at most 3 zero rows a call (a one-token decode step multiplies 4 rows instead of 1).

Element-wise math has the same problem at a finer grain. ATen runs a contiguous element-wise kernel as
vector steps of ``2 * Vectorized<T>::size()`` elements and computes the remainder with the scalar function,
and its vector and scalar transcendental functions round differently (``sigmoid``, ``softplus`` and ``silu``
differ in a few percent of fp32 inputs at the avx2 and avx512 levels; at the ``default`` level a vector
function is the scalar one applied per lane). Which elements land in the remainder depends on the element
count, and with several threads on where ``at::parallel_for`` splits the work, so a token's ``sigmoid``
could change with the rows beside it.
:func:`pointwise` pads the flattened work so that every element takes the vector path at every capability
level and thread count.

What the reference ops of the graph need besides (checked per op by ``tests/reference/test_batch_invariance.py``
at the default, avx2 and avx512 levels): nothing for ``exp`` and ``log``, which run through ``at::vml`` (MKL's
VML, or without MKL a vector map whose remainder is a partial vector load through the same vector function),
nor for ``sqrt``, ``rsqrt``, division and the other correctly rounded operations: they give an element the same
bits wherever it sits. Softmax, the norms, ``amax``/``sum``/``mean`` over a token's own elements, ``topk`` and
``sort`` work row by row; the float64 attention products are one matrix per query row and request; the fp32
GEMMs use :func:`row_matmul` or :func:`pad_rows`.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["ROW_TILE", "LANE_TILE", "pad_rows", "row_matmul", "padded_numel", "pointwise"]

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


#: Element-wise work is padded to a multiple of this many elements per thread chunk: one vector step (two
#: vectors) of the widest vectors ATen uses here, 32 bf16 lanes at avx512 (16 fp32, 8 fp64).
LANE_TILE = 64

#: ATen's ``at::internal::GRAIN_SIZE``: an element-wise kernel over fewer elements runs on one thread, a larger
#: one is cut into ``min(threads, ceil(n / GRAIN_SIZE))`` chunks of ``ceil(n / chunks)`` elements.
_GRAIN_SIZE = 32768


def padded_numel(n: int, threads: int) -> int:
    """The smallest ``m >= n`` (a multiple of `LANE_TILE`) that ATen cuts into thread chunks of whole
    `LANE_TILE` multiples: ``m`` is a multiple of ``LANE_TILE * k`` for the chunk count
    ``k = min(threads, ceil(m / GRAIN_SIZE))`` that ATen derives from ``m`` itself (1 below the grain)."""
    m = -(-max(n, 1) // LANE_TILE) * LANE_TILE
    while True:
        k = max(1, min(threads, -(-m // _GRAIN_SIZE)))
        step = LANE_TILE * k
        if m % step == 0:
            return m
        m = -(-m // step) * step      # k only grows with m and is at most `threads`: this ends


def pointwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an element-wise ``fn`` (one output element from the input element at its position),
    with bits that depend only on each element's value, never on how many elements share the call.

    x any shape and float dtype; returns ``fn``'s output, contiguous, of x's shape. On the CPU the
    elements are copied into a flat buffer zero padded to :func:`padded_numel` (a multiple of `LANE_TILE`
    per thread chunk) so that ATen's kernel computes all of them with the vector function. Other devices
    compute ``fn(x)`` unchanged: the padding answers the CPU kernels' vector/remainder split only.
    """
    if not x.is_cpu:
        return fn(x)
    n = x.numel()
    # below the grain (every decode step) one chunk: the next multiple of LANE_TILE, without the search
    m = -(-n // LANE_TILE) * LANE_TILE if n <= _GRAIN_SIZE else padded_numel(n, torch.get_num_threads())
    flat = x.reshape(-1)
    if m == n:
        return fn(flat).view(x.shape)
    return fn(torch.nn.functional.pad(flat, (0, m - n)))[:n].view(x.shape)
