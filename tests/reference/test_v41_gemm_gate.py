"""V4.1 weight formats and router in the reference backend against independent oracles.

Oracles, written here from the published facts (Hugging Face ``deepseek_v41`` router and checkpoint
test, never by calling the code under test):

* FP8 weights with 32x32 ue8m0 tiles: a float64 per-element sum
  ``C[m, n] = sum_k A[m, k] a_s[m, k // 128] B[n, k] b_s[n // 32, k // 32]``;
* packed FP4 weights with a scale per 16 along K: a byte-by-byte decoder (byte j of a row holds
  element 2j in its low nibble and 2j+1 in its high nibble; nibble bit 3 the sign, bits 0-2 index
  the e2m1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; e8m0 byte e is 2**(e - 127));
* the weight quantizers at those blocks, bit for bit: scale ``2**ceil(log2(amax / 448))`` over a
  32x32 tile (amax floored at 1e-4) and ``2**ceil(log2(amax / 6))`` over 16 values, values cast
  with torch's own e4m3 conversion and, for e2m1, the nearest grid value with ties to the even code;
* the V4.1 router: float64 ``sqrt(softplus(logit / gate_temp))``, choice by ``score + bias`` (the
  image bias on image tokens), weights ``score / (sum + eps) * route_scale``.
"""
from __future__ import annotations

import math

import pytest
import torch

import v4hal
from v4hal.backends.reference import gemm as ref_gemm
from v4hal.backends.reference import quant as ref_quant
from v4hal.backends.reference.moe import moe_gate
from v4hal.hal import formats as F
from v4hal.hal.errors import RangeError, ShapeError

E8M0 = F.E8M0_DTYPE
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _scale64(s: torch.Tensor) -> list:
    """Scales as float64 lists: e8m0 bytes decoded by hand, fp32 as is."""
    if s.dtype == E8M0:
        return [[2.0 ** (int(b) - 127) for b in row] for row in s.view(torch.uint8).reshape(s.shape[0], -1).tolist()]
    return s.double().reshape(s.shape[0], -1).tolist()


def _decode_fp4_row(row: list[int]) -> list[float]:
    out = []
    for byte in row:
        for nib in (byte & 0xF, byte >> 4):
            out.append((-1.0 if nib & 8 else 1.0) * E2M1[nib & 7])
    return out


def _operands(m, n, k, seed, sd):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * torch.logspace(-4, 2, k, base=2.0)    # blocks of different scales
    fmt = "ue8m0" if sd == E8M0 else None
    a, a_s = ref_quant.act_quant(x, 128, fmt, sd)
    return w, a, a_s


