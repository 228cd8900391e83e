"""Seeded random DeepSeek-V4 checkpoints: `write_random_checkpoint` writes one in either layout that
`v4hal.model.checkpoint` reads (inference ``model{rank}-mp{world}.safetensors`` or Hugging Face shards; bf16,
FP8 or FP4 experts), with weight scales that keep activations in a sane range; `random_tensors` yields its
tensors and `save_tensors` writes given ones."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

import v4hal
from v4hal.hal.errors import RangeError

from .checkpoint import is_routed_expert, shard_dim, to_transformers_name
from .config import HF_KEY_MAP, ModelConfig
from .hf_config import transformers_config
from .spec import FP4_X2, TensorSpec, checkpoint_spec, weight_blocks
from .tokenizer import write_tokenizer

__all__ = ["write_random_checkpoint", "random_tensors", "save_tensors", "LAYOUTS"]

#: checkpoint layouts `save_tensors` writes
LAYOUTS = ("inference", "hf", "transformers", "hub")


def _init(name: str, s: TensorSpec, cfg: ModelConfig, g: torch.Generator) -> torch.Tensor:
    """fp32 master values for ``name`` (the logical, unquantized shape)."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    shape = s.shape
    if s.kind == "fp4":
        shape = shape[:-1] + (shape[-1] * 2,)
    leaf = name.split(".")[-1]
    if name.endswith("tid2eid"):
        return torch.rand(shape[0], cfg.n_routed_experts, generator=g).argsort(dim=-1)[:, :shape[1]].to(torch.int32)
    if name.endswith("norm.weight"):
        return 1.0 + 0.05 * randn(*shape)
    if leaf.endswith("_fn"):                                       # mHC projections
        return randn(*shape) * (0.5 / math.sqrt(shape[1]))
    if leaf.endswith("_scale") and leaf.startswith("hc_"):
        return 0.5 + torch.rand(*shape, generator=g)
    if leaf.endswith("_base"):
        return 0.3 * randn(*shape)
    if leaf == "attn_sink":
        return 0.5 * randn(*shape)
    if leaf == "ape":
        return 0.5 * randn(*shape)
    if leaf in ("bias", "bias_vl"):
        return 0.1 * randn(*shape)
    if name == "embed.weight" or s.kind == "table":
        return randn(*shape)
    if leaf in ("q_weight", "k_weight"):                           # V4.1 Engram gate weights
        return 1.0 + 0.1 * randn(*shape)
    return randn(*shape) / math.sqrt(shape[1])                    # Linear weights [N, K]


def _table_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An Engram table ``w [R, W]`` as FP8 rows with one power-of-two e8m0 scale per 32 channels."""
    blocks = w.view(w.shape[0], -1, 32)
    amax = blocks.abs().amax(-1).clamp_min(1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    q = (blocks / scale.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn).view_as(w)
    return q, scale.to(torch.float8_e8m0fnu)


def random_tensors(cfg: ModelConfig, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Seeded random weights for ``cfg`` in the inference layout, quantized as the config says.

    FP8 weights come from ``v4hal.quant_weight_fp8`` (e8m0 scales), FP4 experts from
    ``v4hal.quant_weight_fp4``; a weight and its ``.scale`` are yielded one after the other.
    """
    g = torch.Generator().manual_seed(int(seed))
    spec = checkpoint_spec(cfg)
    tile, fp4_block = weight_blocks(cfg)
    for name, s in spec.items():
        if s.kind in ("fp8_scale", "fp4_scale", "table_scale"):
            continue                           # produced with their weight
        w = _init(name, s, cfg, g)
        if s.kind == "fp8":
            q, sc = v4hal.quant_weight_fp8(w, tile, "ue8m0")
            yield name, q
            yield name[:-len("weight")] + "scale", sc
        elif s.kind == "fp4":
            q, sc = v4hal.quant_weight_fp4(w, fp4_block)
            yield name, q
            yield name[:-len("weight")] + "scale", sc
        elif s.kind == "table":
            q, sc = _table_fp8(w)
            yield name, q
            yield name[:-len("weight")] + "scale", sc
        elif s.kind == "bf16" and cfg.dtype == "fp8" and name.endswith("attn.wo_a.weight"):
            # published checkpoints hold wo_a in FP8 (the public converter dequantizes it to bf16):
            # draw it on the FP8 grid, so that the Hugging Face layout (FP8) and this one agree exactly
            q, sc = v4hal.quant_weight_fp8(w, tile, "ue8m0")
            yield name, v4hal.dequant_fp8(q, sc, tile, out_dtype=torch.bfloat16)
        elif s.kind == "bf16":
            yield name, w.to(torch.bfloat16)
        elif s.kind == "i32":
            yield name, w
        else:
            # fp32 in the model; stored bf16 where the public checkpoints store bf16 (norms, compressor)
            yield name, w


