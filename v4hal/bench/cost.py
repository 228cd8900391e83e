"""Analytic cost model: per-token decode FLOPs and KV-cache bytes versus context length.

Models: DeepSeek-V3.2 (MLA, 128 heads, DSA lightning indexer over every previous token,
``index_topk`` 2048) and DeepSeek-V4 (`v4hal.model.config.ModelConfig`: sliding window +
compressed caches, CSA/HCA layers). ``docs/cost_model.md`` holds the same description with
the numbers it gives.

What "one decode step at context L" means: a single new token whose position is ``L - 1``
(so the attention sees L tokens, the new one included), batch 1, main layers only (the MTP
layers serve speculative decoding and are left out of both models).

FLOPs (per decoded token, 2 FLOPs per multiply-add):
- every Linear: ``2 * in * out`` (dense GEMV; the weight format does not change the count);
- attention: ``2 * d_qk`` per (head, key) for the scores, ``2 * d_v`` per (head, key) for the
  weighted sum, 5 per (head, key) for the softmax (max, subtract, exp, sum, scale).
  V3.2 is counted in its absorbed decode form (scores over 512 latent + 64 rope dims, values
  over the 512 latent dims; the q-side ``W_UK`` and out-side ``W_UV`` absorptions are
  counted as projections); V4 keys and values are the same 512-dim vector;
- lightning indexer: ``2 * H_I * D_I`` per scored entry plus ``3 * H_I`` (ReLU, weight
  multiply-add); V3.2 scores every one of the L tokens, V4 the ``L // 4`` compressed entries;
- MoE: the gate (``2 * dim * E`` plus 4 per expert for the score function), the active routed
  experts and the shared expert (three Linears each, 5 per hidden element for clamped SwiGLU,
  2 per output element for the gate weight);
- elementwise work with a fixed cost per element: RMSNorm 4, rotary 3 per rotated element
  (one complex multiply per pair), Hadamard ``n log2 n`` per vector, residual add 1;
- mHC (V4): per sub-layer the RMS (3 per element of the ``hc*dim`` stream), the mixes
  projection ``2 * (2+hc)*hc * hc*dim``, the Sinkhorn split (``4 * hc^2`` per iteration plus
  ``10 * (2+hc)*hc`` for the sigmoids/softmax), the pre-sum ``2 * hc * dim`` and the post
  ``(2 + 2*hc) * hc * dim``; the head's ``hc_head`` collapse;
- V4 compressors: their two Linears per token (``wkv``, ``wgate``) and the pooling, counted
  once per emitted entry and divided by the ratio (softmax 5 and weighted sum 2 per pooled
  element, then RMSNorm and rotary of the entry, plus the indexer's Hadamard);
- the LM head (``2 * dim * vocab``) and the final norm.
Left out: top-k selection (comparisons, no arithmetic), gathers and scatters, quantization
and dequantization arithmetic, the embedding lookup, rope table construction.

KV-cache bytes (what one sequence of L tokens keeps, per layer, in the stored formats):
- V3.2 attention: 656 B per token (FlashMLA FP8 sparse layout: 512 e4m3 latent + 4 fp32
  scales + 64 bf16 rope dims); indexer keys: 132 B per token (128 e4m3 + one fp32 scale).
- V4 attention entries (window and compressed alike): 584 B (448 e4m3 no-rope dims + 64 bf16
  rope dims + 7 e8m0 scales, one per 64 dims, + 1 pad byte); window: ``min(window, L)``
  entries per layer; compressed: ``L // ratio`` entries; indexer keys (ratio-4 layers):
  68 B per compressed entry (128 e2m1 values packed two per byte + 4 e8m0 scales, one per 32);
  compressor decode state (kv and score of the unfinished block, fp32, as the public code
  keeps them): ``2 * coff*ratio * coff*head_dim * 4`` B per compressor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from v4hal.hal.errors import RangeError
from v4hal.model.config import ModelConfig

__all__ = [
    "V32Config", "Cost", "v32_cost", "v4_cost", "model_cost", "compare", "MODELS",
    "V32_ATTN_BYTES", "V32_INDEX_BYTES", "V4_ATTN_BYTES", "V4_INDEX_BYTES",
    "REPORT_RATIOS", "ONE_M", "report_check", "v4_attn_entry_bytes", "v4_index_entry_bytes",
    "v41_cost", "v41_window_entry_bytes", "v41_compressed_entry_bytes", "V41_WINDOW_BYTES", "V41_COMPRESSED_BYTES",
    "engram_table_bytes",
]

ONE_M = 1 << 20

# Stored bytes per cache entry (see the module docstring).
V32_ATTN_BYTES = 512 + 4 * 4 + 64 * 2          # 656
V32_INDEX_BYTES = 128 + 4                       # 132
V4_INDEX_BYTES = 128 // 2 + 128 // 32           # 68
FP32 = 4

# Per-element costs of the elementwise steps.
RMS_FLOPS = 4
ROPE_FLOPS = 3
SOFTMAX_FLOPS = 5
SWIGLU_FLOPS = 5
GATE_SCORE_FLOPS = 4

# The technical report's figures at 1M tokens: V4 / V3.2.
REPORT_RATIOS: dict[str, dict[str, float]] = {
    "v4-pro": {"flops": 0.27, "kv_bytes": 0.10},
    "v4-flash": {"flops": 0.10, "kv_bytes": 0.07},
}


def v4_attn_entry_bytes(head_dim: int, rope_head_dim: int) -> int:
    """Bytes of one V4 attention cache entry: FP8 no-rope dims, bf16 rope dims, one e8m0 per 64, padded to 8."""
    nope = head_dim - rope_head_dim
    raw = nope + 2 * rope_head_dim + math.ceil(nope / 64)
    return int(math.ceil(raw / 8) * 8)


V4_ATTN_BYTES = v4_attn_entry_bytes(512, 64)    # 584


def v4_index_entry_bytes(index_head_dim: int) -> int:
    """Bytes of one V4 indexer key: packed FP4 values plus one e8m0 scale per 32."""
    return index_head_dim // 2 + math.ceil(index_head_dim / 32)


@dataclass(frozen=True)
class V32Config:
    """DeepSeek-V3.2 shapes (its public ``config.json``)."""

    dim: int = 7168
    n_layers: int = 61
    n_dense_layers: int = 3
    n_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    inter_dim: int = 18432
    moe_inter_dim: int = 2048
    n_routed_experts: int = 256
    n_activated_experts: int = 8
    n_shared_experts: int = 1
    vocab_size: int = 129280
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    attn_entry_bytes: int = V32_ATTN_BYTES
    index_entry_bytes: int = V32_INDEX_BYTES


@dataclass
class Cost:
    """Cost of one decode step at context ``context`` for one model.

    ``flops``: component -> FLOPs for one decoded token (summed over layers).
    ``kv_bytes``: component -> bytes the cache holds for one sequence of ``context`` tokens.
    """

    model: str
    context: int
    flops: dict[str, float] = field(default_factory=dict)
    kv_bytes: dict[str, float] = field(default_factory=dict)
    #: memory that is not KV cache, held in host memory (V4.1's Engram tables), bytes
    host_bytes: dict[str, float] = field(default_factory=dict)
    #: table rows one token gathers (V4.1 Engram), over all layers
    engram_rows_per_token: int = 0

    @property
    def total_flops(self) -> float:
        return float(sum(self.flops.values()))

    @property
    def total_kv_bytes(self) -> float:
        return float(sum(self.kv_bytes.values()))

    @property
    def kv_bytes_per_token(self) -> float:
        """Cache bytes per token of context (total / L)."""
        return self.total_kv_bytes / self.context

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "context": self.context,
            "flops": dict(self.flops), "total_flops": self.total_flops,
            "kv_bytes": dict(self.kv_bytes), "total_kv_bytes": self.total_kv_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "host_bytes": dict(self.host_bytes), "total_host_bytes": float(sum(self.host_bytes.values())),
            "engram_rows_per_token": self.engram_rows_per_token,
        }


def _add(d: dict[str, float], key: str, value: float) -> None:
    d[key] = d.get(key, 0.0) + float(value)


def _linear(n_in: int, n_out: int) -> int:
    return 2 * n_in * n_out


def _hadamard(n: int) -> float:
    return n * math.log2(n)


def _check_context(context: int) -> int:
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise RangeError(f"cost: context must be an int >= 1, got {context!r}")
    return context


def _moe_flops(dim: int, inter: int, n_experts: int, n_active: int, n_shared: int) -> float:
    gate = _linear(dim, n_experts) + GATE_SCORE_FLOPS * n_experts
    per_expert = 3 * _linear(dim, inter) + SWIGLU_FLOPS * inter + 2 * dim
    return gate + (n_active + n_shared) * per_expert


# --------------------------------------------------------------------------- V3.2
def v32_cost(cfg: V32Config, context: int) -> Cost:
    """FLOPs and cache bytes of DeepSeek-V3.2 for one token decoded at context ``context``."""
    L = _check_context(context)
    h, dn, dr, dc, dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
    hi, di = cfg.index_n_heads, cfg.index_head_dim
    flops: dict[str, float] = {}
    kv: dict[str, float] = {}
    nl = cfg.n_layers
    # attention projections: low-rank q, the joint kv latent + rope key, absorptions, output
    attn_proj = (_linear(cfg.dim, cfg.q_lora_rank) + RMS_FLOPS * cfg.q_lora_rank
                 + _linear(cfg.q_lora_rank, h * (dn + dr))
                 + _linear(cfg.dim, dc + dr) + RMS_FLOPS * dc
                 + ROPE_FLOPS * (h * dr + dr)
                 + 2 * h * dn * dc            # q_nope -> latent (W_UK absorbed)
                 + 2 * h * dc * dv            # latent -> v (W_UV absorbed)
                 + _linear(h * dv, cfg.dim))
    _add(flops, "attn_proj", nl * attn_proj)
    # indexer projections: q from the q latent, one key, head weights, rope, Hadamard
    index_proj = (_linear(cfg.q_lora_rank, hi * di) + _linear(cfg.dim, di) + RMS_FLOPS * di
                  + _linear(cfg.dim, hi) + ROPE_FLOPS * (hi + 1) * dr + (hi + 1) * _hadamard(di))
    _add(flops, "indexer_proj", nl * index_proj)
    _add(flops, "indexer_scores", nl * L * (2 * hi * di + 3 * hi))
    n_keys = min(cfg.index_topk, L)
    _add(flops, "attention", nl * n_keys * h * (2 * (dc + dr) + 2 * dc + SOFTMAX_FLOPS))
    # FFN: dense layers then MoE layers
    dense = 3 * _linear(cfg.dim, cfg.inter_dim) + SWIGLU_FLOPS * cfg.inter_dim
    _add(flops, "ffn", cfg.n_dense_layers * dense + (nl - cfg.n_dense_layers) * _moe_flops(
        cfg.dim, cfg.moe_inter_dim, cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_shared_experts))
    _add(flops, "norms_residual", nl * 2 * (RMS_FLOPS * cfg.dim + cfg.dim))
    _add(flops, "head", RMS_FLOPS * cfg.dim + _linear(cfg.dim, cfg.vocab_size))
    _add(kv, "attn_cache", nl * L * cfg.attn_entry_bytes)
    _add(kv, "indexer_cache", nl * L * cfg.index_entry_bytes)
    return Cost("v3.2", L, flops, kv)


# --------------------------------------------------------------------------- V4
def _mhc_sublayer_flops(cfg: ModelConfig) -> float:
    hc, d = cfg.hc_mult, cfg.dim
    mix = (2 + hc) * hc
    pre = 3 * hc * d + _linear(hc * d, mix) + 10 * mix + 4 * hc * hc * cfg.hc_sinkhorn_iters + 2 * hc * d
    post = (2 + 2 * hc) * hc * d
    return pre + post


def _mhc_head_flops(cfg: ModelConfig) -> float:
    hc, d = cfg.hc_mult, cfg.dim
    return 3 * hc * d + _linear(hc * d, hc) + 10 * hc + 2 * hc * d


def _compressor_flops(cfg: ModelConfig, ratio: int, head_dim: int, rotate: bool) -> float:
    """One token's share of a compressor: its two Linears, plus the pooling of one entry / ratio."""
    coff = 2 if ratio == 4 else 1
    proj = 2 * _linear(cfg.dim, coff * head_dim) + coff * head_dim  # wkv, wgate, + ape
    pooled = coff * ratio * head_dim                                  # elements pooled per entry
    entry = ((SOFTMAX_FLOPS + 2) * pooled + RMS_FLOPS * head_dim + ROPE_FLOPS * cfg.rope_head_dim
             + (_hadamard(head_dim) if rotate else 0.0))
    return proj + entry / ratio


