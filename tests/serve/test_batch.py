"""ForwardBatch: what a pool builds for mixed prefill chunks and decode tokens, its checks, and batches
over a runtime's own block tables."""
from __future__ import annotations

import pytest
import torch

from v4hal.hal.errors import DTypeError, RangeError, ShapeError
from v4hal.serve import CachePool, ForwardBatch

from .helpers import random_model, small_cfg, snapshot, tiny_v4_cfg

BS = 8


def _pool() -> CachePool:
    pool = CachePool(small_cfg(max_seq_len=512), block_size=BS, allocate=False,
                     blocks={"token": 64, "c4": 16, "c128": 4})
    pool.add_request("a", list(range(100, 140)))      # 40 tokens
    pool.add_request("b", list(range(200, 210)))      # 10 tokens
    pool.schedule([("a", 30)])
    pool.advance("a", 30)
    return pool


def test_mixed_batch_contents() -> None:
    pool = _pool()
    batch = pool.schedule([("b", 10), ("a", 1)])
    assert batch.req_ids == ("b", "a") and batch.query_lens == (10, 1) and batch.start_positions == (0, 30)
    assert batch.input_ids.tolist() == list(range(200, 210)) + [130]
    assert batch.positions.tolist() == list(range(10)) + [30]
    assert batch.req_index.tolist() == [0] * 10 + [1]
    assert batch.cu_seqlens.tolist() == [0, 10, 11] and batch.seq_lens.tolist() == [10, 31]
    assert batch.last_token_index.tolist() == [9, 10]
    for t in (batch.positions, batch.req_index, batch.cu_seqlens, batch.start_pos, batch.seq_lens, batch.token_slots):
        assert t.dtype == torch.int32
    ta, tb = pool.requests["a"].tables, pool.requests["b"].tables
    bt = batch.block_tables["token"]
    assert bt.shape == (2, 4) and bt[0].tolist() == tb["token"] + [-1, -1] and bt[1].tolist() == ta["token"]
    want = [tb["token"][p // BS] * BS + p % BS for p in range(10)] + [ta["token"][3] * BS + 6]
    assert batch.token_slots.tolist() == want
    # entries completed: b at positions 3 and 7 (entries 0, 1); a's position 30 completes nothing
    c4 = [-1] * 11
    c4[3], c4[7] = tb["c4"][0] * BS + 0, tb["c4"][0] * BS + 1
    assert batch.entry_slots["c4"].tolist() == c4
    assert batch.entry_slots["c128"].tolist() == [-1] * 11
    assert batch.block_tables["c128"].tolist() == [[-1], [-1]]
    assert batch.max_query_len == 10 and batch.max_context_len == 31 and batch.num_tokens == 11


def test_batch_errors_change_nothing() -> None:
    pool = _pool()
    pool.plan("b", 4)
    before = snapshot(pool)
    cases = [
        ([("a", 1), ("a", 1)], "appears twice"),
        ([("b", 0)], "n_tokens must be an int >= 1"),
        ([("b", 11)], "need tokens not known yet"),
        ([("b", 5)], "not planned"),
        ([("zz", 1)], "not active"),
        ([], "at least one"),
        ([("b",)], "pair"),
    ]
    for items, msg in cases:
        with pytest.raises(RangeError, match=msg):
            pool.build_batch(items)
        assert snapshot(pool) == before
    short = CachePool(small_cfg(max_seq_len=32), block_size=BS, allocate=False)
    short.add_request("x", list(range(32)))
    short.schedule([("x", 32)])
    short.advance("x", 32)
    with pytest.raises(RangeError, match="max_seq_len = 32"):
        short.build_batch([("x", 1)])
    with pytest.raises(RangeError, match="max_seq_len = 32"):
        short.append_tokens("x", [1])


#: blocks per kind of `_pool` (state kinds: the default count plus the reserved block 0)
NUM_BLOCKS = {"token": 64, "c4": 16, "c128": 4, "state4": 2 * 32 + 1, "state128": 2 * 32 + 1}


def _tables(batch: ForwardBatch) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in batch.block_tables.items()}


def _from(batch: ForwardBatch, **over: object) -> ForwardBatch:
    args = dict(req_ids=batch.req_ids, input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens,
                start_pos=batch.start_pos, block_tables=_tables(batch), block_size=BS, num_blocks=NUM_BLOCKS)
    args.update(over)
    return ForwardBatch.from_block_tables(small_cfg(max_seq_len=512), **args)


def test_runtime_tables_give_the_same_batch() -> None:
    batch = _pool().schedule([("b", 10), ("a", 1)])
    again = _from(batch)
    for f in ("input_ids", "positions", "req_index", "cu_seqlens", "start_pos", "seq_lens", "token_slots",
              "last_token_index"):
        assert torch.equal(getattr(again, f), getattr(batch, f)), f
    for k in batch.block_tables:
        assert torch.equal(again.block_tables[k], batch.block_tables[k])
    for k in batch.entry_slots:
        assert torch.equal(again.entry_slots[k], batch.entry_slots[k])


def test_runtime_table_errors() -> None:
    batch = _pool().schedule([("b", 10), ("a", 1)])
    t = _tables(batch)
    with pytest.raises(DTypeError, match="cu_seqlens must be int32 or int64, got float32"):
        _from(batch, cu_seqlens=batch.cu_seqlens.float())
    with pytest.raises(DTypeError, match=r"block_tables\['c4'\] must be int32 or int64, got int16"):
        _from(batch, block_tables={**t, "c4": t["c4"].short()})
    with pytest.raises(ShapeError, match=r"start_pos must be \[B\] = \[2\]"):
        _from(batch, start_pos=batch.start_pos[:1])
    with pytest.raises(RangeError, match="exactly the kinds"):
        _from(batch, block_tables={"token": t["token"]})
    with pytest.raises(RangeError, match="cu_seqlens must start at 0 and end at T = 11"):
        _from(batch, cu_seqlens=torch.tensor([0, 10, 12], dtype=torch.int32))
    with pytest.raises(RangeError, match="request 'a' must have at least one token"):
        _from(batch, cu_seqlens=torch.tensor([0, 11, 11], dtype=torch.int32))
    with pytest.raises(RangeError, match=r"positions 512 .. 512 must lie in \[0, max_seq_len = 512\)"):
        _from(batch, start_pos=torch.tensor([0, 512], dtype=torch.int32))
    # a table too short for the positions: request b's tokens 8 and 9 sit on page 1
    short = {**t, "token": t["token"].clone()}
    short["token"][0, 1] = -1
    with pytest.raises(RangeError, match=r"row 0 \(request 'b', positions 0 .. 9\) must hold a block for pages "
                                         r"0 .. 1; page 1 is -1"):
        _from(batch, block_tables=short)
    with pytest.raises(RangeError, match="page 3 is past the table's end"):
        _from(batch, block_tables={**t, "token": t["token"][:, :3]})
    # a slot used by two requests: b's page 0 is a's page 3 too
    clash = {**t, "token": t["token"].clone()}
    clash["token"][0, 0] = t["token"][1, 3]
    with pytest.raises(RangeError, match=f"block {int(t['token'][1, 3])} is written by request 'b' \\(its page 0\\) "
                                         "and is in the table of request 'a' too"):
        _from(batch, block_tables=clash)
    with pytest.raises(RangeError, match=r"outside -1 and \[0, num_blocks = 4\): \[4\]"):
        _from(batch, block_tables={**t, "c128": torch.tensor([[4], [-1]], dtype=torch.int32)})
    with pytest.raises(RangeError, match="req_ids must be distinct"):
        _from(batch, req_ids=("a", "a"))
    with pytest.raises(RangeError, match="input_ids must lie in"):
        _from(batch, input_ids=batch.input_ids + 1000)


def test_state_tables_use_their_own_page_size_and_rule() -> None:
    batch = _pool().schedule([("b", 10), ("a", 1)])
    assert batch.block_sizes == {"token": BS, "c4": BS, "c128": BS, "state4": 16, "state128": 16}
    t = _tables(batch)
    assert all(x == -1 or x >= 1 for k in ("state4", "state128") for x in t[k].flatten().tolist())   # 0: reserved
    # a at 30 reads ratio-4 state from 24 (page 1 of 16 positions), ratio-128 state from 0 (page 0)
    released = {**t, "state4": t["state4"].clone()}
    released["state4"][1, 0] = -1
    assert _from(batch, block_tables=released).block_tables["state4"][1, 0] == -1
    for kind, page in (("state4", 1), ("state128", 0)):
        short = {**t, kind: t[kind].clone()}
        short[kind][1, page] = -1
        with pytest.raises(RangeError, match=rf"block_tables\['{kind}'\] row 1 \(request 'a', positions 30 .. 30\) "
                                             rf"must hold a block for pages {page} .. 1; page {page} is -1"):
            _from(batch, block_tables=short)
    with pytest.raises(RangeError, match=r"block_tables\['state4'\] row 0 \(request 'b', positions 0 .. 9\) must "
                                         r"hold a block for pages 0 .. 1; page 1 is -1"):   # pages of 8 now
        _from(batch, state_block_size=BS)
    with pytest.raises(RangeError, match="state_block_size must be an int >= 1, got 0"):
        _from(batch, state_block_size=0)


# ------------------------------------------------------------------ runtime tables: sharing, ranges, progress
#: request "x" at positions 0 .. 9 on blocks of every kind (c128: no entry completed yet)
TX = {"token": [0, 1], "c4": [0], "c128": [], "state4": [1], "state128": [1]}


def _rt(reqs: list[tuple[str, int, int, dict[str, list[int]]]], *, dtype: torch.dtype = torch.int32,
        num_blocks: dict[str, int] | None = NUM_BLOCKS) -> ForwardBatch:
    """A runtime batch of ``(req_id, start, n_tokens, tables)`` items (token ids: ``start .. start + n - 1``)."""
    cfg = small_cfg(max_seq_len=512)
    cu = [0]
    for _, _, n, _ in reqs:
        cu.append(cu[-1] + n)
    tables = {}
    for k in TX:
        width = max([1] + [len(r[3][k]) for r in reqs])
        tables[k] = torch.tensor([r[3][k] + [-1] * (width - len(r[3][k])) for r in reqs], dtype=dtype)
    return ForwardBatch.from_block_tables(
        cfg, req_ids=[r[0] for r in reqs], input_ids=torch.tensor([s + j for _, s, n, _ in reqs for j in range(n)]),
        cu_seqlens=torch.tensor(cu, dtype=dtype), start_pos=torch.tensor([r[1] for r in reqs], dtype=dtype),
        block_tables=tables, block_size=BS, num_blocks=num_blocks)


def test_runtime_tables_sharing_rules() -> None:
    """A block another request of the step writes, a block listed twice in a row and state block 0 are refused
    when the batch is built; pages shared read-only are accepted."""
    y_reads_x = {**TX, "token": [-1, 1, 6]}          # y decodes at 16: window from 9, page 1 = x's block 1
    with pytest.raises(RangeError, match=r"block_tables\['token'\]: block 1 is written by request 'x' \(its page 1\) "
                                         r"and is in the table of request 'y' too; a page may be shared only while "
                                         r"no request of the step writes it"):
        _rt([("x", 0, 10, TX), ("y", 16, 1, {**y_reads_x, "c4": [4], "state4": [2, 3], "state128": [3, 4]})])
    with pytest.raises(RangeError, match=r"block_tables\['token'\] row 0 \(request 'x'\) lists block 0 at pages 0 "
                                         r"and 1: a block holds one page of one request"):
        _rt([("x", 0, 10, {**TX, "token": [0, 0]})])
    with pytest.raises(RangeError, match=r"block_tables\['state4'\] row 0 \(request 'x'\) holds block ids outside -1 "
                                         r"and \[1, num_blocks = 65\): \[0\]; block 0 of 'state4' is reserved"):
        _rt([("x", 0, 10, {**TX, "state4": [0]})])
    with pytest.raises(RangeError, match=r"num_blocks must map each kind"):
        _rt([("x", 0, 10, TX)], num_blocks=None)
    # x decodes at 10 and y at 12: both read c4 block 0 (entries 0 .. 2), neither completes an entry there
    both = _rt([("x", 10, 1, TX), ("y", 12, 1, {**TX, "token": [2, 3], "state4": [2], "state128": [3]})])
    assert both.block_tables["c4"].tolist() == [[0], [0]]
    wide = _rt([("x", 10, 1, TX), ("y", 12, 1, {**TX, "token": [2, 3], "state4": [2], "state128": [3]})],
               dtype=torch.int64)
    for f in ("token_slots", "positions", "cu_seqlens", "start_pos"):
        assert torch.equal(getattr(wide, f), getattr(both, f))
    assert all(torch.equal(wide.block_tables[k], both.block_tables[k]) for k in TX)


def _runtime_pool(**kw: object) -> CachePool:
    return CachePool(small_cfg(max_seq_len=512), block_size=BS, allocate=False,
                     blocks={"token": 64, "c4": 16, "c128": 4}, **kw)


def _step(pool: CachePool, batch: ForwardBatch) -> None:
    """What `V4Model.forward_batch` does around a step that runs: check, then record its writes."""
    pool.end_step(pool.begin_step(batch))


def test_runtime_steps_must_continue_what_the_pages_hold() -> None:
    """The pool records what each runtime step writes; a step that skips or replays positions, or reads pages
    nothing was written to, is refused with the records unchanged."""
    pool = _runtime_pool()
    assert pool.num_blocks == NUM_BLOCKS
    first = _rt([("x", 0, 10, TX)])
    pool.begin_step(first)                                            # a step that raised: nothing recorded
    assert not pool.fill.written
    _step(pool, first)                                                # so the runtime may retry it
    assert pool.fill.end["token"] == {0: 8, 1: 10} and pool.fill.end["c4"] == {0: 2}
    before = {k: dict(v) for k, v in pool.fill.end.items()}
    cases = [
        (12, r"request 'x' \(positions 12 .. 12\), token page 1 \(block 1\) must hold positions 8 .. 11 and no "
             r"more; it holds positions 8 .. 9 \(start_pos skips positions never computed\)"),
        (5, r"token page 0 \(block 0\) must hold positions 0 .. 4 and no more; it holds positions 0 .. 7 "
            r"\(start_pos replays computed positions\)"),
        (16, r"token page 1 \(block 1\) must hold positions 8 .. 15 \(the step reads them\); it holds positions "
             r"8 .. 9"),
    ]
    for start, msg in cases:
        with pytest.raises(RangeError, match=msg):
            pool.begin_step(_rt([("x", start, 1, {**TX, "token": [0, 1, 2], "state4": [1, 2],
                                                  "state128": [1, 2]})]))
        assert pool.fill.end == before
    with pytest.raises(RangeError, match=r"c4 page 0 \(block 3\) must hold entries 0 .. 1 and no more; it holds "
                                         r"nothing written \(start_pos skips positions never computed\)"):
        pool.begin_step(_rt([("x", 10, 1, {**TX, "c4": [3]})]))      # pages of another (empty) block
    _step(pool, _rt([("x", 10, 6, TX)]))                              # continues: positions 10 .. 15
    assert pool.fill.end["token"] == {0: 8, 1: 16} and pool.fill.end["c4"] == {0: 4}
    # a new request on fresh pages, and a request recomputed from 0 on the blocks x had, both start fresh
    _step(pool, _rt([("z", 0, 3, {**TX, "token": [5], "c4": [-1], "state4": [6], "state128": [7]})]))
    _step(pool, _rt([("x", 0, 4, TX)]))


def test_a_batch_runs_only_on_its_own_pool() -> None:
    """A pool-built batch is refused by another pool and once stale; runtime tables are refused by a pool that
    manages requests of its own or has fewer blocks, and a pool that ran runtime tables refuses its own."""
    a, b = _pool(), _pool()
    batch = a.schedule([("b", 10), ("a", 1)])
    with pytest.raises(RangeError, match="the batch was built by another CachePool"):
        b.begin_step(batch)
    a.begin_step(batch)
    a.advance_batch(batch)
    with pytest.raises(RangeError, match=r"the batch starts request 'b' at position 0, the pool has computed it up "
                                         r"to 10: the batch is stale and would compute positions 0 .. 9 again"):
        a.begin_step(batch)
    with pytest.raises(RangeError, match=r"this pool manages 2 requests .* which the runtime's blocks would "
                                         r"overwrite"):
        a.begin_step(_rt([("x", 0, 10, TX)]))
    small = _runtime_pool()
    _step(small, _rt([("x", 0, 10, TX)]))
    with pytest.raises(RangeError, match=r"block_tables\['token'\] holds block 70, this pool has 64 blocks"):
        small.begin_step(_rt([("y", 0, 1, {**TX, "token": [70]})], num_blocks={**NUM_BLOCKS, "token": 80}))
    small.add_request("p", [1, 2, 3])
    with pytest.raises(RangeError, match="this pool has run a runtime's own block tables"):
        small.begin_step(small.schedule([("p", 3)]))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    prev = torch.get_num_threads()
    torch.set_num_threads(1)            # fp32 GEMM results depend on the thread count
    yield random_model(tiny_v4_cfg(), tmp_path_factory.mktemp("tiny"))
    torch.set_num_threads(prev)


def _caches(pool: CachePool) -> list[torch.Tensor]:
    return [getattr(pool.layers[s.layer], s.name).clone() for s in pool.specs]


def test_runtime_tables_on_a_bare_pool_equal_the_contiguous_path(tiny_model) -> None:
    """A runtime's own tables (here from an allocator-only pool) on a pool holding just the tensors: prefill
    chunks and a decode step give the contiguous path's logits bit for bit; a step that replays positions is
    refused by forward_batch before any cache byte changes."""
    model = tiny_model
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (140,), generator=torch.Generator().manual_seed(2)).tolist()
    tables = CachePool(cfg, block_size=16, allocate=False)          # the runtime's allocator
    caches = CachePool(cfg, block_size=16)                          # the tensors
    tables.add_request("r", prompt)

    def step(n: int) -> torch.Tensor:
        b = tables.schedule([("r", n)])
        rt = ForwardBatch.from_block_tables(cfg, req_ids=["r"], input_ids=b.input_ids, cu_seqlens=b.cu_seqlens.long(),
                                            start_pos=b.start_pos, block_tables=b.block_tables, block_size=16,
                                            num_blocks=caches.num_blocks)
        out = model.forward_batch(rt, caches).logits[0]
        tables.advance_batch(b)
        return out

    step(100)
    assert torch.equal(step(39), model.forward(torch.tensor([prompt[:139]]), 0)[0])
    assert torch.equal(step(1), model.forward(torch.tensor([prompt]), 0)[0])
    st = tables.requests["r"]
    replay = ForwardBatch.from_block_tables(
        cfg, req_ids=["r"], input_ids=torch.tensor(prompt[138:139]), cu_seqlens=torch.tensor([0, 1]),
        start_pos=torch.tensor([138]), block_tables={k: torch.tensor([v]) for k, v in st.tables.items()},
        block_size=16, num_blocks=caches.num_blocks)
    before = _caches(caches)
    with pytest.raises(RangeError, match=r"token page 8 \(block \d+\) must hold positions 128 .. 137 and no more; "
                                         r"it holds positions 128 .. 139 \(start_pos replays computed positions\)"):
        model.forward_batch(replay, caches)
    assert all(torch.equal(x, y) for x, y in zip(before, _caches(caches)))