def _hf_config(cfg: ModelConfig) -> dict[str, Any]:
    inv = {v: k for k, v in HF_KEY_MAP.items()}
    out: dict[str, Any] = {"model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"]}
    for k, v in cfg.to_dict().items():
        if k in ("rope_factor", "original_seq_len", "beta_fast", "beta_slow", "dtype", "scale_fmt",
                 "scale_dtype", "expert_dtype"):
            continue
        out[inv.get(k, k)] = v
    out["rope_scaling"] = {"type": "yarn", "factor": cfg.rope_factor,
                           "original_max_position_embeddings": cfg.original_seq_len,
                           "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow}
    if cfg.dtype == "fp8":
        q: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                             "scale_dtype": cfg.scale_dtype}
        if cfg.scale_fmt is not None:
            q["scale_fmt"] = cfg.scale_fmt
        if cfg.expert_dtype is not None:
            q["expert_dtype"] = cfg.expert_dtype
        out["quantization_config"] = q
    return out


def save_tensors(cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
                 path: str | os.PathLike[str], layout: str = "inference", world: int = 1, shards: int = 1,
                 fp4_storage: str = "F4") -> Path:
    """Write inference-layout tensors as a checkpoint directory.

    ``layout="inference"``: ``config.json`` (inference keys) + ``model{r}-mp{world}.safetensors``
    split like the public converter. ``layout="hf"``: ``config.json`` (HF keys) +
    ``shards`` files with ``model.safetensors.index.json``; ``wo_a`` stored FP8 with a scale
    (FP8 configs), FP4 experts as ``I8``, MTP copies of embed/head included.
    ``layout="transformers"``: what transformers' ``save_pretrained`` writes (``DeepseekV4ForCausalLM`` of
    transformers 5.23 / ``DeepseekV41ForCausalLM``): its ``config.json``, its tensor names
    (`checkpoint.to_transformers_name`), float tensors bf16 (V4.1: mHC, sinks, gate biases fp32), no V4 MTP
    layers, ``wo_a`` FP8 with its scale (FP8 configs); ``shards`` files with an index. ``layout="hub"`` (V4.1
    only): the release layout, hub names (the inference names), ``wo_a`` FP8, the composite ``config.json``.
    ``fp4_storage``: ``"F4"`` (float4_e2m1fn_x2, the public converter's output) or ``"I8"``.
    """
    if layout not in LAYOUTS:
        raise RangeError(f"save_tensors: layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if world < 1 or shards < 1:
        raise RangeError(f"save_tensors: world and shards must be >= 1, got {world}, {shards}")
    if fp4_storage not in ("F4", "I8"):
        raise RangeError(f"save_tensors: fp4_storage must be 'F4' or 'I8', got {fp4_storage!r}")
    out_dir = Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = list(tensors.items() if isinstance(tensors, dict) else tensors)
    spec = checkpoint_spec(cfg)

    def fp4_view(name: str, t: torch.Tensor, storage: str) -> torch.Tensor:
        if name in spec and spec[name].kind == "fp4":
            if storage == "F4" and FP4_X2 is not None:
                return t.view(FP4_X2)
            return t.view(torch.int8)
        return t

    if layout == "inference":
        with open(out_dir / "config.json", "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
        n_local = cfg.n_routed_experts // world
        if cfg.n_routed_experts % world:
            raise RangeError(f"save_tensors: n_routed_experts={cfg.n_routed_experts} must divide by world={world}")
        for name, t in items:
            t = fp4_view(name, t, fp4_storage)
            if is_routed_expert(name):
                e = int(name.split(".")[name.split(".").index("experts") + 1])
                per_rank[e // n_local][name] = t.contiguous()
                continue
            d = shard_dim(name) if world > 1 else None
            for r in range(world):
                if d is None:
                    per_rank[r][name] = t.contiguous() if r == 0 else t.contiguous().clone()
                else:
                    if t.shape[d] % world:
                        raise RangeError(f"save_tensors: {name} dim {d} ({t.shape[d]}) must divide by world={world}")
                    if spec.get(name) is not None and spec[name].kind == "fp8" and (t.shape[d] // world) % 128:
                        raise RangeError(f"save_tensors: {name} dim {d} ({t.shape[d]}) split over world={world} "
                                         f"breaks its 128x128 FP8 scale blocks")
                    step = t.shape[d] // world
                    per_rank[r][name] = t.narrow(d, r * step, step).contiguous()
        for r in range(world):
            save_file(per_rank[r], str(out_dir / f"model{r}-mp{world}.safetensors"))
        return out_dir

    if layout in ("transformers", "hub"):
        if layout == "hub" and not cfg.is_v41:
            raise RangeError("save_tensors: layout 'hub' is DeepSeek-V4.1's release layout; use 'hf' for a V4 config")
        with open(out_dir / "config.json", "w", encoding="utf-8") as f:
            json.dump(transformers_config(cfg), f, indent=2)
        out: list[tuple[str, torch.Tensor]] = []
        for name, t in items:
            t = fp4_view(name, t, fp4_storage if layout == "hub" else "I8")
            pairs = [(name, t)]
            if name.endswith("attn.wo_a.weight") and cfg.dtype == "fp8":    # stored FP8, dequantized at load
                q, sc = v4hal.quant_weight_fp8(t.float(), cfg.weight_block_size, "ue8m0")
                pairs = [(name, q), (name[:-len("weight")] + "scale", sc)]
            for n, v in pairs:
                if layout == "hub":
                    out.append((n, v))
                elif cfg.is_v41 or not n.startswith("mtp."):       # transformers builds no V4 MTP layers
                    out.append((to_transformers_name(n, cfg.is_v41), _transformers_dtype(n, v, cfg.is_v41)))
        _write_shards(out_dir, out, shards)
        return out_dir

    with open(out_dir / "config.json", "w", encoding="utf-8") as f:
        json.dump(_hf_config(cfg), f, indent=2)
    hf: list[tuple[str, torch.Tensor]] = []
    for name, t in items:
        t = fp4_view(name, t, "I8")
        if name.endswith("attn.wo_a.weight") and cfg.dtype == "fp8":
            q, sc = v4hal.quant_weight_fp8(t.float(), cfg.weight_block_size, "ue8m0")
            hf += [(name, q), (name[:-len("weight")] + "scale", sc)]
            continue
        hf.append((name, t))
    embed = dict(items).get("embed.weight")
    head = dict(items).get("head.weight")
    for j in range(cfg.n_mtp_layers):
        if embed is not None:
            hf.append((f"mtp.{j}.embed.weight", embed.clone()))
        if head is not None:
            hf.append((f"mtp.{j}.head.weight", head.to(torch.bfloat16)))
    _write_shards(out_dir, hf, shards)
    return out_dir


# V4.1 tensors transformers keeps in fp32 (``_keep_in_fp32_modules_strict``): mHC, sinks, gate biases
_V41_FP32 = re.compile(r"(\.hc_(attn|ffn)_(fn|base|scale)|\.attn_sink|\.gate\.bias(_vl)?)$")


def _transformers_dtype(name: str, t: torch.Tensor, v41: bool) -> torch.Tensor:
    """The dtype ``save_pretrained`` of a bf16 model gives a tensor: every float tensor bf16 (V4.1 keeps its mHC,
    sink and gate-bias tensors fp32), ``tid2eid`` int64; FP8 / FP4 tensors as they are."""
    if name.endswith("tid2eid"):
        return t.to(torch.int64)
    if not t.is_floating_point() or t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu) or t.element_size() < 2:
        return t
    if v41 and _V41_FP32.search(name):
        return t.to(torch.float32)
    return t.to(torch.bfloat16)


def _write_shards(out_dir: Path, tensors: list[tuple[str, torch.Tensor]], shards: int) -> None:
    """``tensors`` in ``shards`` files ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``."""
    n = min(shards, len(tensors))
    per = math.ceil(len(tensors) / n)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(n):
        chunk = tensors[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in chunk}, str(out_dir / fname))
        for k, v in chunk:
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    with open(out_dir / "model.safetensors.index.json", "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_random_checkpoint(config: ModelConfig, path: str | os.PathLike[str], seed: int = 0,
                            dtype: str | None = None, expert_dtype: str | None = "config",
                            layout: str = "inference", world: int = 1, shards: int = 1,
                            fp4_storage: str = "F4") -> Path:
    """Write a seeded random V4 checkpoint for ``config`` into the directory ``path``.

    Args:
        config: the model shape (e.g. ``ModelConfig.preset("v4-mini")``).
        seed: the weights are a pure function of (config, seed).
        dtype: ``"bf16"`` or ``"fp8"`` for the non-expert Linear weights (default: the config's).
        expert_dtype: ``"fp4"``, ``"fp8"`` or None for the routed experts (default: the config's
            when ``dtype`` is fp8, None (= dtype) for bf16).
        layout, world, shards, fp4_storage: see `save_tensors`.

    Returns the directory. The written ``config.json`` records the dtypes actually used. A DeepSeek-V4.1
    config with Engram layers also gets a tiny ``tokenizer.json`` (`v4hal.model.tokenizer.write_tokenizer`)
    whose vocabulary map has ``engram_compressed_vocab_size`` ids.
    """
    changes: dict[str, Any] = {}
    if dtype is not None:
        if dtype not in ("bf16", "fp8"):
            raise RangeError(f"write_random_checkpoint: dtype must be 'bf16' or 'fp8', got {dtype!r}")
        changes["dtype"] = dtype
    final_dtype = changes.get("dtype", config.dtype)
    if expert_dtype == "config":
        changes["expert_dtype"] = config.expert_dtype if final_dtype == "fp8" else None
    else:
        changes["expert_dtype"] = expert_dtype
    cfg = config.replace(**changes)
    out = save_tensors(cfg, random_tensors(cfg, seed), path, layout=layout, world=world, shards=shards,
                       fp4_storage=fp4_storage)
    if cfg.is_v41 and cfg.engram_layers:
        write_tokenizer(cfg, out)
    return out