def _layer_common(flops: dict[str, float], kv: dict[str, float], cfg: ModelConfig, n_keys: int,
                  window_bytes: float) -> None:
    """What every V4 / V4.1 layer adds whatever its attention kind: attention over ``n_keys`` keys, its window
    cache (``window_bytes``), the MoE, the two mHC sites and the norms / residuals."""
    h, hd = cfg.n_heads, cfg.head_dim
    _add(flops, "attention", n_keys * h * (2 * hd + 2 * hd + SOFTMAX_FLOPS))
    _add(kv, "window_cache", window_bytes)
    _add(flops, "ffn", _moe_flops(cfg.dim, cfg.moe_inter_dim, cfg.n_routed_experts,
                                  cfg.n_activated_experts, cfg.n_shared_experts))
    _add(flops, "mhc", 2 * _mhc_sublayer_flops(cfg))
    _add(flops, "norms_residual", 2 * RMS_FLOPS * cfg.dim)


def v4_cost(cfg: ModelConfig, context: int, name: str = "v4") -> Cost:
    """FLOPs and cache bytes of a DeepSeek-V4 config for one token decoded at context ``context``."""
    L = _check_context(context)
    cfg.validate()
    h, hd, rd = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim
    hi, di = cfg.index_n_heads, cfg.index_head_dim
    attn_entry = v4_attn_entry_bytes(hd, rd)
    index_entry = v4_index_entry_bytes(di)
    flops: dict[str, float] = {}
    kv: dict[str, float] = {}
    window = min(cfg.window_size, L)
    attn_proj = (_linear(cfg.dim, cfg.q_lora_rank) + RMS_FLOPS * cfg.q_lora_rank
                 + _linear(cfg.q_lora_rank, h * hd) + 3 * h * hd       # per-head q RMS rescale
                 + _linear(cfg.dim, hd) + RMS_FLOPS * hd
                 + ROPE_FLOPS * (h * rd + rd)                          # q and kv rope
                 + ROPE_FLOPS * h * rd                                 # inverse rope of the output
                 + 2 * h * hd * cfg.o_lora_rank                        # wo_a: per group (h/g*hd) -> o_lora
                 + _linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim))
    for layer in range(cfg.n_layers):
        ratio = cfg.compress_ratios[layer]
        _add(flops, "attn_proj", attn_proj)
        n_keys = window
        if ratio:
            _add(flops, "compressor", _compressor_flops(cfg, ratio, hd, rotate=False))
            n_comp = L // ratio
            coff = 2 if ratio == 4 else 1
            _add(kv, "compressed_cache", n_comp * attn_entry)
            _add(kv, "compressor_state", 2 * coff * ratio * coff * hd * FP32)
            if ratio == 4:
                _add(flops, "indexer_proj", _linear(cfg.q_lora_rank, hi * di) + _linear(cfg.dim, hi)
                     + ROPE_FLOPS * hi * rd + hi * _hadamard(di)
                     + _compressor_flops(cfg, ratio, di, rotate=True))
                _add(flops, "indexer_scores", n_comp * (2 * hi * di + 3 * hi))
                _add(kv, "indexer_cache", n_comp * index_entry)
                _add(kv, "compressor_state", 2 * coff * ratio * coff * di * FP32)
                n_keys += min(cfg.index_topk, n_comp)
            else:
                n_keys += n_comp
        _layer_common(flops, kv, cfg, n_keys, window * attn_entry)
    _add(flops, "head", _mhc_head_flops(cfg) + RMS_FLOPS * cfg.dim + _linear(cfg.dim, cfg.vocab_size))
    return Cost(name, L, flops, kv)


