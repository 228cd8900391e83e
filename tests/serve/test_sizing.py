"""Pool sizing: `request_pages` bounds what a request really holds in a `CachePool` (and is reached),
`pool_bytes` is what an allocated pool's tensors take, `blocks_for_budget` gives a pool that runs its
requests at once within the budget."""
from __future__ import annotations

import itertools

import pytest

from v4hal.hal.errors import RangeError
from v4hal.model.config import ModelConfig
from v4hal.serve import CachePool, PoolExhaustedError
from v4hal.serve.batch import POSITION_KINDS
from v4hal.serve.sizing import blocks_for_budget, pool_bytes, request_pages

MINI = ModelConfig.preset("v4-mini")                                  # window 16, ratios 4 and 128
WIDE = MINI.replace(window_size=128)                                  # V4-Flash / Pro's window


def peak_pages(pool: CachePool, rids: list[str], max_len: int, prompt: int, chunk: int) -> dict[str, int]:
    """Run ``rids`` side by side through the pool (prefill chunks of ``chunk`` up to ``prompt``, then decode
    steps of one token up to ``max_len``) without a model; the most pages of each kind in use at once."""
    for rid in rids:
        pool.add_request(rid, [i % 256 for i in range(max_len)])
    peak = dict.fromkeys(pool.kinds, 0)
    done = 0
    while done < max_len:
        n = min(chunk, prompt - done) if done < prompt else 1
        for rid in rids:
            pool.plan(rid, n)
        for k, v in pool.pages_in_use().items():
            peak[k] = max(peak[k], v)
        for rid in rids:
            pool.advance(rid, n)
        done += n
    return peak


CASES = [(cfg, max_len, chunk, bs) for cfg, (max_len, chunk, bs) in itertools.product(
    (MINI, WIDE), [(300, 64, 16), (300, 7, 16), (517, 64, 64), (1000, 128, 32), (129, 1, 16), (5, 64, 16)])]


@pytest.mark.parametrize("cfg,max_len,chunk,bs", CASES)
def test_request_pages_bound_what_the_pool_holds(cfg: ModelConfig, max_len: int, chunk: int, bs: int) -> None:
    bound = request_pages(cfg, max_len, chunk=chunk, block_size=bs)
    blocks = {k: max(1, n) for k, n in bound.items()}
    for prompt in (max_len, max_len // 2 or 1):
        pool = CachePool(cfg, blocks=blocks, block_size=bs, allocate=False)
        peak = peak_pages(pool, ["a"], max_len, prompt, chunk)
        assert all(peak[k] <= bound[k] for k in bound), (peak, bound)
        for k in bound:
            if k not in POSITION_KINDS:            # compressed pages are all held at the end: exact
                assert peak[k] == bound[k]


def test_request_pages_is_reached_and_one_page_less_runs_out() -> None:
    # window 16 + chunk 16 from position 9: positions 0 .. 24 on pages of 8 -> 4 pages of "token"
    bound = request_pages(MINI, 25, chunk=16, block_size=8)
    assert bound["token"] == 4
    pool = CachePool(MINI, blocks={k: max(1, n) for k, n in bound.items()}, block_size=8, allocate=False)
    pool.add_request("a", list(range(25)))
    pool.plan("a", 9)
    pool.advance("a", 9)
    pool.plan("a", 16)
    assert pool.pages_in_use()["token"] == 4
    short = {k: max(1, n) for k, n in bound.items()} | {"token": 3}
    pool = CachePool(MINI, blocks=short, block_size=8, allocate=False)
    pool.add_request("a", list(range(25)))
    pool.plan("a", 9)
    pool.advance("a", 9)
    with pytest.raises(PoolExhaustedError):
        pool.plan("a", 16)


@pytest.mark.parametrize("layouts", [("model1_fp8", "indexer_fp4"), ("bf16", "bf16")])
def test_pool_bytes_is_the_allocated_bytes(layouts: tuple[str, str]) -> None:
    blocks = {"token": 3, "c4": 5, "c128": 2, "state4": 4, "state128": 6}
    kw = dict(block_size=16, state_block_size=8, attn_layout=layouts[0], indexer_layout=layouts[1])
    pool = CachePool(MINI, blocks=blocks, **kw)
    tensors = [getattr(layer, name) for layer in pool.layers
               for name in ("window", "compressed", "indexer", "state", "index_state")]
    allocated = sum(t.untyped_storage().nbytes() for t in tensors if t is not None)
    assert pool_bytes(MINI, blocks, **kw) == allocated


def test_blocks_for_budget_runs_its_requests_within_the_budget() -> None:
    per = request_pages(MINI, 300, chunk=32, block_size=16)
    page = CachePool(MINI, block_size=16, allocate=False).page_bytes()
    one = sum(per[k] * page[k] for k in per)
    fixed = page["state4"] + page["state128"]                          # block 0 of each state kind
    budget = fixed + 3 * one + one // 2
    size = blocks_for_budget(MINI, budget, 300, chunk=32, block_size=16)
    assert size.requests == 3 and size.blocks == {k: 3 * n for k, n in per.items()}
    assert size.bytes == fixed + 3 * one == pool_bytes(MINI, size.blocks, block_size=16) <= budget
    pool = CachePool(MINI, blocks=size.blocks, block_size=16, allocate=False)
    peak_pages(pool, ["a", "b", "c"], 300, 200, 32)                 # three at once: no PoolExhaustedError
    with pytest.raises(PoolExhaustedError):
        peak_pages(CachePool(MINI, blocks=size.blocks, block_size=16, allocate=False), ["a", "b", "c", "d"],
                   300, 300, 32)
    assert blocks_for_budget(MINI, fixed + one, 300, chunk=32, block_size=16).requests == 1


def test_sizing_errors_name_the_argument() -> None:
    with pytest.raises(RangeError, match=r"blocks_for_budget: budget_bytes = 1000 does not hold one request of "
                                         r"300 positions: it needs \d+ bytes"):
        blocks_for_budget(MINI, 1000, 300)
    with pytest.raises(RangeError, match="request_pages: max_len must be at most the config's max_seq_len = 4096"):
        request_pages(MINI, 5000)
    with pytest.raises(RangeError, match="request_pages: chunk must be an int >= 1, got 0"):
        request_pages(MINI, 10, chunk=0)
    with pytest.raises(RangeError, match=r"pool_bytes: blocks has kinds \['c8'\]"):
        pool_bytes(MINI, {"c8": 1})
