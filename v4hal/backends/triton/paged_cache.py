"""Triton paged caches: writing bf16 rows into a cache of each layout of :mod:`v4hal.ops.paged`, and
reading entries back dequantized to bf16. The cache bytes written are the reference's, bit for bit.

One program per token (a row of ``x`` or of the output). The program turns its slot into a page (``slot //
block_size``) and an offset in the page, then addresses the page as bytes (the layouts' regions, as
``v4hal/backends/reference/paged.py`` does). Every slot is bounded in the kernel, whether or not the value
checks ran: a slot outside ``[0, blocks * block_size)`` (-1, or any negative or too large value) masks every
store of a write and every load of a read, which gives zeros; offsets are int64.

The entry width ``D`` comes from the cache's last dim; the tile sizes are compile-time constants derived
from it (at V4's widths, 512 and 128, exactly the sizes of the V4-only kernels):

* ``model1_fp8``: the ``nope = D - 64`` first values quantized as :func:`.quant.act_quant` with block 64
  and power-of-two scales (the e8m0 byte is the exponent), stored as e4m3 bytes, the 64 last values
  copied as bf16 bits; then ``8 * ceil(nope / 512)`` scale bytes per token (``nope / 64`` e8m0 scales,
  zero pad bytes; V4: 7 scales and one pad byte).
* ``indexer_fp4``: :func:`.quant.fp4_act_quant` with block 32: ``D / 2`` bytes of packed e2m1 (low
  nibble = even element), then ``D / 32`` e8m0 bytes per token zero padded to a multiple of 4.
* ``indexer_fp8``: :func:`.quant.act_quant` with one block of all ``D`` values and an fp32 scale: ``D``
  e4m3 bytes, then the scale's 4 bytes (read byte by byte: for odd ``D`` they need not be aligned).
* ``v41_window_fp8``: blocks of 32 with the ue8m0 scale ``2**ceil(log2(max(amax / 448, 1e-4)))``
  (:func:`v4hal.hal.formats.fp8_cache_scale`: an IEEE division, then the floor): ``D`` e4m3 bytes, then
  ``D / 32`` e8m0 bytes per token.
* ``v41_compressed_fp4``: blocks of 16 with the e4m3 scale ``e4m3(clamp(amax / 6, 2**-9, 448))``,
  rounded by integer arithmetic (:func:`.quant.e4m3_bits_soft`, so any GPU), each value divided by it
  (IEEE division) and rounded to e2m1: ``D / 2`` packed bytes, then ``D / 16`` e4m3 bytes per token. A
  block holding an inf or a NaN gets the e4m3 NaN scale and code 0 (as the reference).
* ``bf16``: the row's bits copied.

Entries wider than ``MAX_ENTRY`` values run on the reference (a requirement): a program holds one
entry in registers.

The scale and code arithmetic is the jit helpers of :mod:`.quant` (the same rule, so the same bits; a
block holding an inf or a NaN gets a NaN scale and a NaN payload there too). Reads decode e4m3 with
integer arithmetic (exact for every code, any GPU) and round the fp32 products to bf16 through
:func:`._cast.cast_out`. The wrappers read no tensor back to the host.

Verified where: under the interpreter (``tests/triton/test_paged_cache.py``: cache bytes equal to the
reference's, pad bytes and untouched slots included; reads equal bit for bit); compiled for sm_90a by
``tests/triton/sm90_compile.py``. Speed only on a GPU.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import triton
import triton.language as tl

from v4hal.hal import formats as F
from v4hal.hal import requirements as R
from v4hal.hal.registry import implements
from v4hal.ops.paged import FP4_BLOCK, NOPE_BLOCK, PAGED_LAYOUTS, V41_FP4_BLOCK, V41_FP8_BLOCK, _dim_of_width, cache_dim

from ._attn_common import next_pow2
from ._cast import cast_out
from .quant import (
    block_nonfinite,
    clamp_nan,
    e2m1_codes,
    e2m1_value,
    e4m3_bits,
    e4m3_bits_soft,
    e8m0_to_f32,
    fp8_gpu,
    interpreting,
    nan_where,
    pow2_ceil_exp,
    pow2_recip,
)

_FP8_LAYOUTS = ("model1_fp8", "indexer_fp8", "v41_window_fp8")
_FP8_CAP = fp8_gpu("x", "conversions of the model1_fp8 / indexer_fp8 / v41_window_fp8 layouts")


def _fp8_layout_reason(args: Mapping[str, Any]) -> str | None:
    return _FP8_CAP.reason(args) if args.get("layout") in _FP8_LAYOUTS else None


#: writing e4m3 codes (model1_fp8, indexer_fp8) uses the hardware's FP8 conversion: sm_89+
_WRITE_FP8 = R.when("compute capability >= 8.9 for layouts model1_fp8 / indexer_fp8 / v41_window_fp8 "
                    "(FP8 e4m3 conversions)",
                    _fp8_layout_reason)


# ============================================================================ shared helpers
@triton.jit
def _slot_page(slots_ptr, t, s_slot, block_size, page_bytes, n_slots):
    """Slot of token ``t`` -> (the slot, -1 unless ``0 <= slot < n_slots``; byte offset of its page; offset in
    the page; ``block_size``), all int64, so no offset overflows. A slot outside the cache gives page 0 and
    every mask built by :func:`_valid` False: nothing outside the cache is ever addressed."""
    slot = tl.load(slots_ptr + t * s_slot).to(tl.int64)
    slot = tl.where((slot >= 0) & (slot < n_slots), slot, -1)
    s = tl.maximum(slot, 0)
    blk = s // block_size
    return slot, blk * page_bytes, s - blk * block_size, blk * 0 + block_size


@triton.jit
def _valid(idx, slot):
    """A mask shaped like the index tensor ``idx``: True where ``slot >= 0``. (Built from a tensor: the
    interpreter rejects masks that combine a tensor with a scalar comparison.)"""
    return (idx * 0 + slot) >= 0


@triton.jit
def _f32_bytes(v, k):
    """Byte ``k`` (little-endian; ``k`` an int tensor 0..3) of fp32 scalar ``v``'s bits, as uint8."""
    return ((v.to(tl.int32, bitcast=True) >> (k * 8)) & 0xFF).to(tl.uint8)


