"""Hugging Face configs: DeepSeek-V4.1 (composite and flat text backbone) and transformers' DeepseekV4Config."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from v4hal.hal.errors import RangeError, ShapeError
from v4hal.model.config import ModelConfig
from v4hal.model.hf_config import transformers_config

FIXTURES = Path(__file__).parent / "fixtures"


def _release() -> dict:
    """The DeepSeek-V4.1-Flash ``config.json``: DeepseekV41Config's documented defaults + the release values."""
    return json.loads((FIXTURES / "v41_flash_config.json").read_text())


def _diff(a: ModelConfig, b: ModelConfig) -> list:
    return [(f, getattr(a, f), getattr(b, f)) for f in ModelConfig.field_names() if getattr(a, f) != getattr(b, f)]


def test_release_config_is_the_v41_flash_preset() -> None:
    cfg = ModelConfig.from_dict(_release())
    assert _diff(cfg, ModelConfig.preset("v41-flash")) == []
    assert cfg == ModelConfig.preset("v41-flash")
    assert cfg.dspark_layers == 3 and cfg.n_mtp_layers == 0 and len(cfg.compress_ratios) == 40
    assert cfg.weight_block_size == 32 and cfg.expert_block_size == 16 and cfg.expert_dtype == "fp4"
    assert cfg.rope_factor == 16.0 and cfg.original_seq_len == 65536 and cfg.norm_eps == 1e-20
    for key in ("vision_config", "image_token_id", "dtype", "dspark_block_size", "max_position_embeddings"):
        assert key in cfg.ignored_keys


def test_flat_text_config_reads_the_same(tmp_path) -> None:
    d = _release()
    flat = dict(d["text_config"], quantization_config=d["quantization_config"])
    assert ModelConfig.from_dict(flat) == ModelConfig.preset("v41-flash")
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert ModelConfig.from_json(tmp_path) == ModelConfig.preset("v41-flash")


def test_composite_quantization_must_agree() -> None:
    d = _release()
    d["text_config"]["quantization_config"] = dict(d["quantization_config"], weight_block_size=[128, 128])
    with pytest.raises(RangeError, match="quantization_config"):
        ModelConfig.from_dict(d)


def test_v41_missing_keys_take_hf_defaults_and_derived_schedule() -> None:
    # 40 layers without lists: the release schedule; no rope_scaling: no YaRN; no quantization: bf16
    cfg = ModelConfig.from_dict({"model_type": "deepseek_v41_text"})
    flash = ModelConfig.preset("v41-flash")
    assert cfg.compress_ratios == flash.compress_ratios and cfg.kv_source_layers == flash.kv_source_layers
    assert cfg.index_source_layers == flash.index_source_layers and cfg.candidate_source_layer == 20
    assert cfg.engram_layers == [] and cfg.dtype == "bf16" and cfg.rope_factor == 1.0 and cfg.original_seq_len == 0
    assert cfg.dim == 5120 and cfg.n_routed_experts == 384 and cfg.dspark_layers == 3
    # another depth: 2 window layers, a ratio-2 half, a ratio-1 half; sources = first of each run
    cfg = ModelConfig.from_dict({"model_type": "deepseek_v41_text", "num_hidden_layers": 8,
                                 "num_nextn_predict_layers": 0})
    assert cfg.compress_ratios == [0, 0, 2, 2, 2, 1, 1, 1]
    assert cfg.kv_source_layers == [2, 5] and cfg.index_source_layers == [2, 5] and cfg.candidate_source_layer == 5


@pytest.mark.parametrize("value, want", [(None, 20), (-1, -1), (-7, -1), (8, 8)])
def test_candidate_source(value, want) -> None:
    d = _release()
    d["text_config"]["candidate_source_layer_id"] = value
    assert ModelConfig.from_dict(d).candidate_source_layer == want


def test_dspark_entries_must_be_window_only() -> None:
    d = _release()
    d["text_config"]["compress_ratios"][-1] = 1
    with pytest.raises(RangeError, match="compress_ratios.*DSpark"):
        ModelConfig.from_dict(d)
    d = _release()
    d["text_config"]["compress_ratios"] += [0]
    with pytest.raises(ShapeError, match="compress_ratios"):
        ModelConfig.from_dict(d)
    # asking v4hal to run draft layers as MTP layers is refused
    d = _release()
    d["text_config"]["n_mtp_layers"] = 3
    with pytest.raises(RangeError, match="n_mtp_layers"):
        ModelConfig.from_dict(d)


