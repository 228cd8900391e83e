"""Reference paged caches: writing and reading entries of the layouts of :mod:`v4hal.ops.paged`, bytes exact.

Each layout's page is addressed as byte regions: per page, ``block_size`` token records of a fixed width
starting at a fixed byte offset (the values, then the scales). Quantization is the reference
quantizers' (:mod:`v4hal.backends.reference.quant`), so a write then a read gives exactly the
quantize-then-dequantize round trip of ``act_quant`` / ``fp4_act_quant`` with ``inplace=True``:

* ``model1_fp8``: the first 448 values through ``act_quant`` (block 64, ue8m0 scales), the last 64
  stored as bf16;
* ``indexer_fp4``: ``fp4_act_quant`` (block 32, e8m0 scales);
* ``indexer_fp8``: ``act_quant`` (block 128, fp32 scale);
* ``bf16``: copied.

Inputs arrive validated by the op declarations in :mod:`v4hal.ops.paged`.
"""
from __future__ import annotations

import torch

from v4hal.hal import formats as F
from v4hal.hal.registry import implements
from v4hal.ops.paged import PAGED_LAYOUTS

from .quant import act_quant, fp4_act_quant

NOPE, ROPE = 448, 64          # model1_fp8: e4m3 values and bf16 values per entry
NOPE_BLOCK = 64               # model1_fp8: e4m3 values per ue8m0 scale


def _region(cache: torch.Tensor, layout: str, start: int, width: int) -> torch.Tensor:
    """uint8 ``[blocks, block size, width]``: per page, the ``width``-byte record of each token from
    byte ``start * block_size`` of the page (a view: writes land in the cache)."""
    u8 = cache if cache.dtype == torch.uint8 else cache.view(torch.uint8)
    nb, bs = cache.shape[0], cache.shape[1]
    page = PAGED_LAYOUTS[layout].page_bytes(bs)
    return u8.as_strided((nb, bs, width), (page, width, 1), u8.storage_offset() + start * bs)


def _split(cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows with a slot, their blocks, their offsets in the block), slots -1 left out."""
    rows = (slots >= 0).nonzero().flatten()
    s = slots[rows].long()
    bs = cache.shape[1]
    return rows, s // bs, s % bs


@implements("paged_cache_write", "reference")
def paged_cache_write(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, layout: str) -> None:
    """Quantize bf16 ``x [T, D]`` into ``cache`` at ``slots`` (int ``[T]``; -1 skipped), in place."""
    rows, blk, off = _split(cache, slots)
    if rows.numel() == 0:
        return
    xv = x[rows]
    if layout == "bf16":
        cache[blk, off, 0] = xv
    elif layout == "model1_fp8":
        y, s = act_quant(xv[:, :NOPE], NOPE_BLOCK, "ue8m0", F.E8M0_DTYPE)
        data = _region(cache, layout, 0, NOPE + 2 * ROPE)
        data[blk, off] = torch.cat([y.view(torch.uint8), xv[:, NOPE:].contiguous().view(torch.uint8)], dim=-1)
        scales = _region(cache, layout, NOPE + 2 * ROPE, 8)
        scales[blk, off] = torch.nn.functional.pad(s.view(torch.uint8), (0, 1))
    elif layout == "indexer_fp4":
        packed, s = fp4_act_quant(xv, 32)
        _region(cache, layout, 0, 64)[blk, off] = packed
        _region(cache, layout, 64, 4)[blk, off] = s.view(torch.uint8)
    else:  # indexer_fp8
        y, s = act_quant(xv, 128)
        _region(cache, layout, 0, 128)[blk, off] = y.view(torch.uint8)
        _region(cache, layout, 128, 4)[blk, off] = s.contiguous().view(torch.uint8)


def _e8m0(b: torch.Tensor) -> torch.Tensor:
    """uint8 e8m0 bytes -> fp32 scales."""
    return F.e8m0_to_float(b.contiguous())


@implements("paged_cache_read", "reference")
def paged_cache_read(cache: torch.Tensor, slots: torch.Tensor, layout: str) -> torch.Tensor:
    """The entries at ``slots`` (int ``[T]``) dequantized: bf16 ``[T, D]``, zeros for -1."""
    dim = PAGED_LAYOUTS[layout].dim
    out = torch.zeros(slots.shape[0], dim, dtype=torch.bfloat16, device=cache.device)
    rows, blk, off = _split(cache, slots)
    if rows.numel() == 0:
        return out
    if layout == "bf16":
        vals = cache[blk, off, 0]
    elif layout == "model1_fp8":
        data = _region(cache, layout, 0, NOPE + 2 * ROPE)[blk, off]
        s = _e8m0(_region(cache, layout, NOPE + 2 * ROPE, 8)[blk, off, :NOPE // NOPE_BLOCK])
        y = F.fp8_to_float(data[:, :NOPE].contiguous().view(F.FP8_DTYPE))
        nope = (y.unflatten(-1, (-1, NOPE_BLOCK)) * s.unsqueeze(-1)).flatten(-2).to(torch.bfloat16)
        vals = torch.cat([nope, data[:, NOPE:].contiguous().view(torch.bfloat16)], dim=-1)
    elif layout == "indexer_fp4":
        codes = F.unpack_fp4(_region(cache, layout, 0, 64)[blk, off])
        s = _e8m0(_region(cache, layout, 64, 4)[blk, off])
        vals = (F.e2m1_decode(codes).unflatten(-1, (-1, 32)) * s.unsqueeze(-1)).flatten(-2).to(torch.bfloat16)
    else:  # indexer_fp8
        y = F.fp8_to_float(_region(cache, layout, 0, 128)[blk, off].view(F.FP8_DTYPE))
        s = _region(cache, layout, 128, 4)[blk, off].contiguous().view(torch.float32)
        vals = (y * s).to(torch.bfloat16)
    out[rows] = vals
    return out
