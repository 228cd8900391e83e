"""Hugging Face ``config.json`` shapes that `ModelConfig.from_dict` reads, and the ones the random writer writes.

Read:

* DeepSeek-V4.1 as published: the composite ``DeepseekV41Config`` (``model_type: "deepseek_v41"``, the text
  backbone under ``text_config``, ``vision_config`` and ``image_token_id`` beside it, ``quantization_config``
  at the top) or a flat ``deepseek_v41_text`` config. `unwrap` turns either into one flat dict of text keys.
  Keys missing from a V4.1 config take the defaults of Hugging Face's ``DeepseekV41TextConfig``
  (`V41_HF_DEFAULTS`); the layer schedule (KV / index / candidate sources) is derived from
  ``compress_ratios`` the way that class derives it (`v41_schedule`).
* DeepSeek-V4 as transformers 5.23 writes it (``DeepseekV4Config``): the schedule lives in ``layer_types`` +
  ``compress_rates`` and ``mlp_layer_types`` (`v4_schedule`); ``"dtype": "bfloat16"`` there is the torch dtype
  of the saved tensors, not v4hal's ``dtype``.

Written (`transformers_config`): the same two shapes, so that the ``layout="transformers"`` checkpoints of
`v4hal.model.random_checkpoint` look like what ``save_pretrained`` writes.
"""
from __future__ import annotations

from typing import Any, Mapping

from v4hal.hal.errors import RangeError, ShapeError

__all__ = ["V41_MODEL_TYPES", "V41_HF_DEFAULTS", "V41_KEY_MAP", "TORCH_DTYPE_NAMES", "unwrap", "v41_schedule",
           "v4_schedule", "transformers_config"]

#: ``model_type`` values of DeepSeek-V4.1 configs (composite, flat text backbone)
V41_MODEL_TYPES = ("deepseek_v41", "deepseek_v41_text")
#: top-level keys of the composite config that describe what v4hal does not run (recorded as ignored)
_COMPOSITE_ONLY = ("vision_config", "image_token_id")

#: V4.1 config key -> inference key (plain renames)
V41_KEY_MAP: dict[str, str] = {
    "kv_source_layer_ids": "kv_source_layers",
    "index_source_layer_ids": "index_source_layers",
    "engram_layer_ids": "engram_layers",
    "engram_pad_token_id": "engram_pad_id",
}

#: Hugging Face ``DeepseekV41TextConfig`` defaults, in inference names (a V4.1 key missing from a config
#: takes these; ``rope_scaling`` missing means no YaRN, quantization missing means bf16 weights)
V41_HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=129280, dim=5120, n_layers=40, n_heads=64, head_dim=512, q_lora_rank=1280, rope_head_dim=64,
    rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=1.0, original_seq_len=0,
    window_size=128, candidate_topk_blocks=2048, candidate_block_size=8, index_n_heads=32, index_head_dim=128,
    index_topk=512, o_groups=8, o_lora_rank=1024, moe_inter_dim=2304, n_routed_experts=384, n_shared_experts=1,
    n_activated_experts=6, score_func="sqrtsoftplus", gate_temp=1.0, route_scale=1.5, swiglu_limit=10.0,
    hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, engram_vocab_size=16000000, engram_max_ngram_size=4,
    engram_n_heads=8, engram_head_dim=256, engram_pad_id=2, engram_compressed_vocab_size=99092,
    dspark_layers=3, norm_eps=1e-20, n_hash_layers=0, n_mtp_layers=0, weight_block_size=32, expert_block_size=16,
)
#: the released schedule: what ``DeepseekV41TextConfig`` assumes for 40 layers without explicit lists
_V41_RELEASE_RATIOS = [0, 0] + [2] * 18 + [1] * 20
_V41_RELEASE_KV = [2, 8, 14, 20]
_V41_RELEASE_INDEX = [2, 8, 14, 20, 24, 28, 32, 36]
_V41_LAYER_TYPES = ("sliding_attention", "shared_compressed_attention")

#: V4 (transformers) attention layer type -> ``compress_rates`` key (None: window only)
_V4_LAYER_TYPES = {"sliding_attention": None, "compressed_sparse_attention": "compressed_sparse_attention",
                   "heavily_compressed_attention": "heavily_compressed_attention"}
_V4_DEFAULT_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}

#: torch dtype names a Hugging Face config writes under ``dtype`` / ``torch_dtype`` (the saved tensors' dtype)
TORCH_DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64", "half", "float", "float8_e4m3fn", "auto")