@triton.jit
def _e4m3_to_f32(b):
    """e4m3 bytes -> fp32, exactly, by integer arithmetic: normal codes rebuild the fp32 bits, subnormal
    codes are ``mantissa * 2**-9``; 0x7F / 0xFF give NaN (sign kept)."""
    bi = b.to(tl.int32)
    sign = (bi & 0x80) << 24
    ex = (bi >> 3) & 0xF
    man = bi & 7
    normal = ((ex + 120) << 23) | (man << 20)
    sub = (man.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)
    bits = tl.where(ex == 0, sub, normal)
    bits = tl.where((bi & 0x7F) == 0x7F, 0x7FC00000, bits)
    return (bits | sign).to(tl.float32, bitcast=True)


# ============================================================================ writes
@triton.jit
def _write_model1_kernel(cache_ptr, x_ptr, slots_ptr, s_xt, s_slot, block_size, page_bytes, n_slots, amax_floor,
                         max_inv, NB: tl.constexpr, SB: tl.constexpr, R: tl.constexpr, SOFT: tl.constexpr):
    """x bf16 ``[T, NB * 64 + 64]`` -> model1_fp8 records: ``NB * 64`` e4m3 bytes (NB blocks of 64, pow2
    scales) and 64 bf16 values at ``off * (NB * 64 + 128)`` of the page, the NB e8m0 bytes zero padded to
    ``SB`` bytes at ``block_size * (NB * 64 + 128) + off * SB``. ``R``: rows of the tile, a power of two
    ``>= SB`` (V4: NB = 7, SB = R = 8)."""
    t = tl.program_id(0).to(tl.int64)
    slot, page, off, bs = _slot_page(slots_ptr, t, s_slot, block_size, page_bytes, n_slots)
    r = tl.arange(0, R)                          # NB quantization blocks (the other rows are padding)
    c = tl.arange(0, 64)
    rc = r[:, None] * 64 + c[None, :]
    mask = (r < NB)[:, None] & _valid(rc, slot)
    xrow = x_ptr + t * s_xt
    x = tl.load(xrow + rc, mask=mask, other=0.0).to(tl.float32)
    bad = block_nonfinite(x, 1)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), amax_floor)
    e = tl.where(bad, 255, pow2_ceil_exp(amax * max_inv))
    q = nan_where(bad[:, None], clamp_nan(x * pow2_recip(e)[:, None], 448.0))
    rec = cache_ptr + page + off * (NB * 64 + 128)
    tl.store(rec + rc, e4m3_bits(q, SOFT), mask=mask)
    rope = tl.load(xrow.to(tl.pointer_type(tl.int16)) + NB * 64 + c, mask=_valid(c, slot), other=0)
    tl.store((rec + NB * 64).to(tl.pointer_type(tl.int16)) + c, rope, mask=_valid(c, slot))
    sc = cache_ptr + page + bs * (NB * 64 + 128) + off * SB
    tl.store(sc + r, tl.where(r < NB, e, 0).to(tl.uint8), mask=(r < SB) & _valid(r, slot))


