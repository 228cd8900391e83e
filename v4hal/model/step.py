"""The step: one forward pass of many requests on paged caches, and what every layer of it shares.

Every request of a `ForwardBatch` sits at its own position; each may bring a prefill chunk (any length, any
start) or one decode token. The tokens are flattened (``T`` rows); everything but attention is per token,
so the blocks run on ``[1, T, ...]``. `Step.build` derives, once per step, what every layer's attention
reads (each token's position and rope row, its window slots, the compressor state tables, the compressed
entries each token sees) from the batch and the caches of a `CacheSource` (a serving pool, or the model's
`PrivatePool`); `Attention.forward` runs one layer on it.

Per-step plans: ``Step.plans`` is the slot where a backend or the graph keeps what it derives once per step
and every layer reuses (what FlashInfer's ``plan()`` returns, DeepGEMM's paged-MQA schedule, FlashMLA's tile
metadata, CANN's actual sequence lengths). `Step.plan` builds an entry on first use and returns the same
object to every later layer of the step; a step never outlives its batch, so nothing goes stale.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import v4hal
from v4hal.hal import dispatch
from v4hal.ops.paged_attention import band_positions, entry_picks

from .batch import ForwardBatch
from .caches import CacheSource, LayerCaches
from .config import ModelConfig

__all__ = ["Step"]


@dataclass
class Step:
    """What every layer of one step shares: the batch, the caches, and per-token tensors on the batch's device.

    ``positions`` int64 ``[T]``; ``req_index`` int64 ``[T]`` (the token's request row in the batch);
    ``token_slots`` int32 ``[T]``; ``state_tables[ratio]`` int32 ``[B, pages]`` (the ``"state4"`` /
    ``"state128"`` pages of the ratio-4 / ratio-128 compressors, V4.1: ``"state2"`` of the ratio-2 ones,
    released pages as block 0, which a pool never hands out); ``c4_context`` int32 ``[T]`` (compressed
    entries visible to each token);
    ``c128_picks`` int32 ``[T, 1, n]`` (every visible ratio-128 entry index, -1 past) or None when no token
    sees one; ``completed[ratio]``: how many compressed entries of that ratio the step's tokens complete
    (from the batch's host copies: a step that completes none skips the entries' round trip and cache
    writes); ``plans``: see `plan`.
    """

    batch: ForwardBatch
    caches: Sequence[LayerCaches]
    attn_layout: str
    indexer_layout: str
    positions: torch.Tensor
    req_index: torch.Tensor
    token_slots: torch.Tensor
    state_tables: dict[int, torch.Tensor]
    c4_context: torch.Tensor | None
    c128_picks: torch.Tensor | None
    completed: dict[int, int] = field(default_factory=dict)
    plans: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: ModelConfig, batch: ForwardBatch, source: CacheSource) -> "Step":
        """The shared tensors of ``batch`` over the caches, page sizes and layouts of ``source``."""
        pos = batch.positions.long()
        req = batch.req_index.long()
        tables = batch.block_tables
        c4_context = ((pos + 1) // 4).to(torch.int32) if "c4" in tables else None
        c128_picks = None
        n128 = batch.max_context_len // 128
        if "c128" in tables and n128:
            j = torch.arange(n128, device=pos.device).unsqueeze(0)
            c128_picks = torch.where(j < ((pos + 1) // 128).unsqueeze(1), j, -1).to(torch.int32).unsqueeze(1)
        return cls(batch=batch, caches=source.layers, attn_layout=source.attn_layout,
                   indexer_layout=source.indexer_layout, positions=pos, req_index=req,
                   token_slots=batch.token_slots,
                   state_tables={r: tables[f"state{r}"].clamp_min(0) for r in (4, 128, 2) if f"state{r}" in tables},
                   c4_context=c4_context, c128_picks=c128_picks,
                   completed={r: sum((s + n) // r - s // r for s, n in zip(batch.start_positions, batch.query_lens))
                              for r in (4, 128, 2, 1)})

    def plan(self, key: str, build: Callable[[], Any]) -> Any:
        """The step's entry ``key`` of `plans`, made by ``build()`` on first use (once per step)."""
        got = self.plans.get(key)
        if got is None:
            got = self.plans[key] = build()
        return got

    def request_rows(self, kind: str) -> torch.Tensor:
        """int32 ``[T, pages]``: each token's request row of the ``kind`` block table, for ops that take one
        table row per query row (``indexer_topk_paged``, the position form of ``sparse_attn_paged``); built once
        per step (`plan`)."""
        return self.plan(f"rows:{kind}", lambda: self.batch.block_tables[kind][self.req_index])

    @property
    def slot_form(self) -> bool:
        """Whether the layers pass ``sparse_attn_paged`` slots made once per step (`window_slots`, `c128_slots`)
        rather than the position form: where the reference backend serves the op on the step's CPU tensors (it
        converts the position form into these very slots in every call); elsewhere the position form, which
        CANN's shared-KV attention takes as it is."""
        def build() -> bool:
            device = self.positions.device.type
            return device == "cpu" and dispatch.serving_backend("sparse_attn_paged", device) == "reference"
        return self.plan("slot_form", build)

    def window_slots(self, window: int) -> torch.Tensor:
        """int32 ``[T, 1, window]``: the window cache slots of each token's band (positions
        ``max(0, p - window + 1) .. p``, then -1), what ``sparse_attn_paged`` makes of its position form
        (``band_positions`` through ``paged_slots``); built once per step (`plan`)."""
        def build() -> torch.Tensor:
            t = self.positions.shape[0]
            band = band_positions(self.positions.view(t, 1), window).view(t, window)
            return v4hal.paged_slots(band, self.batch.block_tables["token"], self.batch.block_sizes["token"],
                                     req_index=self.req_index).view(t, 1, window)
        return self.plan(f"window_slots:{window}", build)

    def c128_slots(self) -> torch.Tensor:
        """int32 ``[T, 1, n]``: the compressed cache slots of `c128_picks` (-1 past a token's visible entries),
        what ``sparse_attn_paged`` makes of them as entry indices with ratio 128; built once per step (`plan`)."""
        def build() -> torch.Tensor:
            t, _, n = self.c128_picks.shape
            picks = entry_picks(self.c128_picks, self.positions.view(t, 1), 128).view(t, n)
            return v4hal.paged_slots(picks, self.batch.block_tables["c128"], self.batch.block_sizes["c128"],
                                     req_index=self.req_index).view(t, 1, n)
        return self.plan("c128_slots", build)
