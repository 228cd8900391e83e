"""DeepSeek-V4.1's block and model parts against plain-PyTorch re-derivations of the public semantics: lagged mHC,
the Engram memory (hash rows, gate, chunked == one-shot, history across steps and through prefix reuse), the
V4.1 router, FP8 32x32 / FP4-per-16 weights, the tokenizer's vocabulary map, the DSpark refusal.

The V4.1 attention is built elsewhere: the model tests use a V4.1 config whose layers are all window-only."""
from __future__ import annotations

import math

import pytest
import torch

import v4hal
from v4hal.hal.errors import RangeError, V4HalError
from v4hal.model import V4Model, write_random_checkpoint
from v4hal.model.config import ModelConfig
from v4hal.model.layers import Linear
from v4hal.model.moe import Experts, Gate
from v4hal.model.spec import checkpoint_spec
from v4hal.ops.engram import engram_multipliers, engram_primes
from v4hal.serve import CachePool

tokenizers = pytest.importorskip("tokenizers")


def v41_cfg(**changes) -> ModelConfig:
    """v41-mini with window-only layers (the V4.1 attention sources are not built here)."""
    return ModelConfig.preset("v41-mini").replace(compress_ratios=[0] * 8, kv_source_layers=[],
                                                  index_source_layers=[], candidate_source_layer=-1,
                                                  max_seq_len=256, **changes)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(v41_cfg(), tmp_path_factory.mktemp("v41"), seed=5)


@pytest.fixture(scope="module")
def model(model_dir) -> V4Model:
    return V4Model.from_pretrained(model_dir)


# ---------------------------------------------------------------- plain re-derivations of the public code

