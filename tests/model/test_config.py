"""ModelConfig: presets, inference and Hugging Face config.json parsing, validation."""
from __future__ import annotations

import json

import pytest

from v4hal.hal.errors import RangeError, ShapeError
from v4hal.model.config import V41_FIELDS, ModelConfig, engram_table_rows


def test_presets_published_shapes() -> None:
    flash = ModelConfig.preset("v4-flash")
    assert (flash.dim, flash.n_layers, flash.n_heads, flash.q_lora_rank) == (4096, 43, 64, 1024)
    assert (flash.o_groups, flash.o_lora_rank, flash.index_topk) == (8, 1024, 512)
    assert (flash.n_routed_experts, flash.moe_inter_dim, flash.route_scale) == (256, 2048, 1.5)
    assert len(flash.compress_ratios) == 44 and flash.compress_ratios[:4] == [0, 0, 4, 128]
    assert flash.compress_ratios[-2:] == [4, 0]
    assert flash.compress_ratios.count(4) == 21 and flash.compress_ratios.count(128) == 20
    pro = ModelConfig.preset("v4-pro")
    assert (pro.dim, pro.n_layers, pro.n_heads, pro.q_lora_rank) == (7168, 61, 128, 1536)
    assert (pro.o_groups, pro.index_topk, pro.n_routed_experts, pro.moe_inter_dim) == (16, 1024, 384, 3072)
    assert pro.route_scale == 2.5 and len(pro.compress_ratios) == 62
    assert pro.compress_ratios[:4] == [128, 128, 4, 128] and pro.compress_ratios[-2:] == [4, 0]
    for cfg in (flash, pro):
        assert cfg.head_dim == 512 and cfg.nope_head_dim == 448 and cfg.window_size == 128
        assert (cfg.index_n_heads, cfg.index_head_dim, cfg.n_hash_layers) == (64, 128, 3)
        assert (cfg.rope_theta, cfg.compress_rope_theta, cfg.rope_factor, cfg.original_seq_len) == (
            10000.0, 160000.0, 16.0, 65536)
        assert (cfg.dtype, cfg.expert_dtype, cfg.scale_fmt) == ("fp8", "fp4", "ue8m0")


def test_mini_has_every_feature() -> None:
    mini = ModelConfig.preset("v4-mini")
    assert mini.compress_ratios == [0, 4, 128, 4, 0]
    assert mini.n_layers == 4 and mini.n_mtp_layers == 1
    assert set(mini.compress_ratios[: mini.n_layers]) == {0, 4, 128}
    assert mini.is_hash_layer == [True, False, False, False]
    assert mini.hc_mult == 4 and mini.n_shared_experts == 1
    assert mini.index_topk < mini.window_size * 4


def test_presets_are_fresh_copies() -> None:
    a = ModelConfig.preset("v4-mini")
    a.compress_ratios[0] = 128
    assert ModelConfig.preset("v4-mini").compress_ratios[0] == 0
    with pytest.raises(RangeError, match="v4-huge"):
        ModelConfig.preset("v4-huge")


def test_round_trip_inference_dict(tmp_path) -> None:
    cfg = ModelConfig.preset("v4-flash")
    d = cfg.to_dict()
    # a V4 config.json keeps exactly the public ModelArgs keys (the V4.1 fields are left out)
    assert "ignored_keys" not in d and set(d) == set(ModelConfig.field_names()) - set(V41_FIELDS)
    assert ModelConfig.from_dict(d) == cfg
    path = tmp_path / "config.json"
    cfg.to_json(path)
    assert ModelConfig.from_json(path) == cfg
    assert ModelConfig.from_json(tmp_path) == cfg  # directory form


@pytest.mark.parametrize("name", ["v41-flash", "v41-mini"])
def test_v41_presets_round_trip(name: str) -> None:
    cfg = ModelConfig.preset(name)
    d = cfg.to_dict()
    assert set(d) == set(ModelConfig.field_names()) and d["arch"] == "v41"
    assert ModelConfig.from_dict(d) == cfg


def test_v41_flash_is_the_release() -> None:
    cfg = ModelConfig.preset("v41-flash")
    assert cfg.compress_ratios == [0, 0] + [2] * 18 + [1] * 20
    assert [cfg.kv_source_of(i) for i in (1, 2, 7, 8, 19, 20, 39)] == [None, 2, 2, 8, 14, 20, 20]
    assert [cfg.index_source_of(i) for i in (2, 23, 24, 39)] == [2, 20, 24, 36]
    # the released Engram tables hold the sum of their primes (16M and up, 24 per layer)
    assert engram_table_rows([1, 14], 4, 8, 16000000) == cfg.engram_num_embeddings == [384006168, 384016682]


@pytest.mark.parametrize("change, match", [
    (dict(compress_ratios=[0, 0, 4, 2, 1, 1, 1, 1]), "compress_ratios entries must be in"),
    (dict(kv_source_layers=[4]), "no KV source at or before it"),
    (dict(kv_source_layers=[2, 3]), "KV or index source|ratios must match|index source between"),
    (dict(index_source_layers=[4, 6]), "index source between"),
    (dict(candidate_source_layer=5), "candidate_source_layer"),
    (dict(engram_num_embeddings=[10]), "one entry per Engram layer"),
    (dict(n_mtp_layers=1, compress_ratios=[0, 0, 2, 2, 1, 1, 1, 1, 0]), "DSpark"),
    (dict(n_hash_layers=1), "hash-routed"),
    (dict(arch="v5"), "arch must be one of"),
])
def test_v41_schedule_errors(change: dict, match: str) -> None:
    with pytest.raises((RangeError, ShapeError), match=match):
        ModelConfig.preset("v41-mini").replace(**change)