@triton.jit
def _write_fp4_kernel(cache_ptr, x_ptr, slots_ptr, s_xt, s_slot, block_size, page_bytes, n_slots, amax_floor, max_inv,
                      NB: tl.constexpr, SB: tl.constexpr, R: tl.constexpr):
    """x bf16 ``[T, NB * 32]`` -> indexer_fp4 records: ``NB * 16`` packed e2m1 bytes at ``off * NB * 16`` of
    the page, NB e8m0 bytes zero padded to ``SB`` at ``block_size * NB * 16 + off * SB``. ``R``: rows of
    the tile, a power of two ``>= SB`` (V4: NB = SB = R = 4)."""
    t = tl.program_id(0).to(tl.int64)
    slot, page, off, bs = _slot_page(slots_ptr, t, s_slot, block_size, page_bytes, n_slots)
    r = tl.arange(0, R)
    c = tl.arange(0, 32)
    rc = r[:, None] * 32 + c[None, :]
    x = tl.load(x_ptr + t * s_xt + rc, mask=(r < NB)[:, None] & _valid(rc, slot), other=0.0).to(tl.float32)
    bad = block_nonfinite(x, 1)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), amax_floor)
    e = tl.where(bad, 255, pow2_ceil_exp(amax * max_inv))
    v = clamp_nan(x * pow2_recip(e)[:, None], 6.0)
    codes = tl.where(bad[:, None], 7, e2m1_codes(v))
    lo, hi = tl.split(tl.reshape(codes, (R, 16, 2)))
    packed = (lo | (hi << 4)).to(tl.uint8)
    rh = r[:, None] * 16 + tl.arange(0, 16)[None, :]
    tl.store(cache_ptr + page + off * (NB * 16) + rh, packed, mask=(r < NB)[:, None] & _valid(rh, slot))
    tl.store(cache_ptr + page + bs * (NB * 16) + off * SB + r, tl.where(r < NB, e, 0).to(tl.uint8),
             mask=(r < SB) & _valid(r, slot))


