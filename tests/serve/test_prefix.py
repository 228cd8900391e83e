"""Prefix reuse: registration, lookup (longest, collision-proof, leaves a token to compute), shared pages
and copy-on-write of partly filled compressed and compressor-state pages on real caches, LRU eviction."""
from __future__ import annotations

import pytest
import torch

import v4hal.serve.prefix as prefix_mod
from v4hal.hal.errors import RangeError
from v4hal.serve import CachePool, PoolExhaustedError

from .helpers import small_cfg, snapshot

BS = 8


def _run(pool: CachePool, rid: str, prompt: list[int], chunks: list[int]) -> None:
    pool.add_request(rid, prompt)
    for n in chunks:
        pool.advance_batch(pool.schedule([(rid, n)]))


def _page(pool: CachePool, t: torch.Tensor, spec_layout: str | None, block: int) -> torch.Tensor:
    """The bytes of page ``block`` of cache tensor ``t`` (``t.shape[1]`` entries per page)."""
    from v4hal.ops.paged import PAGED_LAYOUTS
    bs = t.shape[1]
    pb = 4 * t.shape[-1] * bs if spec_layout is None else PAGED_LAYOUTS[spec_layout].page_bytes(
        PAGED_LAYOUTS[spec_layout].dim_of_width(t.shape[-1]), bs)
    raw = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
    return raw[block * pb:(block + 1) * pb].clone()


def _tensors(pool: CachePool, kind: str) -> list[tuple[torch.Tensor, str | None]]:
    return [(getattr(pool.layers[s.layer], s.name), s.layout) for s in pool.specs if s.kind == kind]


