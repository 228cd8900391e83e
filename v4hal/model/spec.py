"""The tensors of a DeepSeek-V4 checkpoint, derived from a `ModelConfig`.

One list drives everything that touches weights: the loader checks a checkpoint against it
(name, shape, accepted dtypes), `write_random_checkpoint` writes exactly these tensors, and
the model takes them. Names are those of the public inference layout:
``layers.{i}.attn.wq_a.weight`` with a sibling
``layers.{i}.attn.wq_a.scale`` when the weight is FP8, routed experts one tensor per expert
(``layers.{i}.ffn.experts.{e}.w1.weight``), MTP layers under ``mtp.{j}.``.

Kinds (what a tensor holds, what it may be stored as, what the model keeps):

===========  =====================================  =================================
kind         accepted checkpoint dtypes             kept by the model as
===========  =====================================  =================================
``f32``      bf16 / fp16 / fp32                     fp32 (norms, mHC, sinks, ape, ...)
``bf16``     bf16 / fp16 / fp32                     bf16 (embed, wo_a, gate, bf16 Linear)
``fp8``      float8_e4m3fn                          fp8, with an ``fp8_scale`` sibling
``fp8_scale`` float8_e8m0fnu / fp32, ``[ceil(N/B), ceil(K/B)]`` (``B = cfg.weight_block_size``: 128, 32 in V4.1)
``fp4``      int8 / uint8 ``[N, K/2]`` or F4 ``[N, K]`` packed e2m1 (uint8 ``[N, K/2]``)
``fp4_scale`` float8_e8m0fnu ``[N, K/b]`` (``b = cfg.expert_block_size``: 32, 16 in V4.1)
``i32``      int32 / int64                          int32 (``tid2eid``)
``table``    float8_e4m3fn                          fp8 (V4.1 Engram table rows)
``table_scale`` float8_e8m0fnu / fp32 ``[R, W/32]``  as stored (one scale per 32 channels of a row)
===========  =====================================  =================================

DeepSeek-V4.1 (``cfg.is_v41``) adds, per layer ``i`` of ``cfg.engram_layers``,
``layers.{i}.engram.embed.weight`` (table) / ``.embed.scale`` (table_scale), ``layers.{i}.engram.wkv``
(FP8 Linear ``[(hc + 1) * dim, (N - 1) * heads * head_dim]``), ``layers.{i}.engram.q_weight`` /
``.k_weight`` (f32 ``[hc, dim]``); per layer the router's image-token bias ``layers.{i}.ffn.gate.bias_vl``
(f32, loaded and unused: text only); no ``hc_head_*`` (V4.1's head collapses the streams with the last
FFN's pre mix) and no MTP layers (V4.1's DSpark draft stages are not read).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig

__all__ = ["TensorSpec", "checkpoint_spec", "linear_kind", "expert_kind", "weight_blocks", "is_engram_table",
           "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
E8M0 = torch.float8_e8m0fnu
FP8 = torch.float8_e4m3fn
FP4_X2 = getattr(torch, "float4_e2m1fn_x2", None)

ACCEPTED: dict[str, tuple[torch.dtype, ...]] = {
    "f32": FLOAT_DTYPES,
    "bf16": FLOAT_DTYPES,
    "fp8": (FP8,),
    "fp8_scale": (E8M0, torch.float32),
    "fp4": tuple(d for d in (torch.int8, torch.uint8, FP4_X2) if d is not None),
    "fp4_scale": (E8M0,),
    "i32": (torch.int32, torch.int64),
    "table": (FP8,),
    "table_scale": (E8M0, torch.float32),
}


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: ``shape`` is the logical shape the model keeps (FP4: packed ``[N, K/2]``)."""

    name: str
    shape: tuple[int, ...]
    kind: str

    @property
    def accepted(self) -> tuple[torch.dtype, ...]:
        return ACCEPTED[self.kind]


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def is_engram_table(name: str) -> bool:
    """Whether ``name`` is a DeepSeek-V4.1 Engram table (``layers.{i}.engram.embed.weight`` / ``.scale``): about
    98 GB each in the release, kept in host memory unless told otherwise (`V4Model`, `read_for_device`)."""
    return name.endswith(".engram.embed.weight") or name.endswith(".engram.embed.scale")


def linear_kind(cfg: ModelConfig) -> str:
    """Kind of the non-expert Linear weights: ``"fp8"`` or ``"bf16"`` (``cfg.dtype``)."""
    return "fp8" if cfg.dtype == "fp8" else "bf16"


def expert_kind(cfg: ModelConfig) -> str:
    """Kind of the routed expert weights: ``cfg.expert_dtype``, else the Linear kind."""
    if cfg.expert_dtype == "fp4":
        return "fp4"
    if cfg.expert_dtype == "fp8":
        return "fp8"
    return linear_kind(cfg)


