"""Reference sparse attention over paged caches (FlashMLA's V4 sparse decode semantics), fp32 math.

The picked entries are read and dequantized by slot exactly as :func:`.paged.paged_cache_read` does
(the same byte regions and the same rounding, without its host-syncing row selection), the picks of
both caches are concatenated (window cache first), and the math is that of the reference
:func:`.attention.sparse_attn` over them, operation for operation, plus the log-sum-exp. So this
op over a cache equals ``sparse_attn`` over the same entries laid out contiguously, bit for bit.

Conventions read from FlashMLA's interface docstring and its tests' torch reference of sparse decode
(``tests/ref.py``, ``ref_sparse_attn_decode``): ``topk_length`` is per batch (``[b]``) and masks the
picks at positions ``>= topk_length[b]`` of every query of that batch; the returned lse is the natural
log-sum-exp of the scaled scores of the valid picks, without the sink (the sink only scales the output
by ``exp(lse) / (exp(lse) + exp(sink))``); a query with no valid pick returns 0 and lse ``+inf``.
Inputs arrive validated by :mod:`v4hal.ops.paged_attention`.
"""
from __future__ import annotations

import torch

from v4hal.hal.registry import implements
from v4hal.ops.paged import cache_dim
from v4hal.ops.paged_attention import lse_out, resolve_slots

from . import attention as ref_attention
from .paged import _region, model1_decode, model1_parts, slot_in_cache, v41_decode, v41_regions
from .paged_indexer import paged_slots


def read_entries(cache: torch.Tensor, slots: torch.Tensor, layout: str) -> torch.Tensor:
    """bf16 ``[*slots.shape, D]``: the entries at int ``slots`` dequantized (zeros for -1 and for slots
    outside the cache), the values
    :func:`.paged.paged_cache_read` gives, read without any host sync."""
    flat = slots.reshape(-1).long()
    invalid = ~slot_in_cache(cache, flat)
    s = flat.masked_fill(invalid, 0)
    bs = cache.shape[1]
    blk, off = s // bs, s % bs
    if layout == "bf16":
        vals = cache[blk, off, 0]
    elif layout in ("v41_window_fp8", "v41_compressed_fp4"):
        data, scales = v41_regions(cache, layout)
        vals = v41_decode(layout, data[blk, off], scales[blk, off])
    else:  # model1_fp8
        nope, data_bytes, scale_bytes = model1_parts(cache_dim(cache, layout))
        vals = model1_decode(_region(cache, layout, 0, data_bytes)[blk, off],
                             _region(cache, layout, data_bytes, scale_bytes)[blk, off], nope)
    vals = vals.masked_fill(invalid.unsqueeze(-1), 0)
    return vals.view(*slots.shape, vals.shape[-1])


def effective_indices(indices: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """int64 ``[b, s_q, k]``: ``indices`` with the picks at positions ``>= lengths[b]`` set to -1."""
    idx = indices.long()
    if lengths is None:
        return idx
    k = idx.shape[-1]
    beyond = torch.arange(k, device=idx.device).view(1, 1, k) >= lengths.to(idx.device).long().view(-1, 1, 1)
    return idx.masked_fill(beyond, -1)


def _picks(cache: torch.Tensor, indices: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """int64 ``[b, s_q, k]``: :func:`effective_indices` with every slot outside ``cache`` also -1."""
    idx = effective_indices(indices, lengths)
    return idx.masked_fill(~slot_in_cache(cache, idx), -1)


@implements("sparse_attn_paged", "reference")
def sparse_attn_paged(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
                      softmax_scale: float, topk_length: torch.Tensor | None = None,
                      extra_kv_cache: torch.Tensor | None = None, extra_indices: torch.Tensor | None = None,
                      extra_topk_length: torch.Tensor | None = None, layout: str = "model1_fp8",
                      positions: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                      window_size: int = 0, extra_block_table: torch.Tensor | None = None, extra_ratio: int = 0,
                      return_lse: bool = False, extra_layout: str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """q bf16 ``[b, s_q, h, D]``, the window cache of ``layout`` and the extra one of ``extra_layout``
    (None: ``layout``), both of ``D``-wide entries, int32 slots ``[b, s_q, k]``
    (-1 = none) -> (out bf16 ``[b, s_q, h, D]``, lse fp32 ``[b, h, s_q]``, or ``[0]`` unless
    ``return_lse``). A band window or entry indices (position form) are first turned into slots
    (:func:`v4hal.ops.paged_attention.resolve_slots`), so both forms compute the same thing.

    ``out = sum_j exp(z_j) v_j / (sum_j exp(z_j) + exp(sink))`` and ``lse = log(sum_j exp(z_j))`` over
    the valid picks ``j`` of both caches (slots of their cache below the length),
    ``z_j = softmax_scale * q . v_j``; no valid pick: 0 and +inf. A NaN or +inf score makes the
    (query, head)'s out and lse NaN; a NaN sink its out.
    The math is the reference ``sparse_attn``'s (float64, `attend`), so the output equals it bit for bit on
    the same entries. Memory: the picked entries are dequantized for chunks of query positions sized like
    the reference ``sparse_attn``'s, never for all ``s_q`` at once.
    """
    indices, extra_indices = resolve_slots(kv_cache, indices, extra_kv_cache, extra_indices, positions, block_table,
                                           window_size, extra_block_table, extra_ratio, paged_slots)
    b, m, h, d = q.shape
    scopes = [(kv_cache, layout, _picks(kv_cache, indices, topk_length))]
    if extra_kv_cache is not None and extra_indices is not None:
        scopes.append((extra_kv_cache, extra_layout or layout,
                       _picks(extra_kv_cache, extra_indices, extra_topk_length)))
    k = sum(idx.shape[-1] for _, _, idx in scopes)
    out = torch.zeros(b, m, h, d, dtype=q.dtype, device=q.device)
    lse = torch.full((b, h, m), float("inf"), dtype=torch.float32, device=q.device)
    if k == 0 or out.numel() == 0:
        return out, lse if return_lse else lse_out(q, False)
    step = ref_attention._rows_per_chunk(m, 2 * b * k * d)
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        idx = torch.cat([i[:, lo:hi] for _, _, i in scopes], dim=-1)                 # [b, c, k]
        rows = torch.cat([read_entries(cache, i[:, lo:hi], lay) for cache, lay, i in scopes], dim=2)
        o, chunk_lse = ref_attention.attend(q[:, lo:hi], rows, idx == -1, attn_sink, softmax_scale)
        out[:, lo:hi] = o.to(q.dtype)
        # +inf: a score of +inf (out is NaN there): NaN, so that +inf only ever means "no valid pick"
        chunk_lse = chunk_lse.masked_fill(chunk_lse == float("inf"), float("nan"))
        chunk_lse = chunk_lse.masked_fill(chunk_lse == float("-inf"), float("inf"))
        lse[:, :, lo:hi] = chunk_lse.transpose(1, 2).float()
    return out, lse if return_lse else lse_out(q, False)