def _err(key: str, msg: str, exc: type[Exception] = RangeError) -> Exception:
    return exc(f"ModelConfig.from_dict: {key} {msg}")


def unwrap(d: Mapping[str, Any]) -> tuple[dict[str, Any], bool, list[str]]:
    """(flat text-backbone keys, whether the config is DeepSeek-V4.1, keys recorded as ignored).

    A composite V4.1 config gives its ``text_config`` with the top-level ``quantization_config`` merged in
    (a ``quantization_config`` in both places must agree); ``vision_config`` / ``image_token_id`` are recorded
    as ignored (v4hal runs the text backbone). A flat config is returned as is.
    """
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    is_v41 = model_type in V41_MODEL_TYPES or (
        isinstance(archs, list) and any(isinstance(a, str) and a.startswith("DeepseekV41") for a in archs))
    text = d.get("text_config")
    if text is None:
        if "text_config" in d:
            flat = {k: v for k, v in d.items() if k != "text_config"}
            return flat, is_v41, ["text_config"]
        return dict(d), is_v41, []
    if not isinstance(text, Mapping):
        raise _err("text_config", f"must be a dict (the text backbone's keys), got {type(text).__name__}")
    inner_type = text.get("model_type")
    if inner_type is not None and inner_type not in V41_MODEL_TYPES:
        raise _err("text_config.model_type", f"must be one of {list(V41_MODEL_TYPES)} (a DeepSeek-V4.1 text "
                                             f"backbone), got {inner_type!r}")
    flat = dict(text)
    for key, value in d.items():
        if key == "text_config" or key in _COMPOSITE_ONLY:
            continue
        if key == "quantization_config" and key in flat and flat[key] != value:
            raise _err("quantization_config", "is given at the top and in text_config with different values")
        flat.setdefault(key, value)
    return flat, True, [k for k in d if k in _COMPOSITE_ONLY]