@triton.jit
def _write_fp8_kernel(cache_ptr, x_ptr, slots_ptr, s_xt, s_slot, block_size, page_bytes, n_slots, amax_floor, max_inv,
                      D: tl.constexpr, DP: tl.constexpr, SOFT: tl.constexpr):
    """x bf16 ``[T, D]`` -> indexer_fp8 records: ``D`` e4m3 bytes at ``off * D`` of the page, the fp32
    scale (one block of all D values) at ``block_size * D + off * 4``. ``DP``: a power of two ``>= D``."""
    t = tl.program_id(0).to(tl.int64)
    slot, page, off, bs = _slot_page(slots_ptr, t, s_slot, block_size, page_bytes, n_slots)
    c = tl.arange(0, DP)
    valid = (c < D) & _valid(c, slot)
    x = tl.load(x_ptr + t * s_xt + c, mask=valid, other=0.0).to(tl.float32)
    bad = block_nonfinite(x, 0)
    s = tl.maximum(tl.max(tl.abs(x), axis=0), amax_floor) * max_inv
    q = nan_where(bad, clamp_nan(tl.math.div_rn(x, s), 448.0))
    tl.store(cache_ptr + page + off * D + c, e4m3_bits(q, SOFT), mask=valid)
    k = tl.arange(0, 4)        # the scale's 4 bytes, little-endian (a masked store needs a tensor)
    tl.store(cache_ptr + page + bs * D + off * 4 + k, _f32_bytes(nan_where(bad, s), k),
             mask=_valid(k, slot))


@triton.jit
def _write_v41_fp8_kernel(cache_ptr, x_ptr, slots_ptr, s_xt, s_slot, block_size, page_bytes, n_slots, scale_floor,
                          NB: tl.constexpr, R: tl.constexpr, SOFT: tl.constexpr):
    """x bf16 ``[T, NB * 32]`` -> v41_window_fp8 records: ``NB * 32`` e4m3 bytes at ``off * NB * 32`` of the
    page, NB e8m0 bytes at ``block_size * NB * 32 + off * NB``. ``R``: rows of the tile, a power of two
    ``>= NB`` (V4.1: NB = R = 16)."""
    t = tl.program_id(0).to(tl.int64)
    slot, page, off, bs = _slot_page(slots_ptr, t, s_slot, block_size, page_bytes, n_slots)
    r = tl.arange(0, R)
    c = tl.arange(0, 32)
    rc = r[:, None] * 32 + c[None, :]
    mask = (r < NB)[:, None] & _valid(rc, slot)
    x = tl.load(x_ptr + t * s_xt + rc, mask=mask, other=0.0).to(tl.float32)
    bad = block_nonfinite(x, 1)
    s = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=1), 448.0), scale_floor)
    e = tl.where(bad, 255, pow2_ceil_exp(s))
    q = nan_where(bad[:, None], clamp_nan(x * pow2_recip(e)[:, None], 448.0))
    tl.store(cache_ptr + page + off * (NB * 32) + rc, e4m3_bits(q, SOFT), mask=mask)
    tl.store(cache_ptr + page + bs * (NB * 32) + off * NB + r, e.to(tl.uint8), mask=(r < NB) & _valid(r, slot))


@triton.jit
def _write_v41_fp4_kernel(cache_ptr, x_ptr, slots_ptr, s_xt, s_slot, block_size, page_bytes, n_slots,
                          NB: tl.constexpr, R: tl.constexpr):
    """x bf16 ``[T, NB * 16]`` -> v41_compressed_fp4 records: ``NB * 8`` packed e2m1 bytes at ``off * NB * 8``
    of the page, NB e4m3 scale bytes at ``block_size * NB * 8 + off * NB``. ``R``: rows of the tile, a
    power of two ``>= NB`` (V4.1: NB = R = 32)."""
    t = tl.program_id(0).to(tl.int64)
    slot, page, off, bs = _slot_page(slots_ptr, t, s_slot, block_size, page_bytes, n_slots)
    r = tl.arange(0, R)
    c = tl.arange(0, 16)
    rc = r[:, None] * 16 + c[None, :]
    x = tl.load(x_ptr + t * s_xt + rc, mask=(r < NB)[:, None] & _valid(rc, slot), other=0.0).to(tl.float32)
    bad = block_nonfinite(x, 1)
    q = tl.minimum(tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=1), 6.0), 0.001953125), 448.0)
    sbits = e4m3_bits_soft(q)                               # the e4m3 scale (0 < q <= 448: no sign, no NaN)
    codes = e2m1_codes(tl.math.div_rn(x, _e4m3_to_f32(sbits)[:, None]))
    codes = tl.where(bad[:, None], 0, codes)
    lo, hi = tl.split(tl.reshape(codes, (R, 8, 2)))
    rh = r[:, None] * 8 + tl.arange(0, 8)[None, :]
    tl.store(cache_ptr + page + off * (NB * 8) + rh, (lo | (hi << 4)).to(tl.uint8),
             mask=(r < NB)[:, None] & _valid(rh, slot))
    tl.store(cache_ptr + page + bs * (NB * 8) + off * NB + r, tl.where(bad, 0x7F, sbits).to(tl.uint8),
             mask=(r < NB) & _valid(r, slot))


