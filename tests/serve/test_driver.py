"""The continuous-batching driver (`v4hal.serve.driver`) and ``v4hal run --requests`` / ``v4hal cost --pool`` on
v4-mini: every request finishes, the token and page counts add up, prefix reuse saves the shared tokens, and the
memory table agrees with the pool's own accounting."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from v4hal.apps import serve as serve_app
from v4hal.apps.main import cli
from v4hal.hal import platform as P
from v4hal.hal.errors import RangeError
from v4hal.model import ModelConfig, V4Model, write_random_checkpoint
from v4hal.ops.paged import PAGED_LAYOUTS
from v4hal.serve import CachePool
from v4hal.serve import driver as D
from v4hal.serve import memory as M
from v4hal.serve import sizing as S
from v4hal.serve import workload as W
from v4hal.serve.report import format_report

MINI = ModelConfig.preset("v4-mini")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[V4Model]:
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    path = write_random_checkpoint(MINI, tmp_path_factory.mktemp("mini"), seed=0)
    yield V4Model.from_pretrained(path, experts_fp8=True)
    torch.set_num_threads(prev)


def test_schedule_and_lengths() -> None:
    assert W.arrival_steps(4, 3, seed=0) == [0, 3, 6, 9]
    assert W.arrival_steps(3, 0, seed=0) == [0, 0, 0]
    seeded = W.arrival_steps(16, None, seed=5)
    assert seeded == W.arrival_steps(16, None, seed=5) and seeded[0] == 0
    assert all(0 <= b - a <= 3 for a, b in zip(seeded, seeded[1:]))
    lengths = W.request_lengths(200, 64, seed=1)
    assert min(lengths) >= 16 and max(lengths) <= 128 and len(set(lengths)) > 20
    assert S.default_block_size(MINI) == 16 and S.default_block_size(ModelConfig.preset("v4-flash")) == 64


@pytest.mark.parametrize("kw, message", [
    ({"layout": "fp8"}, "layout must be one of"),
    ({"chunk": 0}, "chunk must be an int >= 1"),
    ({"arrival": -1}, "arrival must be an int >= 0"),
    ({"prompt_len": 2048}, "exceeds the max_seq_len 4096"),
])
def test_check_workload(kw: dict, message: str) -> None:
    args = dict(requests=2, prompt_len=8, max_new_tokens=2, chunk=8, arrival=None, block_size=16,
                layout="quantized", flag="")
    with pytest.raises(RangeError, match=message):
        W.check_workload(MINI, **{**args, **kw})
    small = MINI.replace(dtype="bf16", head_dim=96)      # model1_fp8 needs head_dim - 64 a multiple of 64
    with pytest.raises(RangeError, match="attention caches"):
        W.check_workload(small, **args)


@pytest.mark.parametrize("layout", list(S.LAYOUT_PAIRS))
def test_run_requests(model: V4Model, layout: str) -> None:
    """Four requests arriving one step apart, chunks of 16: all finish with every token, the counts add up,
    every page comes back."""
    new = 3
    res = D.run_requests(model, requests=4, prompt_len=8, max_new_tokens=new, chunk=16, arrival=1, layout=layout,
                       progress=False)
    assert res["all_finished"] and res["finished"] == 4 and res["logits_finite"]
    assert (res["attn_layout"], res["indexer_layout"]) == S.LAYOUT_PAIRS[layout]
    assert res["prefill_tokens"] == sum(res["prompt_lengths"])            # no shared prefix: nothing reused
    assert res["decode_tokens"] == 4 * (new - 1)
    assert res["tokens_computed"] == res["prefill_tokens"] + res["decode_tokens"]
    assert res["prefix_hits"] == 0 and res["prefix_tokens_saved"] == 0
    assert res["steps"] >= max(res["prompt_lengths"]) // 16 + new - 1
    assert res["max_requests_in_step"] >= 2                                # arrivals overlap
    for key in ("prefill_tok_s", "decode_tok_s", "requests_s", "speedup"):
        assert res[key] is not None and res[key] > 0, key
    assert res["single"]["decode_tokens"] == new - 1 and res["single"]["decode_tok_s"] > 0
    assert res["pages_after_evict"] == dict.fromkeys(res["peak_pages"], 0)
    assert all(res["peak_pages"][k] >= res["final_pages"][k] for k in res["peak_pages"])
    assert all(res["peak_pages"][k] <= res["pool_pages"][k] for k in res["peak_pages"])
    assert 0 < res["live_bytes_peak"] <= res["pool_bytes_peak"]
    assert res["kv_bytes_per_token_peak"] == res["live_bytes_peak"] / res["live_tokens_at_peak"]
    attn, idx = S.LAYOUT_PAIRS[layout]
    pool = CachePool(MINI, block_size=16, attn_layout=attn, indexer_layout=idx, allocate=False)
    assert res["kv_bytes_per_token_request"] == pool.kv_bytes_per_token(res["request_tokens"])
    text = format_report(res)
    assert "4 / 4 finished" in text and "batched / single" in text
    json.dumps(res)


def test_shared_prefix_is_computed_once(model: V4Model) -> None:
    """Three prompts starting with the same 16 tokens (one page), arriving 3 steps apart: the later two reuse
    the first's page and compute only their suffixes."""
    res = D.run_requests(model, requests=3, prompt_len=8, max_new_tokens=2, chunk=64, arrival=3, shared_prefix=16,
                       baseline=False, progress=False)
    assert res["all_finished"] and res["single"] is None and res["speedup"] is None
    assert res["prefix_hits"] == 2 and res["prefix_tokens_saved"] == 32
    assert res["prefill_tokens"] == sum(res["prompt_lengths"]) - 32
    assert res["pages_after_evict"] == dict.fromkeys(res["peak_pages"], 0)


