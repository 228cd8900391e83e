"""Expert-parallel dispatch and combine over torch.distributed (`ep_dispatch`, `ep_combine`).

Layout: ``E`` routed experts over the ``W`` ranks of the EP group, rank ``r`` owning experts
``[r*E/W, (r+1)*E/W)`` (``layout.py``). Both functions check their arguments once, then hand the
exchange to the selected `Transport` (``transport.py``): all-to-all on torch.distributed (the
default, ``all_to_all.py``, which documents the exchange and its bytes per token), DeepEP
(``deepep.py``) or Ascend MC2 (``ascend_mc2.py``). The handle remembers its transport, so the
combine goes back the way the dispatch came.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from v4hal.hal.errors import DTypeError, RangeError, ShapeError

from . import comm
from .errors import EPGroupError
from .layout import FP8_BLOCK, EPHandle, expand_rows, expert_range
from .transport import get_transport, select_transport

__all__ = ["EPHandle", "ep_dispatch", "ep_combine", "expert_range", "expand_rows"]

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_SCALE_FMTS = (None, "ue8m0")


def _describe(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"


def _check_inputs(op: str, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, num_experts: int,
                  fp8: bool, scale_fmt: str | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS or x.dim() != 2:
        raise DTypeError(f"{op}: x must be a bf16/fp16/fp32 [T, D] tensor, got {_describe(x)}")
    t = x.shape[0]
    if indices.dim() != 2 or indices.shape[0] != t or indices.dtype not in (torch.int32, torch.int64):
        raise ShapeError(f"{op}: indices must be int32/int64 [T={t}, k], got {_describe(indices)}")
    if indices.shape[1] < 1:
        raise ShapeError(f"{op}: indices must have k >= 1 columns, got {_describe(indices)}")
    if weights.dtype != torch.float32 or tuple(weights.shape) != tuple(indices.shape):
        raise ShapeError(f"{op}: weights must be float32 [T, k] = {list(indices.shape)}, got {_describe(weights)}")
    if x.device != indices.device or x.device != weights.device:
        raise EPGroupError(f"{op}: x, weights, indices must be on one device, got {x.device}, {weights.device}, "
                           f"{indices.device}")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_experts:
            raise RangeError(f"{op}: indices must lie in [0, num_experts={num_experts}), got range [{lo}, {hi}]")
    if scale_fmt not in _SCALE_FMTS:
        raise RangeError(f"{op}: scale_fmt must be None (fp32 scales) or 'ue8m0', got {scale_fmt!r}")
    if fp8 and x.shape[1] % FP8_BLOCK:
        raise ShapeError(f"{op}: an FP8 payload needs D divisible by {FP8_BLOCK} (act_quant blocks), "
                         f"got D={x.shape[1]}")


def ep_dispatch(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                group: dist.ProcessGroup | None = None, *, num_experts: int, fp8: bool = False,
                scale_fmt: str | None = None, timeout: float | None = None, transport: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, EPHandle]:
    """Send each token to the ranks owning its chosen experts; return what the local experts must process.

    Args:
        x: ``[T, D]`` bf16/fp16/fp32 tokens of this rank (T may differ per rank, may be 0).
        weights: fp32 ``[T, k]`` gate weights; indices: int32/int64 ``[T, k]`` global expert ids in ``[0, E)``.
        group: the EP process group (None: WORLD). ``num_experts``: E, divisible by the group size.
        fp8: send the tokens as FP8 (``act_quant``, 128-blocks) + scales, dequantized on arrival; ``scale_fmt``
            None -> fp32 scales, ``"ue8m0"`` -> power-of-two e8m0 scales (1 byte per block).
        timeout: seconds each exchange may take (None: the group's timeout); a dead or absent peer raises
            `EPTimeoutError` within it.
        transport: None (automatic), ``"all_to_all"``, ``"deepep"`` or ``"ascend"`` (see `v4hal.parallel.transport`).

    Returns:
        (``x_local [N, D]`` in x's dtype, grouped by local expert with ``handle.group_offsets`` int64
        ``[E_local + 1]``; their gate weights fp32 ``[N]``, or None when ``handle.weights_at_combine``;
        the handle for `ep_combine`).
    """
    op = "ep_dispatch"
    grp = comm.resolve_group(group, op)
    _check_inputs(op, x, weights, indices, num_experts, fp8, scale_fmt)
    comm.device_fits_group(op, grp, x.device)
    expert_range(num_experts, dist.get_world_size(grp), dist.get_rank(grp), op)
    impl = get_transport(select_transport(transport, x.device, grp, op), op)
    return impl.dispatch(x, weights, indices, grp, num_experts=num_experts, fp8=fp8, scale_fmt=scale_fmt,
                         timeout=timeout)


def ep_combine(y: torch.Tensor, handle: EPHandle, *, out_dtype: torch.dtype | None = None,
               partial_sums: bool = False) -> torch.Tensor:
    """Send the expert outputs back and sum them on each token's home rank.

    Args:
        y: ``[N, D]`` float, one row per dispatched row of `ep_dispatch` (same order); when the dispatch
            returned gate weights the experts have applied them (``moe_experts`` applies them before w2).
        handle: the `EPHandle` of the matching `ep_dispatch`.
        out_dtype: dtype of the result (None: y's dtype). The sum over the k slots is taken in fp32 in
            slot order; ``torch.float32`` returns that sum before any rounding.
        partial_sums: first sum each token's copies on the expert rank (fp32, cast to y's dtype) and send one
            row per (token, rank) instead of one per copy, as DeepEP's combine does: ``h * 2D`` bytes per token
            instead of ``k * 2D`` (h = ranks the token hit), at the price of one more rounding per partial sum
            (then equal to `moe_experts` within y's dtype tolerance, not bit for bit). Only the all-to-all
            transport reads it: DeepEP always combines partial sums, Ascend MC2 its own way.

    Returns:
        ``[T, D]``: ``out[t] = sum_j y(t, j)`` on the rank that dispatched token t.
    """
    op = "ep_combine"
    if not isinstance(handle, EPHandle):
        raise DTypeError(f"{op}: handle must be the EPHandle from ep_dispatch, got {type(handle).__name__}")
    n = int(handle.group_offsets[-1])
    if y.dim() != 2 or y.shape[0] != n or y.shape[1] != handle.dim or y.dtype not in _FLOATS:
        raise ShapeError(f"{op}: y must be float [N={n}, D={handle.dim}] (one row per dispatched row), "
                         f"got {_describe(y)}")
    if out_dtype is not None and out_dtype not in _FLOATS:
        raise DTypeError(f"{op}: out_dtype must be bf16/fp16/fp32 or None, got {out_dtype}")
    return get_transport(handle.transport, op).combine(y, handle, out_dtype=out_dtype, partial_sums=partial_sums)
