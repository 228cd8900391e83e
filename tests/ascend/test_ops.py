"""Every op of the Ascend backend, run through the stand-in CANN ops on A2, A3 and 950, against the
reference backend; and the limit checks that route a call to the reference instead."""
from __future__ import annotations

import pytest
import torch

import v4hal
from tests.numerics import assert_close, calc_diff
from v4hal.backends.reference import attention as ref_attn
from v4hal.hal import formats as F

from .conftest import ascend, both, fell_back, native, reference, same_sets

BF16 = torch.bfloat16


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------- small ops
@pytest.mark.parametrize("dtype,wdtype", [(BF16, torch.float32), (BF16, BF16), (torch.float32, torch.float32)])
def test_rms_norm(npu, dtype, wdtype):
    x = torch.randn(3, 5, 64, generator=gen(), dtype=torch.float32).to(dtype)
    w = (1 + 0.1 * torch.randn(64, generator=gen(1))).to(wdtype)
    got, want = both(v4hal.rms_norm, x, w, 1e-6)
    assert native("rms_norm") and npu.called("npu_rms_norm") == ["torch_npu"]
    assert_close(got, want, dtype)
    got1, want1 = both(v4hal.rms_norm, x[0, 0], w, 1e-5)      # 1-D x is viewed as [1, D] for the op
    assert_close(got1, want1, dtype)


