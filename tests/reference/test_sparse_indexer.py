"""The candidate indexer (V4.1) on the backend the ``backend`` fixture names (``tests/triton/test_sparse_indexer.py``
runs these again on Triton under the interpreter).

Oracles, written here from the published semantics:
- sparse logits: the same backend's dense ``indexer_logits_paged`` gathered at the candidate blocks'
  positions, bit for bit (how DeepGEMM's test checks its paged sparse MQA logits);
- candidate blocks: a per-row loop (block max over visible positions, newest block kept, equal scores by
  ascending id, output ascending, -1 padded);
- sparse top-k: a per-row stable sort of the gathered logits; and with every visible block a candidate,
  the dense ``indexer_topk_paged`` exactly.
"""
from __future__ import annotations

import pytest
import torch

import v4hal
from v4hal.backends.reference import sparse_indexer as ref_sparse
from v4hal.hal import dispatch
from v4hal.hal.errors import RangeError, ShapeError

NB, BS, D, H = 11, 4, 128, 3


@pytest.fixture
def backend() -> str:
    return "reference"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def indexer_inputs(layout: str, ctx2d: bool = False, fp4_q: bool = True, seed: int = 0) -> dict:
    """3 requests of 2 query rows, ragged contexts (one empty), 4-column block table (-1 past a context)."""
    g = _gen(seed)
    cache = v4hal.new_paged_cache(NB, BS, layout, dim=D)
    with v4hal.use_backend("reference"):
        v4hal.paged_cache_write(cache, torch.randn(NB * BS, D, generator=g).bfloat16(),
                                torch.arange(NB * BS, dtype=torch.int32), layout)
        q = torch.randn(3, 2, H, D, generator=g).bfloat16()
        if fp4_q:         # V4.1's FP4 queries: their exact bf16 values
            q = v4hal.fp4_act_quant(q.clone(), 32, inplace=True)
    lens = torch.tensor([15, 9, 0], dtype=torch.int32)
    if ctx2d:
        lens = torch.tensor([[11, 15], [9, 4], [0, 0]], dtype=torch.int32)
    table = torch.tensor([[7, 2, 9, 4], [1, 10, 3, -1], [-1, -1, -1, -1]], dtype=torch.int32)
    return dict(q=q, kv_cache=cache, weights=torch.randn(6, H, generator=g), context_lens=lens, block_table=table,
                layout=layout)


