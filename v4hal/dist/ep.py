"""Expert-parallel dispatch and combine over torch.distributed (`ep_dispatch`, `ep_combine`).

Layout: ``E`` routed experts over the ``W`` ranks of the EP group, rank ``r`` owning experts
``[r*E/W, (r+1)*E/W)`` (local id = global id - r*E/W).

Dispatch (all-to-all path), on each rank with ``x [T, D]``, ``weights fp32 [T, k]``, ``indices [T, k]``:

1. Each token is sent **once per destination rank** (not once per chosen expert), with its k slots
   marked for that rank: local expert id (-1 for slots owned by other ranks) and gate weight.
2. Counts first: one ``all_to_all_single`` of ``[W, 4]`` int64 (rows for each rank, and the row
   size / E / k, checked to agree across ranks so a mismatch is an error, not garbage).
3. Payload: one uneven ``all_to_all_single`` of uint8 rows packing the token (bf16 bytes, or with
   ``fp8=True`` the ``act_quant`` fp8 bytes + block-128 scales), the k local ids (int32) and the k
   weights (fp32). gloo in torch 2.13 supports uneven ``all_to_all_single`` (checked), but not
   fp8 dtypes, hence the uint8 view.
4. The receiver expands its rows into one copy per (row, local slot) and sorts them stably by local
   expert: the returned tokens are grouped by local expert (``handle.group_offsets``), inside an
   expert in (source rank, token, slot) order; FP8 payloads are dequantized (``dequant_fp8``) to
   x's dtype.

Combine: the expert outputs ``y [N, D]`` (one row per copy, grouped like the dispatch output) go
back with one uneven ``all_to_all_single`` in y's dtype (bf16 in the model), one row per copy, and
the home rank puts them in flat ``t*k + j`` order and sums over ``j`` in fp32 with one final cast:
the summation of ``moe_experts``, so with the gate weight applied by the expert (before w2, as
``moe_experts`` does) the EP result equals the single-process ``moe_experts`` row for row.
``partial_sums=True`` instead sums each token's copies on the expert rank and sends one bf16 row
per (token, rank), DeepEP's format: fewer bytes, one more rounding.

Bytes per token (bf16): dispatch ``h * (2D + 8k)`` where ``h`` is the number of ranks a token hits
(``h <= min(k, W)``), FP8 ``h * (D + 4D/128 + 8k)`` (fp32 scales) or ``h * (D + D/128 + 8k)``
(ue8m0); combine ``k * 2D`` (``h * 2D`` with partial sums). ``handle.stats`` records what this
rank actually sent. Counts: ``W * 32`` bytes per rank and call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

import v4hal
from v4hal.hal.errors import DTypeError, RangeError, ShapeError

from . import comm
from .errors import EPGroupError

__all__ = ["EPHandle", "ep_dispatch", "ep_combine", "expert_range"]

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_FP8_BLOCK = 128
_SCALE_FMTS = (None, "ue8m0")


@dataclass
class EPHandle:
    """What `ep_combine` needs to undo `ep_dispatch` (and what the dispatch did).

    ``group_offsets`` int64 ``[E_local + 1]`` delimits the rows of each local expert in the dispatch
    output. ``weights_at_combine`` is True when the transport applies the gate weights in the combine
    (then `ep_dispatch` returned None for the weights and the experts must not apply them).
    ``stats``: bytes and rows this rank sent (``dispatch_bytes`` / ``combine_bytes`` all payload,
    ``*_remote`` without the part that stays on this rank, ``count_bytes`` the counts exchange).
    """

    transport: str
    group: dist.ProcessGroup
    world_size: int
    rank: int
    num_tokens: int
    topk: int
    num_experts: int
    num_local_experts: int
    dim: int
    dtype: torch.dtype
    group_offsets: torch.Tensor
    timeout: float | None
    weights_at_combine: bool = False
    stats: dict[str, float] = field(default_factory=dict)
    state: Any = None

    def local_expert_ids(self) -> torch.Tensor:
        """int32 ``[N]``: the local expert of each dispatched row."""
        counts = self.group_offsets[1:] - self.group_offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.num_local_experts, dtype=torch.int32,
                                                    device=counts.device), counts)


@dataclass
class _A2AState:
    """All-to-all transport bookkeeping."""

    order: torch.Tensor           # int64 [N]: arrival rank (ascending row*k + j) of each grouped copy
    return_splits: list[int]      # copies sent back to each rank in the combine
    home_splits: list[int]        # copies of this rank's tokens held by each rank
    home_order: torch.Tensor      # int64 [T*k]: flat (t*k + j) of this rank's copies in arrival order
    copy_row: torch.Tensor        # int64 [N]: received row of each grouped copy (partial sums)
    recv_splits: list[int]        # rows received from each rank in the dispatch
    send_splits: list[int]        # rows sent to each rank in the dispatch
    pair_tok: torch.Tensor        # int64 [P]: token of each sent row, in send order


def expert_range(num_experts: int, world_size: int, rank: int, op: str = "ep") -> tuple[int, int]:
    """``[lo, hi)`` global expert ids owned by ``rank``; `RangeError` when ``E`` is not divisible by ``W``."""
    if num_experts <= 0 or num_experts % world_size:
        raise RangeError(f"{op}: num_experts must be a positive multiple of the EP group size {world_size} "
                         f"(rank r holds experts [r*E/W, (r+1)*E/W)), got {num_experts}")
    per = num_experts // world_size
    return rank * per, (rank + 1) * per


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
    if fp8 and x.shape[1] % _FP8_BLOCK:
        raise ShapeError(f"{op}: an FP8 payload needs D divisible by {_FP8_BLOCK} (act_quant blocks), "
                         f"got D={x.shape[1]}")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``[R, n]`` -> uint8 ``[R, n * itemsize]`` (a view when possible)."""
    t = t.contiguous()
    return t.view(torch.uint8).reshape(t.shape[0], t.shape[1] * t.element_size())