@triton.jit
def _copy_bf16_kernel(dst_ptr, src_ptr, slots_ptr, s_src, s_dst, s_slot, block_size, page_elems, n_slots,
                      D: tl.constexpr, DP: tl.constexpr, WRITE: tl.constexpr):
    """bf16 rows of ``D`` as int16 bits (``DP``: a power of two ``>= D``). ``WRITE``: src ``[T, D]`` -> the
    cache at the slots (-1 skipped); else the cache at the slots -> dst ``[T, D]`` (zeros for -1)."""
    t = tl.program_id(0).to(tl.int64)
    slot, page, off, bs = _slot_page(slots_ptr, t, s_slot, block_size, page_elems, n_slots)
    c = tl.arange(0, DP)
    valid = (c < D) & _valid(c, slot)
    if WRITE:
        v = tl.load(src_ptr + t * s_src + c, mask=valid, other=0)
        tl.store(dst_ptr + page + off * D + c, v, mask=valid)
    else:
        v = tl.load(src_ptr + page + off * D + c, mask=valid, other=0)
        tl.store(dst_ptr + t * s_dst + c, v, mask=c < D)


# ============================================================================ reads
@triton.jit
def _read_model1_kernel(cache_ptr, out_ptr, slots_ptr, s_slot, block_size, page_bytes, n_slots,
                        NB: tl.constexpr, SB: tl.constexpr, R: tl.constexpr, SOFT: tl.constexpr):
    """model1_fp8 records at the slots -> out bf16 ``[T, NB * 64 + 64]`` (contiguous): e4m3 * e8m0 scale
    for the ``NB * 64`` first values, the stored bf16 bits for the last 64; zeros for -1."""
    t = tl.program_id(0).to(tl.int64)
    slot, page, off, bs = _slot_page(slots_ptr, t, s_slot, block_size, page_bytes, n_slots)
    r = tl.arange(0, R)
    c = tl.arange(0, 64)
    rc = r[:, None] * 64 + c[None, :]
    rmask = r < NB
    rec = cache_ptr + page + off * (NB * 64 + 128)
    yb = tl.load(rec + rc, mask=rmask[:, None] & _valid(rc, slot), other=0)
    sb = tl.load(cache_ptr + page + bs * (NB * 64 + 128) + off * SB + r, mask=rmask & _valid(r, slot),
                 other=127)
    val = _e4m3_to_f32(yb) * e8m0_to_f32(sb)[:, None]
    orow = out_ptr + t * (NB * 64 + 64)
    tl.store(orow + rc, cast_out(val, tl.bfloat16, SOFT), mask=rmask[:, None])
    rope = tl.load((rec + NB * 64).to(tl.pointer_type(tl.int16)) + c, mask=_valid(c, slot), other=0)
    tl.store(orow.to(tl.pointer_type(tl.int16)) + NB * 64 + c, rope)