def v41_schedule(values: dict[str, Any], compress_key: str | None) -> None:
    """Fill the V4.1 schedule in ``values`` (inference keys) the way ``DeepseekV41TextConfig`` does.

    ``compress_ratios``: the backbone entries (a missing list is the release schedule for 40 layers, else
    2 window layers, a ratio-2 half, a ratio-1 half); trailing DSpark entries must be 0 and are dropped.
    ``kv_source_layers``: the release sources for the release ratios, else the first layer of each run of
    equal ratios > 0. ``index_source_layers``: the release ones for the release sources, else the KV sources.
    ``candidate_source_layer``: None -> the last KV source (-1 when none); negative -> -1.
    ``engram_layers`` missing -> none. ``compress_key`` names the key ``compress_ratios`` came from.
    """
    n = values["n_layers"]
    n_draft = values.get("dspark_layers", 0)
    ratios = values.get("compress_ratios")
    if ratios is None:
        if n == len(_V41_RELEASE_RATIOS):
            ratios = list(_V41_RELEASE_RATIOS)
        else:
            n_slide = min(2, n)
            n_enc = max(0, (n - n_slide + 1) // 2)
            ratios = [0] * n_slide + [2] * n_enc + [1] * max(0, n - n_slide - n_enc)
    else:
        if not isinstance(ratios, (list, tuple)):
            raise _err(compress_key or "compress_ratios", f"must be a list of ints, got {ratios!r:.80}")
        ratios = list(ratios)
        if not n <= len(ratios) <= n + n_draft:
            raise _err(compress_key or "compress_ratios",
                       f"must have num_hidden_layers ({n}) entries, plus at most num_nextn_predict_layers "
                       f"({n_draft}) DSpark entries, got {len(ratios)}", ShapeError)
        tail = ratios[n:]
        if any(r != 0 for r in tail):
            raise _err(compress_key or "compress_ratios",
                       f"entries after the {n} backbone layers belong to the DSpark draft layers, which only use "
                       f"a sliding window (0): got {tail}; v4hal does not run DSpark layers")
        ratios = ratios[:n]
    values["compress_ratios"] = ratios
    if values.get("kv_source_layers") is None:
        if ratios == _V41_RELEASE_RATIOS[:n] and n == len(_V41_RELEASE_RATIOS):
            values["kv_source_layers"] = list(_V41_RELEASE_KV)
        else:
            values["kv_source_layers"] = [i for i in range(n)
                                          if ratios[i] > 0 and (i == 0 or ratios[i - 1] != ratios[i])]
    if values.get("index_source_layers") is None:
        kv = values["kv_source_layers"]
        values["index_source_layers"] = list(_V41_RELEASE_INDEX) if kv == _V41_RELEASE_KV else list(kv)
    cand = values.get("candidate_source_layer")
    if cand is None:
        kv = values["kv_source_layers"]
        values["candidate_source_layer"] = kv[-1] if kv else -1
    elif isinstance(cand, int) and not isinstance(cand, bool) and cand < 0:
        values["candidate_source_layer"] = -1
    if values.get("engram_layers") is None:
        values["engram_layers"] = []


def check_v41_layer_types(layer_types: Any, n: int, kv_sources: list[int]) -> None:
    """A V4.1 ``layer_types`` must say ``shared_compressed_attention`` exactly at the KV sources."""
    if not isinstance(layer_types, (list, tuple)) or len(layer_types) != n:
        raise _err("layer_types", f"must be a list of num_hidden_layers ({n}) entries, got {layer_types!r:.80}",
                   ShapeError)
    bad = [t for t in layer_types if t not in _V41_LAYER_TYPES]
    if bad:
        raise _err("layer_types", f"entries must be one of {list(_V41_LAYER_TYPES)} for DeepSeek-V4.1, got {bad[:3]}")
    want = ["shared_compressed_attention" if i in kv_sources else "sliding_attention" for i in range(n)]
    diff = [i for i in range(n) if layer_types[i] != want[i]]
    if diff:
        i = diff[0]
        raise _err("layer_types", f"disagrees with kv_source_layer_ids {kv_sources}: layer {i} is "
                                  f"{layer_types[i]!r}, the sources make it {want[i]!r}")


def v4_schedule(layer_types: Any, rates: Any, mlp_layer_types: Any, n: int) -> tuple[list[int] | None, int | None]:
    """(per-layer compress ratios, number of hash-routed layers) of a transformers ``DeepseekV4Config``
    (``layer_types`` + ``compress_rates``, ``mlp_layer_types``); None where the key is absent."""
    ratios = None
    if rates is None:
        rates = dict(_V4_DEFAULT_RATES)
    if not isinstance(rates, Mapping):
        raise _err("compress_rates", f"must be a dict of layer type -> rate, got {rates!r:.80}")
    if layer_types is not None:
        if not isinstance(layer_types, (list, tuple)) or len(layer_types) < n:
            raise _err("layer_types", f"must be a list of num_hidden_layers ({n}) entries, got {layer_types!r:.80}",
                       ShapeError)
        ratios = []
        for t in list(layer_types)[:n]:
            if t not in _V4_LAYER_TYPES:
                raise _err("layer_types", f"entries must be one of {list(_V4_LAYER_TYPES)} for DeepSeek-V4, got {t!r}")
            key = _V4_LAYER_TYPES[t]
            if key is not None and key not in rates:
                raise _err("compress_rates", f"has no rate for {key!r} (used by layer_types)")
            ratios.append(0 if key is None else rates[key])
    n_hash = None
    if mlp_layer_types is not None:
        if not isinstance(mlp_layer_types, (list, tuple)) or len(mlp_layer_types) < n:
            raise _err("mlp_layer_types", f"must be a list of num_hidden_layers ({n}) entries, "
                                          f"got {mlp_layer_types!r:.80}", ShapeError)
        kinds = list(mlp_layer_types)[:n]
        bad = [k for k in kinds if k not in ("hash_moe", "moe")]
        if bad:
            raise _err("mlp_layer_types", f"entries must be 'hash_moe' or 'moe', got {bad[:3]}")
        n_hash = sum(1 for k in kinds if k == "hash_moe")
        if kinds[:n_hash] != ["hash_moe"] * n_hash:
            raise _err("mlp_layer_types", f"hash-routed layers must come first (the V4 graph routes the first "
                                          f"n_hash_layers by token id), got {kinds}")
    return ratios, n_hash


def _rope_dicts(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    prf = cfg.rope_head_dim / cfg.head_dim
    main = {"partial_rotary_factor": prf, "rope_theta": cfg.rope_theta, "rope_type": "default"}
    comp: dict[str, Any] = {"partial_rotary_factor": prf, "rope_theta": cfg.compress_rope_theta,
                            "rope_type": "default"}
    if cfg.original_seq_len > 0:
        comp.update(rope_type="yarn", type="yarn", attention_factor=1.0, factor=cfg.rope_factor,
                    original_max_position_embeddings=cfg.original_seq_len, beta_fast=cfg.beta_fast,
                    beta_slow=cfg.beta_slow)
    return main, comp


def _quant(cfg: Any) -> dict[str, Any] | None:
    if cfg.dtype != "fp8":
        return None
    b = cfg.weight_block_size
    q: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                         "weight_block_size": [b, b]}
    if cfg.scale_fmt is not None:
        q["scale_fmt"] = cfg.scale_fmt
    if cfg.expert_dtype is not None:
        q["expert_dtype"] = cfg.expert_dtype
    return q


def _common(cfg: Any) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        "q_lora_rank": cfg.q_lora_rank, "qk_rope_head_dim": cfg.rope_head_dim, "rope_theta": cfg.rope_theta,
        "compress_rope_theta": cfg.compress_rope_theta, "sliding_window": cfg.window_size,
        "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
        "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank, "moe_intermediate_size": cfg.moe_inter_dim,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts, "scoring_func": cfg.score_func, "norm_topk_prob": True,
        "routed_scaling_factor": cfg.route_scale, "swiglu_limit": cfg.swiglu_limit, "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps, "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": 1048576, "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "tie_word_embeddings": False,
        "eos_token_id": 1,
    }


