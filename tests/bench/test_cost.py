"""The cost model: FLOP and byte counters on hand-computed tiny configs, the report check, the CLI."""
from __future__ import annotations

import argparse
import json

import pytest

from v4hal.apps.cost import add_arguments, main, parse_length
from v4hal.bench import cost
from v4hal.hal.errors import RangeError
from v4hal.model.config import ModelConfig


def tiny_v4() -> ModelConfig:
    """Three layers (ratio 0, 4, 128), 2 heads of 8 (rope 2), window 4, topk 2, hc 2."""
    return ModelConfig(
        dtype="bf16", expert_dtype=None, dim=8, n_layers=3, n_mtp_layers=0, compress_ratios=[0, 4, 128],
        n_heads=2, head_dim=8, rope_head_dim=2, q_lora_rank=4, o_groups=1, o_lora_rank=4, window_size=4,
        index_n_heads=2, index_head_dim=32, index_topk=2, n_routed_experts=4, n_activated_experts=2,
        n_shared_experts=1, n_hash_layers=0, moe_inter_dim=4, hc_mult=2, hc_sinkhorn_iters=3, vocab_size=16,
    )


def tiny_v32() -> cost.V32Config:
    return cost.V32Config(
        dim=8, n_layers=2, n_dense_layers=1, n_heads=2, q_lora_rank=4, kv_lora_rank=4, qk_nope_head_dim=2,
        qk_rope_head_dim=2, v_head_dim=2, inter_dim=6, moe_inter_dim=4, n_routed_experts=4,
        n_activated_experts=2, n_shared_experts=1, vocab_size=16, index_n_heads=2, index_head_dim=4, index_topk=3,
    )


def test_entry_sizes_of_the_published_formats() -> None:
    assert cost.V32_ATTN_BYTES == 656 and cost.V32_INDEX_BYTES == 132
    assert cost.V4_ATTN_BYTES == 584 and cost.V4_INDEX_BYTES == 68
    assert cost.v4_index_entry_bytes(128) == 68


def test_tiny_v4_kv_bytes() -> None:
    c = cost.v4_cost(tiny_v4(), 1000)
    # entry: 6 fp8 + 2*2 bf16 + 1 scale = 11 -> padded 16 B; index key: 32/2 + 1 = 17 B
    assert c.kv_bytes["window_cache"] == 3 * 4 * 16
    assert c.kv_bytes["compressed_cache"] == 250 * 16 + 7 * 16          # 1000//4, 1000//128
    assert c.kv_bytes["indexer_cache"] == 250 * 17
    # fp32 kv+score states: ratio 4 attn [8, 16], ratio 4 indexer [8, 64], ratio 128 [128, 8]
    assert c.kv_bytes["compressor_state"] == 2 * 4 * (8 * 16 + 8 * 64 + 128 * 8)
    assert c.total_kv_bytes == 192 + 4112 + 4250 + 13312
    assert c.kv_bytes_per_token == pytest.approx(21866 / 1000)


def test_tiny_v4_flops() -> None:
    c = cost.v4_cost(tiny_v4(), 1000)
    # keys: 4 (window) + 6 (window + topk 2) + 11 (window + 1000//128); per (head, key) 16 + 16 + 5
    assert c.flops["attention"] == 21 * 2 * 37
    # 250 compressed entries, 2 heads: 2*2*32 + 3*2 per entry
    assert c.flops["indexer_scores"] == 250 * 134
    # gate 2*8*4 + 4*4, then 3 experts (2 routed + shared): 3 * 2*8*4 + 5*4 + 2*8
    assert c.flops["ffn"] == 3 * (80 + 3 * 228)
    # mHC per sub-layer: rms 48, mixes 2*16*8, sinkhorn 10*8 + 4*4*3, pre 32, post 6*2*8
    assert c.flops["mhc"] == 3 * 2 * (48 + 256 + 80 + 48 + 32 + 96)
    # head: hc_head (48 + 2*16*2 + 20 + 32) + norm 32 + 2*8*16
    assert c.flops["head"] == 164 + 32 + 256
    # per layer: wq_a 64, q_norm 16, wq_b 128, q rescale 48, wkv 128, kv_norm 32, rope 18 + 12, wo_a 128, wo_b 64
    assert c.flops["attn_proj"] == 3 * 638
    # ratio 4: wkv+wgate 2*2*8*16 + ape 16, pooling (7*64 + 32 + 6)/4; ratio 128: 2*2*8*8 + 8 + (7*1024 + 38)/128
    assert c.flops["compressor"] == pytest.approx(528 + 486 / 4 + 264 + 7206 / 128)
    # wq_b 2*4*64, weights 2*8*2, rope 12, Hadamard 2*32*5, its compressor 2112 + (7*256 + 128 + 6 + 160)/4
    assert c.flops["indexer_proj"] == pytest.approx(512 + 32 + 12 + 320 + 2112 + 2086 / 4)
    assert c.flops["norms_residual"] == 3 * 64