def test_reuse_shares_full_pages_and_copies_partial_ones() -> None:
    g = torch.Generator().manual_seed(0)
    pool = CachePool(small_cfg(), blocks={"token": 48, "c4": 16, "c128": 4}, block_size=BS)
    for s in pool.specs:        # stand-in cache contents, so copies can be checked byte for byte
        torch.empty(0, dtype=torch.uint8).set_(getattr(pool.layers[s.layer], s.name).untyped_storage()).copy_(
            torch.randint(0, 256, (getattr(pool.layers[s.layer], s.name).untyped_storage().nbytes(),),
                          dtype=torch.uint8, generator=g))
    prompt = torch.randint(0, 1000, (150,), generator=g).tolist()
    _run(pool, "A", prompt, [64, 64, 8])
    a = pool.requests["A"]
    entry = pool.register_prefix("A", 136)
    assert pool.register_prefix("A", 136) is entry
    # a continuation at 136 reads window positions from 129: token page 16 only; compressor state from 132
    # (state4) and 128 (state128): state page 8 (positions 128 .. 143, partly filled)
    assert entry.pages["token"] == [-1] * 16 + [a.tables["token"][16]]
    assert entry.pages["state4"] == [-1] * 8 + [a.tables["state4"][8]]
    assert entry.pages["state128"] == [-1] * 8 + [a.tables["state128"][8]]
    assert entry.pages["c4"] == a.tables["c4"][:5] and entry.partial == {
        "token": False, "c4": True, "c128": True, "state4": True, "state128": True}
    assert pool.allocators["token"].refcount(a.tables["token"][16]) == 2

    b = pool.add_request("B", prompt[:136] + [7] * 20)
    assert (b.computed, b.prefix_len, pool.prefix.hits, pool.prefix.tokens_saved) == (136, 136, 1, 136)
    assert b.tables["token"] == entry.pages["token"] and b.shared == {"token": 17, "c4": 4, "c128": 0,
                                                                      "state4": 8, "state128": 8}
    assert b.tables["c4"][:4] == a.tables["c4"][:4] and b.tables["c4"][4] not in a.tables["c4"]
    assert b.tables["c128"][0] != a.tables["c128"][0]
    assert b.tables["state4"][:8] == [-1] * 8 and b.tables["state4"][8] != a.tables["state4"][8]
    for kind, src, dst in (("c4", a.tables["c4"][4], b.tables["c4"][4]),
                           ("c128", a.tables["c128"][0], b.tables["c128"][0]),
                           ("state4", a.tables["state4"][8], b.tables["state4"][8]),
                           ("state128", a.tables["state128"][8], b.tables["state128"][8])):
        for t, lay in _tensors(pool, kind):
            assert torch.equal(_page(pool, t, lay, dst), _page(pool, t, lay, src))
    # the owner writes later entries into its page; the copy does not change
    own = [(t, lay, _page(pool, t, lay, b.tables["c4"][4])) for t, lay in _tensors(pool, "c4")]
    for t, _ in _tensors(pool, "c4"):
        t[a.tables["c4"][4]].zero_()
    for t, lay, before in own:
        assert torch.equal(_page(pool, t, lay, b.tables["c4"][4]), before)

    # B's step writes only pages it owns alone
    pool.append_tokens("A", [5])
    batch = pool.schedule([("B", 20), ("A", 1)])
    shared = {k: set(b.tables[k][:b.shared[k]]) | set(a.tables[k]) for k in pool.kinds}
    rows = batch.req_index == 0
    assert not set((batch.token_slots[rows] // BS).tolist()) & shared["token"]
    for k, slots in batch.entry_slots.items():
        written = slots[rows & (slots >= 0)] // BS
        assert written.numel() == (5 if k == "c4" else 0)      # entries 34 .. 38
        assert not set(written.tolist()) & shared[k]
    pool.advance_batch(batch)

    # releasing both requests leaves only the entry's references
    pool.release("A")
    pool.release("B")
    assert pool.pages_in_use() == {"token": 1, "c4": 5, "c128": 1, "state4": 1, "state128": 1}
    pool.evict_prefix(entry)
    assert pool.pages_in_use() == dict.fromkeys(pool.kinds, 0) and len(pool.prefix) == 0
    with pytest.raises(RangeError, match="not registered"):
        pool.evict_prefix(entry)


def test_shared_page_write_is_refused() -> None:
    pool = CachePool(small_cfg(), block_size=BS, allocate=False)
    prompt = list(range(100))
    _run(pool, "A", prompt, [64])
    pool.register_prefix("A", 64)
    b = pool.add_request("B", prompt[:64] + [1, 2])
    assert b.computed == 64
    b.computed = 56              # as if B were to redo positions on a shared page
    with pytest.raises(RangeError, match="would write token page 7, which it shares with a registered prefix"):
        pool.build_batch([("B", 1)])


def test_lookup_rules() -> None:
    pool = CachePool(small_cfg(), block_size=BS, allocate=False)
    prompt = list(range(3, 103))
    _run(pool, "A", prompt, [64])
    e64 = pool.register_prefix("A", 64)
    pool.advance_batch(pool.schedule([("A", 32)]))
    e96 = pool.register_prefix("A")                     # the longest boundary: 96
    assert (e64.length, e96.length) == (64, 96)
    pool.advance_batch(pool.schedule([("A", 4)]))
    assert pool.register_prefix("A") is None           # at 100 the ratio-4 state before 96 is released
    assert pool.add_request("full", prompt[:96]).computed == 64       # leave one token to compute
    assert pool.add_request("long", prompt[:97]).computed == 96       # the longest match
    assert pool.add_request("other", [9] + prompt[1:97]).computed == 0
    assert pool.add_request("short", prompt[:64]).computed == 0
    assert (pool.prefix.hits, pool.prefix.lookups, pool.prefix.tokens_saved) == (2, 5, 160)
    for bad in (60, 0, 104, 2.0):
        with pytest.raises(RangeError, match="length must be a multiple of block_size = 8"):
            pool.register_prefix("A", bad)
    pool.add_request("C", list(range(300)))
    pool.advance_batch(pool.schedule([("C", 300)]))
    with pytest.raises(RangeError, match="no longer holds the token pages .* at 64 reads"):
        pool.register_prefix("C", 64)
    assert pool.register_prefix("C").length == 296


def test_hash_collisions_never_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefix_mod, "page_hash", lambda prev, tokens: 0)
    pool = CachePool(small_cfg(), block_size=BS, allocate=False)
    _run(pool, "A", list(range(40)), [32])
    pool.register_prefix("A", 32)
    _run(pool, "B", list(range(1, 41)), [32])
    pool.register_prefix("B", 32)
    assert len(pool.prefix) == 2
    assert pool.add_request("C", list(range(2, 40))).computed == 0
    assert pool.add_request("D", list(range(1, 40))).computed == 32
    assert pool.requests["D"].tables["token"][:4] == pool.requests["B"].tables["token"][:4]


def test_lru_eviction_before_exhaustion() -> None:
    pool = CachePool(small_cfg(), blocks={"state128": 24, "c4": 16, "c128": 4}, block_size=BS, state_block_size=BS,
                     allocate=False)
    x, y = list(range(70)), list(range(100, 170))
    for rid, prompt in (("X", x), ("Y", y)):
        _run(pool, rid, prompt, [64])
        pool.register_prefix(rid, 64)           # 8 state128 pages (a continuation at 64 reads from 0)
        pool.release(rid)
    assert pool.pages_in_use()["state128"] == 16
    _run(pool, "Z", x[:64] + [1], [1])          # a hit on X makes it the most recently used
    pool.release("Z")
    pool.add_request("W", list(range(300, 400)))
    pool.plan("W", 80)                           # 10 state128 pages, 8 free: evicts Y, keeps X
    assert [e.tokens[0] for e in pool.prefix.lru_order()] == [0]
    assert pool.pages_in_use()["state128"] == 18
    pool.add_request("V", list(range(500, 700)))
    before = snapshot(pool)
    with pytest.raises(PoolExhaustedError, match="state128: 15 needed, 6 free of 24"):
        pool.plan("V", 120)                      # evicting X frees 8 pages: not enough, so nothing is evicted
    assert snapshot(pool) == before
    pool.plan("V", 100)                          # 13 pages: evicts X
    assert len(pool.prefix) == 0 and pool.pages_in_use()["state128"] == 23


def test_copy_on_reuse_evicts_other_prefixes_or_falls_back() -> None:
    pool = CachePool(small_cfg(), blocks={"token": 40, "c4": 2, "c128": 1}, block_size=BS, allocate=False)
    a, b = list(range(30)), list(range(500, 530))         # 7 entries each: one c4 page
    for rid, prompt in (("A", a), ("B", b)):
        _run(pool, rid, prompt, [30])
        assert pool.register_prefix(rid, 24).partial["c4"]     # 6 entries: a partly filled page
        pool.release(rid)
    assert pool.allocators["c4"].num_free == 0
    c = pool.add_request("C", a[:24] + [1])                      # the copy evicts B's prefix, never A's
    assert c.computed == 24 and [e.tokens[0] for e in pool.prefix.lru_order()] == [0]
    e = pool.add_request("E", a[:24] + [2])                      # no page for the copy: computes from 0
    assert e.computed == 0 and pool.prefix.hits == 1 and len(pool.prefix) == 1
