"""Cache bytes per token of one request, per preset and cache layout pair: the pool's page accounting next to
the cost model, FlashMLA's entry size and the contiguous caches (the table of ``v4hal cost --pool``), for
DeepSeek-V4 and DeepSeek-V4.1 presets."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from v4hal.bench.report import text_table
from v4hal.model.config import ModelConfig
from v4hal.ops.paged import PAGED_LAYOUTS

from .pool import CachePool
from .sizing import LAYOUT_PAIRS, default_block_size, layout_pair

__all__ = ["FLASHMLA_ENTRY_BYTES", "contiguous_bytes", "memory_rows", "format_memory_table"]

#: bytes of one FlashMLA sparse-decode cache entry at V4's width (448 e4m3 + 64 bf16 + 7 ue8m0 + 1 pad)
FLASHMLA_ENTRY_BYTES = 584


def contiguous_bytes(cfg: ModelConfig, tokens: int) -> int:
    """Cache bytes of one sequence of ``tokens`` in contiguous caches, as the public V4 inference code keeps
    them (sized for ``max_seq_len = tokens``, no pages), every layer (main and MTP): a bf16 ``head_dim`` row
    per window slot and per compressed entry, a bf16 ``index_head_dim`` row per indexer key (ratio 4), and
    the compressors' fp32 state of the unfinished block (``kv`` and ``score``, and the previous block's for
    ratio 4)."""
    total = 0
    for r in cfg.compress_ratios:
        total += 2 * cfg.head_dim * (cfg.window_size + (tokens // r if r else 0))
        if r:
            coff = 2 if r == 4 else 1
            parts = 4 if r == 4 else 2                      # cur kv, score (+ prev kv, score), fp32
            total += parts * 4 * r * coff * cfg.head_dim
        if r == 4:                                          # the indexer's keys and its compressor's state
            total += 2 * cfg.index_head_dim * (tokens // 4)
            total += 4 * 4 * 4 * 2 * cfg.index_head_dim
    return total


def _measured_pool_bytes(cfg: ModelConfig, tokens: int, attn: str, idx: str, block_size: int) -> int:
    """Bytes one ``tokens``-long request holds in an allocated pool, counted from the tensors: each cache's
    ``nbytes`` per page times the pages the request's tables hold once its positions are computed."""
    pool = CachePool(cfg.replace(max_batch_size=1), block_size=block_size, attn_layout=attn, indexer_layout=idx)
    pool.add_request("m", [0] * tokens)
    pool.plan("m", tokens)
    pool.advance("m", tokens)
    held = {k: sum(b >= 0 for b in pool.requests["m"].tables[k]) for k in pool.kinds}
    total = 0
    for s in pool.specs:
        t = getattr(pool.layers[s.layer], s.name)
        total += t.untyped_storage().nbytes() // t.shape[0] * held[s.kind]
    return total


def memory_rows(tokens: int = 1 << 20, presets: Sequence[str] = ("v4-flash", "v4-pro", "v41-flash"), *,
                mini: bool = True, block_size: int | None = None) -> list[dict[str, Any]]:
    """Cache bytes per token of one request, per preset and `LAYOUT_PAIRS` entry: ``pool`` from a `CachePool`
    built without tensors (page-granular: window pages, compressor state per token, compressed and indexer
    entries), ``cost`` from `v4hal.bench.cost` (main layers, what the caches store), ``flashmla`` every
    attention entry at FlashMLA's 584 B (window and compressed, indexer keys at the layout's bytes; V4 only:
    V4.1's pool already stores FlashMLA's 528 / 288-byte entries), and ``contiguous`` from `contiguous_bytes`
    (V4 only). ``mini``: add v4-mini and v41-mini rows at ``min(tokens, max_seq_len)`` whose ``measured``
    figure comes from an allocated pool's tensors. Block size: `default_block_size`. A V4.1 preset's layout
    pairs are `layout_pair`'s (its quantized window caches are ``v41_window_fp8``)."""
    from v4hal.bench.cost import v4_cost, v41_cost

    rows = []
    minis = ["v4-mini", "v41-mini"] if mini else []
    for name in list(presets) + minis:
        cfg = ModelConfig.preset(name)
        n = min(tokens, cfg.max_seq_len) if name in minis else tokens
        cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, n), max_batch_size=1)
        bs = default_block_size(cfg) if block_size is None else block_size
        cost = (v41_cost if cfg.is_v41 else v4_cost)(cfg, n, name)
        for layout in LAYOUT_PAIRS:
            attn, idx = layout_pair(layout, cfg)
            pool = CachePool(cfg, block_size=bs, attn_layout=attn, indexer_layout=idx, allocate=False)
            by_kind = pool.request_bytes(n)
            flashmla = None
            if not cfg.is_v41 and PAGED_LAYOUTS["model1_fp8"].token_bytes(cfg.head_dim) == FLASHMLA_ENTRY_BYTES:
                entries = sum(min(cfg.window_size, n) + (n // r if r else 0) for r in cfg.compress_ratios)
                keys = sum(n // 4 for r in cfg.compress_ratios if r == 4)
                flashmla = (FLASHMLA_ENTRY_BYTES * entries
                            + PAGED_LAYOUTS["indexer_fp4"].token_bytes(cfg.index_head_dim) * keys) / n
            row = {"config": name, "layout": layout, "attn_layout": attn, "indexer_layout": idx, "tokens": n,
                   "block_size": bs, "attn_entry_bytes": PAGED_LAYOUTS[attn].token_bytes(cfg.head_dim),
                   "indexer_entry_bytes": PAGED_LAYOUTS[idx].token_bytes(cfg.index_head_dim),
                   "pool": sum(by_kind.values()) / n, "pool_by_kind": by_kind,
                   "cost": cost.kv_bytes_per_token, "flashmla": flashmla,
                   "contiguous": None if cfg.is_v41 else contiguous_bytes(cfg, n) / n, "measured": None}
            if name in minis:
                row["measured"] = _measured_pool_bytes(cfg, n, attn, idx, bs) / n
            rows.append(row)
    return rows


def format_memory_table(rows: Sequence[dict[str, Any]]) -> str:
    """The screen table of `memory_rows` (bytes per token of one request)."""
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    body = [[r["config"], r["layout"], f"{r['attn_layout']}+{r['indexer_layout']}", str(r["tokens"]),
             f"{r['attn_entry_bytes']}/{r['indexer_entry_bytes']}", f(r["pool"]), f(r["measured"]), f(r["cost"]),
             f(r["flashmla"]), f(r["contiguous"])] for r in rows]
    return text_table(["config", "layout", "caches", "tokens", "entry B (attn/idx)", "pool B/tok", "measured",
                   "v4hal cost", "FlashMLA 584", "contiguous bf16"], body, left=3)