def plain_mixes(h, fn, scale, base, norm_eps, hc_eps, iters):
    """One site's (pre, post, comb): RMS-normalise the flattened fp32 streams, project, split, Sinkhorn."""
    hc = h.shape[-2]
    flat = h.flatten(-2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    m = flat @ fn.float().T
    pre = torch.sigmoid(m[..., :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2 * torch.sigmoid(m[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = torch.softmax((m[..., 2 * hc:] * scale[2] + base[2 * hc:]).unflatten(-1, (hc, hc)), -1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    return pre, post, comb


def plain_collapse(h, pre):
    return (pre.unsqueeze(-1) * h.float()).sum(-2).to(h.dtype)


def plain_expand(x, res, post, comb):
    mixed = torch.einsum("...jk,...jd->...kd", comb.float(), res.float())
    return (post.unsqueeze(-1) * x.float().unsqueeze(-2) + mixed).to(res.dtype)


def plain_ngram_rows(ids, vmap, pad_raw, mult, primes, n):
    """Rows of one Engram layer for ONE sequence ``ids`` (all positions), by absolute position: look back
    0..n-1 tokens, stopping at the start (pad id), rolling XOR of id * multiplier, modulo each head's prime,
    plus the bucket range's start."""
    c = [int(vmap[t]) for t in ids]
    pad = int(vmap[pad_raw])
    flat = [p for per in primes for p in per]
    offs = [sum(flat[:i]) for i in range(len(flat))]
    out = []
    for p in range(len(ids)):
        toks = [c[p - s] if p - s >= 0 else pad for s in range(n)]
        row, rolling = [], toks[0] * mult[0]
        for i in range(1, n):
            rolling ^= toks[i] * mult[i]
            row += [rolling % q for q in primes[i - 1]]
        out.append([r + o for r, o in zip(row, offs)])
    return torch.tensor(out, dtype=torch.int64)


class _Stub(torch.nn.Module):
    """A sub-layer that is a fixed pointwise map (so the mHC wiring is all that is tested)."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x, *_):
        return self.f(x)


# ---------------------------------------------------------------- lagged mHC

def test_hc_mix_and_hc_collapse_are_hc_pre_bit_for_bit_and_match_a_plain_split() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 64, generator=g).bfloat16()
    fn = torch.randn(24, 256, generator=g) * 0.06
    scale, base = torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g) * 0.5
    y, post, comb = v4hal.hc_pre(x, fn, scale, base, norm_eps=1e-20)
    pre2, post2, comb2 = v4hal.hc_mix(x, fn, scale, base, norm_eps=1e-20)
    assert torch.equal(post2, post) and torch.equal(comb2, comb)
    assert torch.equal(v4hal.hc_collapse(x, pre2), y)                    # V4 keeps its bits
    pre3, post3, comb3 = plain_mixes(x, fn, scale, base, 1e-20, 1e-6, 20)
    for a, b in ((pre2, pre3), (post2, post3), (comb2, comb3)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v4hal.hc_collapse(x, pre3), plain_collapse(x, pre3), rtol=0, atol=0)


def test_lagged_block_and_model_loop_match_a_plain_rederivation(model) -> None:
    """Attention collapses with the carried pre (one-hot on stream 0 at layer 0), the FFN with attention's own
    pre, the head with the last FFN's; each site expands with its own post / comb."""
    cfg = model.config
    blocks = list(model.layers)[:3]
    saved = [(b.attn, b.ffn, b.engram) for b in blocks]
    try:
        for b in blocks:
            b.attn = _Stub(lambda x: (x.float() * 0.5).bfloat16())
            b.ffn = _Stub(lambda x: torch.tanh(x.float()).bfloat16())
            b.engram = None
        g = torch.Generator().manual_seed(1)
        h0 = torch.randn(1, 5, cfg.hc_mult, cfg.dim, generator=g).bfloat16()
        pre = torch.zeros(1, 5, cfg.hc_mult)
        pre[..., 0] = 1
        h, p = h0, pre
        want_h, want_p = h0, pre
        for b in blocks:
            h, p = b.forward_lagged(h, p, None, None, None)
            args = (cfg.norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters)
            pa, qa, ca = plain_mixes(want_h, b.hc_attn_fn, b.hc_attn_scale, b.hc_attn_base, *args)
            x = b.attn_norm(plain_collapse(want_h, want_p))
            h1 = plain_expand((x.float() * 0.5).bfloat16(), want_h, qa, ca)
            pf, qf, cf = plain_mixes(h1, b.hc_ffn_fn, b.hc_ffn_scale, b.hc_ffn_base, *args)
            x = b.ffn_norm(plain_collapse(h1, pa))
            want_h, want_p = plain_expand(torch.tanh(x.float()).bfloat16(), h1, qf, cf), pf
            torch.testing.assert_close(h.float(), want_h.float(), rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(p, want_p, rtol=1e-4, atol=1e-5)
    finally:
        for b, (a, f, e) in zip(blocks, saved):
            b.attn, b.ffn, b.engram = a, f, e


def test_the_model_loop_carries_the_pre_mix_and_the_head_collapses_with_the_last(model) -> None:
    """`V4Model.forward` == the blocks run by hand with the carried pre, then collapse + norm + head."""
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    logits = model.forward(ids, 0)
    with torch.inference_mode():
        step = model._private_step("forward_full", ids, 0, None, main=True)
        rows = model._engram_rows(step)
        h = model.embed(ids).unsqueeze(2).repeat(1, 1, cfg.hc_mult, 1)
        pre = torch.zeros(h.shape[:-1])
        pre[..., 0] = 1
        for b in model.layers:
            h, pre = b.forward_lagged(h, pre, step, ids, rows[b.engram.index] if b.engram is not None else None)
        x = model.norm(plain_collapse(h[:, -1], pre[:, -1]))
        want = x.float() @ model.head.weight.T
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    assert not hasattr(model, "hc_head_fn")


# ---------------------------------------------------------------- Engram

def test_engram_rows_match_a_plain_position_indexed_hash(model) -> None:
    cfg = model.config
    n = cfg.engram_max_ngram_size
    vmap = model.engram_hash.map
    mult = engram_multipliers(cfg.engram_layers, n, cfg.engram_compressed_vocab_size).tolist()
    primes = engram_primes(cfg.engram_layers, n, cfg.engram_n_heads, cfg.engram_vocab_size).tolist()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, cfg.vocab_size, (9,), generator=g).tolist(), [2, 2, 5]]
    pool = CachePool(cfg, block_size=16, attn_layout="bf16", indexer_layout="bf16")
    got: dict[int, list[list[torch.Tensor]]] = {0: [], 1: []}
    for rid, s in enumerate(seqs):
        pool.add_request(rid, s)
    for items in ([(0, 4), (1, 1)], [(0, 1), (1, 2)], [(0, 4)]):        # chunks of several steps
        batch = pool.schedule(items)
        rows = model.engram_hash.rows(batch)
        for i, rid in enumerate(batch.req_ids):
            lo, hi = int(batch.cu_seqlens[i]), int(batch.cu_seqlens[i + 1])
            got[rid].append([r[lo:hi] for r in rows])
        pool.advance_batch(batch)
    for rid, s in enumerate(seqs):
        for li in range(len(cfg.engram_layers)):
            want = plain_ngram_rows(s, vmap, cfg.engram_pad_id, mult[li], primes[li], n)
            assert torch.equal(torch.cat([c[li] for c in got[rid]]), want), (rid, li)


def test_engram_update_matches_a_plain_gate(model) -> None:
    cfg = model.config
    eng = model.layers[cfg.engram_layers[0]].engram
    g = torch.Generator().manual_seed(4)
    t = 5
    h = torch.randn(1, t, cfg.hc_mult, cfg.dim, generator=g).bfloat16()
    rows = torch.randint(0, eng.embed.weight.shape[0], (t, eng.wkv.in_features // cfg.engram_head_dim), generator=g)
    got = eng(h, rows)
    emb = (eng.embed.weight.float().unflatten(-1, (-1, 32)) * eng.embed.scale.float().unsqueeze(-1)).flatten(-2)
    e = emb[rows].flatten(1)
    w = v4hal.dequant_fp8(eng.wkv.weight, eng.wkv.scale, cfg.weight_block_size)
    kv = (e.bfloat16().float() @ w.T)
    key, value = kv.split([cfg.hc_mult * cfg.dim, cfg.dim], dim=-1)
    key = key.unflatten(-1, (cfg.hc_mult, cfg.dim))
    hf = h[0].float()
    rstd = torch.rsqrt(hf.square().mean(-1) + cfg.norm_eps) * torch.rsqrt(key.square().mean(-1) + cfg.norm_eps)
    dot = (hf * eng.q_weight * eng.k_weight * key).sum(-1) * rstd / math.sqrt(cfg.dim)
    gate = torch.sigmoid(torch.copysign(dot.abs().clamp_min(1e-6).sqrt(), dot))
    want = (hf + gate.unsqueeze(-1) * value.unsqueeze(-2)).bfloat16()
    diff = (got[0].float() - want.float()).norm() / want.float().norm()
    assert diff < 1e-2, diff                              # FP8 activations in wkv: the only rounding apart
    assert not torch.equal(got, h)


def test_engram_tables_stay_in_host_memory_and_need_the_vocab_map(model_dir) -> None:
    m = V4Model.from_pretrained(model_dir)
    assert m.layers[1].engram.embed.weight.device.type == "cpu"
    assert m.layers[1].engram.embed.weight.dtype == torch.float8_e4m3fn
    m.engram_hash = None
    with pytest.raises(V4HalError, match="vocabulary map"):
        m.forward(torch.zeros(1, 3, dtype=torch.long), 0)


@pytest.mark.parametrize("cuts", [[12], [5, 4, 3], [1] * 12, [2, 9, 1]])
def test_chunked_prefill_equals_one_shot_bit_for_bit(model, cuts) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(6))
    want = model.forward(ids, 0)
    pos = 0
    for n in cuts:
        got = model.forward(ids[:, pos:pos + n], pos)
        pos += n
    assert torch.equal(got, want)


def test_engram_history_changes_the_logits(model) -> None:
    """The token before a step reaches its n-gram rows: a different earlier token changes the last logits."""
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))
    a = model.forward(ids, 0)
    other = ids.clone()
    other[0, 4] = (other[0, 4] + 1) % 400             # another compressed id
    b = model.forward(other, 0)
    assert not torch.equal(a, b)


def test_serving_pool_steps_and_prefix_reuse_carry_the_history(model) -> None:
    cfg = model.config
    g = torch.Generator().manual_seed(8)
    prompt = torch.randint(0, cfg.vocab_size, (40,), generator=g).tolist()
    want = model.forward(torch.tensor([prompt]), 0)
    pool = CachePool(cfg, block_size=16, attn_layout="bf16", indexer_layout="bf16")
    pool.add_request("A", prompt)
    for n in (7, 25):
        out = model.forward_batch(pool.schedule([("A", n)]), pool)
        pool.advance_batch(out.step.batch)
    assert pool.register_prefix("A", 32) is not None
    b = pool.add_request("B", prompt)
    assert b.computed == 32                              # reused pages: the history comes from the prefix
    out = model.forward_batch(pool.schedule([("B", 8)]), pool)
    assert torch.equal(out.logits, want)
    batch = pool.schedule([("A", 8)])
    assert batch.history_ids.tolist() == [prompt[30:32]]
    assert torch.equal(model.forward_batch(batch, pool).logits, want)


def test_batched_requests_keep_their_own_history(model) -> None:
    """Two requests cut into different chunks and batched together: each gives its one-shot logits bit for bit
    (the history rows of a batch are per request)."""
    cfg = model.config
    g = torch.Generator().manual_seed(12)
    prompts = {r: torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for r, n in (("a", 13), ("b", 9))}
    want = {r: model.forward(torch.tensor([p]), 0) for r, p in prompts.items()}
    pool = CachePool(cfg, block_size=16, attn_layout="bf16", indexer_layout="bf16")
    for r, p in prompts.items():
        pool.add_request(r, p)
    got = {}
    for items in ([("a", 5), ("b", 2)], [("a", 1), ("b", 6)], [("b", 1), ("a", 7)]):
        out = model.forward_batch(pool.schedule(items), pool)
        for i, (r, _) in enumerate(items):
            got[r] = out.logits[i:i + 1]
        pool.advance_batch(out.step.batch)
    for r in prompts:
        assert torch.equal(got[r], want[r]), r


def test_runtime_tables_need_history_after_position_0() -> None:
    cfg = v41_cfg()
    kw = dict(req_ids=["r"], input_ids=torch.tensor([1, 2]), cu_seqlens=torch.tensor([0, 2]),
              start_pos=torch.tensor([4]), block_tables={"token": torch.tensor([[0]])}, block_size=16,
              num_blocks={"token": 4})
    with pytest.raises(RangeError, match="history_ids"):
        v4hal.model.batch.ForwardBatch.from_block_tables(cfg, **kw)
    b = v4hal.model.batch.ForwardBatch.from_block_tables(cfg, **kw, history_ids=torch.tensor([[7, 9]]))
    assert b.history_ids.tolist() == [[7, 9]]


# ---------------------------------------------------------------- router

def test_v41_router_matches_a_plain_rederivation() -> None:
    cfg = v41_cfg(gate_temp=1.7)
    gate = Gate(3, cfg)
    g = torch.Generator().manual_seed(9)
    e = cfg.n_routed_experts
    gate.weight = (torch.randn(e, cfg.dim, generator=g) / 16).bfloat16()
    gate.bias = torch.randn(e, generator=g) * 0.1
    gate.bias_vl = torch.randn(e, generator=g)
    x = torch.randn(11, cfg.dim, generator=g).bfloat16()
    w, idx = gate(x, torch.zeros(11, dtype=torch.long))
    scores = torch.sqrt(torch.nn.functional.softplus((x.float() @ gate.weight.float().T) / 1.7))
    want_idx = (scores + gate.bias).topk(cfg.n_activated_experts, dim=-1)[1]
    want_w = scores.gather(1, want_idx)
    want_w = want_w / (want_w.sum(-1, keepdim=True) + 1e-20) * cfg.route_scale
    assert torch.equal(idx.long(), want_idx)
    torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-7)
    gate.bias_vl = torch.randn(e, generator=g) * 100              # loaded, unused (text only)
    assert torch.equal(gate(x, torch.zeros(11, dtype=torch.long))[1], idx)
    assert not gate.hash


# ---------------------------------------------------------------- weight formats

def test_v41_spec_names_and_block_shapes() -> None:
    cfg = v41_cfg()
    spec = checkpoint_spec(cfg)
    d, hc = cfg.dim, cfg.hc_mult
    assert spec["layers.0.attn.wq_a.scale"].shape == (cfg.q_lora_rank // 32, d // 32)
    assert spec["layers.0.ffn.shared_experts.w1.scale"].shape == (cfg.moe_inter_dim // 32, d // 32)
    assert spec["layers.0.ffn.experts.0.w1.scale"].shape == (cfg.moe_inter_dim, d // 16)
    assert spec["layers.0.ffn.gate.bias_vl"].kind == "f32"
    cols = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads * cfg.engram_head_dim
    assert spec["layers.1.engram.wkv.weight"].shape == ((hc + 1) * d, cols)
    assert spec["layers.1.engram.wkv.scale"].shape == ((hc + 1) * d // 32, cols // 32)
    assert spec["layers.4.engram.embed.weight"].shape == (cfg.engram_num_embeddings[1], cfg.engram_head_dim)
    assert spec["layers.4.engram.embed.scale"].kind == "table_scale"
    assert spec["layers.1.engram.q_weight"].shape == (hc, d)
    assert "layers.0.engram.wkv.weight" not in spec and not any("hc_head" in k for k in spec)
    v4 = checkpoint_spec(ModelConfig.preset("v4-mini"))
    assert v4["layers.0.attn.wq_a.scale"].shape == (1, 2) and "hc_head_fn" in v4
    assert v4["layers.1.ffn.experts.0.w1.scale"].shape == (128, 256 // 32)


def test_fp8_32x32_linear_matches_the_dequantized_float_product() -> None:
    cfg = v41_cfg()
    lin = Linear(256, 96, "fp8", cfg)
    g = torch.Generator().manual_seed(10)
    w = torch.randn(96, 256, generator=g) / 16
    w[:32, :32] *= 64                                    # tiles of very different ranges
    q, sc = v4hal.quant_weight_fp8(w, 32, "ue8m0")
    lin.weight, lin.scale = q, sc
    assert tuple(sc.shape) == (3, 8)
    x = torch.randn(5, 256, generator=g).bfloat16()
    a, a_s = v4hal.act_quant(x, 128, lin.scale_fmt, lin.scale_dtype)
    xd = (a.float().unflatten(-1, (-1, 128)) * a_s.float().unsqueeze(-1)).flatten(-2)
    want = xd @ v4hal.dequant_fp8(q, sc, 32).T
    torch.testing.assert_close(lin(x).float(), want, rtol=1e-2, atol=1e-2)


def test_fp4_per_16_experts_match_the_dequantized_float_swiglu() -> None:
    cfg = v41_cfg()
    ex = Experts(cfg)
    g = torch.Generator().manual_seed(11)
    e, d, inter = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
    deq = {}
    for name, (n, k) in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
        q, sc = v4hal.quant_weight_fp4(torch.randn(e, n, k, generator=g) / math.sqrt(k), 16)
        setattr(ex, name, q)
        setattr(ex, f"{name}_scale", sc)
        deq[name] = v4hal.dequant_fp4(q, sc, 16)
    assert tuple(ex.w1_scale.shape) == (e, inter, d // 16)
    x = torch.randn(6, d, generator=g).bfloat16()
    idx = torch.randint(0, e, (6, 2), generator=g).int()
    wts = torch.rand(6, 2, generator=g)
    got = ex(x, wts, idx).float()

    def fp8(v: torch.Tensor) -> torch.Tensor:         # the FP8 activation round trip before each GEMM
        a, s = v4hal.act_quant(v.bfloat16(), 128, "ue8m0")
        return (a.float().unflatten(-1, (-1, 128)) * s.float().unsqueeze(-1)).flatten(-2)

    want = torch.zeros(6, d)
    for t in range(6):
        for j in range(2):
            k = int(idx[t, j])
            xq = fp8(x[t:t + 1])
            gate = (xq @ deq["w1"][k].T).bfloat16().float().clamp(max=10)
            up = (xq @ deq["w3"][k].T).bfloat16().float().clamp(-10, 10)
            want[t] += (fp8(wts[t, j] * torch.nn.functional.silu(gate) * up) @ deq["w2"][k].T)[0].bfloat16().float()
    assert ((got - want).norm() / want.norm()) < 1e-2


def test_dspark_and_vision_tensors_are_left_unread_others_refused(tmp_path) -> None:
    from v4hal.model.checkpoint import CheckpointError
    from v4hal.model.random_checkpoint import random_tensors, save_tensors
    cfg = v41_cfg(dspark_layers=1)
    extra = [("mtp.0.attn.wq_a.weight", torch.zeros(4, 4)), ("vision.patch.weight", torch.zeros(2, 2)),
             ("image_newline", torch.zeros(8))]
    ok = save_tensors(cfg, list(random_tensors(cfg, 1)) + extra, tmp_path / "ok")
    from v4hal.model.tokenizer import write_tokenizer
    write_tokenizer(cfg, ok)
    m = V4Model.from_pretrained(ok)
    assert m.forward(torch.tensor([[1, 2, 3]]), 0).shape == (1, cfg.vocab_size)
    bad = save_tensors(cfg, list(random_tensors(cfg, 1)) + [("mtp.1.attn.wq_a.weight", torch.zeros(4, 4))],
                       tmp_path / "bad")
    with pytest.raises(CheckpointError, match="unexpected tensor mtp.1.attn.wq_a.weight"):
        V4Model.from_pretrained(bad)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_map_from_a_written_tokenizer_json(model_dir) -> None:
    from v4hal.model.tokenizer import load_tokenizer, load_vocab_map
    cfg = v41_cfg()
    vmap = load_vocab_map(model_dir, cfg)
    assert vmap.shape == (cfg.vocab_size,) and int(vmap.max()) + 1 == cfg.engram_compressed_vocab_size
    # an independent key: the tokenizers library's own normalizers
    from tokenizers import Regex, normalizers
    norm = normalizers.Sequence([normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(),
                                 normalizers.Lowercase(), normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
                                 normalizers.Strip()])
    tok = load_tokenizer(model_dir)
    keys: dict[str, int] = {}
    want = [keys.setdefault(norm.normalize_str(tok.decode([i])), len(keys)) for i in range(cfg.vocab_size)]
    assert vmap.tolist() == want
    with pytest.raises(RangeError, match="engram_compressed_vocab_size"):
        load_vocab_map(model_dir, cfg.replace(engram_compressed_vocab_size=401))


# ---------------------------------------------------------------- DSpark

def test_mtp_calls_on_a_v41_model_name_dspark(model) -> None:
    ids = torch.zeros(1, 2, dtype=torch.long)
    out = model.forward_full(ids, 0)
    with pytest.raises(V4HalError, match="DeepSeek-V4.1's DSpark draft stages are not supported"):
        model.mtp_forward(out.final, ids, 0)
    pool = CachePool(model.config, block_size=16, attn_layout="bf16", indexer_layout="bf16")
    pool.add_request("r", [1, 2])
    o = model.forward_batch(pool.schedule([("r", 2)]), pool)
    with pytest.raises(V4HalError, match="DSpark"):
        model.mtp_forward_batch(o, torch.zeros(2, dtype=torch.long))
    assert len(model.mtp) == 0