# --------------------------------------------------------------------------- V4.1
def v41_window_entry_bytes(head_dim: int) -> int:
    """Bytes of one V4.1 window entry: every dim FP8 e4m3 plus one ue8m0 exponent per 32 (528 at 512)."""
    return head_dim + math.ceil(head_dim / 32)


def v41_compressed_entry_bytes(head_dim: int) -> int:
    """Bytes of one V4.1 compressed entry: e2m1 codes two per byte plus one e4m3 scale per 16 (288 at 512)."""
    return head_dim // 2 + math.ceil(head_dim / 16)


V41_WINDOW_BYTES = v41_window_entry_bytes(512)          # 528
V41_COMPRESSED_BYTES = v41_compressed_entry_bytes(512)  # 288


def engram_table_bytes(rows: int, head_dim: int) -> int:
    """Bytes of one Engram table: FP8 rows plus one ue8m0 scale per 32 values."""
    return rows * (head_dim + math.ceil(head_dim / 32))


def _v41_compressor_flops(cfg: ModelConfig, ratio: int) -> float:
    """One token's share of a V4.1 (CSA2) compressor: ``wkv`` (+ ``wgate`` at ratio 2) per token, then per
    emitted entry the gate softmax over the group and the weighted sum (ratio 2), RMSNorm and rotary."""
    hd = cfg.head_dim
    if ratio == 1:
        return _linear(cfg.dim, hd) + RMS_FLOPS * hd + ROPE_FLOPS * cfg.rope_head_dim
    entry = (SOFTMAX_FLOPS + 2) * ratio * hd + RMS_FLOPS * hd + ROPE_FLOPS * cfg.rope_head_dim
    return 2 * _linear(cfg.dim, hd) + entry / ratio


