"""Expert-parallel dispatch and combine over torch.distributed (`ep_dispatch`, `ep_combine`).

Layout: ``E`` routed experts over the ``W`` ranks of the EP group, rank ``r`` owning experts
``[r*E/W, (r+1)*E/W)`` (``layout.py``). Both functions check their arguments once, then hand the
exchange to the selected `Transport` (``transport.py``): all-to-all on torch.distributed (the
default, ``all_to_all.py``, which documents the exchange and its bytes per token), DeepEP
(``deepep.py``) or Ascend MC2 (``ascend_mc2.py``). The handle remembers its transport, so the
combine goes back the way the dispatch came.

Agreement: before any row moves, every call checks that the ranks of the group mean the same exchange,
for every transport: one bounded all-gather (`comm.gather_ints`: an ``all_to_all_single`` of int64
``[W, 11]``, 88 bytes per peer) of a fixed descriptor holding the call (dispatch or combine), whether
this rank refused its own arguments, the payload dtype, D, k, E, the FP8 payload and its scale format,
``partial_sums``, the transport and T (not compared; the largest goes to the transport, which saves
Ascend MC2 its own max-T exchange). Where a field differs, every rank raises the same one-line error
naming each field that differs and which ranks hold which value, e.g. ``ep_dispatch: ranks disagree
on the payload dtype: rank 0 has bfloat16, rank 1 has float16``: `DTypeError` for a dtype, `ShapeError`
for D / k / E, `RangeError` for the payload format, partial sums and the transport, `EPGroupError` when
the ranks are in different calls. A rank that refuses its own arguments raises its own error after
the agreement and the others an `EPGroupError` naming it, so no rank waits for a peer that will never
send. The agreement is bounded by ``timeout`` like the exchanges (`EPTimeoutError`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

import v4hal.parallel.comm as comm
import v4hal.parallel.transport as _transport
from v4hal.hal.dispatch import value_checks_on
from v4hal.hal.errors import DTypeError, RangeError, ShapeError, V4HalError

from .errors import EPGroupError, EPTimeoutError
from .layout import FP8_BLOCK, EPHandle, expand_rows, expert_range
from .transport import get_transport, select_transport

__all__ = ["EPHandle", "ep_dispatch", "ep_combine", "expert_range", "expand_rows"]

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_SCALE_FMTS = (None, "ue8m0")

# ------------------------------------------------------------------ agreement of the ranks on one call
_CALLS = ("ep_dispatch", "ep_combine")
#: descriptor slots: (name in messages, error type, value -> text); the call and "refused" come first
_FIELDS: tuple[tuple[str, type[Exception], Callable[[int], str]], ...] = (
    ("call", EPGroupError, lambda v: _CALLS[v - 1] if 0 < v <= len(_CALLS) else f"call {v}"),
    ("refused", EPGroupError, lambda v: "refused its arguments" if v else "accepted its arguments"),
    ("the payload dtype", DTypeError,
     lambda v: str(_FLOATS[v - 1]).replace("torch.", "") if 0 < v <= len(_FLOATS) else "?"),
    ("the hidden size D", ShapeError, str),
    ("k (experts per token)", ShapeError, str),
    ("num_experts (E)", ShapeError, str),
    ("the FP8 payload (fp8)", RangeError, lambda v: "fp8=True" if v else "fp8=False"),
    ("the FP8 scale format (scale_fmt)", RangeError,
     lambda v: {0: "none (no FP8 payload)", 1: "fp32 scales (None)", 2: "'ue8m0'"}.get(v, "?")),
    ("partial_sums", RangeError, lambda v: "partial_sums=True" if v else "partial_sums=False"),
    ("the transport", RangeError,
     lambda v: repr(_transport.TRANSPORTS[v - 1]) if 0 < v <= len(_transport.TRANSPORTS) else "?"),
)
_FP8_SLOT, _SCALE_SLOT = 6, 7
_T_SLOT = len(_FIELDS)     # the token count: not compared, its maximum is handed to the transport


def _ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2, 5'; [3] -> 'rank 3'."""
    runs: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(runs)


def _holders(column: list[int], show: Callable[[int], str], verb: tuple[str, str] = ("has", "have")) -> str:
    """'rank 0 has bfloat16, rank 1 has float16' (every distinct value, in order of first rank)."""
    by_value: dict[int, list[int]] = {}
    for r, v in enumerate(column):
        by_value.setdefault(v, []).append(r)
    return ", ".join(f"{_ranks(rs)} {verb[len(rs) > 1]} {show(v)}" for v, rs in by_value.items())


def _agree(op: str, grp: dist.ProcessGroup, desc: list[int], refused: BaseException | None,
           timeout: float | None, device: object) -> int:
    """Check that every rank of ``grp`` makes the same call (see the module docstring); returns the
    largest token count over the ranks. ``refused``: this rank's own argument error, raised after the
    agreement (so its peers learn of it instead of waiting for rows that never come)."""
    try:
        table = comm.gather_ints(desc, grp, f"{op} (agreement)", timeout, comm.exchange_device(grp, device))
    except EPTimeoutError:
        if refused is not None:
            raise refused from None
        raise
    if refused is not None:
        raise refused
    differ = [i for i in range(len(_FIELDS)) if any(row[i] != table[0][i] for row in table)]
    if _FP8_SLOT in differ and _SCALE_SLOT in differ:      # fp8 on / off: the scale format follows
        differ.remove(_SCALE_SLOT)
    if not differ:
        return max(row[_T_SLOT] for row in table)
    if differ[0] == 0:
        calls = _holders([row[0] for row in table], _FIELDS[0][2], ("is in", "are in"))
        raise EPGroupError(f"{op}: the ranks of the EP group are in different calls: {calls} (every rank must "
                           "call ep_dispatch and ep_combine in the same order)")
    if differ[0] == 1:
        bad = [r for r, row in enumerate(table) if row[1]]
        raise EPGroupError(f"{op}: {_ranks(bad)} refused {'its' if len(bad) == 1 else 'their'} arguments (the "
                           f"error raised there says why); no row moved")
    parts = [f"{_FIELDS[i][0]}: {_holders([row[i] for row in table], _FIELDS[i][2])}" for i in differ]
    what = ("x's dtype and D, k, num_experts, fp8, scale_fmt and the transport" if op == "ep_dispatch" else
            "y's dtype, the handle's D, k and num_experts, partial_sums and the transport")
    raise _FIELDS[differ[0]][1](f"{op}: ranks disagree on {'; on '.join(parts)} ({what} must agree "
                                "across the group)")


