"""Triton sparse decode attention over paged caches (``sparse_attn_paged``), dequantizing in the kernel.

One program owns one query row ``(b, m)`` and a block of ``BLOCK_H`` heads (heads on the M side of
both MMAs, so every gathered entry tile is read once per head block). It walks the picks of the
window cache, then those of the extra (compressed) cache, in tiles of ``BLOCK_N`` slots, with one
online softmax across both (exp2 domain, fp32 running max / sum / accumulator):

    for each cache, for each tile of its first topk_length[b] slots:
        entry tile [BLOCK_N, D] read by slot (block = slot // block_size, offset = slot % block_size)
        s = q @ tile^T * scale    (no slot -> -inf);   online softmax;   acc = acc * alpha + p @ tile
    out = acc * exp(m - M) / (l * exp(m - M) + exp(sink - M)),  M = max(m, sink)
    lse = ln(l) + m (natural log, sink excluded);  no valid pick: out 0, lse +inf

A pick is a slot in ``[0, blocks * block_size)`` of its cache; every other value (-1, and with the value
checks off a negative or too large one) is no pick and addresses nothing (slot offsets are int64). A NaN
or +inf score makes ``l`` NaN, and the row's out and lse are then NaN; a NaN sink makes its out NaN.

The entry width ``D`` is q's last dim (the caches' width, checked by the op); the tiles are ``DP`` wide,
the next power of two (at least 16), with the columns from ``D`` on masked (V4: D = DP = 512). Entries
wider than 512 run on the reference (a requirement: one ``[BLOCK_N, DP]`` tile and a ``[BLOCK_H, DP]``
fp32 accumulator per program). Entries, per layout (byte offsets inside the page of ``block``,
``page = block * page_bytes``, ``nope = D - 64``, ``rec = nope + 128`` data bytes per token):

- ``model1_fp8``: ``nope`` e4m3 bytes at ``page + offset * rec``, each multiplied by ``2**(e - 127)``
  with ``e`` the ue8m0 byte ``page + block_size * rec + offset * 8 * ceil(nope / 512) + i // 64``; then 64
  bf16 values at ``page + offset * rec + nope`` (V4: rec = 576, nope = 448, 8 scale bytes). The e4m3,
  e8m0 and bf16 bit patterns are decoded with integer arithmetic (the same code runs compiled and under
  the interpreter); the products are exact in fp32.
- ``v41_window_fp8``: ``D`` e4m3 bytes at ``page + offset * D``, value ``i`` times ``2**(e - 127)`` with
  ``e`` the ue8m0 byte ``page + block_size * D + offset * D / 32 + i // 32`` (V4.1: 528 bytes a token).
- ``v41_compressed_fp4``: the e2m1 code of value ``i`` in byte ``page + offset * D / 2 + i // 2`` (even
  ``i`` in the low nibble, sign in bit 3), times the e4m3 scale byte
  ``page + block_size * D / 2 + offset * D / 16 + i // 16`` (V4.1: 288 bytes a token); the product is
  exact in fp32 and in bf16.
- ``bf16``: ``D`` bf16 values at ``block * stride(0) + offset * stride(1)``.

Each cache is decoded by its own layout (``KIND`` / ``XKIND``: ``layout`` and ``extra_layout``).

Operands of ``tl.dot``: bf16 on a GPU (a dequantized e4m3 value times a power of two fits bf16
exactly), fp32 under the interpreter (its bf16 ``tl.dot`` is wrong). The bf16 output is stored through
:func:`._cast.cast_out` (round to nearest even under the interpreter too).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4hal.hal import requirements as R
from v4hal.hal.registry import implements
from v4hal.ops.paged import NOPE_BLOCK, PAGED_LAYOUTS
from v4hal.ops.paged_attention import lse_out, resolve_slots

from ._attn_common import cdiv, dot_precision, dot_upcast, next_pow2, on_interpreter, softmax_output, softmax_tile
from ._cast import cast_out
from .paged_indexer import paged_slots

_LOG2E = 1.4426950408889634


@triton.jit
def _e4m3(raw, BITS: tl.constexpr):
    """e4m3 bytes (uint8) -> their values: fp32 decoded with integer arithmetic when ``BITS`` (the
    interpreter), else the hardware conversion to bf16 (which holds every e4m3 value exactly)."""
    if BITS:
        r = raw.to(tl.int32)
        ex = (r >> 3) & 15
        man = r & 7
        normal = ((r & 128) << 24) | ((ex + 120) << 23) | (man << 20)   # e4m3 -> fp32 bits (bias 7 -> 127)
        y = normal.to(tl.float32, bitcast=True)
        sub = man.to(tl.float32) * 0.001953125                         # subnormal: man * 2**-9
        y = tl.where(ex == 0, tl.where((r & 128) != 0, -sub, sub), y)
        y = tl.where((ex == 15) & (man == 7), float("nan"), y)
    else:
        y = raw.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)
    return y


@triton.jit
def _e8m0(e):
    """ue8m0 bytes (int32) -> fp32 ``2**(e - 127)`` (0: 2**-127, 255: NaN)."""
    sbits = tl.where(e == 0, 0x00400000, e << 23)
    sbits = tl.where(e == 255, 0x7FC00000, sbits)
    return sbits.to(tl.float32, bitcast=True)


@triton.jit
def _e2m1(code):
    """e2m1 codes (int32 in [0, 16), sign in bit 3) -> fp32 values (0, 0.5, 1, 1.5, 2, 3, 4, 6 signed)."""
    mag = code & 7
    ex = mag >> 1
    man = mag & 1
    v = tl.where(ex == 0, man.to(tl.float32) * 0.5, (((ex + 126) << 23) | (man << 22)).to(tl.float32, bitcast=True))
    return tl.where((code & 8) != 0, -v, v)


@triton.jit
def _entry_tile(kv_ptr, slot, valid, offs_d, s_blk, s_off, BS, SCALE_OFF, KIND: tl.constexpr,
                BITS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, NB: tl.constexpr, SB: tl.constexpr):
    """``[BLOCK_N, DP]`` (bf16, fp32 when ``BITS``): the ``D``-wide entries at ``slot`` (0 rows where not
    ``valid``, 0 columns from ``D`` on) of a cache of layout ``KIND`` (0 bf16, 1 model1_fp8,
    2 v41_window_fp8, 3 v41_compressed_fp4). ``s_off``: bytes of a token's record in the data region
    (the row stride for bf16); ``SB``: scale bytes per token. model1_fp8: ``NB`` scale groups of 64 e4m3
    values (V4: D = DP = 512, NB = 7, SB = 8); V4.1 at D = 512: SB = 16 (window), 32 (compressed)."""
    blk = slot // BS
    off = slot % BS
    d2 = offs_d[None, :]
    if KIND == 1:
        # [BLOCK_N, DP / 64, 64]: groups 0..NB-1 are the e4m3 values (one scale each), group NB the bf16
        # rope values, the groups after it (when D < DP) zeros
        g = tl.arange(0, DP // 64)[None, :, None]
        j = tl.arange(0, 64)[None, None, :]
        base = (blk * s_blk + off * (NB * 64 + 128))[:, None, None]          # int64 byte offsets
        ok = valid[:, None, None]
        is_nope = g < NB
        y = _e4m3(tl.load(kv_ptr + base + g * 64 + j, mask=ok & is_nope, other=0), BITS)
        g2 = tl.arange(0, DP // 64)[None, :]
        e = tl.load(kv_ptr + (blk * s_blk + SCALE_OFF + off * SB)[:, None] + g2, mask=valid[:, None] & (g2 < NB),
                    other=127).to(tl.int32)
        nope = y * _e8m0(e).to(y.dtype)[:, :, None]
        rmask = ok & (g == NB)
        rb = base + NB * 64 + 2 * j
        lo = tl.load(kv_ptr + rb, mask=rmask, other=0).to(tl.int32)
        hi = tl.load(kv_ptr + rb + 1, mask=rmask, other=0).to(tl.int32)
        if BITS:
            rope = ((lo | (hi << 8)) << 16).to(tl.float32, bitcast=True)
        else:
            rope = (lo | (hi << 8)).to(tl.int16).to(tl.bfloat16, bitcast=True)
        tile = tl.reshape(tl.where(is_nope, nope, rope), (slot.shape[0], DP))
    elif KIND == 2:
        # D e4m3 bytes per token, then D / 32 ue8m0 scales per token after the page's data region
        ok = valid[:, None] & (d2 < D)
        y = _e4m3(tl.load(kv_ptr + (blk * s_blk + off * s_off)[:, None] + d2, mask=ok, other=0), BITS)
        e = tl.load(kv_ptr + (blk * s_blk + SCALE_OFF + off * SB)[:, None] + d2 // 32, mask=ok,
                    other=127).to(tl.int32)
        tile = y * _e8m0(e).to(y.dtype)
    elif KIND == 3:
        # D / 2 bytes of e2m1 pairs per token (even element low), then D / 16 e4m3 scales per token
        ok = valid[:, None] & (d2 < D)
        byte = tl.load(kv_ptr + (blk * s_blk + off * s_off)[:, None] + d2 // 2, mask=ok, other=0).to(tl.int32)
        v = _e2m1((byte >> ((d2 & 1) * 4)) & 15)
        sc = _e4m3(tl.load(kv_ptr + (blk * s_blk + SCALE_OFF + off * SB)[:, None] + d2 // 16, mask=ok, other=0x38),
                   BITS).to(tl.float32)
        tile = v * sc                      # exact in fp32, and in bf16 (at most 5 significant bits)
        if not BITS:
            tile = tile.to(tl.bfloat16)
    else:
        if D < DP:
            tile = tl.load(kv_ptr + (blk * s_blk + off * s_off)[:, None] + d2, mask=valid[:, None] & (d2 < D),
                           other=0.0)
        else:
            tile = tl.load(kv_ptr + (blk * s_blk + off * s_off)[:, None] + d2, mask=valid[:, None], other=0.0)
    return tile


@triton.jit
def _attend(q, m_i, l_i, acc, kv_ptr, idx_row, n_picks, n_slots, s_blk, s_off, BS, SCALE_OFF, qk_scale, offs_d,
            BLOCK_N: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr, UPCAST: tl.constexpr,
            PREC: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, NB: tl.constexpr, SB: tl.constexpr):
    """The online softmax over the first ``n_picks`` slots of ``idx_row`` in one cache of ``n_slots`` slots: a
    slot outside ``[0, n_slots)`` (-1, or any other value when the value checks did not run) is no pick, and
    its entry is never addressed."""
    for start in range(0, n_picks, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        idx = tl.load(idx_row + offs_n, mask=offs_n < n_picks, other=-1)
        valid = (idx >= 0) & (idx < n_slots)
        slot = tl.where(valid, idx, 0).to(tl.int64)
        kv = _entry_tile(kv_ptr, slot, valid, offs_d, s_blk, s_off, BS, SCALE_OFF, KIND, BITS, D, DP, NB, SB)
        if UPCAST:
            kv = kv.to(tl.float32)
        else:
            kv = kv.to(q.dtype)
        m_i, l_i, acc = softmax_tile(q, kv, valid, m_i, l_i, acc, qk_scale, PREC)
    return m_i, l_i, acc


@triton.jit
def _paged_attn_kernel(q_ptr, sink_ptr, out_ptr, lse_ptr,
                       kv_ptr, idx_ptr, len_ptr, s_blk, s_off, BS, SCALE_OFF, K, N_SLOTS,
                       xkv_ptr, xidx_ptr, xlen_ptr, xs_blk, xs_off, XBS, XSCALE_OFF, XK, XN_SLOTS,
                       M, H, qk_scale,
                       s_qb, s_qm, s_qh, s_ib, s_im, s_xb, s_xm, s_ob, s_om, s_oh, s_lb, s_lh,
                       BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, KIND: tl.constexpr, XKIND: tl.constexpr,
                       HAS_LEN: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_XLEN: tl.constexpr, UPCAST: tl.constexpr,
                       PREC: tl.constexpr, SOFT: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, NB: tl.constexpr,
                       SB: tl.constexpr, XNB: tl.constexpr, XSB: tl.constexpr):
    """One program: query row (b, m) = divmod(program_id(0), M), heads [pid1 * BLOCK_H, +BLOCK_H).

    ``qk_scale`` = softmax_scale * log2(e). Strides of the caches in their elements (bytes for the
    quantized layouts); ``SCALE_OFF``: byte offset of the scales in a page. ``KIND`` / ``XKIND``: the
    window / extra cache's layout (:func:`_entry_tile`). ``D``: the entry width, ``DP``: the tile width (a
    power of two >= max(D, 16)); ``NB`` / ``XNB``: model1_fp8's e4m3 groups of 64, ``SB`` / ``XSB``: scale
    bytes per token."""
    pid_bm = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = (pid_bm // M).to(tl.int64)
    m = (pid_bm % M).to(tl.int64)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, DP)
    h_ok = offs_h < H
    if D < DP:
        qd_ok = h_ok[:, None] & (offs_d < D)[None, :]
    else:
        qd_ok = h_ok[:, None]
    q = tl.load(q_ptr + b * s_qb + m * s_qm + offs_h[:, None] * s_qh + offs_d[None, :], mask=qd_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DP], tl.float32)
    n = K
    if HAS_LEN:
        n = tl.minimum(tl.load(len_ptr + b), K)
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, kv_ptr, idx_ptr + b * s_ib + m * s_im, n, N_SLOTS, s_blk, s_off, BS,
                            SCALE_OFF, qk_scale, offs_d, BLOCK_N, KIND, SOFT, UPCAST, PREC, D, DP, NB, SB)
    if HAS_EXTRA:
        xn = XK
        if HAS_XLEN:
            xn = tl.minimum(tl.load(xlen_ptr + b), XK)
        m_i, l_i, acc = _attend(q, m_i, l_i, acc, xkv_ptr, xidx_ptr + b * s_xb + m * s_xm, xn, XN_SLOTS, xs_blk,
                                xs_off, XBS, XSCALE_OFF, qk_scale, offs_d, BLOCK_N, XKIND, SOFT, UPCAST, PREC, D,
                                DP, XNB, XSB)

    sink = tl.load(sink_ptr + offs_h, mask=h_ok, other=float("-inf"))
    # a NaN or +inf score leaves l_i NaN (NaN - m or inf - inf inside the exponent; NaN stays): out and lse
    # NaN; a NaN sink: out NaN. Explicit, since max / where may drop a NaN
    nan_l = l_i != l_i
    o = softmax_output(m_i, l_i, acc, sink)
    o = tl.where((nan_l | (sink != sink))[:, None], float("nan"), o)
    tl.store(out_ptr + b * s_ob + m * s_om + offs_h[:, None] * s_oh + offs_d[None, :],
             cast_out(o, out_ptr.dtype.element_ty, SOFT), mask=qd_ok)
    lse = (m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i))) * 0.6931471805599453
    lse = tl.where(nan_l, float("nan"), tl.where(l_i == 0.0, float("inf"), lse))
    tl.store(lse_ptr + b * s_lb + offs_h * s_lh + m, lse, mask=h_ok)


def _cache_args(cache: torch.Tensor, layout: str, dim: int) -> tuple[torch.Tensor, int, int, int, int]:
    """(pointer tensor, stride of a block, stride of a token, block size, scales' byte offset in a page)
    for a cache of ``dim``-wide entries."""
    bs = cache.shape[1]
    if layout == "bf16":
        return cache, cache.stride(0), cache.stride(1), bs, 0
    u8 = cache if cache.dtype == torch.uint8 else cache.view(torch.uint8)
    lay = PAGED_LAYOUTS[layout]
    data = lay.data_bytes(dim)
    return u8, lay.page_bytes(dim, bs), data, bs, bs * data


#: the kernel's ``KIND`` of each attention layout
KINDS = {"bf16": 0, "model1_fp8": 1, "v41_window_fp8": 2, "v41_compressed_fp4": 3}


def _layout_constexprs(layout: str, dim: int) -> tuple[int, int, int]:
    """(``KIND``, ``NB``: model1_fp8's e4m3 groups of 64, ``SB``: scale bytes per token) of a cache of
    ``dim``-wide entries; V4's model1_fp8: NB = 7, SB = 8; V4.1 at D = 512: SB = 16 / 32."""
    lay = PAGED_LAYOUTS[layout]
    if layout == "model1_fp8":
        return KINDS[layout], lay.nope(dim) // NOPE_BLOCK, lay.scale_bytes(dim)
    if layout == "bf16":
        return KINDS[layout], 0, 0
    return KINDS[layout], 0, lay.scale_bytes(dim)


def _shape_constexprs(layout: str, extra_layout: str, dim: int) -> dict[str, int]:
    """``D``, ``DP`` (tile width: the next power of two, at least 16; model1_fp8 takes DP >= 64 anyway)
    and the two caches' `_layout_constexprs`."""
    kind, nb, sb = _layout_constexprs(layout, dim)
    xkind, xnb, xsb = _layout_constexprs(extra_layout, dim)
    return dict(D=dim, DP=max(16, next_pow2(dim)), KIND=kind, NB=nb, SB=sb, XKIND=xkind, XNB=xnb, XSB=xsb)


def _launch_config(h: int, layouts: tuple[str, str], interpreted: bool) -> dict[str, int]:
    """Tiles that compile without register spills for sm_90 (``tests/triton/sm90_compile.py``): the
    dequantization of the quantized layouts needs the small 16-head tile, and V4.1's (e4m3 and e2m1
    decoded per element) 8 warps for it (D = 512: 212 registers; 4 warps spill); bf16 entries take 32
    heads per program."""
    if interpreted:
        return dict(BLOCK_H=16, BLOCK_N=16)
    if any(lay.startswith("v41_") for lay in layouts):
        return dict(BLOCK_H=16, BLOCK_N=16, num_warps=8, num_stages=2)
    if any(lay != "bf16" for lay in layouts) or h <= 16:
        return dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=3)
    return dict(BLOCK_H=32, BLOCK_N=16, num_warps=8, num_stages=2)


#: the whole entry is one tile row: ``[BLOCK_N, DP]`` entries and a ``[BLOCK_H, DP]`` fp32 accumulator
MAX_HEAD_DIM = 512
_REQUIRES = (R.at_most("head dim D", MAX_HEAD_DIM, "q.shape[-1]", why="one [BLOCK_N, D] entry tile per step"),)


@implements("sparse_attn_paged", "triton", requires=_REQUIRES)
def sparse_attn_paged(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
                      softmax_scale: float, topk_length: torch.Tensor | None = None,
                      extra_kv_cache: torch.Tensor | None = None, extra_indices: torch.Tensor | None = None,
                      extra_topk_length: torch.Tensor | None = None, layout: str = "model1_fp8",
                      positions: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                      window_size: int = 0, extra_block_table: torch.Tensor | None = None, extra_ratio: int = 0,
                      return_lse: bool = False, extra_layout: str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """q bf16 ``[b, s_q, h, D]``, the window cache of ``layout``, the extra one of ``extra_layout``
    (None: ``layout``), both of ``D``-wide entries, int32 slots ``[b, s_q, k]``
    (-1 = none; not range-checked here), optional int32 ``[b]`` lengths -> (out bf16 ``[b, s_q, h, D]``,
    lse fp32 ``[b, h, s_q]`` or ``[0]`` unless ``return_lse``); a query with no valid pick gives 0 and +inf.
    The position form (band window, entry indices) is turned into slots first, in tensor ops."""
    indices, extra_indices = resolve_slots(kv_cache, indices, extra_kv_cache, extra_indices, positions, block_table,
                                           window_size, extra_block_table, extra_ratio, paged_slots)
    b, m, h, dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, m), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse if return_lse else lse_out(q, False)
    q = q if q.stride(-1) == 1 else q.contiguous()
    idx = indices.contiguous()
    kv, s_blk, s_off, bs, scale_off = _cache_args(kv_cache, layout, dim)
    has_extra = extra_kv_cache is not None and extra_indices is not None
    xlayout = (extra_layout or layout) if has_extra else layout
    if has_extra:
        xidx = extra_indices.contiguous()
        xkv, xs_blk, xs_off, xbs, xscale_off = _cache_args(extra_kv_cache, xlayout, dim)
        x_slots = extra_kv_cache.shape[0] * xbs
    else:
        xidx, xkv, xs_blk, xs_off, xbs, xscale_off, x_slots = idx, kv, s_blk, s_off, bs, scale_off, 0
    lengths = topk_length.contiguous() if topk_length is not None else idx
    xlengths = extra_topk_length.contiguous() if (has_extra and extra_topk_length is not None) else idx
    sink = attn_sink.to(device=q.device, dtype=torch.float32).contiguous()
    interpreted = on_interpreter(q)
    upcast = dot_upcast(q.dtype, q.device)
    cfg = _launch_config(h, (layout, xlayout), interpreted)
    grid = (b * m, cdiv(h, cfg["BLOCK_H"]))
    _paged_attn_kernel[grid](
        q, sink, out, lse,
        kv, idx, lengths, s_blk, s_off, bs, scale_off, idx.shape[-1], kv_cache.shape[0] * bs,
        xkv, xidx, xlengths, xs_blk, xs_off, xbs, xscale_off, xidx.shape[-1], x_slots,
        m, h, float(softmax_scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), idx.stride(0), idx.stride(1), xidx.stride(0), xidx.stride(1),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        HAS_LEN=topk_length is not None, HAS_EXTRA=has_extra,
        HAS_XLEN=has_extra and extra_topk_length is not None, UPCAST=upcast,
        PREC=dot_precision(torch.float32 if upcast else q.dtype), SOFT=interpreted, **cfg,
        **_shape_constexprs(layout, xlayout, dim))
    return out, lse if return_lse else lse_out(q, False)
