"""CachePool: cache tensors and byte accounting, plan / advance / release, window release while decoding,
all-or-nothing errors."""
from __future__ import annotations

import pytest
import torch

from v4hal.hal.errors import RangeError, ShapeError
from v4hal.model.config import ModelConfig
from v4hal.ops.paged import PAGED_LAYOUTS
from v4hal.serve import CachePool, PoolExhaustedError, alloc_cache, cache_layouts, first_needed_position, memory_table

from .helpers import random_model, small_cfg, snapshot, tiny_v4_cfg


def test_alloc_cache_widths() -> None:
    c = alloc_cache(3, 8, "indexer_fp4", 128, None)
    assert c.shape == (3, 8, 1, 68) and c.dtype == torch.uint8
    assert alloc_cache(3, 8, "bf16", 128, None).shape == (3, 8, 1, 128)
    assert alloc_cache(3, 8, "indexer_fp4", 64, None).shape == (3, 8, 1, 36)
    with pytest.raises(ShapeError, match=r"alloc_cache: layout 'model1_fp8' takes entry widths D = nope \+ 64 with "
                                         "nope a positive multiple of 64, got 96"):
        alloc_cache(3, 8, "model1_fp8", 96, None)
    with pytest.raises(RangeError, match="layout must be one of"):
        alloc_cache(3, 8, "fp16", 512, None)


def test_v4_mini_builds_allocators_only() -> None:
    cfg = ModelConfig.preset("v4-mini")
    pool = CachePool(cfg, attn_layout="bf16", allocate=False, block_size=16)
    assert pool.kinds == ("token", "c4", "c128", "state4", "state128") and pool.layers[1].window is None
    assert pool.allocators["c128"].capacity == cfg.max_batch_size * 2      # 4096 // 128 = 32 entries: 2 pages
    odd = cfg.replace(head_dim=160, rope_head_dim=32)        # model1_fp8 keeps 64 rope dims in bf16, not 32
    with pytest.raises(ShapeError, match="attn_layout 'model1_fp8' stores the last 64 values .* rope_head_dim 32"):
        CachePool(odd, allocate=False)
    pool = CachePool(odd, attn_layout="bf16", allocate=False, block_size=16)
    assert pool.bytes_in_use() == 0 and pool.stats()["bytes_in_use"] == 0


@pytest.mark.parametrize("layouts", [("model1_fp8", "indexer_fp4"), ("bf16", "bf16")])
def test_v4_mini_caches_take_its_widths(layouts: tuple[str, str]) -> None:
    """v4-mini (head_dim 128, index_head_dim 64) stores its caches in the layouts at its own widths."""
    cfg = ModelConfig.preset("v4-mini")
    blocks = {"token": 3, "c4": 2, "c128": 2}
    pool = CachePool(cfg, blocks=blocks, block_size=8, attn_layout=layouts[0], indexer_layout=layouts[1])
    attn, idx = PAGED_LAYOUTS[layouts[0]], PAGED_LAYOUTS[layouts[1]]
    assert pool.layers[0].window.shape[1:] == (8, 1, attn.width(128))
    assert pool.layers[1].indexer.shape[1:] == (8, 1, idx.width(64))
    per_kind = dict.fromkeys(pool.kinds, 0)
    for s in pool.specs:
        t = getattr(pool.layers[s.layer], s.name)
        per_kind[s.kind] += t.untyped_storage().nbytes() // t.shape[0]
    assert pool.page_bytes() == per_kind
    assert per_kind["c4"] == 2 * (attn.page_bytes(128, 8) + idx.page_bytes(64, 8))
    no128 = cfg.replace(compress_ratios=[0, 4, 0, 4, 0])
    assert CachePool(no128, allocate=False).kinds == ("token", "c4", "state4")
    with pytest.raises(RangeError, match=r"blocks has kinds \['c128'\]"):
        CachePool(no128, allocate=False, blocks={"c128": 4})


