"""One graph path: ``forward`` of a whole prompt, ``forward`` in chunks of any size (one token included),
each row of a batch alone, and ``forward_batch`` on a serving pool give the same bits on the reference
backend, for the main layers and the MTP block. With the public-model parity of the whole prompt
(``test_graph_public.py``), every way of cutting a sequence into calls is tied to the public computation.

The chunks cross the window (16), ratio-4 blocks, the first ratio-128 entry (position 127) and the private
pool's page growth (64-token pages, doubled as the sequences grow).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import v4hal.model
from v4hal.hal.errors import RangeError, ShapeError
from v4hal.model import V4Model
from v4hal.serve import CachePool

N = 150


def _ids(model: V4Model, rows: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (rows, n), generator=torch.Generator().manual_seed(seed))


def _chunked(model: V4Model, ids: torch.Tensor, cuts: list[int]):
    """forward_full over ``ids`` cut into calls of ``cuts`` tokens: (last logits, final stream, hidden, MTP logits
    of each call)."""
    finals, hidden, mtp, p = [], [], [], 0
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    for c in cuts:
        res = model.forward_full(ids[:, p:p + c], p, keep_hidden=True)
        finals.append(res.final)
        hidden.append(res.hidden)
        mtp.append(model.mtp_forward(res.final, nxt[:, p:p + c], p))
        p += c
    assert p == ids.shape[1]
    return (res.logits, torch.cat(finals, 1), [torch.cat(h, 1) for h in zip(*hidden)], mtp)


@pytest.mark.parametrize("ckpt", ["mini_fp8", "mini_bf16"])
def test_whole_chunks_rows_and_forward_batch_agree_bit_for_bit(ckpt: str, request) -> None:
    model = V4Model.from_pretrained(request.getfixturevalue(ckpt))
    ids = _ids(model, 2, N, seed=3)
    logits, final, hidden, mtp = _chunked(model, ids, [N])
    cuts = {"7s": [7] * 21 + [3], "pages": [64, 64, 22], "ones": [100] + [1] * 50}
    for name, c in cuts.items():
        got = _chunked(model, ids, c)
        assert torch.equal(got[0], logits), name
        assert torch.equal(got[1], final), name
        assert all(torch.equal(a, b) for a, b in zip(got[2], hidden)), name
        # each call's MTP logits are those of its last position in the whole-prompt MTP pass
        ends = torch.tensor(c).cumsum(0) - 1
        whole = [model.mtp_forward(final[:, :e + 1], torch.cat([ids[:, 1:], ids[:, :1]], 1)[:, :e + 1], 0)
                 for e in ends[:2].tolist()]
        assert all(torch.equal(a, b) for a, b in zip(got[3][:2], whole)), name
    assert model._pool.pages["token"] >= 3            # the pool grew while the chunks ran (copying pages)
    for r in range(2):                                 # each row alone
        alone = _chunked(model, ids[r:r + 1], [N])
        assert torch.equal(alone[0][0], logits[r]) and torch.equal(alone[1][0], final[r])
    # a serving pool (quantized pages of 16), both requests in one step at different lengths, then the rest
    pool = CachePool(model.config, block_size=16)
    for r in range(2):
        pool.add_request(r, ids[r].tolist())
    first = [(0, N - 13), (1, 37)]
    b1 = pool.schedule(first)
    out = model.forward_batch(b1, pool)
    pool.advance_batch(b1)
    b2 = pool.schedule([(0, 13), (1, N - 37)])
    out2 = model.forward_batch(b2, pool)
    assert torch.equal(out.final[0, :N - 13], final[0, :N - 13])
    assert torch.equal(out.final[0, N - 13:], final[1, :37])
    assert torch.equal(out2.logits, logits)
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
    drafts = model.mtp_forward_batch(out2, torch.cat([nxt[0, N - 13:], nxt[1, 37:]]))
    assert drafts.shape == (2, model.config.vocab_size) and torch.isfinite(drafts).all()


def test_a_sequence_continues_at_any_earlier_position(mini_fp8) -> None:
    """Computing positions again (a rejected draft, a rewound sequence) replaces what was cached for them."""
    model = V4Model.from_pretrained(mini_fp8)
    a, b = _ids(model, 1, 60, seed=5), _ids(model, 1, 60, seed=6)
    want_a = model(a, 0)
    want_b = model(torch.cat([a[:, :30], b[:, 30:]], 1), 0)
    model(a[:, :45], 0)
    assert torch.equal(model(a[:, 45:], 45), want_a)
    assert torch.equal(model(a[:, 40:], 40), want_a)                   # the same tokens again
    assert torch.equal(model(b[:, 30:], 30), want_b)                   # other tokens from position 30


def test_positions_are_checked(mini_fp8) -> None:
    model = V4Model.from_pretrained(mini_fp8)
    ids = torch.randint(0, 512, (2, 8))
    with pytest.raises(RangeError, match="start them with forward"):
        model(ids[:, :1], 5)                                   # a continuation before any start
    with pytest.raises(RangeError, match="mtp_forward: start_pos 0 continues running sequences"):
        model.mtp_forward(torch.zeros(2, 1, 4, model.config.dim), ids[:, :1], 0)
    model(ids, 0)
    with pytest.raises(RangeError, match="at or before position 8, got 9"):
        model(ids[:, :1], 9)
    with pytest.raises(ShapeError, match="2 running sequences, got 1"):
        model(ids[:1, :1], 8)
    with pytest.raises(RangeError, match="max_seq_len"):
        model(torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long), 0)
    with pytest.raises(RangeError, match="start_pos must be an int >= 0"):
        model(ids, -1)
    with pytest.raises(ShapeError, match=r"\[b, s\]"):
        model(ids[0], 0)
    with pytest.raises(RangeError, match="MTP block's sequences start at start_pos=0"):
        model.mtp_forward(torch.zeros(2, 1, 4, model.config.dim, dtype=torch.bfloat16), ids[:, :1], 3)
    model(ids[:, :3], 8)                                       # the running sequences are intact: any length


def test_generate_is_greedy_decode(mini_fp8) -> None:
    model = V4Model.from_pretrained(mini_fp8)
    prompt = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(2))
    seen = []
    out = model.generate(prompt, 5, on_token=lambda step, tok: seen.append(step))
    assert out.shape == (2, 5) and seen == list(range(5))
    lg = model(prompt, 0)
    toks = [lg.argmax(-1)]
    for i in range(4):
        toks.append(model(toks[-1].unsqueeze(1), 10 + i).argmax(-1))
    assert torch.equal(out, torch.stack(toks, 1))
    eos = int(out[0, 1])
    out2 = model.generate(prompt, 5, eos_id=eos)
    assert (out2[0, 1:] == eos).all()


def test_the_model_never_imports_the_serving_layer() -> None:
    """The model owns the step, the batch and the cache interface; serving builds on them, never the reverse
    (``cli.py``, a command-line runner that drives the serving loop, is the one exception left)."""
    for f in sorted(Path(v4hal.model.__file__).parent.glob("*.py")):
        if f.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.startswith("v4hal.serve") for n in names), f"{f.name} imports {names}"