def test_v41_layer_types_must_agree_with_sources() -> None:
    d = _release()
    types = ["shared_compressed_attention" if i in (2, 8, 14, 20) else "sliding_attention" for i in range(40)]
    d["text_config"]["layer_types"] = types
    assert ModelConfig.from_dict(d) == ModelConfig.preset("v41-flash")
    d["text_config"]["layer_types"] = types[:3] + ["shared_compressed_attention"] + types[4:]
    with pytest.raises(RangeError, match="layer_types.*layer 3"):
        ModelConfig.from_dict(d)
    d["text_config"]["layer_types"] = ["compressed_sparse_attention"] * 40
    with pytest.raises(RangeError, match="layer_types"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("change, exc, match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 16, "attention_factor": 1.3}}, RangeError, "attention_factor"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, ShapeError,
     "weight_block_size"),
    ({"num_key_value_heads": 2}, ShapeError, "num_key_value_heads"),
    ({"norm_topk_prob": False}, RangeError, "norm_topk_prob"),
    ({"kv_source_layer_ids": [3]}, RangeError, "KV source"),
])
def test_v41_errors_name_the_key(change, exc, match) -> None:
    d = _release()
    d["text_config"].update(change)
    if "quantization_config" in change:
        d["quantization_config"] = change["quantization_config"]
    with pytest.raises(exc, match=match):
        ModelConfig.from_dict(d)


def test_transformers_v4_config() -> None:
    """A config.json written by transformers 5.23's DeepseekV4ForCausalLM.save_pretrained."""
    d = json.loads((FIXTURES / "v4_transformers_config.json").read_text())
    cfg = ModelConfig.from_dict(d)
    assert cfg.arch == "v4" and cfg.compress_ratios == [0, 4, 128, 4, 0] and cfg.n_hash_layers == 1
    assert cfg.n_mtp_layers == 1 and cfg.dtype == "bf16" and "dtype" in cfg.ignored_keys
    assert cfg.rope_head_dim == 64 and cfg.rope_factor == 16.0 and cfg.original_seq_len == 65536
    assert cfg.compress_rope_theta == 160000.0 and cfg.window_size == 16 and cfg.n_routed_experts == 8


@pytest.mark.parametrize("change, match", [
    ({"mlp_layer_types": ["moe", "hash_moe", "moe", "moe"]}, "mlp_layer_types"),
    ({"layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]},
     "layer_types"),
    ({"compress_rates": {"compressed_sparse_attention": 4}}, "compress_rates"),
    ({"compress_ratios": [0, 4, 4, 4, 0]}, "compress_ratios"),
    ({"rope_parameters": {"main": {"rope_type": "yarn", "rope_theta": 1e4}, "compress": {}}}, "rope_parameters.main"),
    ({"partial_rotary_factor": 0.3}, "partial_rotary_factor"),
])
def test_transformers_v4_errors(change, match) -> None:
    d = json.loads((FIXTURES / "v4_transformers_config.json").read_text())
    d.update(change)
    with pytest.raises((RangeError, ShapeError), match=match):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("name", ModelConfig.PRESET_NAMES)
def test_transformers_config_round_trips(name: str) -> None:
    cfg = ModelConfig.preset(name)
    d = json.loads(json.dumps(transformers_config(cfg)))
    assert _diff(ModelConfig.from_dict(d), cfg) == []
    assert ModelConfig.from_dict(copy.deepcopy(d)) == cfg


def test_engram_rows_derived_or_checked() -> None:
    d = _release()
    del d["text_config"]["engram_num_embeddings"]
    assert ModelConfig.from_dict(d).engram_num_embeddings == [384006168, 384016682]
    d["text_config"]["engram_num_embeddings"] = [384006168, 384016683]
    with pytest.raises(RangeError, match="engram_num_embeddings.*primes"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("text, match", [([1, 2], "text_config must be a dict"),
                                         ({"model_type": "llama"}, "text_config.model_type")])
def test_composite_text_config_must_be_v41(text, match) -> None:
    d = _release()
    d["text_config"] = text
    with pytest.raises(RangeError, match=match):
        ModelConfig.from_dict(d)
