"""`V4Model.forward_batch` on a serving pool equals each request run alone, bit for bit.

Requests of mixed prompt lengths run through the continuous-batching `Engine` (prefill chunks and decode
tokens mixed in one step, requests arriving later, prefixes reused, quantized pages of 16); every logits row
each request gets must equal, bit for bit, that request run alone through ``forward`` (the model's private
pool: bf16 pages of 64, the whole prompt in one call, then one-token calls), with the same tokens.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from v4hal.model import V4Model
from v4hal.serve import CachePool
from v4hal.serve.engine import Engine

REUSE = True


def _prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _alone(model: V4Model, prompt: list[int], new: int) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
    """Greedy tokens, the logits each was chosen from and the MTP logits after each, for one request alone
    through ``forward`` (the whole prompt, then one-token calls)."""
    res = model.forward_full(torch.tensor([prompt]), 0)
    toks, rows, drafts = [], [], []
    for k in range(new):
        rows.append(res.logits[0].float())
        toks.append(int(res.logits[0].argmax()))
        nxt, start = (prompt[1:] + toks[-1:], 0) if k == 0 else (toks[-1:], len(prompt) + k - 1)
        drafts.append(model.mtp_forward(res.final, torch.tensor([nxt]), start)[0].float())
        if k + 1 < new:
            res = model.forward_full(torch.tensor([[toks[-1]]]), len(prompt) + k)
    return toks, rows, drafts


def _batched(model: V4Model, prompts: list[list[int]], new: int, chunk: int, forced: list[list[int]],
             arrive: list[int], **pool_kw) -> dict:
    """Run the prompts through the engine with MTP (request i joins at step ``arrive[i]``), forcing
    ``forced[i]``; the finished requests by id."""
    pool = CachePool(model.config, block_size=16, **pool_kw)
    engine = Engine(model, pool, chunk=chunk, keep_logits=True, mtp=True, reuse_prefixes=REUSE,
                    choose=lambda rid, _logits: forced[rid][len(engine.running[rid].output)])
    step = 0
    while step <= max(arrive) or not engine.idle:
        for i, a in enumerate(arrive):
            if a == step:
                engine.add(i, prompts[i], new)
        engine.step()
        step += 1
    for entry in list(pool.prefix.lru_order()):
        pool.evict_prefix(entry)
    assert pool.pages_in_use() == dict.fromkeys(pool.kinds, 0), "every page back in the pool"
    return engine.finished


@pytest.fixture(scope="module")
def model_fp8(mini_fp8: Path) -> V4Model:
    return V4Model.from_pretrained(mini_fp8)


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_continuous_batch_equals_each_request_alone(model_fp8: V4Model, chunk: int) -> None:
    """Prompts crossing the window (16), ratio-4 and ratio-128 boundaries mid-chunk, arriving at steps 0, 0
    and 3, decoding 3 tokens each: main and MTP logits of every token."""
    lengths, new = [150, 9, 37], 3
    prompts = _prompts(lengths, model_fp8.config.vocab_size, seed=chunk)
    alone = [_alone(model_fp8, p, new) for p in prompts]
    got = _batched(model_fp8, prompts, new, chunk, [a[0] for a in alone], arrive=[0, 0, 3],
                   state_block_size={7: 16, 64: 32, 1000: 48}[chunk])     # state pages of their own size
    for i, (_, want, drafts) in enumerate(alone):
        r = got[i]
        assert len(r.logits) == new and len(r.draft_logits) == new
        for k in range(new):
            assert torch.equal(r.logits[k], want[k]), (i, k)
            assert torch.equal(r.draft_logits[k], drafts[k]), (i, k)


def test_one_token_chunks_and_bf16_weights(mini_bf16: Path) -> None:
    """The bf16 checkpoint, one token per step (chunk 1): a prompt crossing the window and ratio-4 blocks
    one token at a time, beside another request."""
    model = V4Model.from_pretrained(mini_bf16)
    lengths, new = [21, 6], 2
    prompts = _prompts(lengths, model.config.vocab_size, seed=11)
    alone = [_alone(model, p, new) for p in prompts]
    got = _batched(model, prompts, new, 1, [a[0] for a in alone], arrive=[0, 2])
    for i, (_, want, drafts) in enumerate(alone):
        for k in range(new):
            assert torch.equal(got[i].logits[k], want[k]), (i, k)
            assert torch.equal(got[i].draft_logits[k], drafts[k]), (i, k)


def test_quantized_cache_bytes_change_nothing(model_fp8: V4Model) -> None:
    """V4 rounds its KV to FP8 and its indexer keys to FP4 before storing them, so model1_fp8 /
    indexer_fp4 pages give bit-identical logits to bf16 pages holding the rounded values."""
    prompts = _prompts([140, 23], model_fp8.config.vocab_size, seed=5)
    forced = [[1, 2, 3], [4, 5, 6]]
    quant = _batched(model_fp8, prompts, 3, 64, forced, arrive=[0, 1])
    plain = _batched(model_fp8, prompts, 3, 64, forced, arrive=[0, 1], attn_layout="bf16", indexer_layout="bf16")
    for i in range(2):
        for a, b in zip(quant[i].logits + quant[i].draft_logits, plain[i].logits + plain[i].draft_logits):
            assert torch.equal(a, b)


def test_prefix_reuse_computes_only_the_suffix(model_fp8: V4Model) -> None:
    """A second request sharing a 256-token prefix (page-aligned) reuses every cache kind's pages up to it
    (window, compressed entries of ratio 4 and 128, indexer keys, compressor state), computes only its
    suffix, and gets the logits it gets without reuse."""
    cfg = model_fp8.config
    prefix = _prompts([256], cfg.vocab_size, seed=9)[0]
    a, b = prefix + _prompts([20], cfg.vocab_size, seed=10)[0], prefix + _prompts([30], cfg.vocab_size, seed=12)[0]
    pool = CachePool(cfg, block_size=16, state_block_size=48)     # 256 = 5 * 48 + 16: state pages copied
    engine = Engine(model_fp8, pool, chunk=64, keep_logits=True)
    engine.add("a", a, 2)
    engine.run()
    before = engine.tokens_computed
    engine.add("b", b, 2)
    engine.run()
    assert engine.finished["b"].prefix_len == 256
    assert engine.tokens_computed - before == len(b) - 256 + 1       # the suffix, then one decode token
    assert pool.prefix.hits == 1 and pool.prefix.tokens_saved == 256
    alone = Engine(model_fp8, CachePool(cfg, block_size=16), chunk=64, keep_logits=True, reuse_prefixes=False)
    alone.add("b", b, 2)
    alone.run()
    assert engine.finished["b"].output == alone.finished["b"].output
    for x, y in zip(engine.finished["b"].logits, alone.finished["b"].logits):
        assert torch.equal(x, y)


def _poison_free_pages(pool: CachePool) -> int:
    """Fill every free page of every cache tensor with NaN / 0xFF bytes; returns how many pages."""
    n = 0
    for kind, alloc in pool.allocators.items():
        free = list(alloc._free)
        n += len(free)
        for s in pool.specs:
            if s.kind != kind:
                continue
            t = getattr(pool.layers[s.layer], s.name)
            for blk in free:
                page = t[blk]
                if page.is_floating_point():
                    page.fill_(float("nan"))
                else:
                    page.view(torch.uint8).fill_(0xFF)
    return n


def test_requests_never_see_each_others_pages(model_fp8: V4Model) -> None:
    """Two interleaved requests with different prompts: after the first leaves, its freed pages (and every
    other free page) are overwritten with garbage; the second request's logits do not change."""
    cfg = model_fp8.config
    prompts = _prompts([60, 90], cfg.vocab_size, seed=21)
    runs = []
    for poison in (False, True):
        pool = CachePool(cfg, block_size=16)
        engine = Engine(model_fp8, pool, chunk=32, keep_logits=True, reuse_prefixes=False)
        engine.add(0, prompts[0], 2)
        engine.add(1, prompts[1], 6)
        poisoned = 0
        while not engine.idle:
            engine.step()
            if poison and 0 in engine.finished:
                poisoned += _poison_free_pages(pool)
        assert poisoned > 0 or not poison
        runs.append(engine.finished[1].logits)
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_forward_batch_refuses_a_foreign_batch_or_pool(model_fp8: V4Model) -> None:
    """Clear errors before any kernel: not a ForwardBatch, a pool of another config or without tensors, a batch
    of another page size; the pool is unchanged after each."""
    from v4hal.hal.errors import ShapeError

    cfg = model_fp8.config
    pool = CachePool(cfg, block_size=16)
    pool.add_request("r", [1, 2, 3])
    batch = pool.schedule([("r", 3)])
    snapshot = (pool.pages_in_use(), pool.requests["r"].computed)
    other = CachePool(cfg.replace(window_size=32), block_size=16)
    cases = [("batch must be a v4hal.serve.ForwardBatch", lambda: model_fp8.forward_batch("r", pool)),
             ("another config", lambda: model_fp8.forward_batch(batch, other)),
             ("with allocated caches", lambda: model_fp8.forward_batch(batch, CachePool(cfg, allocate=False))),
             ("block_size 16 != pool block_size 64", lambda: model_fp8.forward_batch(batch, CachePool(cfg))),
             ("page sizes per kind", lambda: model_fp8.forward_batch(
                 batch, CachePool(cfg, block_size=16, state_block_size=32)))]
    for match, call in cases:
        with pytest.raises(ShapeError, match=match):
            call()
        assert (pool.pages_in_use(), pool.requests["r"].computed) == snapshot
    out = model_fp8.forward_batch(batch, pool)          # the same batch still runs
    assert out.logits.shape == (1, cfg.vocab_size) and bool(torch.isfinite(out.logits).all())


def test_two_requests_reuse_one_prefix_in_the_same_step(model_fp8: V4Model) -> None:
    """Two requests that reuse one registered prefix read its shared compressor-state rows in one step."""
    cfg = model_fp8.config
    shared = _prompts([64], cfg.vocab_size, seed=31)[0]
    pool = CachePool(cfg, block_size=16)
    engine = Engine(model_fp8, pool, chunk=64, keep_logits=True)
    engine.add("a", shared + [1, 2, 3], 1)
    engine.step()
    engine.add("b", shared + [4, 5, 8, 9, 10], 2)
    engine.add("c", shared + [6, 7, 11, 12, 13], 2)
    engine.run()
    assert engine.finished["b"].prefix_len == engine.finished["c"].prefix_len == 64
    for rid, prompt in (("b", shared + [4, 5, 8, 9, 10]), ("c", shared + [6, 7, 11, 12, 13])):
        want = model_fp8.forward(torch.tensor([prompt]), 0)[0]
        assert torch.equal(engine.finished[rid].logits[0], want)
