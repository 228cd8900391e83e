"""``v4hal run --requests`` on DeepSeek-V4.1 (v41-mini with its CSA2 sources and consumers, candidate indexer and
Engram layers): requests sharing a prefix, computed in small chunks, each get the tokens they get alone, and the
run's cache bytes per token stand beside V4's."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from v4hal.model import ModelConfig, V4Model, write_random_checkpoint
from v4hal.serve import CachePool
from v4hal.serve import driver as D
from v4hal.serve import workload as W
from v4hal.serve.report import format_report

pytest.importorskip("tokenizers")          # the Engram vocabulary map of a V4.1 checkpoint

V41 = ModelConfig.preset("v41-mini").replace(max_seq_len=256)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[V4Model]:
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    path = write_random_checkpoint(V41, tmp_path_factory.mktemp("v41"), seed=0)
    yield V4Model.from_pretrained(path, experts_fp8=True)
    torch.set_num_threads(prev)


def _alone(model: V4Model, prompt: list[int], new: int) -> list[int]:
    """Greedy tokens of one request through ``V4Model.forward`` (its private pool, the prompt in one call)."""
    logits = model.forward(torch.tensor([prompt]), 0)
    out = [int(logits[0].argmax())]
    for k in range(new - 1):
        logits = model.forward(torch.tensor([[out[-1]]]), len(prompt) + k)
        out.append(int(logits[0].argmax()))
    return out


@pytest.mark.parametrize("block_size", [16, 5])
def test_shared_prefix_small_chunks_give_each_request_its_tokens_alone(model: V4Model, block_size: int) -> None:
    """Five requests starting with the same 17 tokens, arriving 4 steps apart, chunks of 5 tokens (odd, so ratio-2
    groups are cut between steps and wait in the compressor state) on pages of 16 or 5 entries (prefixes are
    reused at page boundaries: 16 tokens, or 15 with pages of 5, so the reused prefix ends inside a ratio-2 group
    and its partial state page is copied). The later four requests reuse the first one's prefix pages and start
    past the prefix with its Engram history; every request gets, token for token, what it gets alone through
    ``forward``."""
    sp, new = 17, 3
    res = D.run_requests(model, requests=5, prompt_len=6, max_new_tokens=new, chunk=5, arrival=4, shared_prefix=sp,
                         block_size=block_size, baseline=False, progress=False)
    assert res["all_finished"] and res["logits_finite"] and not res["failed"]
    assert res["attn_layout"] == "v41_window_fp8" and res["compressed_layout"] == "v41_compressed_fp4"
    reused = sp // block_size * block_size
    assert res["prefix_hits"] == 4 and res["prefix_tokens_saved"] == 4 * reused
    assert res["prefill_tokens"] == sum(res["prompt_lengths"]) - res["prefix_tokens_saved"]
    assert res["pages_after_evict"] == dict.fromkeys(res["peak_pages"], 0)
    prompts = W.make_prompts([n - sp for n in res["prompt_lengths"]], V41.vocab_size, 0, sp)
    assert all(p[:sp] == prompts[0][:sp] for p in prompts)
    for i, p in enumerate(prompts):
        assert res["tokens"][i] == _alone(model, p, new), i


def test_kv_bytes_per_token_beside_v4(model: V4Model) -> None:
    """The run shows its one-request cache bytes per token next to v4-mini's for the same request length, layout
    name and page size, computed from a v4-mini pool's page sizes; a V4 run has no such row."""
    res = D.run_requests(model, requests=2, prompt_len=8, max_new_tokens=2, chunk=16, arrival=0, baseline=False,
                         progress=False)
    v4 = res["v4_counterpart"]
    pool = CachePool(ModelConfig.preset("v4-mini"), block_size=16, attn_layout="model1_fp8",
                     indexer_layout="indexer_fp4", allocate=False)
    assert v4 == {"model": "v4-mini", "attn_layout": "model1_fp8", "indexer_layout": "indexer_fp4", "block_size": 16,
                  "request_tokens": res["request_tokens"], "cache_layers": 5,
                  "kv_bytes_per_token_request": pool.kv_bytes_per_token(res["request_tokens"])}
    mine = CachePool(V41, block_size=16, attn_layout="v41_window_fp8", indexer_layout="indexer_fp4", allocate=False)
    assert res["kv_bytes_per_token_request"] == mine.kv_bytes_per_token(res["request_tokens"])
    assert res["cache_layers"] == 8
    text = format_report(res)
    ratio = res["kv_bytes_per_token_request"] / v4["kv_bytes_per_token_request"]
    assert (f"KV bytes/token vs V4        one {res['request_tokens']}-token request: "
            f"{res['kv_bytes_per_token_request']:.1f} here (8 layers) vs {v4['kv_bytes_per_token_request']:.1f} for "
            "v4-mini") in text and f": {ratio:.2f}x" in text
    assert "v41_window_fp8 + v41_compressed_fp4 + indexer_fp4" in text


def test_v4_counterpart() -> None:
    assert D.v4_counterpart(ModelConfig.preset("v41-flash")) == "v4-flash"
    assert D.v4_counterpart(ModelConfig.preset("v41-mini")) == "v4-mini"
    assert D.v4_counterpart(ModelConfig.preset("v4-mini")) is None
    assert D.v4_counterpart(V41.replace(window_size=32)) is None          # no V4 preset has those cache widths
    assert D.v4_kv_bytes(ModelConfig.preset("v4-mini"), "quantized", 16, 100) is None
    bf16 = D.v4_kv_bytes(V41, "bf16", 16, 100)
    assert (bf16["attn_layout"], bf16["indexer_layout"]) == ("bf16", "bf16")


def test_serving_doc_table_of_v41_flash_requests() -> None:
    """docs/serving.md's V4.1-Flash rows (pages per request and MiB per layout pair, pages of 64, chunks of 64) are
    what `v4hal.serve.sizing` computes."""
    from pathlib import Path

    from v4hal.serve.sizing import layout_pair, page_bytes, request_pages

    doc = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text(encoding="utf-8")
    cfg = ModelConfig.preset("v41-flash").replace(max_seq_len=1 << 20)
    for name, n in (("128K", 1 << 17), ("1M", 1 << 20)):
        per = request_pages(cfg, n, chunk=64, block_size=64)
        mib = []
        for lay in ("quantized", "bf16"):
            attn, idx = layout_pair(lay, cfg)
            pb = page_bytes(cfg, block_size=64, attn_layout=attn, indexer_layout=idx)
            mib.append(round(sum(per[k] * pb[k] for k in per) / 2**20))
        row = (f"| V4.1-Flash, {name} | {per['token']}, {per['c2']}, {per['c1']}, {per['state2']} | {mib[0]} MiB | "
               f"{mib[1]} MiB |")
        assert row in doc, row
