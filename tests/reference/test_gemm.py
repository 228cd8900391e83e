"""Reference GEMMs (fp8_gemm, fp4_gemm, grouped_gemm) against an independent float64 formula:
operands dequantized with float64 math written here (e8m0 and e2m1 decoded from their bits),
multiplied in float64. Checked with per-dtype tolerances and calc_diff < 1e-6."""
from __future__ import annotations

import time

import pytest
import torch

import v4hal
from tests.numerics import assert_close, calc_diff
from v4hal.backends.reference import gemm as G
from v4hal.hal.errors import DTypeError, RangeError, ShapeError

FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu


# ------------------------------------------------------------------ float64 oracle
def scale_f64(s: torch.Tensor) -> torch.Tensor:
    if s.dtype == E8M0:
        return torch.exp2(s.view(torch.uint8).double() - 127)
    return s.double()


def fp4_f64(packed: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 -> float64 from the nibble bits (s eem, bias 1), low nibble = even element."""
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2).long()
    sign = 1.0 - 2.0 * ((codes >> 3) & 1).double()
    e, m = ((codes >> 1) & 3).double(), (codes & 1).double()
    mag = torch.where(e == 0, m * 0.5, (1 + m / 2) * torch.exp2(e - 1))
    return sign * mag


def act_f64(a: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
    k = a.shape[-1]
    return a.double() * scale_f64(a_s).repeat_interleave(128, dim=-1)[..., :k]


def fp8_weight_f64(b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    n, k = b.shape[-2:]
    s = scale_f64(b_s).repeat_interleave(128, dim=-2).repeat_interleave(128, dim=-1)[..., :n, :k]
    return b.double() * s


def fp4_weight_f64(b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    return fp4_f64(b) * scale_f64(b_s).repeat_interleave(32, dim=-1)


# ------------------------------------------------------------------ random operands
def rand_fp8(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * 4).clamp(-448, 448).to(FP8)


def rand_scales(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dtype == E8M0:
        return torch.randint(122, 132, shape, generator=g, dtype=torch.int32).to(torch.uint8).view(E8M0)
    return torch.rand(shape, generator=g) * 0.2 + 0.01


def rand_fp4(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)


def check(out: torch.Tensor, ref: torch.Tensor, out_dtype: torch.dtype) -> None:
    assert out.dtype == out_dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    scale = max(ref.abs().max().item(), 1e-30)
    d = TOL_DIFF[out_dtype]
    assert calc_diff(out, ref) < d, calc_diff(out, ref)
    # absolute tolerance relative to the output's magnitude: fp32 accumulation over K adds ~K*eps
    atol = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 1e-3}[out_dtype] * scale
    assert_close(out, ref, dtype=out_dtype, atol=atol)


# calc_diff bounds: fp32 output is the exact product up to fp32 accumulation; a bf16/fp16 output
# adds one rounding (relative 2**-9 / 2**-12), which alone gives calc_diff ~ 1e-6 / 1e-8
TOL_DIFF = {torch.float32: 1e-10, torch.bfloat16: 5e-6, torch.float16: 1e-7}


# ------------------------------------------------------------------ fp8_gemm
FP8_CASES = [((4, 256), 256), ((2, 3, 384), 200), ((1, 128), 70), ((7, 320), 130), ((5, 1, 256), 1),
             ((33, 512), 384)]


@pytest.mark.parametrize("a_shape,n", FP8_CASES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, E8M0])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm(a_shape: tuple[int, ...], n: int, scale_dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(n + sum(a_shape))
    k = a_shape[-1]
    kb = -(-k // 128)
    a, a_s = rand_fp8(a_shape, g), rand_scales((*a_shape[:-1], kb), scale_dtype, g)
    b, b_s = rand_fp8((n, k), g), rand_scales((-(-n // 128), kb), scale_dtype, g)
    out = G.fp8_gemm(a, a_s, b, b_s, scale_dtype, out_dtype)
    ref = act_f64(a, a_s) @ fp8_weight_f64(b, b_s).T
    assert out.shape == (*a_shape[:-1], n)
    check(out, ref, out_dtype)


def test_fp8_gemm_mixed_scale_dtypes_and_fp16_out() -> None:
    g = torch.Generator().manual_seed(1)
    a, a_s = rand_fp8((9, 256), g), rand_scales((9, 2), E8M0, g)
    b, b_s = rand_fp8((160, 256), g), rand_scales((2, 2), torch.float32, g)
    out = G.fp8_gemm(a, a_s, b, b_s, E8M0, torch.float16)
    check(out, act_f64(a, a_s) @ fp8_weight_f64(b, b_s).T, torch.float16)


def test_fp8_gemm_scales_apply_per_k_block() -> None:
    # one nonzero K block at a time: the output must pick exactly that block's a_s * b_s
    a = torch.zeros(2, 384).to(FP8)
    b = torch.zeros(130, 384).to(FP8)
    a[:, 128:256] = torch.tensor(1.0).to(FP8)
    b[:, 128:256] = torch.tensor(2.0).to(FP8)
    a_s = torch.tensor([[1.0, 3.0, 5.0], [2.0, 7.0, 11.0]])
    b_s = torch.tensor([[0.5, 0.25, 8.0], [4.0, 0.125, 16.0]])
    out = G.fp8_gemm(a, a_s, b, b_s, torch.float32, torch.float32)
    want = torch.empty(2, 130)
    want[:, :128] = 128 * 2 * a_s[:, 1:2] * b_s[0, 1]
    want[:, 128:] = 128 * 2 * a_s[:, 1:2] * b_s[1, 1]
    assert torch.equal(out, want)


# ------------------------------------------------------------------ fp4_gemm
FP4_CASES = [((4, 256), 256), ((2, 3, 384), 200), ((1, 128), 70), ((7, 160), 96), ((40, 512), 33)]


@pytest.mark.parametrize("a_shape,n", FP4_CASES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, E8M0])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp4_gemm(a_shape: tuple[int, ...], n: int, scale_dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3 * n + sum(a_shape))
    k = a_shape[-1]
    a, a_s = rand_fp8(a_shape, g), rand_scales((*a_shape[:-1], -(-k // 128)), scale_dtype, g)
    b, b_s = rand_fp4((n, k // 2), g), rand_scales((n, k // 32), E8M0, g)
    out = G.fp4_gemm(a, a_s, b, b_s, scale_dtype, out_dtype)
    ref = act_f64(a, a_s) @ fp4_weight_f64(b, b_s).T
    assert out.shape == (*a_shape[:-1], n)
    check(out, ref, out_dtype)


def test_fp4_gemm_nibble_order() -> None:
    # weight row n has a single nonzero element at K index n (even n: low nibble, odd: high nibble)
    k = 64
    codes = torch.zeros(k, k, dtype=torch.uint8)
    codes[torch.arange(k), torch.arange(k)] = 2                      # e2m1 code 2 = 1.0
    b = codes[:, 0::2] | (codes[:, 1::2] << 4)
    b_s = torch.full((k, 2), 127, dtype=torch.uint8).view(E8M0)
    a = torch.arange(1, k + 1, dtype=torch.float32).reshape(1, k).to(FP8)
    out = G.fp4_gemm(a, torch.ones(1, 1), b, b_s, torch.float32, torch.float32)
    assert torch.equal(out, a.float())


# ------------------------------------------------------------------ grouped_gemm
def grouped_ref(x64: torch.Tensor, w64: torch.Tensor, counts: list[int]) -> torch.Tensor:
    outs, start = [], 0
    for e, c in enumerate(counts):
        outs.append(x64[start:start + c] @ w64[e].T)
        start += c
    return torch.cat(outs)


def offsets_of(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)


GROUPS = {
    "zeros": [5, 0, 12, 1, 0, 9],
    "one_expert": [17],
    "single_row": [0, 1, 0],
    "skewed": [0] * 40 + [150] + [1] * 23,
    "all_empty": [0, 0, 0],
}


@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("recipe", ["bf16", "fp32", "fp8-fp32", "fp8-e8m0", "fp4-e8m0", "fp4-fp32"])
def test_grouped_gemm(groups: str, recipe: str) -> None:
    counts = GROUPS[groups]
    g = torch.Generator().manual_seed(len(counts) * 7 + len(recipe))
    e, m, n, k = len(counts), sum(counts), 200, 384
    offs = offsets_of(counts)
    if recipe in ("bf16", "fp32"):
        dt = torch.bfloat16 if recipe == "bf16" else torch.float32
        x, w = torch.randn(m, k, generator=g).to(dt), torch.randn(e, n, k, generator=g).to(dt)
        out = G.grouped_gemm(x, w, offs, out_dtype=torch.float32)
        ref = grouped_ref(x.double(), w.double(), counts)
    else:
        sdt = E8M0 if recipe.endswith("e8m0") else torch.float32
        x, xs = rand_fp8((m, k), g), rand_scales((m, k // 128), sdt, g)
        if recipe.startswith("fp8"):
            w, ws = rand_fp8((e, n, k), g), rand_scales((e, -(-n // 128), k // 128), sdt, g)
            w64 = fp8_weight_f64(w, ws)
        else:
            w, ws = rand_fp4((e, n, k // 2), g), rand_scales((e, n, k // 32), E8M0, g)
            w64 = fp4_weight_f64(w, ws)
        out = G.grouped_gemm(x, w, offs, xs, ws, torch.float32)
        ref = grouped_ref(act_f64(x, xs), w64, counts)
    assert out.shape == (m, n) and out.dtype == torch.float32
    if m:
        check(out, ref, torch.float32)
        out16 = G.grouped_gemm(x, w, offs, *((xs, ws) if recipe[:3] in ("fp8", "fp4") else ()),
                               out_dtype=torch.bfloat16)
        check(out16, ref, torch.bfloat16)


@pytest.mark.parametrize("chunk_elems", [None, 1])
def test_grouped_matches_dense_per_group(chunk_elems: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if chunk_elems is not None:          # one expert per bmm: the memory-bounded chunking path
        monkeypatch.setattr(G, "_CHUNK_ELEMS", chunk_elems)
    g = torch.Generator().manual_seed(5)
    counts = [3, 0, 7, 2, 3]
    x, xs = rand_fp8((15, 256), g), rand_scales((15, 2), E8M0, g)
    w, ws = rand_fp8((5, 130, 256), g), rand_scales((5, 2, 2), E8M0, g)
    out = G.grouped_gemm(x, w, offsets_of(counts), xs, ws, torch.float32)
    start = 0
    for e, c in enumerate(counts):
        dense = G.fp8_gemm(x[start:start + c], xs[start:start + c], w[e], ws[e], E8M0, torch.float32)
        assert_close(out[start:start + c], dense, dtype=torch.float32, atol=1e-6, rtol=1e-6)
        start += c
    w4, w4s = rand_fp4((5, 130, 128), g), rand_scales((5, 130, 8), E8M0, g)
    out = G.grouped_gemm(x, w4, offsets_of(counts), xs, w4s, torch.float32)
    start = 0
    for e, c in enumerate(counts):
        dense = G.fp4_gemm(x[start:start + c], xs[start:start + c], w4[e], w4s[e], E8M0, torch.float32)
        assert_close(out[start:start + c], dense, dtype=torch.float32, atol=1e-6, rtol=1e-6)
        start += c


def test_grouped_gemm_many_small_experts_is_fast() -> None:
    g = torch.Generator().manual_seed(6)
    e, m, n, k = 256, 1536, 64, 256
    ids = torch.sort(torch.randint(0, e, (m,), generator=g)).values
    counts = torch.bincount(ids, minlength=e).tolist()
    x, xs = rand_fp8((m, k), g), rand_scales((m, 2), E8M0, g)
    w, ws = rand_fp4((e, n, k // 2), g), rand_scales((e, n, k // 32), E8M0, g)
    t0 = time.perf_counter()
    out = G.grouped_gemm(x, w, offsets_of(counts), xs, ws, torch.float32)
    elapsed = time.perf_counter() - t0
    check(out, grouped_ref(act_f64(x, xs), fp4_weight_f64(w, ws), counts), torch.float32)
    assert elapsed < 20.0, f"grouped_gemm E=256 took {elapsed:.2f}s"  # ~0.5 s on an idle 2-core box


# ------------------------------------------------------------------ errors
def test_errors() -> None:
    g = torch.Generator().manual_seed(0)
    a, a_s = rand_fp8((4, 256), g), rand_scales((4, 2), torch.float32, g)
    b, b_s = rand_fp8((128, 256), g), rand_scales((1, 2), torch.float32, g)
    with pytest.raises(DTypeError, match="a_s must have scale_dtype"):
        v4hal.fp8_gemm(a, a_s, b, b_s, E8M0)
    with pytest.raises(ShapeError, match="b_s must be"):
        v4hal.fp8_gemm(a, a_s, b, b_s[:, :1])
    with pytest.raises(ShapeError, match="b must be"):
        v4hal.fp8_gemm(a, a_s, b[:, :128], b_s)
    # an fp8 b where packed e2m1 is expected is a dtype error of the op
    with pytest.raises(DTypeError, match="b must be uint8"):
        v4hal.fp4_gemm(a, a_s, b, b_s)
    x, w = torch.randn(5, 64), torch.randn(2, 16, 64)
    with pytest.raises(RangeError, match="group_offsets"):
        v4hal.grouped_gemm(x, w, torch.tensor([0, 2, 4]))
    with pytest.raises(RangeError, match="group_offsets"):
        v4hal.grouped_gemm(x, w, torch.tensor([0, 4, 3]))
    with pytest.raises(ShapeError, match="group_offsets"):
        v4hal.grouped_gemm(x, w, torch.tensor([0, 5]))
    with pytest.raises(DTypeError, match="same dtype"):
        v4hal.grouped_gemm(x, w.bfloat16(), torch.tensor([0, 2, 5]))
    with pytest.raises(DTypeError, match="x_scale and w_scale"):
        v4hal.grouped_gemm(x.to(FP8), w.to(FP8), torch.tensor([0, 2, 5]))
