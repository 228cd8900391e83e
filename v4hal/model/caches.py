"""What the model reads and writes per layer: the paged cache tensors of each layer, the interface a cache
pool offers the model, and the private pool `V4Model.forward` keeps for its own sequences.

Per layer (main and MTP), by compress ratio ``r``:

- window cache (``"token"`` pages, attention layout, ``head_dim`` wide), every layer;
- compressed cache (``"c4"`` / ``"c128"`` pages, attention layout), ``r > 0``;
- indexer cache (``"c4"`` pages, indexer layout, ``index_head_dim`` wide), ``r == 4``;
- compressor state, fp32 ``[blocks, state_block_size, 2 * coff * D]`` (``"state4"`` / ``"state128"`` pages:
  the ``kv | score`` projections of each position, ``coff = 2`` for ratio 4 else 1), ``D = head_dim`` for
  the layer's compressor (``r > 0``) and ``index_head_dim`` for the indexer's (``r == 4``).

DeepSeek-V4.1 (``cfg.is_v41``), per layer: the window cache (``"token"`` pages, attention layout:
``v41_window_fp8`` or ``bf16``), every layer; for a KV-source layer of ratio ``r`` (1 or 2) the compressed
cache (``"c{r}"`` pages, `compressed_layout`: ``v41_compressed_fp4`` beside ``v41_window_fp8``, else ``bf16``),
at ratio 2 its compressor state (``"state2"``, fp32 ``[blocks, state_block_size, 2 * head_dim]``: ``kv | gate``),
and when it is an index source too, the indexer keys (``"c{r}"`` pages, indexer layout, ``index_head_dim``).
Consumer layers (ratio > 0, not a source) own only their window: they read their source's caches.

A serving pool (`v4hal.serve.CachePool`) satisfies `CacheSource` and hands its pages to many requests; the
`PrivatePool` gives each of ``B`` sequences consecutive blocks of every kind and grows with them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from v4hal.hal.platform import platform_of
from v4hal.ops.paged import PAGED_LAYOUTS, new_paged_cache

from .batch import (
    FIRST_BLOCK,
    POSITION_KINDS,
    RATIO,
    STATE_BLOCK_SIZE,
    ForwardBatch,
    block_sizes_of,
    history_width,
    kinds_of,
    pages_needed,
)
from .config import ModelConfig
from .layers import act_scale_format

__all__ = ["LayerCaches", "CacheSpec", "CacheSource", "PrivatePool", "layer_specs", "cache_layouts", "kv_scale_fmt",
           "private_layouts", "compressed_layout", "V41_WINDOW_LAYOUTS"]

#: the window-cache layouts of a V4.1 model (both store exactly the FP8-rounded KV the model computes)
V41_WINDOW_LAYOUTS: tuple[str, ...] = ("v41_window_fp8", "bf16")


def compressed_layout(cfg: ModelConfig | bool, attn_layout: str) -> str:
    """The layout of the compressed caches beside window caches of ``attn_layout`` (``cfg``: the config, or
    whether it is V4.1's): V4's share it; V4.1's are ``v41_compressed_fp4`` beside ``v41_window_fp8``
    (FlashMLA's pair), else ``bf16``."""
    if not (cfg if isinstance(cfg, bool) else cfg.is_v41):
        return attn_layout
    return "v41_compressed_fp4" if attn_layout == "v41_window_fp8" else "bf16"


def cache_layouts(device: str | torch.device | None, cfg: ModelConfig | None = None) -> tuple[str, str]:
    """The (attention, indexer) cache layouts a pool on ``device`` for ``cfg`` uses by default: the device's
    preferred ones (`v4hal.hal.platform.Platform.cache_layouts`: ``model1_fp8`` + ``indexer_fp4``, what
    FlashMLA and DeepGEMM read and the Triton kernels decode, on CUDA and the CPU; ``bf16`` for both on Ascend
    NPUs, whose CANN attention and indexer take bf16 paged caches), kept only where they store exactly what
    the model computed (`v4hal.serve.layout_problem`): ``model1_fp8`` only when the model rounds its KV with
    power-of-two scales (`kv_scale_fmt` is ``"ue8m0"``; ``cfg=None``: assumed, as in the published models),
    else ``bf16`` attention caches."""
    attn, idx = platform_of(device).cache_layouts
    if cfg is not None and cfg.is_v41:        # V4.1's FlashMLA formats in place of V4's MODEL1
        return ("v41_window_fp8" if attn == "model1_fp8" else "bf16"), idx
    if attn == "model1_fp8" and cfg is not None and kv_scale_fmt(cfg) != "ue8m0":
        attn = "bf16"
    return attn, idx


def kv_scale_fmt(cfg: ModelConfig) -> str | None:
    """The scale format of the model's FP8 KV round trip (blocks of 64 of the no-rope dims): ``"ue8m0"``
    (power-of-two scales) or None (``amax / 448`` fp32 scales), as `v4hal.model.layers.act_scale_format`
    derives it from ``scale_fmt`` and ``scale_dtype``."""
    return act_scale_format(cfg)[0]


@dataclass
class LayerCaches:
    """The cache tensors of one layer (None where the layer has no such cache)."""

    ratio: int
    window: torch.Tensor | None = None
    compressed: torch.Tensor | None = None
    indexer: torch.Tensor | None = None
    state: torch.Tensor | None = None
    index_state: torch.Tensor | None = None


@dataclass(frozen=True)
class CacheSpec:
    """One cache tensor of one layer: its field in `LayerCaches`, page kind, layout (None: fp32 state)
    and entry width."""

    layer: int
    name: str
    kind: str
    layout: str | None
    dim: int


def layer_specs(cfg: ModelConfig, attn_layout: str, indexer_layout: str) -> list[CacheSpec]:
    """The cache tensors of every layer of ``cfg`` (main then MTP)."""
    if cfg.is_v41:
        return _v41_specs(cfg, attn_layout, indexer_layout)
    out: list[CacheSpec] = []
    for i, r in enumerate(cfg.compress_ratios):
        out.append(CacheSpec(i, "window", "token", attn_layout, cfg.head_dim))
        if r:
            kind = "c4" if r == 4 else "c128"
            coff = 2 if r == 4 else 1
            out.append(CacheSpec(i, "compressed", kind, attn_layout, cfg.head_dim))
            out.append(CacheSpec(i, "state", f"state{r}", None, 2 * coff * cfg.head_dim))
        if r == 4:
            out.append(CacheSpec(i, "indexer", "c4", indexer_layout, cfg.index_head_dim))
            out.append(CacheSpec(i, "index_state", "state4", None, 2 * 2 * cfg.index_head_dim))
    return out


def _v41_specs(cfg: ModelConfig, attn_layout: str, indexer_layout: str) -> list[CacheSpec]:
    """V4.1's cache tensors: every layer's window; compressed KV (+ state at ratio 2, + indexer keys when an
    index source) only at the KV sources."""
    out: list[CacheSpec] = []
    comp = compressed_layout(cfg, attn_layout)
    for i, r in enumerate(cfg.compress_ratios):
        out.append(CacheSpec(i, "window", "token", attn_layout, cfg.head_dim))
        if i not in cfg.kv_source_layers:
            continue
        out.append(CacheSpec(i, "compressed", f"c{r}", comp, cfg.head_dim))
        if r == 2:
            out.append(CacheSpec(i, "state", "state2", None, 2 * cfg.head_dim))
        if i in cfg.index_source_layers:
            out.append(CacheSpec(i, "indexer", f"c{r}", indexer_layout, cfg.index_head_dim))
    return out


def alloc_spec(spec: CacheSpec, blocks: int, block_size: int, device: torch.device) -> torch.Tensor:
    """A zeroed tensor for ``spec``: fp32 ``[blocks, block_size, dim]`` for a state, else a paged cache of its
    layout ``[blocks, block_size, 1, W]``."""
    if spec.layout is None:
        return torch.zeros(blocks, block_size, spec.dim, dtype=torch.float32, device=device)
    return new_paged_cache(blocks, block_size, spec.layout, device=device, dim=spec.dim)


@runtime_checkable
class CacheSource(Protocol):
    """What `V4Model.forward_batch` needs of a cache pool (`v4hal.serve.CachePool` is one): the config it was
    built for, its page sizes, device and layouts, every layer's cache tensors (``layers[i]`` for layer ``i``,
    main then MTP), and the two calls that bracket a step: ``begin_step(batch, op)`` checks a batch against
    the pool and returns what it will write, ``end_step(writes)`` records it once the step has run."""

    cfg: ModelConfig
    block_size: int
    block_sizes: dict[str, int]
    device: torch.device
    allocated: bool
    attn_layout: str
    indexer_layout: str
    layers: Sequence[LayerCaches]

    def begin_step(self, batch: ForwardBatch, op: str) -> list: ...

    def end_step(self, writes: list) -> None: ...


def private_layouts(cfg: ModelConfig, device: torch.device, serving: bool = False) -> tuple[str, str]:
    """The (attention, indexer) layouts of a `PrivatePool` by default: ``bf16`` on the CPU (the reference reads
    it without decoding; it stores the model's values exactly), elsewhere `cache_layouts` of the device (what
    serving and its kernels use), each replaced by ``bf16`` where it cannot hold ``cfg``'s entries
    (``model1_fp8`` keeps 64 bf16 rope dims; a layout's entry widths). ``serving``: the latter on the CPU too
    (what the Triton kernels read, interpreted there)."""
    if device.type == "cpu" and not serving:
        return "bf16", "bf16"
    attn, index = cache_layouts(device, cfg)
    if cfg.is_v41 and PAGED_LAYOUTS[compressed_layout(cfg, attn)].dim_problem(cfg.head_dim):
        attn = "bf16"
    if attn == "model1_fp8" and cfg.rope_head_dim != 64 or PAGED_LAYOUTS[attn].dim_problem(cfg.head_dim):
        attn = "bf16"
    if PAGED_LAYOUTS[index].dim_problem(cfg.index_head_dim):
        index = "bf16"
    return attn, index


class PrivatePool:
    """The caches of the ``B`` sequences `V4Model.forward` computes: every layer's paged caches, sequence ``b``
    holding blocks ``first + b * pages[kind] .. first + (b + 1) * pages[kind] - 1`` of each kind in page order
    (``first`` = 1 for the state kinds, whose block 0 means "not kept"). Layouts ``bf16`` (they store exactly
    what the model computes); pages of ``block_size`` entries, ``STATE_BLOCK_SIZE`` for the state kinds.

    `ensure` sizes the tensors for ``B`` sequences of ``end`` positions: it grows them (doubling the pages per
    sequence, the computed pages copied along) and never shrinks them. Memory: every position of every
    sequence keeps its window row and compressor state (nothing is released behind the window).
    """

    def __init__(self, cfg: ModelConfig, device: torch.device, block_size: int = 64,
                 layouts: tuple[str, str] | None = None) -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.block_size = block_size
        self.attn_layout, self.indexer_layout = layouts or private_layouts(cfg, self.device)
        self.kinds = kinds_of(cfg)
        self.block_sizes = block_sizes_of(self.kinds, block_size, STATE_BLOCK_SIZE)
        self.specs = layer_specs(cfg, self.attn_layout, self.indexer_layout)
        self.layers: list[LayerCaches] = [LayerCaches(r) for r in cfg.compress_ratios]
        self.bsz = 0                # sequences the tensors hold
        self.running = 0            # sequences the model runs (set by the model at each start)
        self.pages: dict[str, int] = {k: 0 for k in self.kinds}
        self.tables: dict[str, torch.Tensor] = {}
        #: the token ids of every position of each sequence (-1 not yet known), kept for the Engram hash's
        #: look-back (`ForwardBatch.history_ids`); None for a config without Engram layers
        self.tokens: torch.Tensor | None = None

    def ensure(self, bsz: int, end: int, keep: bool) -> None:
        """Hold ``bsz`` sequences of positions ``0 .. end-1``; ``keep``: the sequences continue (their pages
        are copied when the tensors grow), else they start anew (nothing is copied)."""
        need = {k: max(1, pages_needed(k, end, self.block_sizes[k])) for k in self.kinds}
        if bsz <= self.bsz and all(need[k] <= self.pages[k] for k in self.kinds):
            return
        if keep:        # grow geometrically: a long decode copies its pages O(log n) times
            pages = {k: self.pages[k] if need[k] <= self.pages[k] else max(need[k], 2 * self.pages[k])
                     for k in self.kinds}
            bsz = max(bsz, self.bsz)
        else:
            pages = {k: max(need[k], self.pages[k]) for k in self.kinds}
        old, old_pages, old_bsz = self.layers, self.pages, self.bsz
        self.layers = [LayerCaches(r) for r in self.cfg.compress_ratios]
        for s in self.specs:
            first = FIRST_BLOCK[s.kind]
            t = alloc_spec(s, first + bsz * pages[s.kind], self.block_sizes[s.kind], self.device)
            src = getattr(old[s.layer], s.name)
            if keep and src is not None and old_bsz:
                n = old_pages[s.kind]
                t[first:].unflatten(0, (bsz, pages[s.kind]))[:old_bsz, :n].copy_(
                    src[first:].unflatten(0, (old_bsz, n)))
            setattr(self.layers[s.layer], s.name, t)
        if history_width(self.cfg):
            tokens = torch.full((bsz, pages["token"] * self.block_size), -1, dtype=torch.int64, device=self.device)
            if keep and self.tokens is not None:
                tokens[:old_bsz, :self.tokens.shape[1]] = self.tokens
            self.tokens = tokens
        self.bsz, self.pages = bsz, pages
        self.tables = {k: (FIRST_BLOCK[k] + torch.arange(bsz * pages[k], dtype=torch.int32, device=self.device)
                           ).view(bsz, pages[k]) for k in self.kinds}

    def batch(self, input_ids: torch.Tensor, start: int) -> ForwardBatch:
        """The step of ``input_ids [b, s]`` (int64, on the pool's device) at positions ``start .. start+s-1`` of
        sequences ``0 .. b-1`` (`ensure` first)."""
        b, s = input_ids.shape
        dev = self.device
        i32 = torch.int32
        offs = torch.arange(s, dtype=i32, device=dev)
        positions = (offs + start).repeat(b)
        req_index = torch.arange(b, dtype=i32, device=dev).repeat_interleave(s)
        cu = torch.arange(0, b * s + 1, s, dtype=i32, device=dev)
        tables = {k: t[:b] for k, t in self.tables.items()}
        bs = self.block_size

        def slot(kind: str, entry: torch.Tensor) -> torch.Tensor:     # consecutive blocks: a linear map
            return req_index * (self.pages[kind] * bs) + entry

        entry_slots = {}
        for k in self.kinds:
            if k not in POSITION_KINDS:
                r = RATIO[k]
                entry_slots[k] = torch.where((positions + 1) % r == 0, slot(k, positions // r), -1).to(i32)
        history = None
        width = history_width(self.cfg)
        if width:
            self.tokens[:b, start:start + s] = input_ids
            back = torch.arange(start - width, start, device=dev)
            history = torch.where(back >= 0, self.tokens[:b, back.clamp_min(0)], -1)
        return ForwardBatch(
            req_ids=tuple(range(b)), block_size=bs, query_lens=(s,) * b, start_positions=(start,) * b,
            input_ids=input_ids.reshape(-1), positions=positions, req_index=req_index, cu_seqlens=cu,
            start_pos=torch.full((b,), start, dtype=i32, device=dev),
            seq_lens=torch.full((b,), start + s, dtype=i32, device=dev), block_tables=tables,
            block_sizes=dict(self.block_sizes), token_slots=slot("token", positions).to(i32),
            entry_slots=entry_slots, last_token_index=cu[1:].long() - 1, history_ids=history)