@pytest.mark.parametrize("sd", [torch.float32, E8M0])
@pytest.mark.parametrize("m,n,k", [(3, 72, 256), (1, 32, 128)])
def test_fp8_gemm_32x32_tiles_vs_float64(sd, m, n, k):
    w, a, a_s = _operands(m, n, k, seed=n + k, sd=sd)
    b, b_s = ref_quant.quant_weight_fp8(w, 32, "ue8m0" if sd == E8M0 else None)
    assert b_s.shape == (-(-n // 32), k // 32)
    a64, b64 = a.double().tolist(), b.double().tolist()
    sa, sb = _scale64(a_s), _scale64(b_s)
    want = torch.tensor([[sum(a64[i][kk] * sa[i][kk // 128] * b64[j][kk] * sb[j // 32][kk // 32] for kk in range(k))
                          for j in range(n)] for i in range(m)], dtype=torch.float64)
    got = ref_gemm.fp8_gemm(a, a_s, b, b_s, sd, torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6 * float(want.abs().max()))
    with v4hal.use_backend("reference"):
        public = v4hal.fp8_gemm(a, a_s, b, b_s, sd, torch.float32)
    assert torch.equal(public, got)
    # the tiles matter: reading the same scales as 128x128 tiles would be a different (and invalid) call
    b128, b128_s = ref_quant.quant_weight_fp8(w, 128, "ue8m0")
    assert not torch.equal(ref_gemm.fp8_gemm(a, a_s, b128, b128_s, sd, torch.float32), got)


@pytest.mark.parametrize("sd", [torch.float32, E8M0])
def test_fp4_gemm_per16_vs_byte_decoder(sd):
    m, n, k = 3, 40, 256
    w, a, a_s = _operands(m, n, k, seed=11, sd=sd)
    b, b_s = ref_quant.quant_weight_fp4(w, 16)
    assert b.shape == (n, k // 2) and b_s.shape == (n, k // 16) and b_s.dtype == E8M0
    a64, sa, sb = a.double().tolist(), _scale64(a_s), _scale64(b_s)
    dec = [_decode_fp4_row(row) for row in b.tolist()]
    want = torch.tensor([[sum(a64[i][kk] * sa[i][kk // 128] * dec[j][kk] * sb[j][kk // 16] for kk in range(k))
                          for j in range(n)] for i in range(m)], dtype=torch.float64)
    got = ref_gemm.fp4_gemm(a, a_s, b, b_s, sd, torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6 * float(want.abs().max()))
    # grouped GEMM, one expert per half of the rows, each the same weights: the dense product per row
    x = torch.cat([a, a]), torch.cat([a_s, a_s])
    off = torch.tensor([0, m, 2 * m])
    grouped = ref_gemm.grouped_gemm(x[0], torch.stack([b, b]), off, x[1], torch.stack([b_s, b_s]), torch.float32)
    torch.testing.assert_close(grouped.double(), torch.cat([want, want]), rtol=2e-6,
                               atol=2e-6 * float(want.abs().max()))


def test_grouped_fp8_32x32_vs_float64():
    counts, n, k = [2, 0, 3], 64, 128
    g = torch.Generator().manual_seed(3)
    x = torch.randn(sum(counts), k, generator=g)
    w = torch.randn(len(counts), n, k, generator=g) * torch.logspace(-3, 3, k, base=2.0)
    a, a_s = ref_quant.act_quant(x, 128, "ue8m0", E8M0)
    b, b_s = ref_quant.quant_weight_fp8(w, 32, "ue8m0")
    assert b_s.shape == (3, 2, 4)
    off = torch.tensor([0, 2, 2, 5])
    got = ref_gemm.grouped_gemm(a, b, off, a_s, b_s, torch.float32)
    a64, sa = a.double().tolist(), _scale64(a_s)
    rows = []
    for i in range(sum(counts)):
        e = int(torch.searchsorted(off, torch.tensor(i), right=True)) - 1
        b64, sb = b[e].double().tolist(), _scale64(b_s[e])
        rows.append([sum(a64[i][kk] * sa[i][kk // 128] * b64[j][kk] * sb[j // 32][kk // 32] for kk in range(k))
                     for j in range(n)])
    want = torch.tensor(rows, dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6 * float(want.abs().max()))


def _pow2_ceil(v: float) -> float:
    return 2.0 ** math.ceil(math.log2(v))


def test_quant_weight_fp8_32x32_bitwise():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(70, 96, generator=g) * torch.logspace(-6, 6, 96, base=2.0)
    w[:32, :32] = 0.0                                    # an all-zero tile: amax floor 1e-4
    y, s = ref_quant.quant_weight_fp8(w, 32, "ue8m0")
    assert y.shape == w.shape and s.shape == (3, 3) and s.dtype == E8M0
    for ti in range(3):
        for tj in range(3):
            tile = w[ti * 32:(ti + 1) * 32, tj * 32:(tj + 1) * 32].double()
            scale = _pow2_ceil(max(float(tile.abs().max()), 1e-4) / 448.0)
            assert int(s.view(torch.uint8)[ti, tj]) == round(math.log2(scale)) + 127
            want = (tile / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            assert torch.equal(y[ti * 32:(ti + 1) * 32, tj * 32:(tj + 1) * 32].view(torch.uint8),
                               want.view(torch.uint8))


def test_quant_weight_fp4_per16_bitwise():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(5, 64, generator=g) * torch.logspace(-5, 5, 64, base=2.0)
    w[0, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, 6.0, 0.0, -0.0, 0.1, 4.0, 3.0, 2.0])
    y, s = ref_quant.quant_weight_fp4(w, 16)
    assert y.shape == (5, 32) and s.shape == (5, 4)
    for r in range(5):
        for blk in range(4):
            vals = w[r, blk * 16:(blk + 1) * 16].double().tolist()
            scale = _pow2_ceil(max(max(abs(v) for v in vals), 6 * 2.0 ** -126) / 6.0)
            assert int(s.view(torch.uint8)[r, blk]) == round(math.log2(scale)) + 127
            for i, v in enumerate(vals):
                q = min(abs(v) / scale, 6.0)
                best = min(range(8), key=lambda c: (abs(E2M1[c] - q), c % 2))   # nearest, ties to the even code
                code = best | (8 if math.copysign(1.0, v) < 0 and best else 0)
                byte = int(y[r, (blk * 16 + i) // 2])
                got = byte & 0xF if i % 2 == 0 else byte >> 4
                assert got & 7 == best, (r, blk, i, v)
                if best:
                    assert got == code, (r, blk, i, v)
    # the hand-set ties of row 0: 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    assert F.e2m1_decode(F.unpack_fp4(y[:1, :4])).tolist()[0] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0]


def test_format_shapes_are_checked_once():
    a = torch.zeros(2, 256, dtype=F.FP8_DTYPE)
    a_s = torch.ones(2, 2)
    b = torch.zeros(64, 256, dtype=F.FP8_DTYPE)
    with pytest.raises(ShapeError, match=r"b_s must be \[ceil\(N/128\), K/128\] \(128x128 tiles\) or "
                                         r"\[ceil\(N/32\), K/32\] \(32x32 tiles\)"):
        v4hal.fp8_gemm(a, a_s, b, torch.ones(2, 4))
    b4 = torch.zeros(64, 128, dtype=torch.uint8)
    with pytest.raises(ShapeError, match=r"b_s must be \[N, K/32\] \(a scale per 32\) or \[N, K/16\]"):
        v4hal.fp4_gemm(a, a_s, b4, torch.ones(64, 4))
    with pytest.raises(ShapeError, match=r"w_scale must be \[3, N, K/32\]"):
        v4hal.grouped_gemm(a, torch.zeros(3, 64, 128, dtype=torch.uint8), torch.tensor([0, 1, 2, 2]),
                           x_scale=a_s, w_scale=torch.ones(3, 64, 4))


# ------------------------------------------------------------------------------------ V4.1 router
def _router64(x, w, bias, image_bias, image_mask, topk, gate_temp, eps, route_scale):
    """float64 V4.1 router, loops over tokens and experts: (weights by expert id, chosen ids as sets)."""
    x64, w64 = x.double().tolist(), w.double().tolist()
    out = []
    for t, row in enumerate(x64):
        scores = []
        for e in range(len(w64)):
            logit = sum(a * b for a, b in zip(row, w64[e])) / gate_temp
            scores.append(math.sqrt(math.log1p(math.exp(logit)) if logit < 30 else logit))
        b = image_bias if image_mask is not None and bool(image_mask[t]) else bias
        choice = [s + float(b[e]) for e, s in enumerate(scores)]
        ids = sorted(range(len(scores)), key=lambda e: -choice[e])[:topk]
        total = sum(scores[e] for e in ids) + eps
        out.append({e: scores[e] / total * route_scale for e in ids})
    return out


@pytest.mark.parametrize("gate_temp", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_v41_router_vs_float64(gate_temp, dtype):
    t, d, e, k = 12, 48, 24, 6
    g = torch.Generator().manual_seed(int(gate_temp * 10))
    x = torch.randn(t, d, generator=g).to(dtype)
    w = (torch.randn(e, d, generator=g) * d ** -0.5).to(dtype)
    bias = torch.randn(e, generator=g) * 0.3
    image_bias = torch.randn(e, generator=g) * 0.3
    image_mask = torch.arange(t) % 3 == 0
    weights, ids = moe_gate(x, w, k, bias, "sqrtsoftplus", 1.5, None, None, gate_temp, image_bias, image_mask,
                            1e-20)
    want = _router64(x, w, bias, image_bias, image_mask, k, gate_temp, 1e-20, 1.5)
    for row in range(t):
        assert set(ids[row].tolist()) == set(want[row]), row
        for slot in range(k):
            assert math.isclose(float(weights[row, slot]), want[row][int(ids[row, slot])], rel_tol=2e-6)
    # the image rows chose with image_bias: without it they would differ somewhere
    _, plain = moe_gate(x, w, k, bias, "sqrtsoftplus", 1.5, None, None, gate_temp)
    assert torch.equal(plain[~image_mask], ids[~image_mask])
    assert not torch.equal(plain[image_mask], ids[image_mask])


def test_v41_defaults_are_v4_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    x, w, bias = torch.randn(9, 32, generator=g), torch.randn(16, 32, generator=g), torch.randn(16, generator=g)
    old = moe_gate(x, w, 4, bias, "sqrtsoftplus", 1.5)
    new = moe_gate(x, w, 4, bias, "sqrtsoftplus", 1.5, None, None, 1.0, None, None, 0.0)
    assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])
    eps = moe_gate(x, w, 4, bias, "sqrtsoftplus", 1.5, None, None, 1.0, None, None, 1e-20)
    assert torch.equal(old[1], eps[1]) and torch.allclose(old[0], eps[0], rtol=0, atol=0)   # 1e-20 below fp32 ulp


def test_v41_router_errors():
    x, w, bias = torch.zeros(4, 16), torch.zeros(8, 16), torch.zeros(8)
    with pytest.raises(RangeError, match="gate_temp must be in"):
        v4hal.moe_gate(x, w, topk=2, bias=bias, gate_temp=0.0)
    with pytest.raises(ShapeError, match="needs both image_bias and image_mask"):
        v4hal.moe_gate(x, w, topk=2, bias=bias, image_bias=torch.zeros(8))
    with pytest.raises(ShapeError, match="needs bias"):
        v4hal.moe_gate(x, w, topk=2, image_bias=torch.zeros(8), image_mask=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ShapeError, match=r"image_mask must be"):
        v4hal.moe_gate(x, w, topk=2, bias=bias, image_bias=torch.zeros(8), image_mask=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(RangeError, match="norm_eps"):
        v4hal.moe_gate(x, w, topk=2, norm_eps=-1.0)