def test_memory_rows() -> None:
    rows = {(r["config"], r["layout"]): r for r in M.memory_rows(1 << 20)}
    assert set(rows) == {(c, lay) for c in ("v4-flash", "v4-pro", "v41-flash", "v4-mini", "v41-mini")
                         for lay in S.LAYOUT_PAIRS}
    for name in ("v4-flash", "v4-pro"):
        q, b = rows[name, "quantized"], rows[name, "bf16"]
        assert q["tokens"] == 1 << 20 and q["attn_entry_bytes"] == 584 and q["indexer_entry_bytes"] == 68
        assert q["measured"] is None and q["flashmla"] == b["flashmla"]
        # the pool stores what the cost model counts, plus the MTP layer and pages, less the compressor state of
        # the finished ratio-128 block (released at a multiple of 128, where the cost model keeps a whole block)
        assert 0.99 * q["cost"] < q["pool"] < 1.02 * q["cost"]
        assert abs(q["flashmla"] - q["cost"]) < 0.01 * q["cost"]
        assert 1.9 * q["pool"] < b["pool"] and abs(b["pool"] - b["contiguous"]) < 0.01 * b["contiguous"]
        cfg = ModelConfig.preset(name).replace(max_seq_len=1 << 20, max_batch_size=1)
        assert q["contiguous"] == M.contiguous_bytes(cfg, 1 << 20) / (1 << 20)
    for layout, (attn, idx) in S.LAYOUT_PAIRS.items():
        r = rows["v4-mini", layout]
        assert r["tokens"] == MINI.max_seq_len and r["flashmla"] is None
        assert r["measured"] == r["pool"]          # an allocated pool's tensors hold what the accounting says
        assert r["attn_entry_bytes"] == PAGED_LAYOUTS[attn].token_bytes(MINI.head_dim)
    # DeepSeek-V4.1: FlashMLA's 528-byte window entries; the pool holds what the cost model counts (window
    # pages of every layer, compressed entries and indexer keys at KV sources only)
    q = rows["v41-flash", "quantized"]
    assert (q["attn_layout"], q["attn_entry_bytes"], q["flashmla"], q["contiguous"]) == ("v41_window_fp8", 528,
                                                                                         None, None)
    assert abs(q["pool"] - q["cost"]) < 0.001 * q["cost"] and q["pool"] < 0.26 * rows["v4-flash", "quantized"]["pool"]
    r = rows["v41-mini", "quantized"]
    assert r["measured"] == r["pool"] and r["attn_layout"] == "v41_window_fp8"
    text = M.format_memory_table(list(rows.values()))
    assert len(text.splitlines()) == 2 + 15 and "FlashMLA 584" in text


