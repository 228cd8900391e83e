"""Triton ``csa2_compressor_ragged``: V4.1's group pooling, RMSNorm and compress rope in one kernel.

The projections stay GEMMs (:func:`..reference.csa2.project`, fp32, fixed row tiles so a row's bits do not
depend on the batch) and the state rows of this call's tokens are written with one indexed copy
(:func:`..reference.csa2.write_state`). The kernel takes one completed entry per program:

1. the ``ratio`` rows of its group, each from this call's projections (position >= the request's start)
   or from the state cache (block ``table[req, pos // blk]``, row ``pos % blk``, ``[kv | gate]``);
2. ratio 2: per channel ``m = max(g0, g1)``, ``p_k = exp(g_k - m) / (e0 + e1)``, ``kv0 * p0 + kv1 * p1``
   (torch's softmax then sum); ratio 1: kv;
3. the entry rounded to x's dtype, ``y = e * rsqrt(mean(e**2) + eps)`` rounded to x's dtype, the latent
   ``w * y`` rounded to x's dtype (V4.1's RMSNorm);
4. the latent's last ``rope_head_dim`` dims rotated as interleaved pairs by ``freqs_cis[g * ratio]``.

Channels are handled as (even, odd) pairs so the rope needs no register shuffles: the tile is
``D/2`` pairs padded to a power of two (``MAX_D`` bounds it). Verified where: under the Triton
interpreter against the reference (ratios 1 and 2, fp32/fp16/bf16 x, state reads across calls); the
kernel has no ``tl.dot``. The D=512 bf16 configuration compiles for sm_90a without spills.
GPU only: speed and the GPU's ``exp`` / ``rsqrt`` rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4hal.backends.reference import csa2 as ref
from v4hal.backends.reference.ragged_compress import _state_table, entry_rows
from v4hal.hal import requirements as R
from v4hal.hal.registry import implements
from v4hal.ops.ragged_compress import max_entries

from ._cast import cast_out
from .quant import interpreting, next_pow2, tl_dtype

MAX_D = 8192                # D/2 channel pairs of one entry sit in registers


@triton.jit
def _group_row(kv_ptr, gate_ptr, state_ptr, table_ptr, rq, pos, start, first, ev, od, m, D, BLK, COLS, s_sb, s_tb):
    """fp32 ``(kv even, kv odd, gate even, gate odd)`` of position ``pos`` of request ``rq``: this call's
    projections when ``pos >= start``, else its state row (block ``table[rq, pos // BLK]``)."""
    tok = tl.maximum(first + pos - start, 0)
    col = pos // BLK
    col = tl.where(col < COLS, col, COLS)
    blk_id = tl.load(table_ptr + rq * s_tb + col).to(tl.int64)
    srow = state_ptr + blk_id * s_sb + (pos % BLK) * (2 * D)
    here_v = (ev * 0 + pos) >= start        # vector masks (the interpreter rejects scalar & vector)
    mh = m & here_v
    ms = m & (here_v == 0)
    kv_e = tl.where(here_v, tl.load(kv_ptr + tok * D + ev, mask=mh, other=0.0), tl.load(srow + ev, mask=ms, other=0.0))
    kv_o = tl.where(here_v, tl.load(kv_ptr + tok * D + od, mask=mh, other=0.0), tl.load(srow + od, mask=ms, other=0.0))
    g_e = tl.where(here_v, tl.load(gate_ptr + tok * D + ev, mask=mh, other=0.0),
                   tl.load(srow + D + ev, mask=ms, other=0.0))
    g_o = tl.where(here_v, tl.load(gate_ptr + tok * D + od, mask=mh, other=0.0),
                   tl.load(srow + D + od, mask=ms, other=0.0))
    return kv_e, kv_o, g_e, g_o


@triton.jit
def _csa2_entry_kernel(kv_ptr, gate_ptr, state_ptr, table_ptr, cu_ptr, sp_ptr, req_ptr, entry_ptr,
                       w_ptr, f_ptr, ent_ptr, lat_ptr, eps,
                       D, HALF_ROPE, BLK, COLS, S, s_sb, s_tb, s_f,
                       RATIO: tl.constexpr, HP: tl.constexpr, OUT: tl.constexpr, SOFT: tl.constexpr):
    """program_id(0) = output row; writes ``ent[row]`` and ``lat[row]`` (rows past the entries: zeros)."""
    row = tl.program_id(0)
    i = tl.arange(0, HP)
    half = D // 2
    im = i < half
    ev = 2 * i
    od = 2 * i + 1
    req = tl.load(req_ptr + row)
    rq = tl.maximum(req, 0).to(tl.int64)
    g = tl.load(entry_ptr + row).to(tl.int64)
    start = tl.load(sp_ptr + rq).to(tl.int64)
    first = tl.load(cu_ptr + rq).to(tl.int64)
    m = im & ((i * 0 + req) >= 0)          # a vector mask (the interpreter rejects scalar & vector)
    if RATIO == 1:
        tok = first + g - start
        pe = tl.load(kv_ptr + tok * D + ev, mask=m, other=0.0)
        po = tl.load(kv_ptr + tok * D + od, mask=m, other=0.0)
    else:
        kv_e0, kv_o0, g_e0, g_o0 = _group_row(kv_ptr, gate_ptr, state_ptr, table_ptr, rq, g * 2, start, first,
                                              ev, od, m, D, BLK, COLS, s_sb, s_tb)
        kv_e1, kv_o1, g_e1, g_o1 = _group_row(kv_ptr, gate_ptr, state_ptr, table_ptr, rq, g * 2 + 1, start, first,
                                              ev, od, m, D, BLK, COLS, s_sb, s_tb)
        mx_e = tl.maximum(g_e0, g_e1)
        mx_o = tl.maximum(g_o0, g_o1)
        x_e0 = tl.exp(g_e0 - mx_e)
        x_e1 = tl.exp(g_e1 - mx_e)
        x_o0 = tl.exp(g_o0 - mx_o)
        x_o1 = tl.exp(g_o1 - mx_o)
        den_e = x_e0 + x_e1
        den_o = x_o0 + x_o1
        pe = kv_e0 * (x_e0 / den_e) + kv_e1 * (x_e1 / den_e)
        po = kv_o0 * (x_o0 / den_o) + kv_o1 * (x_o1 / den_o)
    # V4.1's RMSNorm in x's dtype: round the entry, normalize in fp32, round, weight, round
    pe = cast_out(pe, OUT, SOFT).to(tl.float32)
    po = cast_out(po, OUT, SOFT).to(tl.float32)
    pe = tl.where(m, pe, 0.0)
    po = tl.where(m, po, 0.0)
    ms_sum = tl.sum(pe * pe, axis=0) + tl.sum(po * po, axis=0)
    inv = 1.0 / tl.sqrt(ms_sum / D + eps)
    ye = cast_out(pe * inv, OUT, SOFT).to(tl.float32)
    yo = cast_out(po * inv, OUT, SOFT).to(tl.float32)
    we = tl.load(w_ptr + ev, mask=im, other=0.0).to(tl.float32)
    wo = tl.load(w_ptr + od, mask=im, other=0.0).to(tl.float32)
    le = cast_out(we * ye, OUT, SOFT)
    lo = cast_out(wo * yo, OUT, SOFT)
    le = tl.where(m, le, 0.0)
    lo = tl.where(m, lo, 0.0)
    out_row = row.to(tl.int64) * D
    tl.store(lat_ptr + out_row + ev, le, mask=im)
    tl.store(lat_ptr + out_row + od, lo, mask=im)
    # compress rope on the last 2*HALF_ROPE dims: pair i rotates by freqs[g * RATIO, i - (half - HALF_ROPE)]
    j = i - (half - HALF_ROPE)
    rope = m & (j >= 0)
    jj = tl.maximum(j, 0)
    fpos = tl.minimum(g * RATIO, S - 1)       # the rope row (past the table with the value checks off: its last)
    c = tl.load(f_ptr + fpos * s_f + 2 * jj, mask=rope, other=1.0)
    s = tl.load(f_ptr + fpos * s_f + 2 * jj + 1, mask=rope, other=0.0)
    a = le.to(tl.float32)
    b = lo.to(tl.float32)
    re = tl.where(rope, a * c - b * s, a)
    imv = tl.where(rope, a * s + b * c, b)
    tl.store(ent_ptr + out_row + ev, cast_out(re, OUT, SOFT), mask=im)
    tl.store(ent_ptr + out_row + od, cast_out(imv, OUT, SOFT), mask=im)


@implements("csa2_compressor_ragged", "triton", requires=(
    R.at_most("D", MAX_D, value=lambda a: a["norm_weight"].shape[0], why="the D/2 channel pairs sit in registers"),
    R.divisible("D", 2, value=lambda a: a["norm_weight"].shape[0],
                why="channels are processed as (even, odd) rope pairs"),))
def csa2_compressor_ragged(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor | None,
                           norm_weight: torch.Tensor, freqs_cis: torch.Tensor, state_cache: torch.Tensor,
                           state_block_table: torch.Tensor, cu_seqlens: torch.Tensor, start_pos: torch.Tensor,
                           ratio: int, norm_eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`v4hal.ops.csa2.csa2_compressor_ragged`; state_cache is updated in place at ratio 2."""
    t, b, d = x.shape[0], start_pos.shape[0], norm_weight.shape[0]
    n = max_entries(t, ratio, b)
    dev = x.device
    ent = torch.zeros(n, d, dtype=x.dtype, device=dev)
    lat = torch.zeros(n, d, dtype=x.dtype, device=dev)
    none = torch.full((n,), -1, dtype=torch.int32, device=dev)
    if t == 0 or b == 0:
        return ent, lat, none, none.clone()
    table = _state_table(state_block_table, state_cache.shape[0]).contiguous()
    cols = state_block_table.shape[1]
    kv_t = ref.project(x, wkv).contiguous()
    gate_t = ref.project(x, wgate).contiguous() if ratio > 1 else kv_t
    valid, req, entry = entry_rows(cu_seqlens, start_pos, ratio, n)
    entry_req = torch.where(valid, req, -1)
    entry_pos = torch.where(valid, entry, -1)
    f = torch.view_as_real(freqs_cis)
    _csa2_entry_kernel[(n,)](kv_t, gate_t, state_cache, table, cu_seqlens, start_pos, entry_req, entry_pos,
                             norm_weight, f, ent, lat, float(norm_eps),
                             d, freqs_cis.shape[1], state_cache.shape[1], cols, freqs_cis.shape[0],
                             state_cache.stride(0),
                             table.stride(0), f.stride(0),
                             RATIO=ratio, HP=next_pow2(d // 2), OUT=tl_dtype(x.dtype), SOFT=interpreting(x),
                             num_warps=4)
    if ratio > 1:
        tok_req, tok_pos = ref.token_rows(cu_seqlens, start_pos, t)
        ref.write_state(state_cache, table, cols, tok_req, tok_pos, kv_t, gate_t)
    return ent, lat, entry_req.to(torch.int32), entry_pos.to(torch.int32)


__all__ = ["csa2_compressor_ragged", "MAX_D"]