def test_v41_fields_refused_on_v4() -> None:
    with pytest.raises(RangeError, match="kv_source_layers is a DeepSeek-V4.1 field"):
        ModelConfig.preset("v4-mini").replace(kv_source_layers=[1])


def test_missing_keys_take_public_defaults() -> None:
    cfg = ModelConfig.from_dict({"dim": 1024})
    ref = ModelConfig()
    assert cfg.dim == 1024 and cfg.n_layers == ref.n_layers == 7
    assert cfg.compress_ratios == [0, 0, 4, 128, 4, 128, 4, 0]
    assert cfg.max_seq_len == 4096 and cfg.norm_eps == 1e-6


def _hf_flash() -> dict:
    flash = ModelConfig.preset("v4-flash")
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64,
        "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024,
        "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128, "compress_ratios": flash.compress_ratios,
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "n_routed_experts": 256,
        "n_shared_experts": 1, "num_experts_per_tok": 6, "num_hash_layers": 3, "moe_intermediate_size": 2048,
        "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hc_mult": 4,
        "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "compress_rope_theta": 160000, "num_nextn_predict_layers": 1, "max_position_embeddings": 1048576,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0},
        "quantization_config": {"fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                                "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
        "torch_dtype": "bfloat16",
    }


def test_hugging_face_keys() -> None:
    cfg = ModelConfig.from_dict(_hf_flash())
    flash = ModelConfig.preset("v4-flash")
    for name in ModelConfig.field_names():
        if name in ("expert_dtype", "scale_dtype", "max_seq_len", "max_batch_size"):
            continue
        assert getattr(cfg, name) == getattr(flash, name), name
    assert isinstance(cfg.rope_theta, float) and isinstance(cfg.rope_factor, float)
    assert cfg.dtype == "fp8" and cfg.scale_fmt == "ue8m0"
    for key in ("architectures", "model_type", "max_position_embeddings", "torch_dtype",
                "rope_scaling.mscale", "quantization_config.activation_scheme"):
        assert key in cfg.ignored_keys
    assert cfg.max_seq_len == 4096  # max_position_embeddings does not size the caches


def test_hf_and_inference_keys_conflict() -> None:
    d = _hf_flash()
    d["dim"] = 2048
    with pytest.raises(RangeError, match="hidden_size"):
        ModelConfig.from_dict(d)
    d["dim"] = 4096  # agreeing duplicates are fine
    assert ModelConfig.from_dict(d).dim == 4096


def test_hf_rejects_what_v4_cannot_be() -> None:
    d = _hf_flash()
    d["num_key_value_heads"] = 8
    with pytest.raises(ShapeError, match="num_key_value_heads"):
        ModelConfig.from_dict(d)
    d = _hf_flash()
    d["quantization_config"]["weight_block_size"] = [64, 64]
    with pytest.raises(ShapeError, match="weight_block_size"):
        ModelConfig.from_dict(d)
    d = _hf_flash()
    d["rope_scaling"] = None
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_factor == 1.0 and cfg.original_seq_len == 0


@pytest.mark.parametrize(
    "changes, exc, field",
    [
        ({"compress_ratios": [0, 4, 128, 4]}, ShapeError, "compress_ratios"),
        ({"compress_ratios": [0, 4, 64, 4, 0]}, RangeError, "compress_ratios"),
        ({"rope_head_dim": 128}, ShapeError, "head_dim"),
        ({"rope_head_dim": 63}, ShapeError, "rope_head_dim"),
        ({"o_groups": 3}, ShapeError, "o_groups"),
        ({"n_activated_experts": 9}, RangeError, "n_activated_experts"),
        ({"n_hash_layers": 5}, RangeError, "n_hash_layers"),
        ({"index_head_dim": 96}, ShapeError, "index_head_dim"),
        ({"dim": 200}, ShapeError, "dim"),
        ({"moe_inter_dim": 96}, ShapeError, "moe_inter_dim"),
        ({"dtype": "fp16"}, RangeError, "dtype"),
        ({"expert_dtype": "int4"}, RangeError, "expert_dtype"),
        ({"score_func": "relu"}, RangeError, "score_func"),
        ({"window_size": 0}, RangeError, "window_size"),
        ({"n_heads": 4.5}, RangeError, "n_heads"),
        ({"hc_eps": float("nan")}, RangeError, "hc_eps"),
    ],
)
def test_validate_names_the_field(changes: dict, exc: type, field: str) -> None:
    with pytest.raises(exc, match=field):
        ModelConfig.preset("v4-mini").replace(**changes)


def test_bf16_relaxes_block_rules() -> None:
    cfg = ModelConfig.preset("v4-mini").replace(dtype="bf16", expert_dtype=None, dim=200, moe_inter_dim=96)
    assert cfg.dim == 200


def test_from_json_errors(tmp_path) -> None:
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(RangeError, match="config.json"):
        ModelConfig.from_json(p)
    p.write_text(json.dumps({"n_layers": 2, "compress_ratios": [0, 4, 128, 0]}))
    with pytest.raises(ShapeError, match="compress_ratios"):
        ModelConfig.from_json(p)
    with pytest.raises(RangeError, match="mapping"):
        ModelConfig.from_dict([1, 2])  # type: ignore[arg-type]