@pytest.mark.parametrize("layouts", [("model1_fp8", "indexer_fp4"), ("bf16", "bf16")])
def test_page_bytes_match_the_tensors(layouts: tuple[str, str]) -> None:
    cfg = small_cfg()
    blocks = {"token": 5, "c4": 3, "c128": 2, "state4": 5, "state128": 5}
    pool = CachePool(cfg, blocks=blocks, block_size=8, state_block_size=16, attn_layout=layouts[0],
                     indexer_layout=layouts[1])
    per_kind = dict.fromkeys(pool.kinds, 0)
    for s in pool.specs:
        t = getattr(pool.layers[s.layer], s.name)
        state = s.kind.startswith("state")
        n = blocks[s.kind] + state          # state block 0 is reserved
        assert t.shape[:2] == (n, 16 if state else 8)
        per_kind[s.kind] += t.untyped_storage().nbytes() // n
    assert pool.allocators["token"].capacity == blocks["token"]
    assert pool.page_bytes() == per_kind
    state = pool.layers[1].state
    assert state.dtype == torch.float32 and state.shape == (6, 16, 2 * 2 * 512)   # + the reserved block 0
    assert pool.layers[1].index_state.shape == (6, 16, 2 * 2 * 128)
    assert pool.layers[2].state.shape == (6, 16, 2 * 512) and pool.layers[2].indexer is None
    assert pool.allocators["state4"].capacity == blocks["state4"]
    assert pool.layers[0].compressed is None and pool.layers[0].state is None
    pool.add_request("a", list(range(20)))
    pool.plan("a", 20)          # 3 token pages, 5 entries -> 1 c4 page, no c128 page, 2 pages of each state kind
    assert pool.pages_in_use() == {"token": 3, "c4": 1, "c128": 0, "state4": 2, "state128": 2}
    assert pool.bytes_in_use() == 3 * per_kind["token"] + per_kind["c4"] + 2 * (per_kind["state4"]
                                                                                 + per_kind["state128"])


