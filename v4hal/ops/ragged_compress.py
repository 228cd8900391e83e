"""The ragged KV compressor: per-token projections of many requests at their own positions, pooled
into compressed entries, with the unfinished blocks kept in a paged fp32 state cache.

``compressor_ragged`` fuses what V4's ``Compressor`` does for one layer: the fp32 projections
``x @ wkv^T`` and ``x @ wgate^T``, the gated softmax pooling of ``ratio`` tokens (``compress_kv``;
ratio 4 pools overlapping windows), RMSNorm of the pooled entry in x's dtype and rope on its last
``rope_head_dim`` dims at the entry's first position. It stops before the quantization round trip.

State cache (the layout of the CANN ``compressor`` with ``cache_mode=1``): token position ``p`` of
request ``i`` owns row ``p % blk`` of block ``state_block_table[i, p // blk]``; the row holds
``[kv (coff*D) | score + ape[p % ratio] (coff*D)]`` in fp32. A table entry 0 means "not kept":
block 0 is never written. Every call writes the rows of all its tokens and reads the rows of the
earlier tokens its completed entries need. See ``docs/ops.md`` for the full contract.
"""
from __future__ import annotations

import torch

from . import _checks as C
from ._checks import INT32_MAX
from ._define import call, define_op

#: Compression ratios: 4 (overlapping windows, coff = 2) and 128 (coff = 1), V4's two.
COMPRESS_RATIOS: tuple[int, ...] = (4, 128)


def coff_of(ratio: int) -> int:
    """Channels per token over the entry width: 2 for the overlapping ratio-4 pooling, else 1."""
    return 2 if ratio == 4 else 1