@triton.jit
def _read_fp4_kernel(cache_ptr, out_ptr, slots_ptr, s_slot, block_size, page_bytes, n_slots,
                     NB: tl.constexpr, SB: tl.constexpr, R: tl.constexpr, SOFT: tl.constexpr):
    """indexer_fp4 records at the slots -> out bf16 ``[T, NB * 32]``: e2m1 value * e8m0 scale; zeros for -1."""
    t = tl.program_id(0).to(tl.int64)
    slot, page, off, bs = _slot_page(slots_ptr, t, s_slot, block_size, page_bytes, n_slots)
    r = tl.arange(0, R)
    rmask = r < NB
    rh = r[:, None] * 16 + tl.arange(0, 16)[None, :]
    packed = tl.load(cache_ptr + page + off * (NB * 16) + rh, mask=rmask[:, None] & _valid(rh, slot),
                     other=0).to(tl.int32)
    codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (R, 32))
    sb = tl.load(cache_ptr + page + bs * (NB * 16) + off * SB + r, mask=rmask & _valid(r, slot), other=127)
    mag = e2m1_value(codes & 7)
    val = tl.where((codes & 8) != 0, -mag, mag) * e8m0_to_f32(sb)[:, None]
    c = tl.arange(0, 32)
    tl.store(out_ptr + t * (NB * 32) + r[:, None] * 32 + c[None, :], cast_out(val, tl.bfloat16, SOFT),
             mask=rmask[:, None])


@triton.jit
def _read_fp8_kernel(cache_ptr, out_ptr, slots_ptr, s_slot, block_size, page_bytes, n_slots,
                     D: tl.constexpr, DP: tl.constexpr, SOFT: tl.constexpr):
    """indexer_fp8 records at the slots -> out bf16 ``[T, D]``: e4m3 value * fp32 scale; zeros for -1."""
    t = tl.program_id(0).to(tl.int64)
    slot, page, off, bs = _slot_page(slots_ptr, t, s_slot, block_size, page_bytes, n_slots)
    c = tl.arange(0, DP)
    yb = tl.load(cache_ptr + page + off * D + c, mask=(c < D) & _valid(c, slot), other=0)
    # the scale's 4 bytes, little-endian, read byte by byte (for odd D it need not be 4-byte aligned)
    k = tl.arange(0, 4)
    sb = tl.load(cache_ptr + page + bs * D + off * 4 + k, mask=_valid(k, slot), other=0)
    bits = tl.sum(sb.to(tl.uint32) << (k * 8).to(tl.uint32), axis=0)
    s = tl.where(slot >= 0, bits.to(tl.float32, bitcast=True), 1.0)
    tl.store(out_ptr + t * D + c, cast_out(_e4m3_to_f32(yb) * s, tl.bfloat16, SOFT), mask=c < D)


@triton.jit
def _read_v41_fp8_kernel(cache_ptr, out_ptr, slots_ptr, s_slot, block_size, page_bytes, n_slots,
                         NB: tl.constexpr, R: tl.constexpr, SOFT: tl.constexpr):
    """v41_window_fp8 records at the slots -> out bf16 ``[T, NB * 32]``: e4m3 * e8m0 scale; zeros for -1."""
    t = tl.program_id(0).to(tl.int64)
    slot, page, off, bs = _slot_page(slots_ptr, t, s_slot, block_size, page_bytes, n_slots)
    r = tl.arange(0, R)
    rmask = r < NB
    rc = r[:, None] * 32 + tl.arange(0, 32)[None, :]
    yb = tl.load(cache_ptr + page + off * (NB * 32) + rc, mask=rmask[:, None] & _valid(rc, slot), other=0)
    sb = tl.load(cache_ptr + page + bs * (NB * 32) + off * NB + r, mask=rmask & _valid(r, slot), other=127)
    val = _e4m3_to_f32(yb) * e8m0_to_f32(sb)[:, None]
    tl.store(out_ptr + t * (NB * 32) + rc, cast_out(val, tl.bfloat16, SOFT), mask=rmask[:, None])