def test_cli_run_requests_and_cost_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("V4HAL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    argv = ["run", "--requests", "3", "--prompt-len", "6", "--max-new-tokens", "2", "--chunk", "8", "--arrival", "1",
            "--no-progress", "--threads", "1", "--json", str(out)]
    assert cli(argv) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["finished"] == 3 and res["chunk"] == 8 and res["block_size"] == 16 and res["layout"] == "quantized"
    assert "3 / 3 finished" in text and "KV bytes/token" in text
    assert cli(["cost", "--pool", "--context", "65536", "--json", str(tmp_path / "c.json")]) == 0
    text = capsys.readouterr().out
    pool = json.loads((tmp_path / "c.json").read_text())["pool"]
    assert [r["tokens"] for r in pool] == [65536] * 9 + [4096] * 6 and "pool B/tok" in text


def test_engine_defers_prefill_when_the_pool_is_short(tmp_path) -> None:
    """A pool too small for every prompt at once: prefill chunks wait, decode tokens run, every request
    finishes with the tokens it gets alone."""
    import torch

    from v4hal.model import ModelConfig, V4Model, write_random_checkpoint
    from v4hal.serve import CachePool, Engine

    cfg = ModelConfig.preset("v4-mini")
    model = V4Model.from_pretrained(write_random_checkpoint(cfg, tmp_path / "m", seed=3))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (40, 50, 30)]
    small = Engine(model, CachePool(cfg, block_size=16, blocks={"token": 4, "c4": 3, "c128": 3}), chunk=64,
                   reuse_prefixes=False)
    big = Engine(model, CachePool(cfg, block_size=16), chunk=64, reuse_prefixes=False)
    for e in (small, big):
        for i, p in enumerate(prompts):
            e.add(i, p, 3)
        e.run()
    assert {i: r.output for i, r in small.finished.items()} == {i: r.output for i, r in big.finished.items()}
    assert len(small.steps) > len(big.steps)


def test_cli_run_requests_ep2_matches_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``v4hal run --requests 5 --ep 2``: rank 0 serves requests 0, 2, 4 and rank 1 requests 1, 3, stepping
    together; every request finishes with the tokens of the one-process run (greedy, same seeds), and the
    merged counts are the one-process run's. Ranks are forked here (a spawned interpreter re-imports torch)."""
    monkeypatch.setenv("V4HAL_CACHE_DIR", str(tmp_path / "cache"))
    real = serve_app.run_requests_ep
    monkeypatch.setattr(serve_app, "run_requests_ep", lambda *a, **k: real(*a, **k, start_method="fork", timeout_s=60))
    argv = ["run", "--requests", "5", "--prompt-len", "12", "--max-new-tokens", "4", "--chunk", "16",
            "--no-progress", "--threads", "1", "--json"]
    assert cli([*argv, str(tmp_path / "one.json")]) == 0
    assert cli([*argv, str(tmp_path / "ep.json"), "--ep", "2"]) == 0
    text = capsys.readouterr().out
    one, ep = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ep"))
    assert ep["all_finished"] and ep["logits_finite"] and ep["finished"] == 5
    assert ep["tokens"] == one["tokens"] and all(len(t) == 4 for t in ep["tokens"])
    assert ep["ep"] == 2 and ep["rank_requests"] == [3, 2]
    assert re.search(r"expert parallel +2 ranks", text)
    for key in ("prompt_lengths", "arrival_steps", "prefill_tokens", "decode_tokens", "tokens_computed"):
        assert ep[key] == one[key], key
    assert ep["prefill_tokens"] == sum(ep["prompt_lengths"]) and ep["decode_tokens"] == 5 * 3
    # each rank's pool is sized for its own requests; the merged figures sum them
    assert sum(ep["pool_pages"].values()) >= sum(one["pool_pages"].values())
    assert ep["pages_after_evict"] == dict.fromkeys(ep["peak_pages"], 0)
    assert ep["peak_pages"]["token"] > 0 and all(ep["peak_pages"][k] <= ep["pool_pages"][k] for k in ep["peak_pages"])
    assert ep["single"]["decode_tokens"] == 3 and ep["speedup"] > 0


