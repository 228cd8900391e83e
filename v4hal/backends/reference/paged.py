"""Reference paged caches: writing and reading entries of the layouts of :mod:`v4hal.ops.paged`, bytes exact.

Each layout's page is addressed as byte regions: per page, ``block_size`` token records of a fixed width
starting at a fixed byte offset (the values, then the scales). The entry width ``D`` comes from the
cache's last dim. Quantization is the reference quantizers' (:mod:`v4hal.backends.reference.quant`), so
a write then a read gives exactly the quantize-then-dequantize round trip of ``act_quant`` /
``fp4_act_quant`` with ``inplace=True``:

* ``model1_fp8``: the first ``nope = D - 64`` values through ``act_quant`` (block 64, ue8m0 scales),
  the last 64 stored as bf16;
* ``indexer_fp4``: ``fp4_act_quant`` (block 32, e8m0 scales);
* ``indexer_fp8``: ``act_quant`` with one block of all ``D`` values (fp32 scale);
* ``v41_window_fp8``: :func:`v4hal.hal.formats.fp8_cache_block_quant` (block 32, ue8m0 scales floored
  at ``1e-4`` after the division by 448), every value e4m3;
* ``v41_compressed_fp4``: :func:`v4hal.hal.formats.fp4_e4m3_block_quant` (block 16, e4m3 scales), so a
  write then a read is :func:`v4hal.hal.formats.fp4_e4m3_round_trip` cast to bf16;
* ``bf16``: copied.

Inputs arrive validated by the op declarations in :mod:`v4hal.ops.paged`.
"""
from __future__ import annotations

import torch

from v4hal.hal import formats as F
from v4hal.hal.registry import implements
from v4hal.ops.paged import FP4_BLOCK, NOPE_BLOCK, PAGED_LAYOUTS, V41_FP4_BLOCK, V41_FP8_BLOCK, cache_dim

from .quant import act_quant, fp4_act_quant


def _region(cache: torch.Tensor, layout: str, start: int, width: int) -> torch.Tensor:
    """uint8 ``[blocks, block size, width]``: per page, the ``width``-byte record of each token from
    byte ``start * block_size`` of the page (a view: writes land in the cache)."""
    u8 = cache if cache.dtype == torch.uint8 else cache.view(torch.uint8)
    nb, bs = cache.shape[0], cache.shape[1]
    page = PAGED_LAYOUTS[layout].page_bytes(cache_dim(cache, layout), bs)
    return u8.as_strided((nb, bs, width), (page, width, 1), u8.storage_offset() + start * bs)


def model1_parts(dim: int) -> tuple[int, int, int]:
    """model1_fp8 entries of width ``dim``: (e4m3 values ``nope``, data bytes per token, scale bytes per token)."""
    lay = PAGED_LAYOUTS["model1_fp8"]
    return lay.nope(dim), lay.data_bytes(dim), lay.scale_bytes(dim)


