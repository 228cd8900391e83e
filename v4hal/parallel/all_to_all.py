"""The default transport: torch.distributed ``all_to_all_single`` (gloo, NCCL, HCCL).

Dispatch, on each rank with ``x [T, D]``, ``weights fp32 [T, k]``, ``indices [T, k]``:

1. Each token is sent **once per destination rank** (not once per chosen expert), with its k slots
   marked for that rank: local expert id (-1 for slots owned by other ranks) and gate weight.
2. Counts first: one ``all_to_all_single`` of ``[W, 1]`` int64 (rows for each rank). That the ranks
   agree on the row format (dtype, D, k, E, FP8 payload and scale format) `ep_dispatch` has checked
   before calling the transport, so a mismatch is an error, not garbage.
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
rank actually sent. Counts: ``W * 8`` bytes per rank and call (plus ``W * 88`` bytes for the agreement
of `ep_dispatch` / `ep_combine`). Every exchange is bounded by ``timeout`` (`comm.wait`): a dead or absent
peer raises `EPTimeoutError`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

import v4hal
import v4hal.parallel.comm as comm

from .layout import FP8_BLOCK, EPHandle, expand_rows

__all__ = ["AllToAll"]


@dataclass(kw_only=True)
class _A2AState:
    """All-to-all bookkeeping of one dispatch."""

    order: torch.Tensor           # int64 [N]: arrival rank (ascending row*k + j) of each grouped copy
    return_splits: list[int]      # copies sent back to each rank in the combine
    home_splits: list[int]        # copies of this rank's tokens held by each rank
    home_order: torch.Tensor      # int64 [T*k]: flat (t*k + j) of this rank's copies in arrival order
    copy_row: torch.Tensor        # int64 [N]: received row of each grouped copy (partial sums)
    recv_splits: list[int]        # rows received from each rank in the dispatch
    send_splits: list[int]        # rows sent to each rank in the dispatch
    pair_tok: torch.Tensor        # int64 [P]: token of each sent row, in send order


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
        sb = (dim // FP8_BLOCK) * (1 if scale_fmt == "ue8m0" else 4)
    else:
        xb, sb = dim * torch.empty(0, dtype=dtype).element_size(), 0
    return xb, sb, xb + sb + 8 * topk


class AllToAll:
    """Two uneven ``all_to_all_single`` per dispatch (counts, payload), one per combine; any device
    the process group serves. Returns the gate weights with the rows (the experts apply them)."""

    name = "all_to_all"
    device_type: str | None = None

    def unavailable(self, device: torch.device, group: dist.ProcessGroup | None) -> str | None:
        """Never: torch.distributed serves every group (`comm.device_fits_group` checks the device)."""
        return None

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, group: dist.ProcessGroup, *,
                 num_experts: int, fp8: bool, scale_fmt: str | None, timeout: float | None,
                 max_tokens: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, EPHandle]:
        """See the module docstring; returns (x_local ``[N, D]``, weights fp32 ``[N]``, handle)."""
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
                xq, xs = v4hal.act_quant(x, FP8_BLOCK, scale_fmt, sdtype)
            else:
                xq = torch.empty(0, d, dtype=torch.float8_e4m3fn, device=dev)
                xs = torch.empty(0, d // FP8_BLOCK, dtype=sdtype, device=dev)
            parts = [_bytes(xq[pair_tok]), _bytes(xs[pair_tok])]
        else:
            parts = [_bytes(x[pair_tok])]
        send = torch.cat([*parts, _bytes(lids), _bytes(wts)], dim=1) if pair_tok.numel() else \
            torch.empty(0, row_bytes, dtype=torch.uint8, device=dev)

        # counts (the row format is the same on every rank: ep_dispatch checked it)
        counts_in = send_rows.to(torch.int64).unsqueeze(1).contiguous()
        counts_out = torch.empty_like(counts_in)
        comm.all_to_all(counts_out, counts_in, None, None, group, f"{op} (counts)", timeout)
        recv_rows = counts_out[:, 0]
        in_splits, out_splits = send_rows.tolist(), recv_rows.tolist()
        recv = torch.empty(sum(out_splits), row_bytes, dtype=torch.uint8, device=dev)
        comm.all_to_all(recv, send, out_splits, in_splits, group, f"{op} (payload)", timeout)

        # unpack
        n_rows = recv.shape[0]
        if fp8:
            rq = _from_bytes(recv[:, :xb], torch.float8_e4m3fn, d)
            rs = _from_bytes(recv[:, xb:xb + sb], sdtype, d // FP8_BLOCK)
            recv_x = v4hal.dequant_fp8(rq, rs, FP8_BLOCK, out_dtype=x.dtype) if n_rows else \
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
        state = _A2AState(order=order, return_splits=return_splits, home_splits=home_splits, home_order=home_order,
                          copy_row=copy_row, recv_splits=out_splits, send_splits=in_splits, pair_tok=pair_tok)
        handle = EPHandle(transport=self.name, group=group, world_size=world, rank=rank, num_tokens=t, topk=k,
                          num_experts=num_experts, num_local_experts=e_local, dim=d, dtype=x.dtype,
                          group_offsets=offsets, timeout=timeout, stats=stats, state=state)
        return x_local, w_local, handle

    def combine(self, y: torch.Tensor, handle: EPHandle, *, out_dtype: torch.dtype | None,
                partial_sums: bool) -> torch.Tensor:
        """One row per copy back home, fp32 sum over the k slots (or one partial sum per (token, rank))."""
        op = "ep_combine"
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