def candidates_for(cb: int) -> torch.Tensor:
    """int32 [3, 2, 4]: ascending blocks, -1 holes, blocks past a row's limit, one duplicate."""
    span = -(-4 * BS // cb)
    c = torch.tensor([[[0, 1, 3, span - 1], [-1, 2, 3, -1]],
                      [[1, 1, 2, span - 1], [0, -1, -1, 2]],
                      [[0, 1, -1, -1], [-1, -1, -1, -1]]], dtype=torch.int32)
    return c.clamp_max(span - 1)


def _dense(backend: str, a: dict, width: int) -> torch.Tensor:
    with v4hal.use_backend(backend):
        return v4hal.indexer_logits_paged(a["q"], a["kv_cache"], a["weights"], a["context_lens"], a["block_table"],
                                          width, layout=a["layout"])


def _sparse(backend: str, a: dict, cand: torch.Tensor, cb: int) -> torch.Tensor:
    with v4hal.use_backend(backend):
        return v4hal.indexer_logits_paged_sparse(a["q"], a["kv_cache"], a["weights"], a["context_lens"],
                                                 a["block_table"], cand, candidate_block=cb, layout=a["layout"])


def _sparse_topk(backend: str, a: dict, cand: torch.Tensor, cb: int, topk: int, offset: int = 0) -> torch.Tensor:
    with v4hal.use_backend(backend):
        return v4hal.indexer_topk_paged_sparse(a["q"], a["kv_cache"], a["weights"], a["context_lens"],
                                               a["block_table"], cand, topk, candidate_block=cb, layout=a["layout"],
                                               offset=offset)


def gathered(dense: torch.Tensor, cand: torch.Tensor, cb: int) -> torch.Tensor:
    """The dense logits ``[rows, W]`` at the candidate positions; -inf for a -1 block or a position past W."""
    rows, w = dense.shape
    out = torch.full((rows, cand.shape[-1] * cb), float("-inf"))
    for r, row in enumerate(cand.reshape(rows, -1).tolist()):
        for j, c in enumerate(row):
            for o in range(cb):
                t = c * cb + o
                if c >= 0 and t < w:
                    out[r, j * cb + o] = dense[r, t]
    return out


@pytest.mark.parametrize("layout", ["indexer_fp4", "indexer_fp8"])
@pytest.mark.parametrize("ctx2d", [False, True])
@pytest.mark.parametrize("cb", [8, 3])
def test_sparse_logits_are_the_dense_logits_at_the_candidates(backend, layout, ctx2d, cb) -> None:
    a = indexer_inputs(layout, ctx2d)
    cand = candidates_for(cb)
    dense = _dense(backend, a, 4 * BS)
    got = _sparse(backend, a, cand, cb)
    assert got.shape == (6, 4 * cb) and got.dtype == torch.float32
    assert torch.equal(got, gathered(dense, cand, cb))
    assert torch.isfinite(got).any()


def test_sparse_logits_bf16_queries_match_dense_bit_for_bit(backend) -> None:
    a = indexer_inputs("indexer_fp4", fp4_q=False, seed=3)
    cand = candidates_for(8)
    assert torch.equal(_sparse(backend, a, cand, 8), gathered(_dense(backend, a, 4 * BS), cand, 8))


def candidate_oracle(logits: torch.Tensor, limits: list[int], n_blocks: int, cb: int) -> list[list[int]]:
    out = []
    for r, limit in enumerate(limits):
        nvis = -(-limit // cb)
        if nvis == 0:
            out.append([-1] * n_blocks)
            continue
        scores = []
        for blk in range(nvis - 1):            # every visible block but the newest
            vals = [float(logits[r, t]) for t in range(blk * cb, min(blk * cb + cb, limit))]
            if max(vals) > float("-inf"):       # a block with no scored position is never published
                scores.append((max(vals), blk))
        scores.sort(key=lambda sb: (-sb[0], sb[1]))
        chosen = sorted([blk for _, blk in scores[:n_blocks - 1]] + [nvis - 1])
        out.append(chosen + [-1] * (n_blocks - len(chosen)))
    return out


@pytest.mark.parametrize("ctx2d", [False, True])
@pytest.mark.parametrize("n_blocks,cb", [(3, 4), (2, 8), (9, 3), (1, 5)])
def test_candidate_blocks_match_the_loop_oracle(backend, ctx2d, n_blocks, cb) -> None:
    g = _gen(5)
    b, n, w = 4, 2, 29
    lens = torch.tensor([29, 17, 0, 6], dtype=torch.int32)
    if ctx2d:
        lens = torch.tensor([[20, 29], [17, 1], [0, 0], [5, 6]], dtype=torch.int32)
        limits = lens.view(-1).tolist()
    else:
        limits = [max(0, int(c) - n + 1 + i) for c in lens for i in range(n)]
    logits = (torch.randn(b * n, w, generator=g) * 2).round() / 2          # coarse: many equal block maxima
    for r, lim in enumerate(limits):
        logits[r, lim:] = float("-inf")
    logits[0, 3:9] = float("-inf")                                         # no key in these positions
    with v4hal.use_backend(backend):
        got = v4hal.indexer_candidate_blocks(logits, lens, n_blocks, candidate_block=cb)
    assert got.shape == (b, n, n_blocks) and got.dtype == torch.int32
    assert got.view(b * n, n_blocks).tolist() == candidate_oracle(logits, limits, n_blocks, cb)


def test_candidate_blocks_keep_the_newest_block_and_break_ties_by_lower_id(backend) -> None:
    lens = torch.tensor([21], dtype=torch.int32)                 # blocks of 4: 0..4 full, 5 holds position 20
    logits = torch.zeros(1, 24)
    logits[0, 20] = -100.0                                       # the newest block scores worst
    logits[0, 21:] = 50.0                                        # past the context: must not count
    with v4hal.use_backend(backend):
        got = v4hal.indexer_candidate_blocks(logits, lens, 3, candidate_block=4)
    assert got.tolist() == [[[0, 1, 5]]]                         # ties (all 0): ids 0, 1; plus the newest


def test_candidate_blocks_with_logits_past_the_contexts(backend) -> None:
    """Only positions below the row's limit count, whatever the logits hold past it."""
    lens = torch.tensor([10], dtype=torch.int32)
    logits = torch.arange(16.0).view(1, 16)                       # increasing: block 3 (12..15) would win
    with v4hal.use_backend(backend):
        got = v4hal.indexer_candidate_blocks(logits, lens, 2, candidate_block=4)
    assert got.tolist() == [[[1, 2]]]                             # block 2 (8, 9) is the newest, block 1 next


def topk_oracle(logits: torch.Tensor, cand: torch.Tensor, cb: int, topk: int, offset: int) -> list[list[int]]:
    out = []
    for r, row in enumerate(cand.reshape(logits.shape[0], -1).tolist()):
        cols = [(float(logits[r, j * cb + o]), j * cb + o, c * cb + o) for j, c in enumerate(row) for o in range(cb)]
        cols = [x for x in cols if x[0] != float("-inf")]
        cols.sort(key=lambda x: (-x[0], x[1]))
        picks = [pos + offset for _, _, pos in cols[:topk]]
        out.append(picks + [-1] * (topk - len(picks)))
    return out


@pytest.mark.parametrize("layout", ["indexer_fp4", "indexer_fp8"])
@pytest.mark.parametrize("ctx2d", [False, True])
def test_sparse_topk_matches_the_sort_oracle(backend, layout, ctx2d) -> None:
    a = indexer_inputs(layout, ctx2d, seed=1)
    cand = candidates_for(4).clone()
    cand[1, 0] = torch.tensor([0, 1, 2, 3], dtype=torch.int32)    # distinct candidates everywhere
    logits = _sparse(backend, a, cand, 4)
    got = _sparse_topk(backend, a, cand, 4, 7, offset=5)
    assert got.shape == (3, 2, 7) and got.dtype == torch.int32
    assert got.view(6, 7).tolist() == topk_oracle(logits, cand, 4, 7, 5)


@pytest.mark.parametrize("ctx2d", [False, True])
def test_two_levels_with_every_block_a_candidate_equal_the_dense_topk(backend, ctx2d) -> None:
    """Candidate source -> candidates -> sparse top-k: with room for every visible block, the dense picks."""
    a = indexer_inputs("indexer_fp4", ctx2d, seed=2)
    with v4hal.use_backend(backend):
        dense = v4hal.indexer_logits_paged(a["q"], a["kv_cache"], a["weights"], a["context_lens"],
                                           a["block_table"], 4 * BS, layout="indexer_fp4")
        cand = v4hal.indexer_candidate_blocks(dense, a["context_lens"], 8, candidate_block=2)
        want = v4hal.indexer_topk_paged(a["q"], a["kv_cache"], a["weights"], a["context_lens"], a["block_table"],
                                        9, layout="indexer_fp4", offset=3)
    assert torch.equal(_sparse_topk(backend, a, cand, 2, 9, offset=3), want)


def test_two_levels_pick_only_inside_the_published_blocks(backend) -> None:
    a = indexer_inputs("indexer_fp4", seed=6)
    with v4hal.use_backend(backend):
        dense = v4hal.indexer_logits_paged(a["q"], a["kv_cache"], a["weights"], a["context_lens"],
                                           a["block_table"], 4 * BS, layout="indexer_fp4")
        cand = v4hal.indexer_candidate_blocks(dense, a["context_lens"], 2, candidate_block=4)
    picks = _sparse_topk(backend, a, cand, 4, 8)
    for r in range(3):
        for i in range(2):
            blocks = {c for c in cand[r, i].tolist() if c >= 0}
            assert all(p // 4 in blocks for p in picks[r, i].tolist() if p >= 0)
    assert 3 in cand[0, 1].tolist()                               # row (0, 1) sees 15 positions: newest block 3
    assert int((picks[0, 1] >= 0).sum()) == 7                     # 4 positions of one block + 3 of the newest


def test_reference_chunking_does_not_change_the_logits(monkeypatch) -> None:
    a = indexer_inputs("indexer_fp4", seed=4)
    cand = candidates_for(8)
    want = _sparse("reference", a, cand, 8)
    monkeypatch.setattr(ref_sparse, "_CHUNK_ELEMS", 3 * 2 * D)
    assert torch.equal(_sparse("reference", a, cand, 8), want)


# ---------------------------------------------------------------- checks and bounds
def test_candidate_values_are_checked(backend) -> None:
    a = indexer_inputs("indexer_fp4")
    for bad in (4, -2):                                         # span of 4 columns x 4 positions / 4 = 4 blocks
        cand = candidates_for(4).clone()
        cand[0, 0, 0] = bad
        with pytest.raises(RangeError, match="indexer_logits_paged_sparse: candidates"):
            _sparse(backend, a, cand, 4)
        with pytest.raises(RangeError, match="indexer_topk_paged_sparse: candidates"):
            _sparse_topk(backend, a, cand, 4, 3)


def test_shapes_and_scalars_are_checked(backend) -> None:
    a = indexer_inputs("indexer_fp4")
    with pytest.raises(ShapeError, match=r"candidates must be \[b, N, K\] = \[3, 2, K\]"):
        _sparse(backend, a, candidates_for(4)[:2], 4)
    with pytest.raises(RangeError, match="candidate_block"):
        _sparse(backend, a, candidates_for(4), 0)
    with pytest.raises(RangeError, match="topk"):
        _sparse_topk(backend, a, candidates_for(4), 4, 0)
    with v4hal.use_backend(backend):
        with pytest.raises(ShapeError, match=r"logits must be \[b \* N, W\]"):
            v4hal.indexer_candidate_blocks(torch.zeros(5, 8), torch.tensor([8, 8], dtype=torch.int32), 2)
        with pytest.raises(RangeError, match="logits must hold every visible position"):
            v4hal.indexer_candidate_blocks(torch.zeros(2, 8), torch.tensor([8, 9], dtype=torch.int32), 2)
        with pytest.raises(RangeError, match="n_blocks"):
            v4hal.indexer_candidate_blocks(torch.zeros(2, 8), torch.tensor([8, 8], dtype=torch.int32), 0)


def test_candidates_outside_the_table_have_no_key_with_checks_off(backend, monkeypatch) -> None:
    """With value checks off, a candidate id outside ``[0, span)`` (any negative, or past the block table, up
    to int32's largest) scores nothing, like -1."""
    monkeypatch.setenv("V4HAL_CHECK_VALUES", "0")
    dispatch.refresh()
    a = indexer_inputs("indexer_fp4")
    cand = candidates_for(4)
    want = _sparse(backend, a, cand, 4)
    holes = cand.clone()
    holes[0, 0, 0], holes[1, 1, 0], holes[0, 1, 1] = -7, 2**31 - 1, 4
    bad = holes != cand
    got = _sparse(backend, a, holes, 4)
    mask = bad.reshape(6, 4).repeat_interleave(4, dim=1)
    assert torch.equal(got[~mask], want[~mask]) and bool((got[mask] == float("-inf")).all())
    picks = _sparse_topk(backend, a, holes, 4, 16)
    assert int(picks.max()) < 4 * BS


def test_v41_indexer_keys_round_e2m1_ties_to_even() -> None:
    """V4.1's indexer keys are written in the ``indexer_fp4`` layout (DeepGEMM's 68-byte record): halfway
    values go to the even code, as HF's and FlashMLA's quantizers do (0.75 -> 1, 1.75 -> 2, 3.5 -> 4),
    not down as DeepGEMM's Python quantizer does (0.75 -> 0.5, 1.75 -> 1.5, 3.5 -> 3). Decoded from the bytes."""
    cache = v4hal.new_paged_cache(1, 1, "indexer_fp4", dim=D)
    x = torch.zeros(1, D)
    x[0, :6] = torch.tensor([6.0, 0.75, 1.75, 3.5, -0.75, 2.5])      # amax 6 in the first block: scale 2**0
    with v4hal.use_backend("reference"):
        v4hal.paged_cache_write(cache, x.bfloat16(), torch.tensor([0], dtype=torch.int32), "indexer_fp4")
    raw = cache.view(torch.uint8).reshape(-1)
    codes = [int(raw[j // 2]) >> (4 * (j % 2)) & 15 for j in range(6)]
    assert codes == [7, 2, 4, 6, 8 | 2, 4]                           # 6, 1, 2, 4, -1, 2 (2.5 -> 2: even code 4)
    assert int(raw[D // 2]) == 127                                   # ue8m0 2**0 for the first 32 values


def test_candidate_blocks_skip_blocks_without_a_scored_position(backend) -> None:
    """A block whose visible logits are all -inf (no key) is not published, the newest block always is."""
    logits = torch.full((1, 16), float("-inf"))
    logits[0, 5] = 1.0
    with v4hal.use_backend(backend):
        got = v4hal.indexer_candidate_blocks(logits, torch.tensor([15], dtype=torch.int32), 4, candidate_block=4)
    assert got.tolist() == [[[1, 3, -1, -1]]]


def test_candidate_blocks_rank_a_nan_block_first(backend) -> None:
    """A NaN logit makes its block's score NaN, ranked above every number (the sort's NaN rule)."""
    logits = torch.zeros(1, 16)
    logits[0, 1], logits[0, 9] = float("nan"), 5.0
    with v4hal.use_backend(backend):
        got = v4hal.indexer_candidate_blocks(logits, torch.tensor([16], dtype=torch.int32), 2, candidate_block=4)
    assert got.tolist() == [[[0, 3]]]


def test_v41_score_by_a_per_position_formula(backend) -> None:
    """V4.1's score, written per position from its published definition: FP4 queries (block 32, ue8m0),
    keys decoded from the cache, ``sum_h relu(q_h . k) * D**-0.5 * w_h * H**-0.5``, visible while the
    entry index is below ``(position + 1) // 2`` (ratio 2). The op gets the factor folded into the weights."""
    a = indexer_inputs("indexer_fp4", seed=8)
    positions = torch.tensor([[29, 30], [16, 17], [0, 0]])                        # two MTP rows per request
    lens = ((positions + 1) // 2).to(torch.int32)                                 # [b, next_n]
    w = a["weights"]
    folded = w * (D ** -0.5 * H ** -0.5)
    cand = torch.tensor([[[0, 3], [1, 3]], [[0, 2], [1, 2]], [[0, -1], [0, -1]]], dtype=torch.int32)
    with v4hal.use_backend(backend):
        got = v4hal.indexer_logits_paged_sparse(a["q"], a["kv_cache"], folded, lens, a["block_table"], cand,
                                                candidate_block=4)
        keys = v4hal.paged_cache_read(a["kv_cache"], torch.arange(NB * BS, dtype=torch.int32), "indexer_fp4")
    for r in range(3):
        for i in range(2):
            for j, c in enumerate(cand[r, i].tolist()):
                for o in range(4):
                    t, col = c * 4 + o, j * 4 + o
                    if c < 0 or t >= int(lens[r, i]):
                        assert got[r * 2 + i, col] == float("-inf")
                        continue
                    slot = int(a["block_table"][r, t // BS]) * BS + t % BS
                    k = keys[slot].double()
                    want = sum(max(float(a["q"][r, i, h].double() @ k), 0.0) * D ** -0.5 * float(w[r * 2 + i, h])
                               * H ** -0.5 for h in range(H))
                    assert abs(float(got[r * 2 + i, col]) - want) <= 1e-5 * max(1.0, abs(want))