def test_tiny_v4_short_context_clamps() -> None:
    c = cost.v4_cost(tiny_v4(), 3)  # window holds 3, no complete compressed block yet
    assert c.flops["attention"] == 3 * 3 * 2 * 37
    assert c.flops["indexer_scores"] == 0
    assert c.kv_bytes["compressed_cache"] == 0 and c.kv_bytes["window_cache"] == 3 * 3 * 16


def test_tiny_v32() -> None:
    c = cost.v32_cost(tiny_v32(), 10)
    assert c.flops["indexer_scores"] == 2 * 10 * (2 * 2 * 4 + 3 * 2)
    # 3 keys; per (head, key): 2*(4+2) scores + 2*4 values + 5 softmax
    assert c.flops["attention"] == 2 * 3 * 2 * 25
    # 1 dense layer (3 * 2*8*6 + 5*6) + 1 MoE layer (80 + 3*228)
    assert c.flops["ffn"] == 318 + 764
    assert c.flops["head"] == 32 + 256
    # wq_a 64 + 16, wq_b 2*4*8, wkv_a 2*8*6 + 16, rope 3*6, W_UK 2*2*2*4, W_UV 2*2*4*2, wo 2*4*8
    assert c.flops["attn_proj"] == 2 * (64 + 16 + 64 + 96 + 16 + 18 + 32 + 32 + 64)
    assert c.total_kv_bytes == 2 * 10 * (656 + 132)
    longer = cost.v32_cost(tiny_v32(), 20)
    assert longer.flops["indexer_scores"] == 2 * c.flops["indexer_scores"]
    assert longer.flops["attention"] == c.flops["attention"]  # top-k caps the keys


def test_context_must_be_positive() -> None:
    with pytest.raises(RangeError, match="context"):
        cost.v4_cost(tiny_v4(), 0)
    with pytest.raises(RangeError, match="model"):
        cost.model_cost("v5", 10)


def test_ratios_at_1m_match_the_report() -> None:
    r = cost.compare(cost.ONE_M)["ratios"]
    check = cost.report_check(r)
    assert set(check) == {"v4-pro.flops", "v4-pro.kv_bytes", "v4-flash.flops", "v4-flash.kv_bytes"}
    for key, v in check.items():
        assert v["ok"], (key, v)
    # V4 layer by layer: the compressed caches dominate and scale with L
    flash = cost.model_cost("v4-flash", cost.ONE_M)
    assert flash.kv_bytes_per_token == pytest.approx(21 * (584 + 68) / 4 + 20 * 584 / 128, rel=0.01)
    assert cost.model_cost("v3.2", cost.ONE_M).kv_bytes_per_token == 61 * 788