def test_merge_ranks_needs_every_rank() -> None:
    rec = {"rank": 1, "world": 2, "trace": []}
    with pytest.raises(RangeError, match=r"expected the records of ranks 0..0, got ranks \[1\]"):
        D.merge_ranks([rec])


def test_a_small_pool_makes_requests_wait_with_the_same_tokens(model: V4Model) -> None:
    """Six requests arriving at once into a pool of 1 MiB (three of the longest request's page sets): requests
    wait for pages instead of exhausting the pool, the pool stays within the budget, and every request gets
    the tokens it gets from a pool that holds them all."""
    kw = dict(requests=6, prompt_len=8, max_new_tokens=3, chunk=64, arrival=0, baseline=False, progress=False,
              reuse_prefixes=False)
    small = D.run_requests(model, **kw, pool_memory=1 << 20)
    big = D.run_requests(model, **kw)
    assert small["all_finished"] and small["tokens"] == big["tokens"]
    assert small["waited"] >= 1 and big["waited"] == 0
    assert small["pool_bytes"] <= small["pool_memory"] == 1 << 20
    assert sum(small["pool_pages"].values()) < sum(big["pool_pages"].values())
    assert small["steps"] > big["steps"]
    with pytest.raises(RangeError, match=r"needs .* of cache pages, more than the pool's pool_memory 256 KiB"):
        D.run_requests(model, **kw, pool_memory=256 << 10)


def test_pool_follows_the_sizing_module(model: V4Model) -> None:
    """The driver sizes its pool with `v4hal.serve.sizing`: as many peak page sets of the longest request as
    the budget buys (`blocks_for_budget`), never more pages than every request at once; a budget of exactly
    `request_budget_bytes` holds one request, one byte less is refused before anything runs."""
    kw = dict(requests=4, prompt_len=8, max_new_tokens=3, chunk=16, arrival=0, baseline=False, progress=False,
              reuse_prefixes=False)
    res = D.run_requests(model, **kw)
    longest = max(res["prompt_lengths"]) + 3 - 1
    peak = S.request_pages(MINI, longest, chunk=16, block_size=16)
    every = {k: sum(S.request_pages(MINI, n + 2, chunk=16, block_size=16)[k] for n in res["prompt_lengths"])
             for k in peak}
    assert res["pool_pages"] == {k: max(1, n) for k, n in every.items()}
    one = S.request_budget_bytes(MINI, longest, chunk=16, block_size=16, attn_layout="model1_fp8",
                                 indexer_layout="indexer_fp4")
    tight = D.run_requests(model, **kw, pool_memory=one)
    assert tight["all_finished"] and tight["tokens"] == res["tokens"] and tight["waited"] >= 1
    assert tight["pool_pages"] == {k: max(1, n) for k, n in peak.items()}
    with pytest.raises(RangeError, match="needs .* of cache pages, more than the pool's pool_memory"):
        D.run_requests(model, **kw, pool_memory=one - 1)