def model1_decode(data: torch.Tensor, scales: torch.Tensor, nope: int) -> torch.Tensor:
    """bf16 ``[..., nope + 64]`` from model1_fp8 records: uint8 data ``[..., nope + 128]`` and ue8m0 scale
    bytes ``[..., >= nope / 64]`` (e4m3 times its scale rounded once to bf16, then the bf16 values)."""
    s = F.e8m0_to_float(scales[..., :nope // NOPE_BLOCK].contiguous())
    y = F.fp8_to_float(data[..., :nope].contiguous().view(F.FP8_DTYPE))
    vals = (y.unflatten(-1, (-1, NOPE_BLOCK)) * s.unsqueeze(-1)).flatten(-2).to(torch.bfloat16)
    return torch.cat([vals, data[..., nope:].contiguous().view(torch.bfloat16)], dim=-1)


def fp4_dequant(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 ``[..., D]`` from indexer_fp4 records: packed uint8 ``[..., D / 2]`` and ue8m0 scale bytes
    ``[..., >= D / 32]``."""
    codes = F.unpack_fp4(packed)
    s = F.e8m0_to_float(scales[..., :codes.shape[-1] // FP4_BLOCK].contiguous())
    return (F.e2m1_decode(codes).unflatten(-1, (-1, FP4_BLOCK)) * s.unsqueeze(-1)).flatten(-2)


def v41_regions(cache: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes ``[blocks, block size, data bytes]``, scales ``[blocks, block size, D / block]``): uint8 views
    of a ``v41_window_fp8`` / ``v41_compressed_fp4`` cache's two regions."""
    lay = PAGED_LAYOUTS[layout]
    dim = cache_dim(cache, layout)
    data = lay.data_bytes(dim)
    return _region(cache, layout, 0, data), _region(cache, layout, data, lay.scale_bytes(dim))


def v41_quant(layout: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A V4.1 cache's records of float rows ``x [T, D]``: (uint8 codes ``[T, data bytes]``, uint8 scale
    bytes ``[T, D / block]``)."""
    if layout == "v41_window_fp8":
        y, s = F.fp8_cache_block_quant(x, V41_FP8_BLOCK)
        return y.view(torch.uint8), s.view(torch.uint8)
    packed, s = F.fp4_e4m3_block_quant(x, V41_FP4_BLOCK)
    return packed, s.view(torch.uint8)


def v41_decode(layout: str, data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """bf16 ``[..., D]`` from V4.1 cache records: uint8 codes ``[..., data bytes]`` and scale bytes
    ``[..., D / block]`` (each value times its scale in fp32, exact, then bf16: exact too)."""
    if layout == "v41_window_fp8":
        vals = F.fp8_block_dequant(data.contiguous().view(F.FP8_DTYPE), scales)
    else:
        vals = F.fp4_e4m3_block_dequant(data, scales)
    return vals.to(torch.bfloat16)


def slot_in_cache(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """bool like ``slots``: True where the slot is one of ``cache``'s, ``0 <= slot < blocks * block size``.
    Every other value (-1, and with value checks off any negative or too large one) means "no slot"."""
    s = slots.long()
    return (s >= 0) & (s < cache.shape[0] * cache.shape[1])


def _split(cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows with a slot of the cache, their blocks, their offsets in the block); -1 and every slot
    outside the cache left out."""
    rows = slot_in_cache(cache, slots).nonzero().flatten()
    s = slots[rows].long()
    bs = cache.shape[1]
    return rows, s // bs, s % bs


@implements("paged_cache_write", "reference")
def paged_cache_write(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, layout: str) -> None:
    """Quantize bf16 ``x [T, D]`` into ``cache`` at ``slots`` (int ``[T]``; -1 and slots outside the cache
    skipped), in place."""
    rows, blk, off = _split(cache, slots)
    if rows.numel() == 0:
        return
    xv = x[rows]
    d = x.shape[1]
    if layout == "bf16":
        cache[blk, off, 0] = xv
    elif layout == "model1_fp8":
        nope, data_bytes, scale_bytes = model1_parts(d)
        y, s = act_quant(xv[:, :nope], NOPE_BLOCK, "ue8m0", F.E8M0_DTYPE)
        data = _region(cache, layout, 0, data_bytes)
        data[blk, off] = torch.cat([y.view(torch.uint8), xv[:, nope:].contiguous().view(torch.uint8)], dim=-1)
        scales = _region(cache, layout, data_bytes, scale_bytes)
        scales[blk, off] = torch.nn.functional.pad(s.view(torch.uint8), (0, scale_bytes - nope // NOPE_BLOCK))
    elif layout == "indexer_fp4":
        scale_bytes = PAGED_LAYOUTS[layout].scale_bytes(d)
        packed, s = fp4_act_quant(xv, FP4_BLOCK)
        _region(cache, layout, 0, d // 2)[blk, off] = packed
        _region(cache, layout, d // 2, scale_bytes)[blk, off] = torch.nn.functional.pad(
            s.view(torch.uint8), (0, scale_bytes - d // FP4_BLOCK))
    elif layout in ("v41_window_fp8", "v41_compressed_fp4"):
        data, scales = v41_regions(cache, layout)
        data[blk, off], scales[blk, off] = v41_quant(layout, xv)
    else:  # indexer_fp8
        y, s = act_quant(xv, d)
        _region(cache, layout, 0, d)[blk, off] = y.view(torch.uint8)
        _region(cache, layout, d, 4)[blk, off] = s.contiguous().view(torch.uint8)


@implements("paged_cache_read", "reference")
def paged_cache_read(cache: torch.Tensor, slots: torch.Tensor, layout: str) -> torch.Tensor:
    """The entries at ``slots`` (int ``[T]``) dequantized: bf16 ``[T, D]``, zeros for -1 and slots outside
    the cache."""
    dim = cache_dim(cache, layout)
    out = torch.zeros(slots.shape[0], dim, dtype=torch.bfloat16, device=cache.device)
    rows, blk, off = _split(cache, slots)
    if rows.numel() == 0:
        return out
    if layout == "bf16":
        vals = cache[blk, off, 0]
    elif layout == "model1_fp8":
        nope, data_bytes, scale_bytes = model1_parts(dim)
        vals = model1_decode(_region(cache, layout, 0, data_bytes)[blk, off],
                             _region(cache, layout, data_bytes, scale_bytes)[blk, off], nope)
    elif layout == "indexer_fp4":
        scale_bytes = PAGED_LAYOUTS[layout].scale_bytes(dim)
        vals = fp4_dequant(_region(cache, layout, 0, dim // 2)[blk, off],
                           _region(cache, layout, dim // 2, scale_bytes)[blk, off]).to(torch.bfloat16)
    elif layout in ("v41_window_fp8", "v41_compressed_fp4"):
        data, scales = v41_regions(cache, layout)
        vals = v41_decode(layout, data[blk, off], scales[blk, off])
    else:  # indexer_fp8
        y = F.fp8_to_float(_region(cache, layout, 0, dim)[blk, off].view(F.FP8_DTYPE))
        s = _region(cache, layout, dim, 4)[blk, off].contiguous().view(torch.float32)
        vals = (y * s).to(torch.bfloat16)
    out[rows] = vals
    return out
