"""Batch invariance of every reference op the V4 graph uses: a row (a token, or a request of a batched op)
gets the same bits alone and inside batches of 1..9 rows at any offset, at every CPU capability level ATen
can run here (``ATEN_CPU_CAPABILITY`` = default, avx2, avx512; each in a subprocess, a level the CPU lacks is
skipped) and with 1 and 2 threads. The wide cases cross ATen's 32768-element grain, so 2 threads split them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

ROWS = 9
LEVELS = ("default", "avx2", "avx512")

#: A case: a name and a function of a row selection (a slice of ``range(ROWS)``) returning outputs whose dim 0
#: is the row.
Case = tuple[str, Callable[[slice], list[torch.Tensor]]]


def _cases() -> list[Case]:
    """Every op of the graph on small, seeded inputs of ``ROWS`` rows (row widths chosen to leave vector
    remainders: 8 experts, 4 mHC copies, 40-wide experts, 5 heads)."""
    import v4hal
    from v4hal.cases import make_case
    from v4hal.hal import formats as F

    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    bf = torch.bfloat16
    cases: list[Case] = []

    # quantizers and GEMMs
    x = randn(ROWS, 256, dtype=bf)
    for fmt, sdt in ((None, torch.float32), ("ue8m0", F.E8M0_DTYPE)):
        cases.append((f"act_quant {fmt}", lambda r, fmt=fmt, sdt=sdt: [
            t.view(torch.uint8) if t.dtype == F.FP8_DTYPE else t.float()
            for t in v4hal.act_quant(x[r], 128, fmt, scale_dtype=sdt)]))

    def inplace(r: slice, fn) -> list[torch.Tensor]:
        y = x[r].clone()
        fn(y)
        return [y]

    cases.append(("act_quant inplace", lambda r: inplace(r, lambda y: v4hal.act_quant(y, 64, "ue8m0", inplace=True))))
    cases.append(("fp4_act_quant", lambda r: [t.view(torch.uint8) for t in v4hal.fp4_act_quant(x[r], 32)]))
    cases.append(("fp4_act_quant inplace", lambda r: inplace(r, lambda y: v4hal.fp4_act_quant(y, 32, inplace=True))))
    a, a_s = v4hal.act_quant(x, 128, "ue8m0", scale_dtype=F.E8M0_DTYPE)
    w8, w8_s = v4hal.quant_weight_fp8(randn(136, 256, scale=0.05), 128, "ue8m0")
    w4, w4_s = v4hal.quant_weight_fp4(randn(136, 256, scale=0.05), 32)
    cases.append(("fp8_gemm", lambda r: [v4hal.fp8_gemm(a[r], a_s[r], w8, w8_s, scale_dtype=a_s.dtype)]))
    cases.append(("fp4_gemm", lambda r: [v4hal.fp4_gemm(a[r], a_s[r], w4, w4_s, scale_dtype=a_s.dtype)]))
    cases.append(("dequant_fp8", lambda r: [v4hal.dequant_fp8(a[r], a_s[r], 128)]))

    # MoE
    xg, gate_w, bias = randn(ROWS, 64, dtype=bf), randn(8, 64, scale=0.3), randn(8, scale=0.1)
    tid2eid = torch.randint(0, 8, (50, 2), generator=g, dtype=torch.int32)
    ids = torch.randint(0, 50, (ROWS,), generator=g)
    wide_w, wide_bias = randn(20, 64, scale=0.3), randn(20, scale=0.1)
    for sf in ("sqrtsoftplus", "sigmoid", "softmax"):
        cases.append((f"moe_gate {sf}", lambda r, sf=sf: list(v4hal.moe_gate(
            xg[r], gate_w, topk=2, bias=bias, score_func=sf, route_scale=1.5))))
        cases.append((f"moe_gate {sf} 20 experts", lambda r, sf=sf: list(v4hal.moe_gate(
            xg[r], wide_w, topk=20, bias=wide_bias, score_func=sf))))
    cases.append(("moe_gate hash", lambda r: list(v4hal.moe_gate(
        xg[r], gate_w, topk=2, tid2eid=tid2eid, input_ids=ids[r]))))
    weights, idx = v4hal.moe_gate(xg, gate_w, topk=2, bias=bias)
    for dt in (bf, torch.float32):     # fp32: the SwiGLU product is not rounded to bf16 before w2
        ew1, ew2, ew3 = randn(8, 40, 64, scale=0.3, dtype=dt), randn(8, 64, 40, scale=0.3, dtype=dt), \
            randn(8, 40, 64, scale=0.3, dtype=dt)
        cases.append((f"moe_experts {dt}", lambda r, e=(ew1, ew2, ew3), dt=dt: [
            v4hal.moe_experts(xg[r].to(dt), weights[r], idx[r], *e, swiglu_limit=3.0)]))
    xw = randn(ROWS, 128, dtype=bf)
    ww, wi = torch.rand(ROWS, 4, generator=g), torch.randint(0, 2, (ROWS, 4), generator=g, dtype=torch.int32)
    q1, s1 = v4hal.quant_weight_fp4(randn(2, 256, 128, scale=0.1), 32)
    q2, s2 = v4hal.quant_weight_fp4(randn(2, 128, 256, scale=0.1), 32)
    q3, s3 = v4hal.quant_weight_fp4(randn(2, 256, 128, scale=0.1), 32)
    cases.append(("moe_experts fp4", lambda r: [v4hal.moe_experts(xw[r], ww[r], wi[r], q1, q2, q3,
                                                                  w_scales=(s1, s2, s3), swiglu_limit=10.0)]))
    # 9 x 4 x 1003 = 36108 fp32 SwiGLU elements: 2 threads take 18054 each, not a whole number of vector steps
    f1, f2, f3 = randn(2, 1003, 128, scale=0.1), randn(2, 128, 1003, scale=0.1), randn(2, 1003, 128, scale=0.1)
    cases.append(("moe_experts fp32 wide", lambda r: [v4hal.moe_experts(xw[r].float(), ww[r], wi[r], f1, f2, f3)]))

    def dispatch_combine(r: slice) -> list[torch.Tensor]:
        xs, _, handle = v4hal.moe_dispatch(xg[r], idx[r], 8)
        return [v4hal.moe_combine(xs, weights[r], handle)]

    cases.append(("moe_dispatch + moe_combine", dispatch_combine))

    # mHC
    h = randn(ROWS, 4, 64, dtype=bf)
    hc_fn, hc_scale, hc_base = randn(24, 256, scale=0.3), torch.rand(3, generator=g) + 0.5, randn(24, scale=0.5)
    cases.append(("hc_pre", lambda r: list(v4hal.hc_pre(h[r], hc_fn, hc_scale, hc_base))))
    mixes = randn(ROWS, 24)
    cases.append(("hc_split_sinkhorn", lambda r: list(v4hal.hc_split_sinkhorn(mixes[r], hc_scale, hc_base))))
    post, comb = v4hal.hc_pre(h, hc_fn, hc_scale, hc_base)[1:]
    xo = randn(ROWS, 64, dtype=bf)
    cases.append(("hc_post", lambda r: [v4hal.hc_post(xo[r], h[r], post[r], comb[r])]))
    head_fn, head_scale, head_base = randn(4, 256, scale=0.3), torch.rand(1, generator=g) + 0.5, randn(4)
    cases.append(("hc_head", lambda r: [v4hal.hc_head(h[r], head_fn, head_scale, head_base)]))
    # 9 x 4 x 1000 = 36000 elements in the weighted sums over the copies: 2 threads split them
    hw, xow = randn(ROWS, 4, 1000, dtype=bf), randn(ROWS, 1000, dtype=bf)
    fn_w, head_w = randn(24, 4000, scale=0.03), randn(4, 4000, scale=0.03)
    cases.append(("hc_pre wide", lambda r: list(v4hal.hc_pre(hw[r], fn_w, hc_scale, hc_base))))
    cases.append(("hc_post wide", lambda r: [v4hal.hc_post(xow[r], hw[r], post[r], comb[r])]))
    cases.append(("hc_head wide", lambda r: [v4hal.hc_head(hw[r], head_w, head_scale, head_base)]))

    # small ops: narrow and wide rows
    for d, label in ((24, ""), (4096, " wide")):
        xs, nw = randn(ROWS, d, dtype=bf), randn(d).add(1.0)
        cases.append((f"rms_norm{label}", lambda r, xs=xs, nw=nw: [v4hal.rms_norm(xs[r], nw, 1e-6)]))
    xr = randn(ROWS, 3, 5, 64, dtype=bf)
    freqs = torch.polar(torch.ones(ROWS, 3, 32), randn(ROWS, 3, 32))
    for inv in (False, True):
        cases.append((f"rotary_emb {inv}", lambda r, inv=inv: [v4hal.rotary_emb(xr[r], freqs[r], inv)]))
    xh = randn(ROWS, 5, 128, dtype=bf)
    cases.append(("hadamard_transform", lambda r: [v4hal.hadamard_transform(xh[r])]))

    # attention (rows = sequences of the batch)
    q, kv = randn(ROWS, 3, 5, 64, dtype=bf), randn(ROWS, 20, 64, dtype=bf)
    sink = randn(5)
    picks = torch.randint(-1, 20, (ROWS, 3, 7), generator=g, dtype=torch.int32)
    cases.append(("sparse_attn", lambda r: [v4hal.sparse_attn(q[r], kv[r], sink, picks[r], 0.125)]))
    # float64 products large enough for the BLAS path, at 2 threads too
    qw, kvw = randn(ROWS, 4, 8, 64, dtype=bf), randn(ROWS, 64, 64, dtype=bf)
    picks_w = torch.randint(-1, 64, (ROWS, 4, 48), generator=g, dtype=torch.int32)
    cases.append(("sparse_attn wide", lambda r: [v4hal.sparse_attn(qw[r], kvw[r], sink[:1].expand(8).contiguous(),
                                                                   picks_w[r], 0.125)]))
    iq, ik, iw = randn(ROWS, 6, 5, 32, dtype=bf), randn(ROWS, 9, 32, dtype=bf), randn(ROWS, 6, 5, dtype=bf)
    cases.append(("index_scores", lambda r: [v4hal.index_scores(iq[r], ik[r], iw[r])]))
    cases.append(("indexer_topk", lambda r: [v4hal.indexer_topk(iq[r], ik[r], iw[r], 4, start_pos=30, ratio=4)]))
    for ratio, ov in ((4, True), (8, False)):
        ckv, csc = randn(ROWS, 16, (2 if ov else 1) * 40, dtype=bf), randn(ROWS, 16, (2 if ov else 1) * 40)
        ape = randn(ratio, (2 if ov else 1) * 40)
        cases.append((f"compress_kv {ratio}", lambda r, ckv=ckv, csc=csc, ape=ape, ratio=ratio, ov=ov: [
            v4hal.compress_kv(ckv[r], csc[r], ape, ratio, ov)]))

    # paged ops (rows = requests; the cache is shared)
    (pq, cache, pidx, psink, scale, plen, xcache, xidx, xlen, layout, *_) = make_case("sparse_attn_paged", {
        "layout": "model1_fp8", "b": ROWS, "s": 2, "h": 3, "block_size": 24, "ctx": 30, "topk": 8, "d": 128,
        "extra_ctx": 24, "extra_topk": 6, "holes": 0.25, "uneven": True})
    cases.append(("sparse_attn_paged", lambda r: list(v4hal.sparse_attn_paged(
        pq[r], cache, pidx[r], psink, scale, topk_length=plen[r], extra_kv_cache=xcache, extra_indices=xidx[r],
        extra_topk_length=xlen[r], layout=layout, return_lse=True))))
    (iq2, icache, iw2, ctx, table, width, ilay) = make_case("indexer_logits_paged", {
        "b": ROWS, "n": 2, "h": 5, "mb": 3, "block_size": 4, "extra": 3, "topk": 6, "offset": 7})

    def logits(r: slice) -> list[torch.Tensor]:
        out = v4hal.indexer_logits_paged(iq2[r], icache, iw2[2 * r.start:2 * r.stop], ctx[r], table[r], width,
                                         layout=ilay)
        return [out.view(r.stop - r.start, 2, -1)]

    cases.append(("indexer_logits_paged", logits))
    cases.append(("indexer_topk_paged", lambda r: [v4hal.indexer_topk_paged(
        iq2[r], icache, iw2[2 * r.start:2 * r.stop], ctx[r], table[r], 6, layout=ilay, offset=7)]))

    # the ragged compressor (rows = requests of 5 tokens each; entries per request padded to 2, and the
    # request's state pages after the call)
    (rx, wkv, wgate, cape, cnorm, cfreqs, state, stable, cu, sp, cratio, ceps) = make_case("compressor_ragged", {
        "ratio": 4, "d": 32, "h": 64, "reqs": ROWS, "s": 5, "start": 6, "blk": 4, "rd": 16})

    def ragged(r: slice) -> list[torch.Tensor]:
        st = state.clone()
        lo, hi = int(cu[r.start]), int(cu[r.stop])
        ent, ereq, _ = v4hal.compressor_ragged(rx[lo:hi], wkv, wgate, cape, cnorm, cfreqs, st, stable[r],
                                               cu[r.start:r.stop + 1] - cu[r.start], sp[r], cratio, ceps)
        per = ent.new_zeros(r.stop - r.start, 2, ent.shape[1])
        for i in range(r.stop - r.start):
            rows = ent[ereq == i]
            per[i, :rows.shape[0]] = rows
        return [per, st[stable[r].long()]]

    cases.append(("compressor_ragged", ragged))
    return cases


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (NaNs of the same bits count as equal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    return torch.equal(a, b)


def find_differences(threads: tuple[int, ...] = (1, 2)) -> list[str]:
    """Every (case, threads, batch, offset, row) whose row differs from the row computed alone. Above one
    thread only the ``wide`` cases run (the others stay below ATen's grain, where a second thread never
    starts)."""
    from v4hal.hal.dispatch import use_backend

    bad: list[str] = []
    prev = torch.get_num_threads()
    try:
        with use_backend("reference"):
            cases = _cases()
            for t in threads:
                torch.set_num_threads(t)
                for name, fn in cases:
                    if t > 1 and "wide" not in name:
                        continue
                    alone = [fn(slice(i, i + 1)) for i in range(ROWS)]
                    for m in range(1, ROWS + 1):
                        for off in sorted({0, ROWS - m}):
                            outs = fn(slice(off, off + m))
                            for i in range(m):
                                if not all(_same(o[i], a[0]) for o, a in zip(outs, alone[off + i])):
                                    bad.append(f"{name}: threads {t}, batch {m} at {off}, row {off + i}")
                                    break
    finally:
        torch.set_num_threads(prev)
    return bad


def _run_level(level: str) -> tuple[str, list[str]]:
    """(capability ATen ran at, differences) from a subprocess at ``ATEN_CPU_CAPABILITY=level``."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, ATEN_CPU_CAPABILITY=level, PYTHONPATH=os.pathsep.join(
        [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    code = ("import json, torch; from tests.reference.test_batch_invariance import find_differences; "
            "print(json.dumps([torch.backends.cpu.get_cpu_capability(), find_differences()]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, bad = json.loads(proc.stdout.strip().splitlines()[-1])
    return got, bad


@pytest.mark.parametrize("level", LEVELS)
def test_every_op_gives_a_row_the_same_bits_in_any_batch(level: str) -> None:
    got, bad = _run_level(level)
    if got.lower() != level:
        pytest.skip(f"this CPU runs ATen at {got}, not {level}")
    assert not bad, "\n".join(bad[:40])


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 16])
def test_padding_gives_every_thread_chunk_whole_vector_steps(threads: int) -> None:
    """ATen's chunking of the padded count (``min(threads, ceil(m / grain))`` chunks of ``ceil(m / chunks)``):
    every chunk starts and ends on a multiple of LANE_TILE, and the padding stays below a tile per thread."""
    from v4hal.backends.reference._rows import _GRAIN_SIZE, LANE_TILE, padded_numel

    for n in [1, 4, 63, 64, 65, 1000, 32767, 32768, 32769, 36000, 65537, 100003, 10 ** 6 + 7]:
        m = padded_numel(n, threads)
        chunks = max(1, min(threads, -(-m // _GRAIN_SIZE)))
        size = -(-m // chunks)
        assert m >= n and m - n < LANE_TILE * threads and m % LANE_TILE == 0, (n, m)
        assert size % LANE_TILE == 0 and size * chunks == m, (n, m, chunks)