@pytest.mark.parametrize("heads", [None, 4])
@pytest.mark.parametrize("per_seq", [False, True])
@pytest.mark.parametrize("inverse", [False, True])
def test_rotary_emb(npu, heads, per_seq, inverse):
    b, s, rd = 2, 5, 16
    shape = (b, s, rd) if heads is None else (b, s, heads, rd)
    x = torch.randn(*shape, generator=gen()).to(BF16)
    ang = torch.rand(*((b, s) if per_seq else (s,)), rd // 2, generator=gen(2)) * 6.0
    freqs = torch.polar(torch.ones_like(ang), ang)
    got, want = both(v4hal.rotary_emb, x, freqs, inverse)
    assert native("rotary_emb")
    assert_close(got, want, BF16)


def test_rotary_emb_too_wide_falls_back(npu):
    x = torch.randn(1, 2, 896, generator=gen()).to(BF16)
    freqs = torch.polar(torch.ones(2, 448), torch.rand(2, 448, generator=gen(1)))
    got, want = both(v4hal.rotary_emb, x, freqs)
    assert fell_back("rotary_emb", "D < 896") and not npu.called("npu_rotary_mul")
    assert torch.equal(got, want)


def test_hadamard_is_reference(npu):
    x = torch.randn(4, 64, generator=gen()).to(BF16)
    got, want = both(v4hal.hadamard_transform, x)
    assert torch.equal(got, want) and fell_back("hadamard_transform", "no CANN Hadamard")


# ---------------------------------------------------------------------------------- sparse_attn
def _attn_inputs(b=2, m=3, h=4, d=512, n=40, k=16, dtype=BF16, seed=0):
    g = gen(seed)
    q = torch.randn(b, m, h, d, generator=g).to(dtype)
    kv = torch.randn(b, n, d, generator=g).to(dtype)
    sink = torch.randn(h, generator=g)
    idx = torch.randint(0, n, (b, m, k), generator=g, dtype=torch.int32)
    idx[torch.rand(b, m, k, generator=g) < 0.3] = -1                 # -1 scattered through the rows
    idx[0, 1] = -1                                                    # a row with nothing to attend
    return q, kv, sink, idx


@pytest.mark.parametrize("tiers", [("torch_npu", "_C_ascend", "custom"), ("_C_ascend", "custom"), ("custom",)])
def test_sparse_attn_every_tier(npu, tiers, monkeypatch):
    from tests.ascend.fake_npu import install, uninstall

    handle = install(npu.chip, tiers=tiers)        # re-install with fewer tiers (the fixture restores)
    try:
        q, kv, sink, idx = _attn_inputs()
        scale = 512 ** -0.5
        got, want = both(v4hal.sparse_attn, q, kv, sink, idx, scale)
        assert handle.called("npu_sparse_flash_attention") == [tiers[0]]
        assert_close(got, want, BF16)
        assert torch.equal(got[0, 1], torch.zeros_like(got[0, 1]))   # all -1 row is exactly 0
        assert calc_diff(got, want) < 1e-5
    finally:
        uninstall(handle)


def test_sparse_attn_fp16_and_no_sink(npu):
    q, kv, sink, idx = _attn_inputs(dtype=torch.float16, seed=3)
    got, want = both(v4hal.sparse_attn, q, kv, sink, idx, 0.05)
    assert native("sparse_attn")
    assert_close(got, want, torch.float16)
    none = torch.full_like(sink, float("-inf"))
    got, want = both(v4hal.sparse_attn, q, kv, none, idx, 0.05)
    assert not torch.isnan(got).any()
    assert_close(got, want, torch.float16)


@pytest.mark.parametrize("case,text", [
    ("d64", "head dim d != 512"), ("fp32", "not bf16/fp16"), ("mixed_sink", "mixes -inf"),
])
def test_sparse_attn_limits(npu, case, text):
    q, kv, sink, idx = _attn_inputs(d=64 if case == "d64" else 512, dtype=torch.float32 if case == "fp32" else BF16)
    if case == "mixed_sink":
        sink[0] = float("-inf")
    got, want = both(v4hal.sparse_attn, q, kv, sink, idx, 0.1)
    assert fell_back("sparse_attn", text) and not npu.called("npu_sparse_flash_attention")
    assert torch.equal(got, want)


def test_sparse_attn_head_limit_per_chip(npu):
    q, kv, sink, idx = _attn_inputs(h=3)
    got, want = both(v4hal.sparse_attn, q, kv, sink, idx, 0.05)
    if npu.chip == "950":              # 950 takes 1..128 heads, A2/A3 only powers of two
        assert native("sparse_attn")
        assert_close(got, want, BF16)
    else:
        assert fell_back("sparse_attn", "A2/A3 N1 limit")
        assert torch.equal(got, want)


# --------------------------------------------------------------------------------------- indexer
def _indexer_inputs(b=2, s=1, h=8, t=13, d=128, dtype=BF16, seed=0):
    g = gen(seed)
    q = torch.randn(b, s, h, d, generator=g).to(dtype)
    k = torch.randn(b, t, d, generator=g).to(dtype)
    w = torch.randn(b, s, h, generator=g).to(dtype)
    return q, k, w


def test_indexer_decode_uniform_mask(npu):
    q, k, w = _indexer_inputs(s=1, t=13)
    got, want = both(v4hal.indexer_topk, q, k, w, 8, start_pos=50, ratio=4, offset=128)
    assert native("indexer_topk")
    same_sets(got, want)
    got, want = both(v4hal.indexer_topk, q, k, w, 20, start_pos=50, ratio=4, offset=0)   # topk > visible
    same_sets(got, want)
    assert (got == -1).sum() == (want == -1).sum() > 0


def test_indexer_token_causal(npu):
    q, k, w = _indexer_inputs(s=6, t=10)
    got, want = both(v4hal.indexer_topk, q, k, w, 4, start_pos=4, ratio=1)
    assert native("indexer_topk")
    same_sets(got, want)


def test_indexer_staircase_prefill_falls_back(npu):
    q, k, w = _indexer_inputs(s=16, t=4)
    got, want = both(v4hal.indexer_topk, q, k, w, 4, start_pos=0, ratio=4)
    assert fell_back("indexer_topk", "staircase") and not npu.called("npu_lightning_indexer")
    assert torch.equal(got, want)


def test_indexer_head_limits(npu):
    q, k, w = _indexer_inputs(h=12)                      # 12 heads: fine on A2/A3 (<= 64), not on 950
    got, want = both(v4hal.indexer_topk, q, k, w, 8, start_pos=50, ratio=4)
    if npu.chip == "950":
        assert fell_back("indexer_topk", "8, 16, 24, 32, 64")
        assert torch.equal(got, want)
    else:
        assert native("indexer_topk")
        same_sets(got, want)


def test_index_scores_and_compress_kv_are_reference(npu):
    q, k, w = _indexer_inputs(s=3, t=7)
    got, want = both(v4hal.index_scores, q, k, w)
    assert torch.equal(got, want)
    kv = torch.randn(2, 8, 2 * 16, generator=gen()).to(BF16)
    score = torch.randn(2, 8, 32, generator=gen(1))
    ape = torch.randn(4, 32, generator=gen(2))
    got, want = both(v4hal.compress_kv, kv, score, ape, 4, True)
    assert torch.equal(got, want) and fell_back("compress_kv", "pooling only")


# ------------------------------------------------------------------------------------------- MoE
def _pairs(w: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(i, dim=-1)
    return torch.gather(w, -1, order), torch.gather(i, -1, order)


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "softmax", "sigmoid"])
@pytest.mark.parametrize("hashed", [False, True])
def test_moe_gate(npu, score_func, hashed):
    g = gen()
    x = torch.randn(10, 32, generator=g).to(BF16)
    weight = torch.randn(16, 32, generator=g).to(BF16)
    bias = torch.randn(16, generator=g)
    kw = dict(topk=4, bias=None if hashed else bias, score_func=score_func, route_scale=1.5)
    if hashed:
        kw.update(tid2eid=torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(50)]).to(torch.int32),
                  input_ids=torch.randint(0, 50, (10,), generator=g))
    (gw, gi), (rw, ri) = both(v4hal.moe_gate, x, weight, **kw)
    assert native("moe_gate")
    want_tier = "_C_ascend" if score_func == "sqrtsoftplus" else "torch_npu"
    assert npu.called("moe_gating_top_k_hash" if score_func == "sqrtsoftplus"
                      else "npu_moe_gating_top_k") == [want_tier]
    gw, gi = _pairs(gw, gi)
    rw, ri = _pairs(rw, ri)
    assert torch.equal(gi, ri)
    assert_close(gw, rw, torch.float32)