@triton.jit
def _read_v41_fp4_kernel(cache_ptr, out_ptr, slots_ptr, s_slot, block_size, page_bytes, n_slots,
                         NB: tl.constexpr, R: tl.constexpr, SOFT: tl.constexpr):
    """v41_compressed_fp4 records at the slots -> out bf16 ``[T, NB * 16]``: e2m1 value * e4m3 scale (exact);
    zeros for -1."""
    t = tl.program_id(0).to(tl.int64)
    slot, page, off, bs = _slot_page(slots_ptr, t, s_slot, block_size, page_bytes, n_slots)
    r = tl.arange(0, R)
    rmask = r < NB
    rh = r[:, None] * 8 + tl.arange(0, 8)[None, :]
    packed = tl.load(cache_ptr + page + off * (NB * 8) + rh, mask=rmask[:, None] & _valid(rh, slot),
                     other=0).to(tl.int32)
    codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (R, 16))
    sb = tl.load(cache_ptr + page + bs * (NB * 8) + off * NB + r, mask=rmask & _valid(r, slot), other=0x38)
    mag = e2m1_value(codes & 7)
    val = tl.where((codes & 8) != 0, -mag, mag) * _e4m3_to_f32(sb)[:, None]
    rc = r[:, None] * 16 + tl.arange(0, 16)[None, :]
    tl.store(out_ptr + t * (NB * 16) + rc, cast_out(val, tl.bfloat16, SOFT), mask=rmask[:, None])


# ============================================================================ wrappers
def _bytes(cache: torch.Tensor) -> torch.Tensor:
    """The cache as uint8 (a view: the same storage, strides and offset)."""
    return cache if cache.dtype == torch.uint8 else cache.view(torch.uint8)


def _shape_constexprs(layout: str, dim: int) -> dict[str, int]:
    """The kernels' compile-time sizes for ``dim``-wide entries of ``layout`` (V4's widths: the sizes the
    kernels were written for: model1_fp8 NB = 7, SB = R = 8; indexer_fp4 NB = SB = R = 4; D = DP = 128
    or 512)."""
    lay = PAGED_LAYOUTS[layout]
    if layout == "model1_fp8":
        nb, sb = lay.nope(dim) // NOPE_BLOCK, lay.scale_bytes(dim)
        return dict(NB=nb, SB=sb, R=next_pow2(sb))
    if layout == "indexer_fp4":
        nb, sb = dim // FP4_BLOCK, lay.scale_bytes(dim)
        return dict(NB=nb, SB=sb, R=next_pow2(sb))
    if layout in ("v41_window_fp8", "v41_compressed_fp4"):
        nb = dim // (V41_FP8_BLOCK if layout == "v41_window_fp8" else V41_FP4_BLOCK)
        return dict(NB=nb, R=next_pow2(nb))
    return dict(D=dim, DP=next_pow2(dim))


#: every kernel holds one entry (a power-of-two tile of at least D values) per program in registers
MAX_ENTRY = 4096


def _entry_dim(args: Mapping[str, Any]) -> int | None:
    """The cache's entry width, None when the arguments do not tell one (the op's checks report those)."""
    layout, cache = args.get("layout"), args.get("cache")
    lay = PAGED_LAYOUTS.get(layout) if isinstance(layout, str) else None
    return None if lay is None or not isinstance(cache, torch.Tensor) else _dim_of_width(lay, cache.shape[-1])


_ENTRY = R.at_most("entry width D", MAX_ENTRY, _entry_dim, why="one entry per program, held in registers")


