"""The paged lightning indexer on Ascend.

- ``indexer_topk_paged`` -> ``npu_lightning_indexer`` on A2, A3 and 950 for ``indexer_fp4`` and ``bf16``
  caches. ``bf16`` pages (block size a multiple of 16 up to 1024) go in as they are, PA_BSND with the
  request's block table (the columns past a request's keys set to block 0: the op validates the table up to
  its longest request); for ``indexer_fp4`` (or other page sizes) the keys of the pages a request's row names
  are read as bf16 (FP4 keys dequantized: exact, an e2m1 value times a power of two is a bf16 value) and laid
  out as PA_BSND pages of 128 keys with an identity block table. q goes in as TND ``[b * next_n, H, 128]``
  (bf16, as given), weights as given (fp32 or bf16 ``[b * next_n, H]``), the key length of request ``b`` is
  ``context_lens[b]``. One query row per request is ``sparse_mode=0``; ``next_n`` rows are ``sparse_mode=3``
  (right-down causal: row ``i`` sees ``t <= context_lens[b] - next_n + i``, exactly our rule for ``[b]``
  lengths). A single-row request with no key yet (``context_lens[b] == 0``) is given key length 1 and its
  picks are set to -1 afterwards (no key length 0 is ever passed). Falls back to the reference on the NPU
  tensors:

  * ``indexer_fp8``: its keys (e4m3 value times an fp32 scale) are not exact in the bf16/fp16 keys
    ``npu_lightning_indexer`` takes, and ``npu_vllm_quant_lightning_indexer``, which reads e4m3 keys
    with fp32 per-key scales (950), also requires FP8/int8 queries with per-head scales: quantizing our
    bf16 queries would change the logits;
  * keys of a width other than 128 (the cache's entry width, e.g. a V4-shaped config's 64): the CANN
    indexers take head dim 128 only;
  * 950: its ``npu_lightning_indexer`` takes no fp32 weights, and rounding them changes the logits (V4's
    weights are bf16 values: its ``weights_proj`` is a bf16 linear layer scaled in bf16, so the model
    passes them as bf16 and 950 runs natively);
  * ``[b, next_n]`` context lengths with ``next_n > 1`` (the op takes one key length per request), a
    query row of a multi-row request that sees no key, more heads than the chip takes, ``topk > 8192``,
    empty inputs.
- ``indexer_logits_paged``: the CANN indexers return top-k indices, never the logits: reference.
- ``paged_slots``: a gather of the block table (plain tensor ops on the NPU), no CANN op: reference.
"""
from __future__ import annotations

import torch

from v4hal.backends.reference import paged_indexer as ref
from v4hal.hal.registry import implements

from . import limits
from ._route import always_reference, route
from .attention import INDEXER_D, LIGHTNING_INDEXER, _cum_lengths, _pages, _sparse_count
from .limits import always, fallback_when
from .paged_attention import _dense_table

MAX_SPARSE_COUNT = 8192


def _no_key_row(a: limits.Args) -> bool:
    """A query row of a multi-row request sees no key (reads context_lens: one host sync)."""
    lens, n = a["context_lens"], a["q"].shape[1]
    if lens.numel() == 0 or n == 1:
        return False
    return int(lens.min()) < (n if lens.dim() == 1 else 1)


limits.plan("indexer_topk_paged", {c: "npu_lightning_indexer (TND q, bf16 PA_BSND pages as they are, or "
                                      "indexer_fp4 keys dequantized to bf16 pages)" for c in ("A2", "A3", "950")})
INDEXER_TOPK_PAGED_LIMITS = (
    fallback_when("fp32 weights (950's npu_lightning_indexer takes them in q's dtype only; rounding them would "
                  "change the logits; V4's are bf16)", lambda a: a["weights"].dtype == torch.float32, ("950",)),
    fallback_when("indexer heads not in {8, 16, 24, 32, 64}", lambda a: a["q"].shape[2] not in (8, 16, 24, 32, 64),
                  ("950",)),
    fallback_when("indexer_fp8 cache (e4m3 x fp32-scale keys are not exact in bf16; the quantized indexer "
                  "needs quantized queries, ours are bf16)", lambda a: a["layout"] == "indexer_fp8"),
    fallback_when("indexer head dim D != 128", lambda a: a["q"].shape[-1] != INDEXER_D),
    fallback_when("more than 64 indexer heads", lambda a: a["q"].shape[2] > 64, ("A2", "A3")),
    fallback_when("empty input", lambda a: a["q"].shape[0] * a["q"].shape[1] * a["q"].shape[2] == 0),
    fallback_when("topk > 8192 (sparse_count limit)", lambda a: a["topk"] > MAX_SPARSE_COUNT),
    fallback_when("context_lens per query row ([b, next_n], next_n > 1): one key length per request only",
                  lambda a: a["context_lens"].dim() == 2 and a["q"].shape[1] > 1),
    fallback_when("a query row of a multi-row request sees no key (context_lens < next_n)", _no_key_row),
)