def test_moe_dispatch_combine(npu):
    g = gen()
    x = torch.randn(7, 16, generator=g).to(BF16)
    idx = torch.randint(0, 4, (7, 3), generator=g, dtype=torch.int32)        # expert 4 of 5 gets nothing
    (xs, off, s2f), (rxs, roff, rs2f) = both(v4hal.moe_dispatch, x, idx, 5)
    assert native("moe_dispatch")
    assert torch.equal(xs, rxs) and torch.equal(off, roff)
    assert torch.equal(s2f.sorted_to_flat, rs2f.sorted_to_flat)      # bit for bit, as the contract says
    y = torch.randn(21, 16, generator=g).to(BF16)
    wts = torch.rand(7, 3, generator=g)
    got, want = both(v4hal.moe_combine, y, wts, s2f)
    assert native("moe_combine")
    assert_close(got, want, BF16)


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e8m0", "fp8_fp32", "fp4"])
def test_moe_experts(npu, fmt):
    g = gen()
    t, k, e, d, inter = 6, 2, 3, 128, 128
    x = (torch.randn(t, d, generator=g) * 0.5).to(BF16)
    weights = torch.rand(t, k, generator=g)
    indices = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    w1, w3 = ((torch.randn(e, inter, d, generator=g) * 0.05).to(BF16) for _ in range(2))
    w2 = (torch.randn(e, d, inter, generator=g) * 0.05).to(BF16)
    scales: dict = {}
    if fmt.startswith("fp8"):
        sf = "ue8m0" if fmt == "fp8_e8m0" else None
        (w1, s1), (w2, s2), (w3, s3) = (reference(v4hal.quant_weight_fp8, w, 128, sf) for w in (w1, w2, w3))
        scales = dict(w_scales=(s1, s2, s3))
    elif fmt == "fp4":
        (w1, s1), (w2, s2), (w3, s3) = (reference(v4hal.quant_weight_fp4, w) for w in (w1, w2, w3))
        scales = dict(w_scales=(s1, s2, s3))
    got, want = both(v4hal.moe_experts, x, weights, indices, w1, w2, w3, swiglu_limit=0.5, **scales)
    assert native("moe_experts") and npu.called("npu_grouped_matmul")
    assert_close(got, want, BF16)
    assert calc_diff(got, want) < 1e-4


# ------------------------------------------------------------------------------------------ GEMMs
@pytest.mark.parametrize("scale_dtype", [F.E8M0_DTYPE, torch.float32])
def test_fp8_gemm(npu, scale_dtype):
    g = gen()
    a_f = torch.randn(2, 5, 256, generator=g)
    b_f = torch.randn(192, 256, generator=g) * 0.05
    a, a_s = reference(v4hal.act_quant, a_f, 128, None, scale_dtype)
    b, b_s = reference(v4hal.quant_weight_fp8, b_f, 128, "ue8m0" if scale_dtype == F.E8M0_DTYPE else None)
    got, want = both(v4hal.fp8_gemm, a, a_s, b, b_s, scale_dtype, BF16)
    mx = npu.chip == "950" and scale_dtype == F.E8M0_DTYPE
    assert bool(npu.called("npu_quant_matmul")) == mx
    assert_close(got, want, BF16)
    assert calc_diff(got, want) < 1e-5