def test_default_layout_follows_the_model_config(tmp_path: Path) -> None:
    """A model whose KV scales are not powers of two gets bf16 attention pages by default (``model1_fp8`` would
    round its FP8 KV again), and serves; the published configs keep the quantized pair on the CPU."""
    assert S.default_layout("cpu", MINI) == "quantized"
    cfg = MINI.replace(scale_fmt=None, scale_dtype="fp32")
    assert S.default_layout("cpu", cfg) == "bf16_kv" and S.LAYOUT_PAIRS["bf16_kv"] == ("bf16", "indexer_fp4")
    assert S.default_layout("npu", cfg) == "bf16"
    m = V4Model.from_pretrained(write_random_checkpoint(cfg, tmp_path / "amax", seed=0), experts_fp8=True)
    res = D.run_requests(m, requests=2, prompt_len=6, max_new_tokens=2, chunk=16, arrival=0, baseline=False,
                         progress=False)
    assert res["all_finished"] and res["layout"] == "bf16_kv"


def test_report_shows_preemptions_and_failures(model: V4Model) -> None:
    """A request whose prompt holds a token with a NaN embedding fails in the engine: the run's figures name it
    with the engine's reason, the table shows it with the preemptions, the others finish, and the run does
    not count as all finished."""
    lengths = W.request_lengths(3, 6, seed=0)
    prompts = list(W.iter_prompts(lengths, MINI.vocab_size, 0))
    bad = next(t for t in prompts[1] if t not in prompts[0] and t not in prompts[2])
    w = model.embed.weight
    keep = w[bad].clone()
    with torch.no_grad():
        w[bad] = float("nan")
    try:
        res = D.run_requests(model, requests=3, prompt_len=6, max_new_tokens=2, chunk=64, arrival=0,
                             baseline=False, progress=False)
    finally:
        with torch.no_grad():
            w[bad] = keep
    assert list(res["failed"]) == [1] and res["failed"][1].startswith("request 1 failed: non-finite")
    assert res["finished"] == 3 and not res["all_finished"] and res["preemptions"] == 0
    assert res["tokens"][1] == [] and all(len(res["tokens"][i]) == 2 for i in (0, 2))
    text = format_report(res)
    assert "1 failed, 0 preemptions; request 1: request 1 failed: non-finite" in text


def test_workload_and_memory_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    args = dict(prompt_len=64, max_new_tokens=32, chunk=64, arrival=None, block_size=16, layout="quantized")
    W.check_workload(MINI, requests=W.MAX_WORKLOAD_TOKENS // 160, **args)
    with pytest.raises(RangeError, match="a run makes and records at most"):
        W.check_workload(MINI, requests=W.MAX_WORKLOAD_TOKENS // 160 + 1, **args)
    monkeypatch.setattr(P, "cpu_available_memory", lambda: 8 << 30)
    assert S.available_memory("cpu") == 8 << 30
    assert S.default_pool_memory("cpu") == int(P.platform_of("cpu").pool_memory_share * (8 << 30))
    lengths = W.request_lengths(5, 8, seed=3)
    assert list(W.iter_prompts(lengths, 100, 3, 4)) == W.make_prompts(lengths, 100, 3, 4)


def test_single_request_baseline_is_like_for_like(model: V4Model) -> None:
    """With a shared prefix the requests' prompts are longer than ``prompt_len``: the single request the batch is
    compared with has their mean length, shared prefix included (it used to have ``prompt_len`` tokens)."""
    res = D.run_requests(model, requests=3, prompt_len=8, max_new_tokens=2, chunk=64, arrival=3, shared_prefix=16,
                         progress=False)
    mean = round(sum(res["prompt_lengths"]) / 3)
    assert min(res["prompt_lengths"]) >= 16 + 2 and res["single"]["prompt_len"] == mean > 16
    assert f"prompt {mean} = the requests' mean" in format_report(res)


def test_layout_flag_names_every_pair() -> None:
    """``--layout`` lists its names without importing serving code; they are `LAYOUT_PAIRS`'s."""
    from v4hal.apps.run import LAYOUT_NAMES

    assert LAYOUT_NAMES == tuple(S.LAYOUT_PAIRS)