def _weight(out: dict[str, TensorSpec], name: str, n: int, k: int, kind: str,
            blocks: tuple[int, int] = (128, 32)) -> None:
    """A Linear weight ``[n, k]`` of ``kind`` plus its scale sibling when quantized; ``blocks``: (FP8 weight
    tile, FP4 scale block along K), `weight_blocks` of the config."""
    w = f"{name}.weight"
    if kind == "fp8":
        b = blocks[0]
        out[w] = TensorSpec(w, (n, k), "fp8")
        out[f"{name}.scale"] = TensorSpec(f"{name}.scale", (_ceil(n, b), _ceil(k, b)), "fp8_scale")
    elif kind == "fp4":
        out[w] = TensorSpec(w, (n, k // 2), "fp4")
        out[f"{name}.scale"] = TensorSpec(f"{name}.scale", (n, k // blocks[1]), "fp4_scale")
    else:
        out[w] = TensorSpec(w, (n, k), kind)


def weight_blocks(cfg: ModelConfig) -> tuple[int, int]:
    """(FP8 weight tile, FP4 expert scale block along K) of ``cfg``: (128, 32) in V4, (32, 16) in V4.1."""
    return cfg.weight_block_size, cfg.expert_block_size


def _plain(out: dict[str, TensorSpec], name: str, shape: tuple[int, ...], kind: str) -> None:
    out[name] = TensorSpec(name, tuple(shape), kind)


def _compressor(out: dict[str, TensorSpec], p: str, cfg: ModelConfig, ratio: int, head_dim: int) -> None:
    coff = 2 if ratio == 4 else 1
    _weight(out, f"{p}.wkv", coff * head_dim, cfg.dim, "f32")
    _weight(out, f"{p}.wgate", coff * head_dim, cfg.dim, "f32")
    _plain(out, f"{p}.ape", (ratio, coff * head_dim), "f32")
    _plain(out, f"{p}.norm.weight", (head_dim,), "f32")


def _v41_attention(out: dict[str, TensorSpec], a: str, cfg: ModelConfig, layer_id: int) -> None:
    """DeepSeek-V4.1's compressor (KV sources) and indexer (index sources) under attention prefix ``a``, named as
    the release checkpoint names them: ``compressor.wkv`` / ``compressor.wgate`` (ratio 2 only) ``[head_dim, dim]``
    and ``compressor.norm``; ``indexer.wq_b`` (the Linear kind, FP8), ``indexer.weights_proj`` (bf16) and, at a
    KV source, ``indexer.wk`` ``[index_head_dim, head_dim]`` (bf16) and ``indexer.k_norm``."""
    ratio = cfg.compress_ratios[layer_id]
    if layer_id in cfg.kv_source_layers:
        c = f"{a}.compressor"
        _weight(out, f"{c}.wkv", cfg.head_dim, cfg.dim, "f32")
        if ratio == 2:
            _weight(out, f"{c}.wgate", cfg.head_dim, cfg.dim, "f32")
        _plain(out, f"{c}.norm.weight", (cfg.head_dim,), "f32")
    if layer_id in cfg.index_source_layers:
        i = f"{a}.indexer"
        _weight(out, f"{i}.wq_b", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank, linear_kind(cfg),
                weight_blocks(cfg))
        _weight(out, f"{i}.weights_proj", cfg.index_n_heads, cfg.dim, "bf16")
        if layer_id in cfg.kv_source_layers:
            _weight(out, f"{i}.wk", cfg.index_head_dim, cfg.head_dim, "bf16")
            _plain(out, f"{i}.k_norm.weight", (cfg.index_head_dim,), "f32")


def _block(out: dict[str, TensorSpec], p: str, cfg: ModelConfig, layer_id: int) -> None:
    """Tensors of one block (main layer ``layer_id`` or an MTP layer) under prefix ``p``."""
    lin = linear_kind(cfg)
    wb = weight_blocks(cfg)
    hc, dim = cfg.hc_mult, cfg.dim
    mix = (2 + hc) * hc
    ratio = cfg.compress_ratios[layer_id]
    _plain(out, f"{p}.attn_norm.weight", (dim,), "f32")
    _plain(out, f"{p}.ffn_norm.weight", (dim,), "f32")
    for part in ("attn", "ffn"):
        _plain(out, f"{p}.hc_{part}_fn", (mix, hc * dim), "f32")
        _plain(out, f"{p}.hc_{part}_base", (mix,), "f32")
        _plain(out, f"{p}.hc_{part}_scale", (3,), "f32")
    a = f"{p}.attn"
    _plain(out, f"{a}.attn_sink", (cfg.n_heads,), "f32")
    _weight(out, f"{a}.wq_a", cfg.q_lora_rank, dim, lin, wb)
    _plain(out, f"{a}.q_norm.weight", (cfg.q_lora_rank,), "f32")
    _weight(out, f"{a}.wq_b", cfg.n_heads * cfg.head_dim, cfg.q_lora_rank, lin, wb)
    _weight(out, f"{a}.wkv", cfg.head_dim, dim, lin, wb)
    _plain(out, f"{a}.kv_norm.weight", (cfg.head_dim,), "f32")
    _weight(out, f"{a}.wo_a", cfg.o_groups * cfg.o_lora_rank, cfg.n_heads * cfg.head_dim // cfg.o_groups, "bf16")
    _weight(out, f"{a}.wo_b", dim, cfg.o_groups * cfg.o_lora_rank, lin, wb)
    if cfg.is_v41:
        _v41_attention(out, a, cfg, layer_id)
    elif ratio:
        _compressor(out, f"{a}.compressor", cfg, ratio, cfg.head_dim)
    if ratio == 4 and not cfg.is_v41:
        i = f"{a}.indexer"
        _weight(out, f"{i}.wq_b", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank, lin, wb)
        _weight(out, f"{i}.weights_proj", cfg.index_n_heads, dim, "bf16")
        _compressor(out, f"{i}.compressor", cfg, ratio, cfg.index_head_dim)
    f = f"{p}.ffn"
    _weight(out, f"{f}.gate", cfg.n_routed_experts, dim, "bf16")
    if layer_id < cfg.n_hash_layers:
        _plain(out, f"{f}.gate.tid2eid", (cfg.vocab_size, cfg.n_activated_experts), "i32")
    else:
        _plain(out, f"{f}.gate.bias", (cfg.n_routed_experts,), "f32")
    if cfg.is_v41:
        _plain(out, f"{f}.gate.bias_vl", (cfg.n_routed_experts,), "f32")
    ek = expert_kind(cfg)
    inter = cfg.moe_inter_dim
    for e in range(cfg.n_routed_experts):
        _weight(out, f"{f}.experts.{e}.w1", inter, dim, ek, wb)
        _weight(out, f"{f}.experts.{e}.w2", dim, inter, ek, wb)
        _weight(out, f"{f}.experts.{e}.w3", inter, dim, ek, wb)
    if cfg.n_shared_experts:
        _weight(out, f"{f}.shared_experts.w1", inter, dim, lin, wb)
        _weight(out, f"{f}.shared_experts.w2", dim, inter, lin, wb)
        _weight(out, f"{f}.shared_experts.w3", inter, dim, lin, wb)


def _engram(out: dict[str, TensorSpec], p: str, cfg: ModelConfig, layer_id: int) -> None:
    """V4.1: the Engram memory before layer ``layer_id`` (one of ``cfg.engram_layers``) under ``{p}.engram``."""
    e = f"{p}.engram"
    rows = cfg.engram_num_embeddings[cfg.engram_layers.index(layer_id)]
    width = cfg.engram_head_dim
    _plain(out, f"{e}.embed.weight", (rows, width), "table")
    _plain(out, f"{e}.embed.scale", (rows, width // 32), "table_scale")
    cols = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads
    _weight(out, f"{e}.wkv", (cfg.hc_mult + 1) * cfg.dim, cols * width, linear_kind(cfg), weight_blocks(cfg))
    _plain(out, f"{e}.q_weight", (cfg.hc_mult, cfg.dim), "f32")
    _plain(out, f"{e}.k_weight", (cfg.hc_mult, cfg.dim), "f32")


def _hc_head(out: dict[str, TensorSpec], p: str, cfg: ModelConfig) -> None:
    hc = cfg.hc_mult
    _plain(out, f"{p}hc_head_fn", (hc, hc * cfg.dim), "f32")
    _plain(out, f"{p}hc_head_base", (hc,), "f32")
    _plain(out, f"{p}hc_head_scale", (1,), "f32")


def checkpoint_spec(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of the inference layout for ``cfg``, in a stable order (name -> spec)."""
    out: dict[str, TensorSpec] = {}
    _plain(out, "embed.weight", (cfg.vocab_size, cfg.dim), "bf16")
    for i in range(cfg.n_layers):
        if i in cfg.engram_layers:
            _engram(out, f"layers.{i}", cfg, i)
        _block(out, f"layers.{i}", cfg, i)
    _plain(out, "norm.weight", (cfg.dim,), "f32")
    _plain(out, "head.weight", (cfg.vocab_size, cfg.dim), "f32")
    if not cfg.is_v41:
        _hc_head(out, "", cfg)
    lin = linear_kind(cfg)
    for j in range(cfg.n_mtp_layers):
        p = f"mtp.{j}"
        _block(out, p, cfg, cfg.n_layers + j)
        _weight(out, f"{p}.e_proj", cfg.dim, cfg.dim, lin)
        _weight(out, f"{p}.h_proj", cfg.dim, cfg.dim, lin)
        for norm in ("enorm", "hnorm", "norm"):
            _plain(out, f"{p}.{norm}.weight", (cfg.dim,), "f32")
        _hc_head(out, f"{p}.", cfg)
    return out