def test_fp4_gemm(npu):
    g = gen()
    a, a_s = reference(v4hal.act_quant, torch.randn(4, 256, generator=g), 128, None, F.E8M0_DTYPE)
    b, b_s = reference(v4hal.quant_weight_fp4, torch.randn(96, 256, generator=g) * 0.05)
    got, want = both(v4hal.fp4_gemm, a, a_s, b, b_s, F.E8M0_DTYPE, BF16)
    assert bool(npu.called("npu_quant_matmul")) == (npu.chip == "950")
    assert_close(got, want, BF16)


@pytest.mark.parametrize("recipe", ["bf16", "fp32", "fp8", "fp4"])
def test_grouped_gemm(npu, recipe):
    g = gen()
    m, k, n, e = 9, 256, 64, 4
    offsets = torch.tensor([0, 3, 3, 7, 9])                              # expert 1 empty
    xf = torch.randn(m, k, generator=g)
    wf = torch.randn(e, n, k, generator=g) * 0.05
    if recipe in ("bf16", "fp32"):
        dt = BF16 if recipe == "bf16" else torch.float32
        args = (xf.to(dt), wf.to(dt), offsets)
        kw = {"out_dtype": dt}
    else:
        x, xs = reference(v4hal.act_quant, xf, 128, "ue8m0", F.E8M0_DTYPE)
        w, ws = reference(v4hal.quant_weight_fp8 if recipe == "fp8" else v4hal.quant_weight_fp4, wf)
        args, kw = (x, w, offsets), {"x_scale": xs, "w_scale": ws}
    got, want = both(v4hal.grouped_gemm, *args, **kw)
    assert native("grouped_gemm")
    assert_close(got, want, kw.get("out_dtype", BF16))


# ------------------------------------------------------------------------------------ quantizers
def test_act_quant_is_reference(npu):
    x = torch.randn(3, 256, generator=gen()).to(BF16)
    (y, s), (ry, rs) = both(v4hal.act_quant, x, 128, "ue8m0", F.E8M0_DTYPE)
    assert (torch.equal(y.view(torch.uint8), ry.view(torch.uint8))
            and torch.equal(s.view(torch.uint8), rs.view(torch.uint8)))
    assert fell_back("act_quant", "1x128 FP8")
    x1, x2 = x.clone(), x.clone()
    ascend(v4hal.act_quant, x1, 128, None, inplace=True)
    reference(v4hal.act_quant, x2, 128, None, inplace=True)
    assert torch.equal(x1, x2)


def test_fp4_act_quant(npu):
    x = (torch.randn(4, 3, 64, generator=gen()) * 3).to(BF16)
    x[0, 0, :32] = 0.0                                     # an all-zero block hits the amax floor
    (y, s), (ry, rs) = both(v4hal.fp4_act_quant, x)
    assert torch.equal(y, ry) and torch.equal(s.view(torch.uint8), rs.view(torch.uint8))
    assert bool(npu.called("npu_dynamic_mx_quant")) == (npu.chip == "950")
    if npu.chip != "950":
        assert fell_back("fp4_act_quant", "no MX quantizer")
    x1, x2 = x.clone(), x.clone()
    ascend(v4hal.fp4_act_quant, x1, inplace=True)
    reference(v4hal.fp4_act_quant, x2, inplace=True)
    assert torch.equal(x1, x2)


def test_load_time_helpers_are_reference(npu):
    w = torch.randn(130, 256, generator=gen()).to(BF16)
    (q, s), (rq, rs) = both(v4hal.quant_weight_fp8, w)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    got, want = both(v4hal.dequant_fp8, q, s)
    assert torch.equal(got, want)
    (q4, s4), (rq4, rs4) = both(v4hal.quant_weight_fp4, w)
    assert torch.equal(q4, rq4)
    got, want = both(v4hal.dequant_fp4, q4, s4)
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------- mHC
def _hc_inputs(t=3, d=4096, hc=4, seed=0):
    g = gen(seed)
    x = torch.randn(t, hc, d, generator=g).to(BF16)
    fn = torch.randn((2 + hc) * hc, hc * d, generator=g) * 0.01
    scale = torch.rand(3, generator=g) + 0.5
    base = torch.randn((2 + hc) * hc, generator=g) * 0.1
    return x, fn, scale, base


