"""Shared helpers of the serving tests: a small config whose widths match the paged layouts (head_dim 512,
index_head_dim 128), a snapshot of a pool's whole bookkeeping state, and a tiny random V4 model."""
from __future__ import annotations

import copy
from pathlib import Path

from v4hal.model import V4Model, write_random_checkpoint
from v4hal.model.config import ModelConfig
from v4hal.serve import CachePool


def small_cfg(ratios: list[int] | None = None, window: int = 8, max_seq_len: int = 1024) -> ModelConfig:
    """Layer widths of the published models, everything else tiny; the last ratio is the MTP layer's."""
    ratios = [0, 4, 128, 4] if ratios is None else ratios
    cfg = ModelConfig(dim=64, n_layers=len(ratios) - 1, n_mtp_layers=1, compress_ratios=list(ratios),
                      head_dim=512, rope_head_dim=64, index_head_dim=128, window_size=window,
                      max_seq_len=max_seq_len, vocab_size=1000, n_heads=2, o_groups=1, q_lora_rank=64,
                      o_lora_rank=64, moe_inter_dim=64, max_batch_size=2, scale_fmt="ue8m0")
    cfg.validate()
    return cfg


def snapshot(pool: CachePool) -> object:
    """Everything a failed call must leave as it was."""
    return copy.deepcopy((
        {k: (a._refs, a._free) for k, a in pool.allocators.items()},
        {rid: vars(st) for rid, st in pool.requests.items()},
        [(e.tokens, e.pages, e.partial) for e in pool.prefix.lru_order()],
        (pool.prefix.hits, pool.prefix.lookups, pool.prefix.tokens_saved),
    ))



def tiny_v4_cfg(scale_fmt: str | None = "ue8m0", scale_dtype: str = "fp8") -> ModelConfig:
    """Two v4-mini layers (ratio 4 with indexer, ratio 128) and the MTP layer (ratio 4), KV rounded with
    ``scale_fmt`` / ``scale_dtype``: the smallest config whose model exercises every page kind."""
    return ModelConfig.preset("v4-mini").replace(n_layers=2, compress_ratios=[4, 128, 4], max_seq_len=256,
                                                 scale_fmt=scale_fmt, scale_dtype=scale_dtype)


def random_model(cfg: ModelConfig, path: Path, seed: int = 3) -> V4Model:
    """A V4Model of ``cfg`` with seeded random weights (a checkpoint written to ``path``)."""
    return V4Model.from_pretrained(write_random_checkpoint(cfg, path, seed=seed))