def test_kv_bytes_per_token_of_v4_flash() -> None:
    cfg = ModelConfig.preset("v4-flash").replace(max_seq_len=1 << 20)
    pool = CachePool(cfg, allocate=False)
    fp8, fp4 = PAGED_LAYOUTS["model1_fp8"].page_bytes(512, 64), PAGED_LAYOUTS["indexer_fp4"].page_bytes(128, 64)
    n4, n128 = cfg.compress_ratios.count(4), cfg.compress_ratios.count(128)
    t = 1 << 20
    got = pool.request_bytes(t)
    assert got["c4"] == n4 * (fp8 + fp4) * (t // 4 // 64)
    assert got["c128"] == n128 * fp8 * (t // 128 // 64)
    assert got["token"] == 2 * len(cfg.compress_ratios) * fp8            # positions from t - 127: 2 pages
    assert got["state4"] == 4 * 16 * n4 * (4 * 512 + 4 * 128)           # positions from t - 4: 1 page of 16
    assert got["state128"] == 0                                          # no unfinished ratio-128 block
    assert pool.kv_bytes_per_token(t) == pytest.approx(sum(got.values()) / t)
    assert 3400 < pool.kv_bytes_per_token(t) < 3600      # about 1/4 of 584 B per ratio-4 layer and 1/128 per HCA


def test_memory_table_rows() -> None:
    rows = memory_table(tokens=1 << 16)
    assert [(r["config"], r["attn_layout"]) for r in rows] == [
        ("v4-flash", "model1_fp8"), ("v4-flash", "bf16"), ("v4-pro", "model1_fp8"), ("v4-pro", "bf16")]
    for r in rows:
        assert r["total_bytes"] == sum(r["bytes_by_kind"].values())
        assert r["kv_bytes_per_token"] == r["total_bytes"] / (1 << 16)
    assert rows[0]["kv_bytes_per_token"] < rows[1]["kv_bytes_per_token"] < rows[3]["kv_bytes_per_token"]


@pytest.mark.parametrize("ratios", [[0, 4, 128, 4, 0], [0, 4, 0, 4, 0], [0, 0, 0, 0, 0]])
def test_decoding_far_past_the_window_keeps_token_pages_bounded(ratios: list[int]) -> None:
    cfg = ModelConfig.preset("v4-mini").replace(compress_ratios=ratios)
    bs = 4
    pool = CachePool(cfg, allocate=False, block_size=bs)
    span = 128 if 128 in ratios else cfg.window_size      # positions a step may read behind it
    pool.add_request("r", list(range(40)))
    pool.plan("r", 40)
    pool.advance("r", 40)
    st = pool.requests["r"]
    for p in range(40, 700):
        pool.append_tokens("r", [p % cfg.vocab_size])
        pool.plan("r", 1)
        pool.advance("r", 1)
        held = [b for b in st.tables["token"] if b >= 0]
        assert pool.allocators["token"].in_use == len(held) <= span // bs + 2
        lo = first_needed_position(cfg, p + 1)
        assert st.tables["token"][:lo // bs] == [-1] * (lo // bs) and -1 not in st.tables["token"][lo // bs:]
        for k in ("state4", "state128"):
            if k in pool.kinds:         # held from the start of the block before / of the unfinished block
                sbs, lo = pool.block_sizes[k], first_needed_position(cfg, p + 1, k)
                assert st.tables[k][:lo // sbs] == [-1] * (lo // sbs) and -1 not in st.tables[k][lo // sbs:]
                assert pool.allocators[k].in_use <= (8 if k == "state4" else 128) // sbs + 2
    for k in pool.kinds:
        if k in ("c4", "c128"):
            r = {"c4": 4, "c128": 128}[k]
            assert pool.allocators[k].in_use == -(-(700 // r) // bs)
    pool.release("r")
    assert pool.pages_in_use() == dict.fromkeys(pool.kinds, 0)


def test_plan_rolls_back_when_one_kind_runs_out() -> None:
    cfg = small_cfg()
    pool = CachePool(cfg, blocks={"token": 40, "c4": 2, "c128": 2}, block_size=8, allocate=False)
    pool.add_request("a", list(range(100)))
    pool.add_request("b", list(range(100)))
    pool.plan("a", 40)                    # 10 entries: 2 c4 pages
    before = snapshot(pool)
    with pytest.raises(PoolExhaustedError, match="c4: 1 needed, 0 free of 2"):
        pool.plan("b", 8)                 # 1 token page (free), 2 entries: 1 c4 page (none free)
    assert snapshot(pool) == before
    with pytest.raises(PoolExhaustedError):
        pool.schedule([("b", 3), ("a", 70)])   # b alone fits; a (at 0) needs a third c4 page
    assert snapshot(pool) == before


def test_request_errors_change_nothing() -> None:
    cfg = small_cfg(max_seq_len=64)
    pool = CachePool(cfg, block_size=8, allocate=False)
    pool.add_request("a", [1, 2, 3])
    before = snapshot(pool)
    cases = [
        (lambda: pool.add_request("a", [1]), "already active"),
        (lambda: pool.add_request("b", []), "at least one token"),
        (lambda: pool.add_request("b", [1, 1000]), r"\[0, vocab_size = 1000\), got \[1000\]"),
        (lambda: pool.add_request("b", list(range(65))), "at most max_seq_len = 64"),
        (lambda: pool.add_request(["x"], [1]), "hashable"),
        (lambda: pool.plan("a", 0), "n_tokens must be an int >= 1"),
        (lambda: pool.plan("a", 65), "past max_seq_len = 64"),
        (lambda: pool.plan("zz", 1), "'zz' is not active"),
        (lambda: pool.advance("a", 1), "not planned"),
        (lambda: pool.append_tokens("a", [5, -1]), "got \\[-1\\]"),
        (lambda: pool.release("zz"), "not active"),
    ]
    for call, msg in cases:
        with pytest.raises(RangeError, match=msg):
            call()
        assert snapshot(pool) == before
    pool.plan("a", 5)
    before = snapshot(pool)
    with pytest.raises(RangeError, match="need tokens not known yet"):
        pool.advance("a", 4)
    assert snapshot(pool) == before
    pool.release("a")
    with pytest.raises(RangeError, match="already released"):
        pool.release("a")
    assert pool.pages_in_use() == dict.fromkeys(pool.kinds, 0)


# ---------------------------------------------------------------------------------------------- layouts
#: (scale_fmt, scale_dtype) of the config -> the scale format of the model's FP8 KV round trip
SCALE_FORMATS = {(None, "fp32"): None, ("ue8m0", "fp32"): "ue8m0", (None, "fp8"): "ue8m0", ("ue8m0", "fp8"): "ue8m0"}


def test_layout_rule_and_defaults() -> None:
    from v4hal.serve import layout_problem
    from v4hal.serve.pool import kv_scale_fmt

    for (fmt, sdt), kv in SCALE_FORMATS.items():
        cfg = tiny_v4_cfg(fmt, sdt)
        assert kv_scale_fmt(cfg) == kv
        assert cache_layouts("cpu", cfg) == (("model1_fp8" if kv else "bf16"), "indexer_fp4")
        for attn in PAGED_LAYOUTS:
            for idx in PAGED_LAYOUTS:
                ok = (attn == "bf16" or (attn == "model1_fp8" and kv == "ue8m0")) and idx in ("indexer_fp4", "bf16")
                assert (layout_problem(cfg, attn, idx) is None) == ok, (fmt, sdt, attn, idx)
    assert cache_layouts(None) == ("model1_fp8", "indexer_fp4")
    cfg = tiny_v4_cfg(None, "fp32")
    pool = CachePool(cfg, allocate=False)
    assert (pool.attn_layout, pool.indexer_layout) == ("bf16", "indexer_fp4")
    with pytest.raises(RangeError, match=r"CachePool: attn_layout 'model1_fp8' stores FP8 with power-of-two "
                                         r"\(ue8m0\) scales, but this model rounds its KV with scale_fmt None"):
        CachePool(cfg, attn_layout="model1_fp8", allocate=False)
    with pytest.raises(RangeError, match=r"indexer_layout 'indexer_fp8' would round the model's FP4 indexer keys "
                                         r"again \(one fp32 scale per entry\)"):
        CachePool(small_cfg(), indexer_layout="indexer_fp8", allocate=False)


@pytest.fixture(scope="module", params=list(SCALE_FORMATS), ids=lambda p: f"{p[0]}-{p[1]}")
def layout_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    prev = torch.get_num_threads()
    torch.set_num_threads(1)            # fp32 GEMM results depend on the thread count
    model = random_model(tiny_v4_cfg(*request.param), tmp_path_factory.mktemp("layouts"))
    yield model
    torch.set_num_threads(prev)


def test_every_layout_stores_what_the_model_computed(layout_model) -> None:
    """Paged logits (forward_batch) equal the contiguous path's (forward) bit for bit for every layout pair the
    pool accepts; every other pair is refused before anything is allocated."""
    from v4hal.serve.pool import layout_problem

    model = layout_model
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (137,), generator=torch.Generator().manual_seed(1)).tolist()
    want = model.forward(torch.tensor([prompt]), 0)[0]          # crosses ratio-4 and ratio-128 entries
    pairs = [(None, None)] + [(a, i) for a in PAGED_LAYOUTS for i in PAGED_LAYOUTS]
    ran = 0
    for attn, idx in pairs:
        why = layout_problem(cfg, attn, idx) if attn else None
        if why is not None:
            with pytest.raises(RangeError, match="would round|stores FP8 with power-of-two"):
                CachePool(cfg, block_size=16, attn_layout=attn, indexer_layout=idx)
            continue
        pool = CachePool(cfg, block_size=16, attn_layout=attn, indexer_layout=idx)
        pool.add_request("r", prompt[:100])
        first = model.forward_batch(pool.schedule([("r", 100)]), pool).logits[0]
        pool.advance("r", 100)
        pool.append_tokens("r", prompt[100:])
        got = model.forward_batch(pool.schedule([("r", 37)]), pool).logits[0]
        assert torch.equal(got, want), (attn, idx, float((got - want).abs().max()))
        assert torch.equal(first, model.forward(torch.tensor([prompt[:100]]), 0)[0]), (attn, idx)
        ran += 1
    assert ran == (5 if SCALE_FORMATS[(cfg.scale_fmt, cfg.scale_dtype)] else 3)