def test_hc_pre(npu):
    x, fn, scale, base = _hc_inputs()
    (y, post, comb), (ry, rpost, rcomb) = both(v4hal.hc_pre, x.view(1, 3, 4, 4096), fn, scale, base)
    assert native("hc_pre") and npu.called("npu_hc_pre_v2") == ["_C_ascend"]
    assert_close(y, ry, BF16)
    assert_close(post, rpost, torch.float32, atol=1e-5, rtol=1e-4)
    assert_close(comb, rcomb, torch.float32, atol=1e-5, rtol=1e-4)


def test_hc_pre_custom_tier(npu):
    from tests.ascend.fake_npu import install, uninstall

    handle = install(npu.chip, drop=("_C_ascend.npu_hc_pre_v2",))
    try:
        x, fn, scale, base = _hc_inputs(t=2, seed=1)
        (y, post, comb), (ry, rpost, rcomb) = both(v4hal.hc_pre, x, fn, scale, base)
        assert handle.called("npu_hc_pre") == ["custom"]
        assert_close(y, ry, BF16)
        assert_close(comb, rcomb, torch.float32, atol=1e-5, rtol=1e-4)
    finally:
        uninstall(handle)


def test_hc_pre_limits(npu):
    x, fn, scale, base = _hc_inputs(d=256)
    got, want = both(v4hal.hc_pre, x, fn, scale, base)
    assert fell_back("hc_pre", "dim not 4096 or 7168") and not npu.called("npu_hc_pre_v2")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    x, fn, scale, base = _hc_inputs(d=4096)
    got, want = both(v4hal.hc_pre, x.float(), fn, scale, base)
    assert fell_back("hc_pre", "x not bf16")


def test_hc_post_split_head(npu):
    g = gen()
    x = torch.randn(2, 3, 64, generator=g).to(BF16)
    res = torch.randn(2, 3, 4, 64, generator=g).to(BF16)
    post = torch.rand(2, 3, 4, generator=g) * 2
    comb = torch.rand(2, 3, 4, 4, generator=g)
    got, want = both(v4hal.hc_post, x, res, post, comb)
    assert native("hc_post")
    assert_close(got, want, BF16)
    got, want = both(v4hal.hc_post, x.float(), res, post, comb)          # mixed dtypes: reference
    assert fell_back("hc_post", "different dtypes") and torch.equal(got, want)
    mixes = torch.randn(5, 24, generator=g)
    sc, base = torch.rand(3, generator=g), torch.randn(24, generator=g)
    got, want = both(v4hal.hc_split_sinkhorn, mixes, sc, base)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    xh = torch.randn(2, 4, 64, generator=g).to(BF16)
    got, want = both(v4hal.hc_head, xh, torch.randn(4, 256, generator=g) * 0.01, torch.rand(1, generator=g),
                     torch.randn(4, generator=g))
    assert torch.equal(got, want)


def test_every_contract_op_served(npu):
    """The emulation registers an Ascend implementation for every declared op."""
    from v4hal.backends.ascend import register
    from v4hal.hal import registry

    ops = set(v4hal.OPS)
    assert set(register.implementations()) == ops
    assert all(any(i.backend == "ascend" for i in registry.implementations(op, "cpu")) for op in ops)


def test_reference_oracle_helper_consistent(npu):
    """The fixture's reference really is the reference backend (guards the comparisons above)."""
    q, kv, sink, idx = _attn_inputs(d=64)
    assert torch.equal(reference(v4hal.sparse_attn, q, kv, sink, idx, 0.1), ref_attn.sparse_attn(q, kv, sink, idx, 0.1))


def test_parity_harness_passes(npu):
    """``v4hal parity`` (the command an NPU engineer runs) over every op with the Ascend code path."""
    from v4hal import parity

    rows = parity.run_parity("cpu", ["ascend"], progress=False)
    ascend_rows = [r for r in rows if r["backend"] == "ascend"]
    assert ascend_rows and all(r["status"] == "pass" for r in ascend_rows), \
        [(r["op"], r["shape"], r.get("reason") or r.get("diff")) for r in ascend_rows if r["status"] != "pass"]
    assert {r["op"] for r in ascend_rows} >= {"sparse_attn", "moe_experts", "fp8_gemm", "hc_post", "rms_norm"}
