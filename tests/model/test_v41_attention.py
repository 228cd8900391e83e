"""DeepSeek-V4.1 attention on the one graph path: CSA2 sources and consumers, the shared indexer keys, the
candidate top-k, V4.1 pages in the pools, and an independent float64 re-derivation of the layers.

The model under test is v41-mini without Engram (attention is what these tests look at); its blocks run
through `V4Model`, and the attention layers alone run on a `Step` of a `PrivatePool` (every layer reading the
same input, so that layers interact only through the shared caches, top-k and candidates).
"""
from __future__ import annotations

import pytest
import torch
from ref_v41_attention import RefV41Attention

from v4hal.hal.errors import RangeError
from v4hal.model import ForwardBatch, V4Model
from v4hal.model.attention_v41 import CANDIDATES_PLAN, topk_plan_key
from v4hal.model.caches import PrivatePool
from v4hal.model.config import ModelConfig
from v4hal.model.random_checkpoint import random_tensors
from v4hal.model.spec import checkpoint_spec
from v4hal.model.step import Step
from v4hal.ops.paged import PAGED_LAYOUTS
from v4hal.serve import CachePool
from v4hal.serve.engine import Engine
from v4hal.serve.sizing import (
    blocks_for_budget,
    default_layout,
    layout_pair,
    pool_bytes,
    request_budget_bytes,
    request_pages,
)

QUANTIZED = ("v41_window_fp8", "indexer_fp4")


def _cfg(**kw) -> ModelConfig:
    return ModelConfig.preset("v41-mini").replace(engram_layers=[], engram_num_embeddings=[], max_seq_len=256,
                                                   max_batch_size=4, **kw)


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return _cfg()


@pytest.fixture(scope="module")
def model(cfg: ModelConfig) -> V4Model:
    return V4Model.from_tensors(cfg, random_tensors(cfg, 0))


@pytest.fixture(scope="module")
def bf16_cfg() -> ModelConfig:
    return _cfg(dtype="bf16")