def transformers_config(cfg: Any) -> dict[str, Any]:
    """The ``config.json`` transformers writes for ``cfg`` (a `ModelConfig`): ``DeepseekV4Config`` (5.23) for
    V4, the composite ``DeepseekV41Config`` for V4.1 (DSpark stages counted in ``num_nextn_predict_layers``,
    their ratios 0). ``dtype`` is the torch dtype of the non-quantized tensors (bfloat16)."""
    main, comp = _rope_dicts(cfg)
    out = _common(cfg)
    if cfg.is_v41:
        n = cfg.n_layers
        out.update({
            "model_type": "deepseek_v41_text", "compress_ratios": list(cfg.compress_ratios) + [0] * cfg.dspark_layers,
            "kv_source_layer_ids": list(cfg.kv_source_layers), "index_source_layer_ids": list(cfg.index_source_layers),
            "candidate_source_layer_id": cfg.candidate_source_layer, "candidate_topk_blocks": cfg.candidate_topk_blocks,
            "candidate_block_size": cfg.candidate_block_size, "gate_temp": cfg.gate_temp, "topk_method": "noaux_tc",
            "engram_layer_ids": list(cfg.engram_layers), "engram_vocab_size": cfg.engram_vocab_size,
            "engram_num_embeddings": list(cfg.engram_num_embeddings),
            "engram_max_ngram_size": cfg.engram_max_ngram_size, "engram_n_heads": cfg.engram_n_heads,
            "engram_head_dim": cfg.engram_head_dim, "engram_pad_id": cfg.engram_pad_id,
            "engram_compressed_vocab_size": cfg.engram_compressed_vocab_size,
            "num_nextn_predict_layers": cfg.dspark_layers,
            "layer_types": ["shared_compressed_attention" if i in cfg.kv_source_layers else "sliding_attention"
                            for i in range(n)],
            "rope_parameters": {"main": main, "compress": comp},
        })
        top: dict[str, Any] = {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41",
                               "text_config": out, "vision_config": {"model_type": "deepseek_v41_vision"},
                               "image_token_id": 129264, "tie_word_embeddings": False, "dtype": "bfloat16",
                               "transformers_version": "5.23.0"}
        q = _quant(cfg)
        if q is not None:
            top["quantization_config"] = q
        return top
    rates = sorted({r for r in cfg.compress_ratios[:cfg.n_layers] if r})
    names = {4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    out.update({
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "compress_rates": {names[r]: r for r in (4, 128)} if set(rates) <= {4, 128} else {},
        "layer_types": [("sliding_attention" if r == 0 else names[r]) for r in cfg.compress_ratios[:cfg.n_layers]],
        "mlp_layer_types": ["hash_moe" if h else "moe" for h in cfg.is_hash_layer],
        "num_nextn_predict_layers": cfg.n_mtp_layers, "partial_rotary_factor": cfg.rope_head_dim / cfg.head_dim,
        "rope_parameters": {"main": main, "compress": comp}, "dtype": "bfloat16", "bos_token_id": 0,
        "pad_token_id": None, "mlp_bias": False, "output_router_logits": False, "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0, "transformers_version": "5.23.0",
    })
    q = _quant(cfg)
    if q is not None:
        out["quantization_config"] = q
    return out
