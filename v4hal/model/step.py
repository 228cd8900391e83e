"""One forward step of many requests on paged caches: the attention of a V4 layer over a `ForwardBatch`.

Every request of the batch sits at its own position; each may bring a prefill chunk (any length, any
start) or one decode token. The tokens are flattened (``T`` rows); everything but attention is per token,
so the blocks run on ``[1, T, ...]`` as they do on one sequence. Attention per layer, on the paged ops:

1. q, kv as in `Attention.forward` with rope at each token's own position; kv gets V4's FP8 round trip
   and is written to the window cache at the token's slot (``paged_cache_write``);
2. the compressor (``compressor_ragged``: projections, state kept per token position in the pool's
   ``"state4"`` / ``"state128"`` pages, pooling, norm, rope) emits the entries this step completes; they
   get V4's round trip (FP8, or Hadamard + FP4 for indexer keys) and are written to the compressed /
   indexer caches;
3. picks per token: the window (its last ``window`` positions), and for ratio 4 the indexer's top-k
   (``indexer_topk_paged`` over the FP4 keys of the entries visible at that position), for ratio 128
   every visible entry; logical positions become slots with ``paged_slots``;
4. ``sparse_attn_paged`` over the window cache plus the compressed cache (one softmax with the sink).

Writes happen before reads within a layer, so a token sees the window rows and entries that earlier
tokens of its own chunk produced, and never a later one (visibility is by position). Because V4 rounds
the KV to FP8 (64-blocks, ue8m0) and the indexer keys to FP4 before storing them, a ``model1_fp8`` /
``indexer_fp4`` cache stores exactly the values a ``bf16`` cache would.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import v4hal

from .attention import Attention, _fp8_kv_roundtrip, _rope_tail
from .layers import float_gemm

__all__ = ["PagedStep", "attention_step"]


@dataclass
class PagedStep:
    """What every layer of one step shares: the batch's per-token tensors on the model's device.

    ``positions`` int64 ``[T]``; ``token_slots`` int32 ``[T]``; ``window_slots`` int32
    ``[T, 1, window]`` (-1 before position 0 and past the token); ``tables[kind]`` int32 ``[T, pages]`` (the
    token's request row); ``state_tables[ratio]`` int32 ``[B, pages]`` (the ``"state4"`` / ``"state128"``
    pages of the ratio-4 / ratio-128 compressors, released pages as block 0, which the pool never hands
    out); ``c4_context`` int32 ``[T]`` (entries visible to each token);
    ``c128_slots`` int32 ``[T, 1, n]`` (every visible ratio-128 entry, -1 past) or None when no token sees one.
    """

    batch: object
    caches: list
    attn_layout: str
    indexer_layout: str
    positions: torch.Tensor
    token_slots: torch.Tensor
    window_slots: torch.Tensor
    tables: dict[str, torch.Tensor]
    state_tables: dict[int, torch.Tensor]
    c4_context: torch.Tensor | None
    c128_slots: torch.Tensor | None

    @classmethod
    def build(cls, cfg, batch, pool) -> "PagedStep":
        """The shared tensors of ``batch`` (a `v4hal.serve.ForwardBatch`) over ``pool`` (a `CachePool`)."""
        bs = batch.block_size
        pos = batch.positions.long()
        req = batch.req_index.long()
        tables = {k: t[req] for k, t in batch.block_tables.items()}
        win = cfg.window_size
        first = pos - (pos.clamp(max=win - 1))                       # window start: max(0, p - win + 1)
        wpos = first.unsqueeze(1) + torch.arange(win, device=pos.device)
        wpos = torch.where(wpos <= pos.unsqueeze(1), wpos, -1).to(torch.int32)
        window_slots = v4hal.paged_slots(wpos, tables["token"], bs).unsqueeze(1)
        c4_context = ((pos + 1) // 4).to(torch.int32) if "c4" in tables else None
        c128_slots = None
        n128 = batch.max_context_len // 128
        if "c128" in tables and n128:
            j = torch.arange(n128, device=pos.device).unsqueeze(0)
            picks = torch.where(j < ((pos + 1) // 128).unsqueeze(1), j, -1).to(torch.int32)
            c128_slots = v4hal.paged_slots(picks, tables["c128"], bs).unsqueeze(1)
        return cls(batch=batch, caches=pool.layers, attn_layout=pool.attn_layout,
                   indexer_layout=pool.indexer_layout, positions=pos,
                   token_slots=batch.token_slots, window_slots=window_slots, tables=tables,
                   state_tables={r: batch.block_tables[f"state{r}"].clamp_min(0) for r in (4, 128)
                                 if f"state{r}" in batch.block_tables}, c4_context=c4_context,
                   c128_slots=c128_slots)


def _compress(comp, x2: torch.Tensor, step: PagedStep, state: torch.Tensor, eps: float,
              freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries ``x2 [T, dim]`` completes for one `Compressor` (normed, roped, V4's round trip applied),
    with their request rows and entry indices (-1 for unused rows)."""
    b = step.batch
    entries, req, epos = v4hal.compressor_ragged(
        x2, comp.wkv.weight, comp.wgate.weight, comp.ape, comp.norm.weight, freqs_cis, state,
        step.state_tables[comp.ratio], b.cu_seqlens, b.start_pos, comp.ratio, eps)
    if comp.rotate:
        entries = v4hal.hadamard_transform(entries)
        v4hal.fp4_act_quant(entries, 32, inplace=True)
    else:
        entries = _fp8_kv_roundtrip(entries, comp.rd, comp.scale_fmt)
    return entries, req, epos