def test_parse_length() -> None:
    assert parse_length("1M") == 1 << 20 and parse_length("128k") == 131072 and parse_length("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        parse_length("lots")


def test_cli_json_and_plot(tmp_path, capsys) -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    out_json, out_png = tmp_path / "cost.json", tmp_path / "cost.png"
    args = p.parse_args(["--context", "4096", "1048576", "--json", str(out_json), "--plot", str(out_png)])
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "v4-flash.flops" in text and "v4-pro.kv_bytes" in text
    data = json.loads(out_json.read_text())
    assert [e["context"] for e in data["contexts"]] == [4096, 1048576]
    assert set(data["at_1m"]["ratios"]) == {"v4-flash", "v4-pro"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dense_control_grows_with_context() -> None:
    from v4hal.bench.measure import dense_control

    mini = ModelConfig.preset("v4-mini")
    short, long = 1024, 65536
    dense_short = cost.v4_cost(dense_control(mini, short), short)
    dense_long = cost.v4_cost(dense_control(mini, long), long)
    hybrid_long = cost.v4_cost(mini.replace(max_seq_len=long), long)
    # the control attends to every token: its attention grows 64x; the hybrid's stays far below it
    assert dense_long.flops["attention"] == 64 * dense_short.flops["attention"]
    assert hybrid_long.flops["attention"] < dense_long.flops["attention"] / 10
    assert dense_control(mini, short).compress_ratios == [0] * 5


def test_measure_one_point(capsys) -> None:
    from v4hal.bench.measure import measure, render_measure

    r = measure([40], repeats=1, progress=False)
    row = r["rows"][0]
    assert row["context"] == 40 and row["hybrid_ms"] > 0 and row["dense_ms"] > 0
    assert row["dense_over_hybrid"] == pytest.approx(row["dense_ms"] / row["hybrid_ms"])
    assert "dense/hybrid" in render_measure(r)
    with pytest.raises(RangeError, match="weights"):
        measure([40], weights="fp16")


# ------------------------------------------------------------------ DeepSeek-V4.1
def test_v41_entry_sizes() -> None:
    assert cost.V41_WINDOW_BYTES == 528 and cost.V41_COMPRESSED_BYTES == 288
    assert cost.engram_table_bytes(10, 256) == 10 * (256 + 8)


@pytest.mark.parametrize("L", [4096, 1 << 20])
def test_v41_flash_kv_bytes_by_hand(L: int) -> None:
    c = cost.model_cost("v41-flash", L)
    # 40 layers keep a 128-entry window of 528 B; only the KV sources 2, 8, 14 (ratio 2) and 20 (ratio 1) own
    # compressed entries (288 B) and indexer keys (68 B; every source feeds an index source); the ratio-2
    # sources keep one open group of kv + gate logits (2 * 2 * 512 fp32)
    entries = 3 * (L // 2) + L
    assert c.kv_bytes == {"window_cache": 40 * 128 * 528, "compressed_cache": entries * 288,
                          "indexer_cache": entries * 68, "compressor_state": 3 * 2 * 2 * 512 * 4}
    want = {4096: 6_373_376, 1 << 20: 935_960_576}[L]
    assert c.total_kv_bytes == want
    assert c.kv_bytes_per_token == pytest.approx({4096: 1556.0, 1 << 20: 892.6}[L], abs=0.05)
    # Engram tables are host memory, not cache: 384,006,168 + 384,016,682 rows of 256 FP8 + 8 ue8m0 bytes
    assert c.host_bytes == {"engram_tables": (384006168 + 384016682) * 264}
    assert c.engram_rows_per_token == 2 * 3 * 8


@pytest.mark.parametrize("L", [4096, 1 << 20])
def test_v41_flash_indexer_candidate_attention_flops_by_hand(L: int) -> None:
    c = cost.model_cost("v41-flash", L)
    per_entry = 2 * 32 * 128 + 3 * 32                       # 32 index heads of 128, relu + weight
    # index sources 2, 8, 14 (ratio 2) and 20 (ratio 1, the candidate source) score every entry ...
    assert c.flops["indexer_scores"] == (3 * (L // 2) + L) * per_entry
    # ... 24, 28, 32, 36 only those inside 2048 candidate blocks of 8 positions
    assert c.flops["candidate_scores"] == 4 * min(L, 2048 * 8) * per_entry
    # keys: window 128 everywhere, + top-512 of the compressed entries in the 38 layers with a ratio
    keys = 40 * 128 + 38 * 512
    assert c.flops["attention"] == keys * 64 * (4 * 512 + 5)
    # Engram: wkv [24*256 -> 5120*5] and the gate of 4 streams, at layers 1 and 14
    assert c.flops["engram"] == 2 * (2 * 24 * 256 * 5120 * 5 + 4 * (11 * 5120 + 5))


def test_v41_flash_beside_v4() -> None:
    for L in (4096, 1 << 20):
        v41, v4 = cost.model_cost("v41-flash", L), cost.model_cost("v4-flash", L)
        assert v41.kv_bytes_per_token < v4.kv_bytes_per_token / 3
    assert "v41-flash" in cost.MODELS
    report = cost.compare(4096, ["v4-flash", "v41-flash"])
    assert report["costs"]["v41-flash"]["host_bytes"]["engram_tables"] > 2e11
    with pytest.raises(RangeError, match="arch 'v41'"):
        cost.v41_cost(ModelConfig.preset("v4-mini"), 10)
    assert cost.model_cost("v41-mini", 100).total_flops > 0