def _descriptor(call: int, dtype: torch.dtype, dim: int, topk: int, num_experts: int, fp8: bool,
                scale_fmt: str | None, partial_sums: bool, transport: str, tokens: int) -> list[int]:
    """The int64 descriptor of one call, in `_FIELDS` order, then the token count."""
    scale = (2 if scale_fmt == "ue8m0" else 1) if fp8 else 0
    return [call, 0, _FLOATS.index(dtype) + 1, dim, topk, num_experts, int(fp8), scale, int(partial_sums),
            _transport.TRANSPORTS.index(transport) + 1, tokens]


def _refused_descriptor(call: int) -> list[int]:
    """The descriptor of a rank that refused its own arguments (only the call and the flag mean anything)."""
    return [call, 1, *([0] * (len(_FIELDS) - 2)), 0]


def _describe(t: object) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"


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

    Every rank of the group must call it with the same x dtype, D, k, num_experts, fp8, scale_fmt (read only
    with fp8) and transport; before any row moves the ranks check that they do (the module docstring).

    Raises:
        DTypeError / ShapeError / RangeError: this rank's arguments, or the ranks disagree (the message names
            the field and which rank holds which value). EPGroupError: no process group, another rank
            refused its arguments, or the ranks are in different calls. EPTimeoutError: a peer did not
            answer within ``timeout``.

    Returns:
        (``x_local [N, D]`` in x's dtype, grouped by local expert with ``handle.group_offsets`` int64
        ``[E_local + 1]``; their gate weights fp32 ``[N]``, or None when ``handle.weights_at_combine``;
        the handle for `ep_combine`).
    """
    op = "ep_dispatch"
    grp = comm.resolve_group(group, op)
    refused: Exception | None = None
    try:
        _check_inputs(op, x, weights, indices, num_experts, fp8, scale_fmt)
        comm.device_fits_group(op, grp, x.device)
        expert_range(num_experts, dist.get_world_size(grp), dist.get_rank(grp), op)
        name = select_transport(transport, x.device, grp, op)
        desc = _descriptor(1, x.dtype, x.shape[1], indices.shape[1], num_experts, fp8, scale_fmt, False, name,
                           x.shape[0])
    except (V4HalError, TypeError, ValueError, AttributeError) as exc:    # raised after the agreement
        refused, desc, name = exc, _refused_descriptor(1), ""
    max_tokens = _agree(op, grp, desc, refused, timeout, getattr(x, "device", None))
    return get_transport(name, op).dispatch(x, weights, indices, grp, num_experts=num_experts, fp8=fp8,
                                            scale_fmt=scale_fmt, timeout=timeout, max_tokens=max_tokens)


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

    Every rank of the group must call it with the same y dtype and partial_sums, on the handles of the same
    dispatch call (same D, k, num_experts, transport), checked before any row moves like `ep_dispatch`
    where value checks run (by default for CPU tensors: on accelerators the check's exchange would add a
    host sync to a combine that has none; ``V4HAL_CHECK_VALUES=1`` turns it on there too);
    ``out_dtype`` is this rank's own cast of its result and may differ between ranks.

    Raises:
        As `ep_dispatch`; `DTypeError` when handle is no `EPHandle`.

    Returns:
        ``[T, D]``: ``out[t] = sum_j y(t, j)`` on the rank that dispatched token t.
    """
    op = "ep_combine"
    if not isinstance(handle, EPHandle):
        raise DTypeError(f"{op}: handle must be the EPHandle from ep_dispatch, got {type(handle).__name__}")
    refused: Exception | None = None
    try:
        n = int(handle.group_offsets[-1])
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != n or y.shape[1] != handle.dim or \
                y.dtype not in _FLOATS:
            raise ShapeError(f"{op}: y must be float [N={n}, D={handle.dim}] (one row per dispatched row), "
                             f"got {_describe(y) if isinstance(y, torch.Tensor) else type(y).__name__}")
        if out_dtype is not None and out_dtype not in _FLOATS:
            raise DTypeError(f"{op}: out_dtype must be bf16/fp16/fp32 or None, got {out_dtype}")
        desc = _descriptor(2, y.dtype, handle.dim, handle.topk, handle.num_experts, False, None, partial_sums,
                           handle.transport, handle.num_tokens)
    except (V4HalError, TypeError, ValueError, AttributeError) as exc:    # raised after the agreement
        refused, desc = exc, _refused_descriptor(2)
    device = getattr(y, "device", None)
    if value_checks_on(device.type if isinstance(device, torch.device) else "cpu"):
        _agree(op, handle.group, desc, refused, handle.timeout, device)
    elif refused is not None:
        raise refused
    return get_transport(handle.transport, op).combine(y, handle, out_dtype=out_dtype, partial_sums=partial_sums)