def max_entries(tokens: int, ratio: int, requests: int) -> int:
    """Rows of the outputs: ``min(T, T // ratio + B)``, an upper bound of the entries one call completes."""
    return min(tokens, tokens // ratio + requests)


def _check(x, wkv, wgate, ape, norm_weight, freqs_cis, state_cache, state_block_table, cu_seqlens, start_pos,
           ratio, norm_eps):
    op = "compressor_ragged"
    C.one_of(op, "ratio", ratio, COMPRESS_RATIOS)
    C.eps_arg(op, "norm_eps", norm_eps)
    C.dtype(op, "x", x, C.FLOATS)
    C.rank(op, "x", x, (2,), "[T, H]")
    t, h = x.shape
    C.dtype(op, "norm_weight", norm_weight, (torch.float32, torch.bfloat16))
    C.rank(op, "norm_weight", norm_weight, (1,), "[D]")
    d = norm_weight.shape[0]
    if d < 2:
        raise C.ShapeError(f"{op}: norm_weight must be [D] with D >= 2, got {C.describe(norm_weight)}")
    coff = coff_of(ratio)
    cd = coff * d
    C.dtype(op, "wkv", wkv, (torch.float32, torch.bfloat16))
    C.shape(op, "wkv", wkv, (cd, h), f"[coff*D, H] (coff = {coff} for ratio {ratio})")
    C.dtype(op, "wgate", wgate, (wkv.dtype,))
    C.shape(op, "wgate", wgate, (cd, h), f"[coff*D, H] (coff = {coff} for ratio {ratio})")
    C.dtype(op, "ape", ape, (torch.float32,))
    C.shape(op, "ape", ape, (ratio, cd), "[ratio, coff*D]")
    check_ragged_shapes(op, d, 2 * cd, "2*coff*D", freqs_cis, state_cache, state_block_table, cu_seqlens,
                        start_pos)
    C.same_device(op, x=x, wkv=wkv, wgate=wgate, ape=ape, norm_weight=norm_weight, freqs_cis=freqs_cis,
                  state_cache=state_cache, state_block_table=state_block_table, cu_seqlens=cu_seqlens,
                  start_pos=start_pos)


def check_ragged_shapes(op: str, d: int, width: int, width_doc: str, freqs_cis: torch.Tensor,
                        state_cache: torch.Tensor, state_block_table: torch.Tensor, cu_seqlens: torch.Tensor,
                        start_pos: torch.Tensor) -> None:
    """Shape checks shared by the ragged compressors: the rope table complex64 ``[S, R/2]`` (2 <= R <= ``d``),
    the fp32 state cache ``[blocks, blk, width]`` with dense rows (``width_doc`` names the width in messages),
    ``start_pos`` int32 ``[B]``, ``cu_seqlens`` int32 ``[B + 1]``, ``state_block_table`` int32 ``[B, M]``."""
    C.dtype(op, "freqs_cis", freqs_cis, (torch.complex64,))
    C.rank(op, "freqs_cis", freqs_cis, (2,), "[S, R/2] (R: the rope dims)")
    if not 1 <= freqs_cis.shape[1] <= d // 2:
        raise C.ShapeError(f"{op}: freqs_cis must be [S, R/2] with 2 <= R <= D ({d}) (R: the rope dims), "
                           f"got {C.describe(freqs_cis)}")
    C.dtype(op, "state_cache", state_cache, (torch.float32,))
    C.rank(op, "state_cache", state_cache, (3,), f"[blocks, blk, {width_doc}]")
    nb, blk, have = state_cache.shape
    if have != width or nb < 1 or blk < 1:
        raise C.ShapeError(f"{op}: state_cache must be [blocks >= 1, blk >= 1, {width_doc} = {width}], "
                           f"got {C.describe(state_cache)}")
    if state_cache.stride(2) != 1 or (blk > 1 and state_cache.stride(1) != width) or \
            (nb > 1 and state_cache.stride(0) < blk * width):
        raise C.ShapeError(f"{op}: state_cache rows must be dense (strides [>= blk*{width}, {width}, 1]; the "
                           f"block stride may be padded), got strides {list(state_cache.stride())}")
    if nb * blk > INT32_MAX:
        raise C.ShapeError(f"{op}: state_cache must hold at most {C.show(INT32_MAX)} rows, "
                           f"got {C.describe(state_cache)}")
    C.dtype(op, "start_pos", start_pos, (torch.int32,))
    C.rank(op, "start_pos", start_pos, (1,), "[B]")
    b = start_pos.shape[0]
    C.dtype(op, "cu_seqlens", cu_seqlens, (torch.int32,))
    C.shape(op, "cu_seqlens", cu_seqlens, (b + 1,), "[B + 1]")
    C.dtype(op, "state_block_table", state_block_table, (torch.int32,))
    C.rank(op, "state_block_table", state_block_table, (2,), "[B, M]")
    if state_block_table.shape[0] != b:
        raise C.ShapeError(f"{op}: state_block_table must be [B, M] = [{b}, M], "
                           f"got {C.describe(state_block_table)}")


#: per ratio: the last batch tensors that passed `_value_check` (the same tensors, copies of their values, and
#: the shapes the checks read): a step's compressors of one ratio share them, so they are checked once
_CHECKED: dict[int, tuple] = {}


def _value_check(x, wkv, wgate, ape, norm_weight, freqs_cis, state_cache, state_block_table, cu_seqlens, start_pos,
                 ratio, norm_eps):
    tensors = (cu_seqlens, start_pos, state_block_table)
    key = (x.shape[0], tuple(state_cache.shape[:2]), freqs_cis.shape[0])
    last = _CHECKED.get(ratio)
    if last is not None and last[0] == key and all(a is b for a, b in zip(last[1], tensors)) and \
            all(torch.equal(a, c) for a, c in zip(tensors, last[2])):
        return
    check_ragged_values("compressor_ragged", x, freqs_cis, state_cache, state_block_table, cu_seqlens, start_pos,
                        ratio, overlap=ratio == 4)
    _CHECKED[ratio] = (key, tensors, tuple(t.clone() for t in tensors))


def check_ragged_values(op: str, x: torch.Tensor, freqs_cis: torch.Tensor, state_cache: torch.Tensor | None,
                        state_block_table: torch.Tensor, cu_seqlens: torch.Tensor, start_pos: torch.Tensor,
                        ratio: int, overlap: bool) -> None:
    """Value checks shared by the ragged compressors: ``cu_seqlens``, ``start_pos``, the rope rows and (when
    ``state_cache`` is given) the state block table. ``overlap``: entry j also pools block j-1."""
    t = x.shape[0]
    cu = cu_seqlens.cpu().long()
    cu_list = cu.tolist()
    if cu_list[0] != 0 or cu_list[-1] != t or any(b < a for a, b in zip(cu_list, cu_list[1:])):
        raise C.RangeError(f"{op}: cu_seqlens must be non-decreasing from 0 to T = {t}, got {cu_list[:16]}"
                           + (" ..." if len(cu_list) > 16 else ""))
    if start_pos.numel() == 0:
        return
    sp = start_pos.cpu().long()
    lens = cu[1:] - cu[:-1]
    end = sp + lens
    if int(sp.min()) < 0 or int(end.max()) > INT32_MAX:
        raise C.RangeError(f"{op}: start_pos must be >= 0 with start_pos + tokens <= 2**31 - 1, "
                           f"got min {int(sp.min())}, max end {int(end.max())}")
    # rope rows: the first position of every completed entry must lie in the table
    last_entry = end // ratio - 1
    done = (last_entry >= sp // ratio) & (lens > 0)
    if bool(done.any()):
        need = int((last_entry[done] * ratio).max()) + 1
        if need > freqs_cis.shape[0]:
            raise C.RangeError(f"{op}: freqs_cis must cover position {need - 1} (the first token of the last "
                               f"entry completed here), got {C.describe(freqs_cis)}")
    if state_cache is None:
        return
    nb, blk = state_cache.shape[0], state_cache.shape[1]
    table = state_block_table.cpu().long()
    cols = table.shape[1]
    if table.numel() and (int(table.min()) < 0 or int(table.max()) >= nb):
        raise C.RangeError(f"{op}: state_block_table ids must be in [0, {nb}) (0: no state kept), "
                           f"got min {int(table.min())}, max {int(table.max())}")
    need_cols = torch.where(lens > 0, (end + blk - 1) // blk, torch.zeros_like(end))
    short = need_cols > cols
    if bool(short.any()):
        i = int(short.nonzero()[0, 0])
        raise C.RangeError(f"{op}: state_block_table rows must cover every position a request touches: request "
                           f"{i} (start_pos {int(sp[i])}, {int(lens[i])} tokens) needs {int(need_cols[i])} "
                           f"columns of {blk}-row blocks, got {C.describe(state_block_table)}")
    # positions read from the cache: the earlier tokens of the entries this call completes
    lo = (sp // ratio - (1 if overlap else 0)).clamp_min(0) * ratio
    reads = done & (lo < sp)
    req_ids, positions = [], []
    for i in reads.nonzero().flatten().tolist():
        p = torch.arange(int(lo[i]), int(sp[i]))
        req_ids.append(torch.full_like(p, i))
        positions.append(p)
    tok_req = torch.repeat_interleave(torch.arange(len(lens)), lens)
    tok_pos = sp[tok_req] + torch.arange(t) - cu[tok_req] if t else torch.zeros(0, dtype=torch.long)
    all_req = torch.cat([*req_ids, tok_req])
    all_pos = torch.cat([*positions, tok_pos])
    ids = table[all_req, all_pos // blk] if all_pos.numel() else torch.zeros(0, dtype=torch.long)
    n_reads = sum(p.numel() for p in positions)
    if n_reads and bool((ids[:n_reads] == 0).any()):
        k = int((ids[:n_reads] == 0).nonzero()[0, 0])
        raise C.RangeError(f"{op}: state_block_table maps position {int(all_pos[k])} of request {int(all_req[k])}, "
                           f"whose state this call reads, to block 0 (block 0 is never written)")
    slots = ids * blk + all_pos % blk
    read, written = slots[:n_reads], slots[n_reads:][ids[n_reads:] != 0]
    if written.numel() != torch.unique(written).numel():
        raise C.RangeError(f"{op}: state_block_table must give every position this call writes its own state row "
                           f"(two tokens share a block row)")
    if n_reads and bool(torch.isin(read, written).any()):
        raise C.RangeError(f"{op}: state_block_table maps a position this call reads and another it writes to one "
                           f"state row")


def _fake(x, wkv, wgate, ape, norm_weight, freqs_cis, state_cache, state_block_table, cu_seqlens, start_pos,
          ratio, norm_eps):
    t, b = x.shape[0], start_pos.shape[0]
    n = torch.sym_min(t, t // ratio + b)
    return (x.new_empty((n, norm_weight.shape[0])), x.new_empty((n,), dtype=torch.int32),
            x.new_empty((n,), dtype=torch.int32))


define_op("compressor_ragged",
          "(Tensor x, Tensor wkv, Tensor wgate, Tensor ape, Tensor norm_weight, Tensor freqs_cis, "
          "Tensor(a!) state_cache, Tensor state_block_table, Tensor cu_seqlens, Tensor start_pos, int ratio, "
          "float norm_eps) -> (Tensor, Tensor, Tensor)",
          check=_check, fake=_fake, value_check=_value_check,
          doc=C.ranges_doc(ratio="{4, 128}", norm_eps=C.EPS_RANGE) +
          " Checked values: `cu_seqlens` non-decreasing from 0 to T; `start_pos` >= 0; `freqs_cis` covers the "
          "first position of every completed entry; every `state_block_table` row covers the positions its "
          "request touches, with ids in `[0, blocks)`, no position this call reads in block 0, no two "
          "written positions sharing a state row, and no row both read and written (requests may read the "
          "same rows: a shared prefix).")


def compressor_ragged(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, ape: torch.Tensor,
                      norm_weight: torch.Tensor, freqs_cis: torch.Tensor, state_cache: torch.Tensor,
                      state_block_table: torch.Tensor, cu_seqlens: torch.Tensor, start_pos: torch.Tensor,
                      ratio: int, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress the tokens of B requests (``x [T, H]`` float; request i is ``x[cu_seqlens[i]:cu_seqlens[i+1]]``
    at positions ``start_pos[i] ..``) into the entries they complete.

    wkv, wgate: fp32 or bf16 ``[coff*D, H]`` (coff 2 for ratio 4, else 1); ape fp32 ``[ratio, coff*D]``;
    norm_weight fp32 or bf16 ``[D]``; freqs_cis complex64 ``[S, rope_head_dim/2]`` (rope on the last
    rope_head_dim dims at the entry's first position); state_cache fp32 ``[blocks, blk, 2*coff*D]``
    (updated in place); state_block_table, cu_seqlens ``[B+1]``, start_pos ``[B]``: int32; ratio 4 or 128.

    Returns ``(entries [N, D]`` in x's dtype, ``entry_req`` int32 ``[N]``, ``entry_pos`` int32 ``[N])`` with
    ``N = min(T, T // ratio + B)``: the completed entries packed at the front, in request order then entry
    order; entry ``j`` of a request pools its positions ``j*ratio .. j*ratio + ratio - 1``. Unused rows
    hold zeros and -1.
    """
    return call.compressor_ragged(x, wkv, wgate, ape, norm_weight, freqs_cis, state_cache, state_block_table,
                                  cu_seqlens, start_pos, int(ratio), float(norm_eps))