@pytest.fixture(scope="module")
def bf16_tensors(bf16_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return dict(random_tensors(bf16_cfg, 3))


@pytest.fixture(scope="module")
def bf16_model(bf16_cfg: ModelConfig, bf16_tensors: dict[str, torch.Tensor]) -> V4Model:
    return V4Model.from_tensors(bf16_cfg, bf16_tensors.items())


def _layers(model: V4Model, x: torch.Tensor, ids: torch.Tensor, layouts: tuple[str, str] | None = None,
            chunk: int | None = None, slot_form: bool | None = None) -> tuple[list[torch.Tensor], Step, PrivatePool]:
    """Every attention layer over ``x [b, s, dim]`` (bf16) at positions ``0 .. s-1`` of ``b`` sequences, in
    chunks of ``chunk`` positions (None: one step): each layer's output ``[b, s, dim]``, the last step and pool.
    ``slot_form``: force how the steps pass the attention picks (`Step.slot_form`; None: the step's choice)."""
    cfg = model.config
    b, s, _ = x.shape
    pool = PrivatePool(cfg, model.device, layouts=layouts)
    outs: list[list[torch.Tensor]] = [[] for _ in cfg.compress_ratios]
    chunk = chunk or s
    for start in range(0, s, chunk):
        end = min(s, start + chunk)
        pool.ensure(b, end, keep=start > 0)
        step = Step.build(cfg, pool.batch(ids[:, start:end], start), pool)
        if slot_form is not None:
            step.plans["slot_form"] = slot_form
        xs = x[:, start:end].reshape(1, -1, x.shape[-1])
        for i, block in enumerate(model.layers):
            outs[i].append(block.attn(xs, step).view(b, end - start, -1))
    return [torch.cat(o, dim=1) for o in outs], step, pool


def _inputs(cfg: ModelConfig, b: int, s: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, cfg.dim, generator=g).to(torch.bfloat16)
    return x, torch.randint(0, cfg.vocab_size, (b, s), generator=g)


# ---------------------------------------------------------------------------------------------- caches, bytes
def test_page_bytes_528_and_288() -> None:
    """FlashMLA's V4.1 records at head_dim 512; a v41-flash pool's pages: every layer's window, compressed KV and
    indexer keys only at the four KV sources (three ratio 2, one ratio 1), fp32 state of the ratio-2 sources."""
    assert PAGED_LAYOUTS["v41_window_fp8"].token_bytes(512) == 528
    assert PAGED_LAYOUTS["v41_compressed_fp4"].token_bytes(512) == 288
    assert PAGED_LAYOUTS["indexer_fp4"].token_bytes(128) == 68
    cfg = ModelConfig.preset("v41-flash").replace(max_batch_size=1)
    pool = CachePool(cfg, block_size=64, attn_layout=QUANTIZED[0], indexer_layout=QUANTIZED[1], allocate=False)
    assert pool.kinds == ("token", "c2", "c1", "state2")
    assert pool.page_bytes() == {"token": 40 * 528 * 64, "c2": 3 * (288 + 68) * 64, "c1": (288 + 68) * 64,
                                 "state2": 3 * 16 * 2 * 512 * 4}


@pytest.mark.parametrize("name,tokens", [("v41-flash", 1 << 20), ("v41-mini", 4096)])
def test_pool_kv_bytes_per_token(name: str, tokens: int) -> None:
    """`CachePool.kv_bytes_per_token`: the window pages behind which nothing is read are released; compressed
    entries (KV + keys) of each source stay; a whole number of groups leaves no ratio-2 state."""
    cfg = ModelConfig.preset(name)
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, tokens), max_batch_size=1)
    bs = 64
    pool = CachePool(cfg, block_size=bs, attn_layout=QUANTIZED[0], indexer_layout=QUANTIZED[1], allocate=False)
    d, di = cfg.head_dim, cfg.index_head_dim
    kv, key = PAGED_LAYOUTS["v41_compressed_fp4"].token_bytes(d), PAGED_LAYOUTS["indexer_fp4"].token_bytes(di)
    window_pages = -(-tokens // bs) - (tokens - cfg.window_size + 1) // bs
    want = window_pages * bs * cfg.n_layers * PAGED_LAYOUTS["v41_window_fp8"].token_bytes(d)
    for s in cfg.kv_source_layers:
        r = cfg.compress_ratios[s]
        want += -(-(tokens // r) // bs) * bs * (kv + (key if s in cfg.index_source_layers else 0))
    assert pool.kv_bytes_per_token(tokens) == want / tokens
    if name == "v41-flash":      # 3 x (288 + 68) / 2 + (288 + 68) per token, plus 2 window pages of 40 layers
        assert pool.kv_bytes_per_token(tokens) == pytest.approx(890 + 2 * 64 * 40 * 528 / tokens)


def test_request_pages(cfg: ModelConfig) -> None:
    """`request_pages` of a V4.1 request (200 positions, chunks of 7, pages of 16): compressed entries stay (100
    ratio-2, 200 ratio-1 entries), the window spans a chunk plus 15 positions behind, the ratio-2 state a chunk
    plus the one waiting position; a budget for 3 such requests sizes a pool of at least 3."""
    got = request_pages(cfg, 200, chunk=7, block_size=16)
    assert got == {"token": 3, "c2": 7, "c1": 13, "state2": 2}
    lay = dict(attn_layout=QUANTIZED[0], indexer_layout=QUANTIZED[1])
    size = blocks_for_budget(cfg, 3 * request_budget_bytes(cfg, 200, chunk=7, block_size=16, **lay), 200, chunk=7,
                             block_size=16, **lay)
    assert size.requests >= 3 and size.blocks == {k: size.requests * n for k, n in got.items()}
    assert pool_bytes(cfg, size.blocks, block_size=16, **lay) == size.bytes


def test_layouts_by_name() -> None:
    """A V4.1 model's quantized pair is FlashMLA's V4.1 window format; V4's stays MODEL1; a V4.1 pool refuses
    MODEL1 pages."""
    v41, v4 = _cfg(), ModelConfig.preset("v4-mini")
    assert layout_pair("quantized", v41) == QUANTIZED and layout_pair("quantized", v4)[0] == "model1_fp8"
    assert default_layout("cpu", v41) == "quantized"
    with pytest.raises(RangeError, match="v41_window_fp8"):
        CachePool(v41, attn_layout="model1_fp8", indexer_layout="indexer_fp4", allocate=False)


def test_consumers_own_no_compressed_cache(cfg: ModelConfig) -> None:
    """Window caches everywhere; compressed KV only at the KV sources (2: ratio 2 with its state, 4: ratio 1);
    indexer keys only at sources that index; consumers (3, 5, 6, 7) and window-only layers (0, 1) none."""
    pool = CachePool(cfg, block_size=16, attn_layout=QUANTIZED[0], indexer_layout=QUANTIZED[1])
    for i, c in enumerate(pool.layers):
        assert c.window is not None
        owns = i in cfg.kv_source_layers
        assert (c.compressed is not None, c.indexer is not None) == (owns, owns), i
        assert (c.state is not None) == (owns and cfg.compress_ratios[i] == 2), i
        assert c.index_state is None
    assert {s.layout for s in pool.specs if s.name == "compressed"} == {"v41_compressed_fp4"}
    assert pool.layers[2].compressed.shape[-1] == PAGED_LAYOUTS["v41_compressed_fp4"].token_bytes(cfg.head_dim)


def test_checkpoint_names(cfg: ModelConfig) -> None:
    """The V4.1 attention tensors of `checkpoint_spec`: compressor at the KV sources (wgate at ratio 2 only),
    indexer at the index sources, its key projection only where it owns keys; no V4 compressor/indexer parts."""
    spec = checkpoint_spec(cfg)
    names = {n for n in spec if ".attn.compressor." in n or ".attn.indexer." in n}
    want = {"layers.2.attn.compressor.wkv.weight", "layers.2.attn.compressor.wgate.weight",
            "layers.2.attn.compressor.norm.weight", "layers.4.attn.compressor.wkv.weight",
            "layers.4.attn.compressor.norm.weight"}
    for i in cfg.index_source_layers:
        want |= {f"layers.{i}.attn.indexer.wq_b.weight", f"layers.{i}.attn.indexer.wq_b.scale",
                 f"layers.{i}.attn.indexer.weights_proj.weight"}
    for i in (2, 4):
        want |= {f"layers.{i}.attn.indexer.wk.weight", f"layers.{i}.attn.indexer.k_norm.weight"}
    assert names == want
    assert spec["layers.4.attn.indexer.wk.weight"].shape == (cfg.index_head_dim, cfg.head_dim)
    assert spec["layers.4.attn.indexer.wk.weight"].kind == "bf16"
    assert spec["layers.6.attn.indexer.wq_b.weight"].kind == "fp8"
    assert spec["layers.2.attn.compressor.wgate.weight"].shape == (cfg.head_dim, cfg.dim)


def test_candidates_of_another_source_are_refused() -> None:
    """Candidate blocks index their source's entries: an index source reading another KV source's keys cannot
    select inside them (a clear error when the model is built, before anything runs)."""
    cfg = _cfg(candidate_source_layer=2)
    with pytest.raises(RangeError, match="layer 4 selects inside the candidate blocks of layer 2"):
        V4Model(cfg)


# ---------------------------------------------------------------------------------------------- one path
@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
def test_chunked_prefill_equals_one_shot(model: V4Model, chunk: int) -> None:
    """Two sequences of 70 positions through `forward_full` in chunks that split ratio-2 groups (odd sizes):
    the final streams equal the one-shot prefill's bit for bit, and with V4.1's quantized pages as well."""
    _, ids = _inputs(model.config, 2, 70, seed=chunk)
    model.private_layouts = None
    full = model.forward_full(ids).final
    for layouts in (None, QUANTIZED):
        model.private_layouts = layouts
        parts = [model.forward_full(ids[:, s:s + chunk], s).final for s in range(0, ids.shape[1], chunk)]
        assert torch.equal(torch.cat(parts, dim=1), full), layouts
    model.private_layouts = None


def test_continuous_batch_equals_each_request_alone(model: V4Model) -> None:
    """Mixed requests through the `Engine` on a V4.1 `CachePool` (quantized pages of 16, chunks of 7, a request
    reusing another's registered prefix), arriving at steps 0, 0, 2, 6: every logits row equals that request
    run alone through ``forward`` (bf16 pages), bit for bit."""
    cfg = model.config
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (45, 9, 37)]
    prompts.append(prompts[0][:32] + [5, 6, 7])
    new = 3
    alone = []
    for p in prompts:
        res, toks, rows = model.forward_full(torch.tensor([p])), [], []
        for k in range(new):
            rows.append(res.logits[0].float())
            toks.append(int(res.logits[0].argmax()))
            if k + 1 < new:
                res = model.forward_full(torch.tensor([[toks[-1]]]), len(p) + k)
        alone.append((toks, rows))
    pool = CachePool(cfg, block_size=16, attn_layout=QUANTIZED[0], indexer_layout=QUANTIZED[1])
    engine = Engine(model, pool, chunk=7, keep_logits=True, mtp=False, reuse_prefixes=True,
                    choose=lambda rid, _logits: alone[rid][0][len(engine.running[rid].output)])
    arrive, step = [0, 0, 2, 6], 0
    while step <= max(arrive) or not engine.idle:
        for i, a in enumerate(arrive):
            if a == step:
                engine.add(i, prompts[i], new)
        engine.step()
        step += 1
    assert pool.stats()["prefix_tokens_saved"] == 32
    for i, (_, rows) in enumerate(alone):
        got = engine.finished[i].logits
        assert all(torch.equal(got[k], rows[k]) for k in range(new)), i


def test_runtime_tables_equal_forward(model: V4Model) -> None:
    """A runtime's own V4.1 tables (`ForwardBatch.from_block_tables`, from an allocator-only pool) on a pool of
    quantized pages: prefill chunks of odd sizes and a decode step give ``forward``'s logits bit for bit."""
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (41,), generator=torch.Generator().manual_seed(8)).tolist()
    tables = CachePool(cfg, block_size=16, allocate=False)
    caches = CachePool(cfg, block_size=16, attn_layout=QUANTIZED[0], indexer_layout=QUANTIZED[1])
    tables.add_request("r", prompt)

    def step(n: int) -> torch.Tensor:
        b = tables.schedule([("r", n)])
        rt = ForwardBatch.from_block_tables(cfg, req_ids=["r"], input_ids=b.input_ids, cu_seqlens=b.cu_seqlens,
                                            start_pos=b.start_pos, block_tables=b.block_tables, block_size=16,
                                            num_blocks=caches.num_blocks)
        out = model.forward_batch(rt, caches).logits[0]
        tables.advance_batch(b)
        return out

    step(23)
    assert torch.equal(step(17), model.forward(torch.tensor([prompt[:40]]), 0)[0])
    assert torch.equal(step(1), model.forward(torch.tensor([prompt]), 0)[0])


def test_position_form_equals_slot_form(model: V4Model) -> None:
    """The picks as positions and entry indices over the request's pages (what CANN's attention and the other
    backends take) give the slots' outputs bit for bit, on V4.1's quantized pages, in chunks of 5."""
    x, ids = _inputs(model.config, 2, 30, seed=4)
    slots, _, _ = _layers(model, x, ids, QUANTIZED, chunk=5, slot_form=True)
    positions, _, _ = _layers(model, x, ids, QUANTIZED, chunk=5, slot_form=False)
    assert all(torch.equal(a, b) for a, b in zip(slots, positions))


def test_consumers_read_their_source(model: V4Model) -> None:
    """Layer 3 (ratio 2) attends over source 2's compressed cache and layer 5 over source 4's: changing the
    source's entries changes the consumer's output; changing the other source's does not."""
    x, ids = _inputs(model.config, 1, 24, seed=5)
    outs, step, pool = _layers(model, x, ids)
    xs = x.reshape(1, -1, x.shape[-1])
    for consumer, source, other in ((3, 2, 4), (5, 4, 2)):
        attn = model.layers[consumer].attn
        assert torch.equal(attn(xs, step).view_as(outs[consumer]), outs[consumer])
        saved = pool.layers[other].compressed.clone()
        pool.layers[other].compressed.mul_(-1)
        assert torch.equal(attn(xs, step).view_as(outs[consumer]), outs[consumer]), consumer
        pool.layers[other].compressed.copy_(saved)
        saved = pool.layers[source].compressed.clone()
        pool.layers[source].compressed.mul_(-1)
        assert not torch.equal(attn(xs, step).view_as(outs[consumer]), outs[consumer]), consumer
        pool.layers[source].compressed.copy_(saved)


def test_candidates_restrict_later_index_sources(model: V4Model) -> None:
    """The candidate source (4) publishes at most 4 blocks of 4 entries per token, the newest always among them;
    layer 6 picks only inside them, and somewhere that differs from its unrestricted top-k (so a path that
    ignored the candidates would pick otherwise)."""
    cfg = model.config
    x, ids = _inputs(cfg, 1, 60, seed=6)
    _, step, pool = _layers(model, x, ids)
    cands = step.plans[CANDIDATES_PLAN][:, 0]                                  # [T, 4]
    picks = step.plans[topk_plan_key(6)][:, 0]                                 # [T, 8]
    cb = cfg.candidate_block_size
    differs = 0
    attn6 = model.layers[6].attn
    xs = x.reshape(1, -1, cfg.dim)
    freqs = attn6.freqs_cis[step.positions]
    qr, iq, _, _ = attn6.project(xs, freqs)
    del step.plans[CANDIDATES_PLAN]               # the same layer with no candidates published: dense top-k
    dense = attn6.indexer(xs, qr, freqs, step, pool.layers[4].indexer, iq)[:, 0]
    for p in range(x.shape[1]):
        c = [int(v) for v in cands[p] if v >= 0]
        assert len(c) == min(cfg.candidate_topk_blocks, -(-(p + 1) // cb)) and p // cb in c
        got = {int(v) for v in picks[p] if v >= 0}
        assert got and all(g // cb in c for g in got), p
        differs += got != {int(v) for v in dense[p] if v >= 0}
    assert differs > 10


# ---------------------------------------------------------------------------------------------- re-derivation
def test_layers_match_independent_re_derivation(bf16_model: V4Model, bf16_tensors: dict[str, torch.Tensor]) -> None:
    """Every V4.1 attention layer of v41-mini (bf16 weights) against the float64 re-derivation of
    `ref_v41_attention`, on 40 positions: the same top-k picks at the index sources (one token may differ by
    a rounding), outputs within a bf16 step; ignoring the candidates would change layer 6's picks."""
    cfg = bf16_model.config
    x, ids = _inputs(cfg, 1, 40, seed=9)
    outs, step, _ = _layers(bf16_model, x, ids)
    ref = RefV41Attention(cfg, bf16_tensors)
    want = ref.run(x[0].double())
    for i in cfg.index_source_layers:
        got = step.plans[topk_plan_key(i)][:, 0]
        same = sum({int(v) for v in got[p] if v >= 0} == set(ref.picks[i][p]) for p in range(x.shape[1]))
        assert same >= x.shape[1] - 1, (i, same)
    for i, (o, w) in enumerate(zip(outs, want)):
        err = (o[0].double() - w).abs().max() / w.abs().max()
        assert err < 1e-2, (i, float(err))
        assert (o[0].double() - w).abs().mean() / w.abs().mean() < 1e-3, i
    free = RefV41Attention(cfg, bf16_tensors)
    free.run(x[0].double(), use_candidates=False)
    assert free.picks[6] != ref.picks[6]