def v41_cost(cfg: ModelConfig, context: int, name: str = "v41") -> Cost:
    """FLOPs and cache bytes of a DeepSeek-V4.1 config for one token decoded at context ``context``.

    Every layer keeps a window of 528 B entries; only KV-source layers own a compressed cache (288 B per entry,
    ``L // ratio`` entries; the layers after a source read it) and, when an index source reads them, the
    indexer keys (68 B per entry at index head dim 128). Index sources score every compressed entry of their
    KV source, except those after the candidate source, which score only inside the candidate blocks
    (``candidate_scores``); every layer with a compressed branch attends its window plus the top-k entries.
    Engram tables are host memory (``host_bytes``), not cache; their ``wkv`` and gate are FLOPs.
    """
    L = _check_context(context)
    cfg.validate()
    if not cfg.is_v41:
        raise RangeError(f"cost: v41_cost needs a config with arch 'v41', got {cfg.arch!r}")
    h, hd, rd = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim
    hi, di = cfg.index_n_heads, cfg.index_head_dim
    win_entry, comp_entry = v41_window_entry_bytes(hd), v41_compressed_entry_bytes(hd)
    index_entry = v4_index_entry_bytes(di)
    flops: dict[str, float] = {}
    kv: dict[str, float] = {}
    window = min(cfg.window_size, L)
    attn_proj = (_linear(cfg.dim, cfg.q_lora_rank) + RMS_FLOPS * cfg.q_lora_rank
                 + _linear(cfg.q_lora_rank, h * hd)                    # no per-head q norm in V4.1
                 + _linear(cfg.dim, hd) + RMS_FLOPS * hd
                 + ROPE_FLOPS * (h * rd + rd) + ROPE_FLOPS * h * rd
                 + 2 * h * hd * cfg.o_lora_rank + _linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim))
    keyed = {cfg.kv_source_of(i) for i in cfg.index_source_layers}      # KV sources whose keys an indexer reads
    candidates = cfg.candidate_topk_blocks * cfg.candidate_block_size
    for layer in range(cfg.n_layers):
        ratio = cfg.compress_ratios[layer]
        _add(flops, "attn_proj", attn_proj)
        n_keys = window
        if ratio:
            n_comp = L // ratio
            if layer in cfg.kv_source_layers:
                _add(flops, "compressor", _v41_compressor_flops(cfg, ratio))
                _add(kv, "compressed_cache", n_comp * comp_entry)
                if ratio > 1:
                    _add(kv, "compressor_state", 2 * ratio * hd * FP32)  # kv + gate logits of an open group
                if layer in keyed:
                    _add(flops, "indexer_keys", (_linear(hd, di) + RMS_FLOPS * di + ROPE_FLOPS * rd) / ratio)
                    _add(kv, "indexer_cache", n_comp * index_entry)
            if layer in cfg.index_source_layers:
                _add(flops, "indexer_proj", _linear(cfg.q_lora_rank, hi * di) + _linear(cfg.dim, hi)
                     + ROPE_FLOPS * hi * rd)
                per_entry = 2 * hi * di + 3 * hi
                if 0 <= cfg.candidate_source_layer < layer:
                    _add(flops, "candidate_scores", min(n_comp, candidates) * per_entry)
                else:
                    _add(flops, "indexer_scores", n_comp * per_entry)
            n_keys += min(cfg.index_topk, n_comp)
        _layer_common(flops, kv, cfg, n_keys, window * win_entry)
    host: dict[str, float] = {}
    rows_per_layer = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads
    for layer, rows in zip(cfg.engram_layers, cfg.engram_num_embeddings):
        width = rows_per_layer * cfg.engram_head_dim
        # wkv: the gathered rows -> one key per stream + a shared value; per stream: the two RMS (3 per element),
        # the weighted dot (3 per element), signed sqrt + sigmoid (5), stream += gate * value (2 per element)
        _add(flops, "engram", _linear(width, cfg.dim * (cfg.hc_mult + 1))
             + cfg.hc_mult * (11 * cfg.dim + SOFTMAX_FLOPS))
        _add(host, "engram_tables", engram_table_bytes(rows, cfg.engram_head_dim))
    _add(flops, "head", 2 * cfg.hc_mult * cfg.dim + RMS_FLOPS * cfg.dim + _linear(cfg.dim, cfg.vocab_size))
    return Cost(name, L, flops, kv, host, rows_per_layer * len(cfg.engram_layers))