def test_forward_batch_refuses_another_pools_batch(tiny_model) -> None:
    """A batch built by one pool, run on another pool of the same config whose request is running, is refused
    before anything is written: that pool's request goes on with the logits it had."""
    model = tiny_model
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    a, b = CachePool(cfg, block_size=16), CachePool(cfg, block_size=16)
    for pool in (a, b):
        pool.add_request("r", prompt[:19])
        batch = pool.schedule([("r", 19)])
        model.forward_batch(batch, pool)
        pool.advance_batch(batch)
        pool.append_tokens("r", prompt[19:])
    foreign = a.schedule([("r", 1)])
    before = _caches(b)
    with pytest.raises(RangeError, match="the batch was built by another CachePool"):
        model.forward_batch(foreign, b)
    assert all(torch.equal(x, y) for x, y in zip(before, _caches(b)))
    assert torch.equal(model.forward_batch(b.schedule([("r", 1)]), b).logits[0],
                       model.forward(torch.tensor([prompt]), 0)[0])


def test_runtime_prefix_sharing_with_a_copied_partial_page(tiny_model) -> None:
    """Request y reuses the first 16 positions of x: the full pages shared (read-only), the partly filled
    ratio-4 entry page copied with `CachePool.copy_page`; y's logits equal y alone through the contiguous
    path bit for bit. A copy the pool was not told about reads as a page holding nothing."""
    model = tiny_model
    cfg = model.config
    g = torch.Generator().manual_seed(6)
    prefix, tail_x, tail_y = (torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (16, 4, 10))
    caches = CachePool(cfg, block_size=16)

    def run(rid: str, tokens: list[int], start: int, tables: dict[str, list[int]]) -> torch.Tensor:
        batch = ForwardBatch.from_block_tables(
            cfg, req_ids=[rid], input_ids=torch.tensor(tokens), cu_seqlens=torch.tensor([0, len(tokens)]),
            start_pos=torch.tensor([start]), block_tables={k: torch.tensor([v]) for k, v in tables.items()},
            block_size=16, num_blocks=caches.num_blocks)
        return model.forward_batch(batch, caches).logits[0]

    run("x", prefix + tail_x, 0, {"token": [1, 2], "c4": [1], "c128": [-1], "state4": [1, 2], "state128": [1, 2]})
    ty = {"token": [1, 3], "c4": [2], "c128": [-1], "state4": [1, 3], "state128": [1, 3]}
    caches._copy_page("c4", 1, 2)                     # the bytes alone: the pool does not know what block 2 holds
    with pytest.raises(RangeError, match=r"c4 page 0 \(block 2\) must hold entries 0 .. 3 and no more; it holds "
                                         r"nothing written"):
        run("y", tail_y, 16, ty)
    with pytest.raises(RangeError, match=r"upto must be a position in \[0, max_seq_len = 256\], got 257"):
        caches.copy_page("c4", 1, 2, 257)
    caches.copy_page("c4", 1, 2, 16)                  # x's entries 0 .. 3 (its entry 4 is past the prefix)
    assert caches.fill.end["c4"][2] == 4
    assert torch.equal(run("y", tail_y, 16, ty), model.forward(torch.tensor([prefix + tail_y]), 0)[0])