limits.plan("indexer_logits_paged", {})
limits.plan("paged_slots", {})


@implements("indexer_logits_paged", "ascend", requires=(
    always("the CANN indexers return top-k indices, not the logits"),))
def indexer_logits_paged(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                         block_table: torch.Tensor, max_context_len: int,
                         layout: str = "indexer_fp4") -> torch.Tensor:
    """Reference logits fp32 ``[b * next_n, max_context_len]`` on the NPU tensors."""
    return always_reference("indexer_logits_paged", ref.indexer_logits_paged, q, kv_cache, weights, context_lens,
                            block_table, max_context_len, layout)


@implements("paged_slots", "ascend", requires=(
    always("a gather of the block table in plain tensor ops; no CANN op needed"),))
def paged_slots(positions: torch.Tensor, block_table: torch.Tensor, block_size: int,
                req_index: torch.Tensor | None = None) -> torch.Tensor:
    """int32 slots like ``positions`` (the reference's tensor ops on the NPU tensors)."""
    return always_reference("paged_slots", ref.paged_slots, positions, block_table, block_size, req_index)


@implements("indexer_topk_paged", "ascend", requires=INDEXER_TOPK_PAGED_LIMITS)
def indexer_topk_paged(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                       block_table: torch.Tensor, topk: int, layout: str = "indexer_fp4",
                       offset: int = 0) -> torch.Tensor:
    """int32 ``[b, next_n, topk]``: the best visible positions (+ offset), -1 padded."""
    args = (q, kv_cache, weights, context_lens, block_table, topk, layout, offset)
    chip, op, why = route("indexer_topk_paged", LIGHTNING_INDEXER, *args)
    if op is None:
        return limits.fallback("indexer_topk_paged", chip, why, ref.indexer_topk_paged, *args)
    b, n, h, d = q.shape
    nb, bs = kv_cache.shape[0], kv_cache.shape[1]
    lens = context_lens.reshape(b).to(torch.int32)
    key_lens = lens.clamp_min(1) if n == 1 else lens                             # a 0-key request: masked below
    if layout == "bf16" and bs % 16 == 0 and 16 <= bs <= 1024:
        k_pages, table = kv_cache, _dense_table(block_table, key_lens, bs)       # the pages as they are
    else:
        mb = block_table.shape[1]
        blocks = block_table.long().clamp(0, nb - 1)                              # unused entries: any block
        keys = torch.empty(b, mb * bs, d, dtype=torch.bfloat16, device=q.device)
        step = max(1, ref._CHUNK_ELEMS // max(1, mb * bs * d))                    # fp32 keys of a few requests
        for r0 in range(0, b, step):
            keys[r0:r0 + step] = ref.dequant_pages(kv_cache, layout, blocks[r0:r0 + step]).flatten(1, 2)
        k_pages, table = _pages(keys, max(mb * bs, 1))
    count = _sparse_count(topk)
    res = op(q.reshape(b * n, h, d).contiguous(), k_pages, weights.reshape(b * n, h).contiguous(),
             actual_seq_lengths_query=_cum_lengths(b, n, q.device),
             actual_seq_lengths_key=key_lens.contiguous(),
             block_table=table, layout_query="TND", layout_key="PA_BSND", sparse_count=count,
             sparse_mode=3 if n > 1 else 0)
    idx = res if isinstance(res, torch.Tensor) else res[0]
    idx = idx.view(b, n, count)[..., :topk]
    seen = (idx >= 0) & (lens > 0).view(b, 1, 1)
    return torch.where(seen, idx + offset, torch.full_like(idx, -1)).to(torch.int32)