def _write_entries(cache: torch.Tensor, layout: str, entries: torch.Tensor, req: torch.Tensor, epos: torch.Tensor,
                   table: torch.Tensor, block_size: int) -> None:
    """Write compressed ``entries [N, D]`` of batch rows ``req`` at entry indices ``epos`` (-1: unused row)."""
    rows = table[req.long().clamp_min(0)]
    slots = v4hal.paged_slots(epos.unsqueeze(1), rows, block_size).squeeze(1)
    v4hal.paged_cache_write(cache, entries.contiguous(), slots, layout)


def _index_weights(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """The indexer's head weights of ``x [1, T, dim]`` (bf16) as the contiguous path makes them: when the
    layer fused its projections of x, the fp32 GEMM of the widened bf16 weights rounded to bf16 (only the
    weights' rows are multiplied here: the compressor projects inside ``compressor_ragged``), else the
    bf16 projection."""
    wp = attn.indexer.weights_proj
    if attn.comp_proj is None:
        return wp(x)
    return float_gemm(x.float(), wp.weight.float()).to(torch.bfloat16)


def attention_step(attn: Attention, x: torch.Tensor, step: PagedStep) -> torch.Tensor:
    """``attn`` (layer ``attn.layer_id``) over the step's tokens: x ``[1, T, dim]`` bf16 (normed) -> ``[1, T, dim]``."""
    caches = step.caches[attn.layer_id]
    bs = step.batch.block_size
    t = x.shape[1]
    rd, ratio = attn.rd, attn.ratio
    freqs = attn.freqs_cis[step.positions]                                 # [T, rd/2]: each token's position
    qr, iq, q, kv = attn.project(x, freqs)
    v4hal.paged_cache_write(caches.window, kv[0].contiguous(), step.token_slots, step.attn_layout)

    extra = extra_idx = None
    if ratio:
        x2 = x[0]
        entries, req, epos = _compress(attn.compressor, x2, step, caches.state, attn.eps, attn.freqs_cis)
        kind = "c4" if ratio == 4 else "c128"
        _write_entries(caches.compressed, step.attn_layout, entries, req, epos, step.batch.block_tables[kind], bs)
        extra = caches.compressed
        if ratio == 4:
            ind = attn.indexer
            ientries, ireq, iepos = _compress(ind.compressor, x2, step, caches.index_state, attn.eps,
                                              attn.freqs_cis)
            _write_entries(caches.indexer, step.indexer_layout, ientries, ireq, iepos,
                           step.batch.block_tables["c4"], bs)
            iq = ind.queries(qr, freqs, iq)
            weights = (_index_weights(attn, x) * ind.weight_scale).float()
            picks = v4hal.indexer_topk_paged(iq.view(t, 1, ind.n_heads, ind.head_dim), caches.indexer,
                                             weights.view(t, ind.n_heads), step.c4_context, step.tables["c4"],
                                             ind.topk, layout=step.indexer_layout)
            extra_idx = v4hal.paged_slots(picks, step.tables["c4"], bs)
        elif step.c128_slots is not None:
            extra_idx = step.c128_slots
        else:
            extra = None
    o, _ = v4hal.sparse_attn_paged(q.view(t, 1, attn.n_heads, attn.head_dim), caches.window, step.window_slots,
                                   attn.attn_sink, attn.softmax_scale, extra_kv_cache=extra,
                                   extra_indices=extra_idx, layout=step.attn_layout)
    o = _rope_tail(o.view(1, t, attn.n_heads, attn.head_dim), freqs, rd, inverse=True)
    return attn.wo_b(attn._grouped_out(o))