# --------------------------------------------------------------------------- front door
MODELS: tuple[str, ...] = ("v3.2", "v4-flash", "v4-pro", "v41-flash")


def model_cost(model: str | ModelConfig | V32Config, context: int) -> Cost:
    """Cost of ``"v3.2"``, a preset (``"v4-flash"``, ``"v4-pro"``, ``"v41-flash"``, the minis) or a config object."""
    if isinstance(model, V32Config):
        return v32_cost(model, context)
    if isinstance(model, ModelConfig):
        return v41_cost(model, context) if model.is_v41 else v4_cost(model, context)
    if model in ("v3.2", "v32", "deepseek-v3.2"):
        return v32_cost(V32Config(), context)
    if model in ModelConfig.PRESET_NAMES:
        cfg = ModelConfig.preset(model)
        return v41_cost(cfg, context, name=model) if cfg.is_v41 else v4_cost(cfg, context, name=model)
    raise RangeError(f"cost: model must be one of {list(MODELS) + ['v4-mini', 'v41-mini']}, got {model!r}")


def compare(context: int, models: Iterable[str] = MODELS, baseline: str = "v3.2") -> dict[str, Any]:
    """Costs of ``models`` at ``context`` and their ratios to ``baseline``.

    Returns ``{"context": L, "costs": {model: Cost.to_dict()}, "ratios": {model: {"flops": r, "kv_bytes": r}}}``.
    """
    costs = {m: model_cost(m, context) for m in models}
    base = costs[baseline] if baseline in costs else model_cost(baseline, context)
    ratios = {m: {"flops": c.total_flops / base.total_flops, "kv_bytes": c.total_kv_bytes / base.total_kv_bytes}
              for m, c in costs.items() if m != baseline}
    return {"context": context, "costs": {m: c.to_dict() for m, c in costs.items()}, "ratios": ratios}


def report_check(ratios: Mapping[str, Mapping[str, float]], tolerance: float = 0.25) -> dict[str, dict[str, Any]]:
    """Each ratio against the technical report's figure: value, target, relative error, within tolerance."""
    out: dict[str, dict[str, Any]] = {}
    for model, targets in REPORT_RATIOS.items():
        if model not in ratios:
            continue
        for kind, target in targets.items():
            got = ratios[model][kind]
            rel = abs(got - target) / target
            out[f"{model}.{kind}"] = {"value": got, "target": target, "rel_err": rel, "ok": rel <= tolerance}
    return out
