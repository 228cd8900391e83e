"""ForwardBatch: what a pool builds for mixed prefill chunks and decode tokens, its checks, and batches
over a runtime's own block tables."""
from __future__ import annotations

import pytest
import torch

from v4hal.hal.errors import DTypeError, RangeError, ShapeError
from v4hal.serve import CachePool, ForwardBatch

from .helpers import small_cfg, snapshot

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


def _tables(batch: ForwardBatch) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in batch.block_tables.items()}


def _from(batch: ForwardBatch, **over: object) -> ForwardBatch:
    args = dict(req_ids=batch.req_ids, input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens,
                start_pos=batch.start_pos, block_tables=_tables(batch), block_size=BS,
                num_blocks={"token": 64, "c4": 16, "c128": 4})
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
    with pytest.raises(DTypeError, match="cu_seqlens must be int32, got int64"):
        _from(batch, cu_seqlens=batch.cu_seqlens.long())
    with pytest.raises(DTypeError, match=r"block_tables\['c4'\] must be int32"):
        _from(batch, block_tables={**t, "c4": t["c4"].long()})
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
    with pytest.raises(RangeError, match=f"block {int(t['token'][1, 3])} is written by request 'a' and by "
                                         "request 'b'"):
        _from(batch, block_tables=clash)
    with pytest.raises(RangeError, match=r"outside \[-1, 4\)"):
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