def _from_bytes(b: torch.Tensor, dtype: torch.dtype, width: int) -> torch.Tensor:
    """uint8 ``[R, width * itemsize]`` columns -> ``[R, width]`` of ``dtype``."""
    return b.contiguous().view(dtype).reshape(b.shape[0], width)


def _payload_layout(dim: int, topk: int, dtype: torch.dtype, fp8: bool, scale_fmt: str | None
                    ) -> tuple[int, int, int]:
    """(token bytes, scale bytes, total row bytes) of one dispatched row."""
    if fp8:
        xb = dim
        sb = (dim // _FP8_BLOCK) * (1 if scale_fmt == "ue8m0" else 4)
    else:
        xb, sb = dim * torch.empty(0, dtype=dtype).element_size(), 0
    return xb, sb, xb + sb + 8 * topk


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
        transport: None (automatic), ``"all_to_all"``, ``"deepep"`` or ``"ascend"`` (see `v4hal.dist.transport`).

    Returns:
        (``x_local [N, D]`` in x's dtype, grouped by local expert with ``handle.group_offsets`` int64
        ``[E_local + 1]``; their gate weights fp32 ``[N]``, or None when ``handle.weights_at_combine``;
        the handle for `ep_combine`).
    """
    op = "ep_dispatch"
    from .transport import get_transport

    grp = comm.resolve_group(group, op)
    _check_inputs(op, x, weights, indices, num_experts, fp8, scale_fmt)
    comm.device_fits_group(op, grp, x.device)
    expert_range(num_experts, dist.get_world_size(grp), dist.get_rank(grp), op)
    impl = get_transport(transport, x.device, grp, op)
    if impl is not None:
        return impl.dispatch(x, weights, indices, grp, num_experts=num_experts, fp8=fp8, scale_fmt=scale_fmt,
                             timeout=timeout)
    return _a2a_dispatch(x, weights, indices, grp, num_experts, fp8, scale_fmt, timeout)


def expand_rows(recv_lids: torch.Tensor, num_local_experts: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of received rows grouped by local expert.

    recv_lids int ``[R, k]`` (local expert per slot, -1 = not here) -> (copy_pos int64 ``[N]``: flat
    ``row*k + j`` of each copy, stably sorted by local expert; order int64 ``[N]``: copy i is the
    ``order[i]``-th copy in ascending ``row*k + j`` order; group_offsets int64 ``[E_local + 1]``).
    """
    flat = recv_lids.reshape(-1).long()
    pos = torch.nonzero(flat >= 0).squeeze(1)                        # ascending row*k + j
    lids = flat[pos]
    order = torch.argsort(lids, stable=True)
    counts = torch.bincount(lids, minlength=num_local_experts)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return pos[order], order, offsets


def _a2a_dispatch(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, group: dist.ProcessGroup,
                  num_experts: int, fp8: bool, scale_fmt: str | None, timeout: float | None
                  ) -> tuple[torch.Tensor, torch.Tensor, EPHandle]:
    op = "ep_dispatch"
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    t, d = x.shape
    k = indices.shape[1]
    e_local = num_experts // world
    dev = x.device
    idx = indices.long()
    dest = torch.div(idx, e_local, rounding_mode="floor")                            # [T, k]

    # one row per (token, destination rank), ordered by rank then token
    hit = torch.zeros(t, world, dtype=torch.bool, device=dev)
    hit.scatter_(1, dest, True)
    pair_rank, pair_tok = torch.nonzero(hit.t(), as_tuple=True)
    send_rows = torch.bincount(pair_rank, minlength=world)
    mine = dest[pair_tok] == pair_rank.unsqueeze(1)                                   # [P, k]
    lids = torch.where(mine, idx[pair_tok] - pair_rank.unsqueeze(1) * e_local, -1).to(torch.int32)
    wts = torch.where(mine, weights[pair_tok], 0.0)

    xb, sb, row_bytes = _payload_layout(d, k, x.dtype, fp8, scale_fmt)
    if fp8:
        sdtype = torch.float8_e8m0fnu if scale_fmt == "ue8m0" else torch.float32
        if t:
            xq, xs = v4hal.act_quant(x, _FP8_BLOCK, scale_fmt, sdtype)
        else:
            xq = torch.empty(0, d, dtype=torch.float8_e4m3fn, device=dev)
            xs = torch.empty(0, d // _FP8_BLOCK, dtype=sdtype, device=dev)
        parts = [_bytes(xq[pair_tok]), _bytes(xs[pair_tok])]
    else:
        parts = [_bytes(x[pair_tok])]
    send = torch.cat([*parts, _bytes(lids), _bytes(wts)], dim=1) if pair_tok.numel() else \
        torch.empty(0, row_bytes, dtype=torch.uint8, device=dev)

    # counts (and the row format, checked across ranks)
    meta = torch.tensor([row_bytes, num_experts, k], dtype=torch.int64, device=dev)
    counts_in = torch.cat([send_rows.unsqueeze(1), meta.expand(world, 3)], dim=1).contiguous()
    counts_out = torch.empty_like(counts_in)
    comm.all_to_all(counts_out, counts_in, None, None, group, f"{op} (counts)", timeout)
    bad = torch.nonzero((counts_out[:, 1:] != meta).any(dim=1)).squeeze(1).tolist()
    if bad:
        s = bad[0]
        raise ShapeError(f"{op}: rank {s} dispatches rows of {int(counts_out[s, 1])} bytes with "
                         f"E={int(counts_out[s, 2])}, k={int(counts_out[s, 3])}; rank {rank} has {row_bytes} bytes, "
                         f"E={num_experts}, k={k}: "
                         "x's D and dtype, k, num_experts and the fp8 payload setting must agree across the group")
    recv_rows = counts_out[:, 0]
    in_splits, out_splits = send_rows.tolist(), recv_rows.tolist()
    recv = torch.empty(sum(out_splits), row_bytes, dtype=torch.uint8, device=dev)
    comm.all_to_all(recv, send, out_splits, in_splits, group, f"{op} (payload)", timeout)

    # unpack
    n_rows = recv.shape[0]
    if fp8:
        rq = _from_bytes(recv[:, :xb], torch.float8_e4m3fn, d)
        rs = _from_bytes(recv[:, xb:xb + sb], sdtype, d // _FP8_BLOCK)
        recv_x = v4hal.dequant_fp8(rq, rs, _FP8_BLOCK, out_dtype=x.dtype) if n_rows else \
            torch.empty(0, d, dtype=x.dtype, device=dev)
    else:
        recv_x = _from_bytes(recv[:, :xb], x.dtype, d)
    recv_lids = _from_bytes(recv[:, xb + sb:xb + sb + 4 * k], torch.int32, k)
    recv_w = _from_bytes(recv[:, xb + sb + 4 * k:], torch.float32, k)

    copy_pos, order, offsets = expand_rows(recv_lids, e_local)
    copy_row = torch.div(copy_pos, k, rounding_mode="floor")
    x_local = recv_x[copy_row]
    w_local = recv_w.reshape(-1)[copy_pos]

    # combine bookkeeping: copies per source rank (rows arrive grouped by source) and the home order
    src = torch.repeat_interleave(torch.arange(world, device=dev), recv_rows)
    per_row = (recv_lids >= 0).sum(dim=1)
    return_splits = torch.zeros(world, dtype=torch.int64, device=dev).index_add_(0, src, per_row).tolist()
    flat_dest = dest.reshape(-1)
    home_order = torch.argsort(flat_dest, stable=True)
    home_splits = torch.bincount(flat_dest, minlength=world).tolist()

    remote = [i for i in range(world) if i != rank]
    stats = {
        "tokens": float(t), "dispatch_rows": float(pair_tok.numel()),
        "dispatch_bytes": float(send.numel()),
        "dispatch_bytes_remote": float(sum(in_splits[i] for i in remote) * row_bytes),
        "count_bytes": float(counts_in.numel() * counts_in.element_size()),
        "received_rows": float(n_rows), "received_copies": float(copy_pos.numel()),
    }
    handle = EPHandle("all_to_all", group, world, rank, t, k, num_experts, e_local, d, x.dtype, offsets,
                      timeout, False, stats,
                      _A2AState(order, return_splits, home_splits, home_order, copy_row, out_splits, in_splits,
                                pair_tok))
    return x_local, w_local, handle


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
    if handle.transport != "all_to_all":
        from .transport import transport_by_name

        return transport_by_name(handle.transport).combine(y, handle, out_dtype=out_dtype)
    st: _A2AState = handle.state
    t, k, d = handle.num_tokens, handle.topk, handle.dim
    row = d * y.element_size()
    if partial_sums:
        part = torch.zeros(sum(st.recv_splits), d, dtype=torch.float32, device=y.device)
        part.index_add_(0, st.copy_row, y.float())
        part = part.to(y.dtype)
        recv = torch.empty(sum(st.send_splits), d, dtype=y.dtype, device=y.device)
        comm.all_to_all(recv, part, st.send_splits, st.recv_splits, handle.group, op, handle.timeout)
        out = torch.zeros(t, d, dtype=torch.float32, device=y.device).index_add_(0, st.pair_tok, recv.float())
        handle.stats["combine_bytes"] = float(part.numel() * part.element_size())
        handle.stats["combine_bytes_remote"] = float(
            sum(s for i, s in enumerate(st.recv_splits) if i != handle.rank) * row)
        return out.to(out_dtype or y.dtype)
    back = torch.empty_like(y)
    back[st.order] = y                               # arrival order of the copies: (source rank, row, slot)
    recv = torch.empty(t * k, d, dtype=y.dtype, device=y.device)
    comm.all_to_all(recv, back, st.home_splits, st.return_splits, handle.group, op, handle.timeout)
    flat = torch.empty_like(recv)
    flat[st.home_order] = recv
    out = flat.float().reshape(t, k, d).sum(dim=1)
    remote = sum(s for i, s in enumerate(st.return_splits) if i != handle.rank)
    handle.stats["combine_bytes"] = float(back.numel() * back.element_size())
    handle.stats["combine_bytes_remote"] = float(remote * row)
    return out.to(out_dtype or y.dtype)