@implements("paged_cache_write", "triton", requires=(_WRITE_FP8, _ENTRY))
def paged_cache_write(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, layout: str) -> None:
    """Quantize bf16 ``x [T, D]`` by ``layout`` into ``cache [blocks, block size, 1, W]`` at ``slots``
    (int32/int64 ``[T]``; -1 and slots outside the cache skipped), in place; the bytes of the reference's
    write."""
    t, dim = x.shape
    if t == 0:
        return
    xc = x if x.stride(-1) == 1 else x.contiguous()
    bs = cache.shape[1]
    n = cache.shape[0] * bs                        # the slots of the cache: any other value is "no slot"
    page = PAGED_LAYOUTS[layout].page_bytes(dim, bs)
    sizes = _shape_constexprs(layout, dim)
    soft = interpreting(cache)
    if layout == "bf16":
        _copy_bf16_kernel[(t,)](cache.view(torch.int16), xc.view(torch.int16), slots, xc.stride(0), 0,
                                slots.stride(0), bs, page // 2, n, WRITE=True, num_warps=4, **sizes)
    elif layout == "model1_fp8":
        _write_model1_kernel[(t,)](_bytes(cache), xc, slots, xc.stride(0), slots.stride(0), bs, page, n,
                                   F.FP8_AMAX_FLOOR, F.FP8_MAX_INV, SOFT=soft, num_warps=4, **sizes)
    elif layout == "indexer_fp4":
        _write_fp4_kernel[(t,)](_bytes(cache), xc, slots, xc.stride(0), slots.stride(0), bs, page, n,
                                F.FP4_AMAX_FLOOR, F.FP4_MAX_INV, num_warps=1, **sizes)
    elif layout == "v41_window_fp8":
        _write_v41_fp8_kernel[(t,)](_bytes(cache), xc, slots, xc.stride(0), slots.stride(0), bs, page, n,
                                    F.FP8_CACHE_SCALE_FLOOR, SOFT=soft, num_warps=4, **sizes)
    elif layout == "v41_compressed_fp4":
        _write_v41_fp4_kernel[(t,)](_bytes(cache), xc, slots, xc.stride(0), slots.stride(0), bs, page, n,
                                    num_warps=4, **sizes)
    else:  # indexer_fp8
        _write_fp8_kernel[(t,)](_bytes(cache), xc, slots, xc.stride(0), slots.stride(0), bs, page, n,
                                F.FP8_AMAX_FLOOR, F.FP8_MAX_INV, SOFT=soft, num_warps=1, **sizes)


@implements("paged_cache_read", "triton", requires=(_ENTRY,))
def paged_cache_read(cache: torch.Tensor, slots: torch.Tensor, layout: str) -> torch.Tensor:
    """The entries at ``slots`` (int32/int64 ``[T]``) of ``cache`` dequantized by ``layout``: bf16
    ``[T, D]``, zeros for -1 and slots outside the cache; the reference's values bit for bit."""
    t = slots.shape[0]
    dim = cache_dim(cache, layout)
    out = torch.empty(t, dim, dtype=torch.bfloat16, device=cache.device)
    if t == 0:
        return out
    bs = cache.shape[1]
    n = cache.shape[0] * bs                        # the slots of the cache: any other value is "no slot"
    page = PAGED_LAYOUTS[layout].page_bytes(dim, bs)
    sizes = _shape_constexprs(layout, dim)
    soft = interpreting(cache)
    if layout == "bf16":
        _copy_bf16_kernel[(t,)](out.view(torch.int16), cache.view(torch.int16), slots, 0, dim, slots.stride(0),
                                bs, page // 2, n, WRITE=False, num_warps=4, **sizes)
    elif layout == "model1_fp8":
        _read_model1_kernel[(t,)](_bytes(cache), out, slots, slots.stride(0), bs, page, n, SOFT=soft, num_warps=4,
                                  **sizes)
    elif layout == "indexer_fp4":
        _read_fp4_kernel[(t,)](_bytes(cache), out, slots, slots.stride(0), bs, page, n, SOFT=soft, num_warps=1,
                               **sizes)
    elif layout == "v41_window_fp8":
        _read_v41_fp8_kernel[(t,)](_bytes(cache), out, slots, slots.stride(0), bs, page, n, SOFT=soft,
                                   num_warps=4, **sizes)
    elif layout == "v41_compressed_fp4":
        _read_v41_fp4_kernel[(t,)](_bytes(cache), out, slots, slots.stride(0), bs, page, n, SOFT=soft,
                                   num_warps=4, **sizes)
    else:  # indexer_fp8
        _read_fp8_kernel[(t,)](_bytes(cache), out, slots, slots.stride(0), bs, page, n, SOFT=soft, num_warps=1,
                               **sizes)
    return out


__all__ = ["paged_cache_write", "paged_cache_read"]
