"""Low-precision GEMMs: FP8 x FP8 (1x128 activation, 128x128 or 32x32 weight scales), FP8 x packed FP4
(a scale per 32 or per 16 along K), and the grouped (MoE) GEMM over rows grouped by expert.

Weight format variants: the weight block is read from the shape of the weight scales, decided and
validated here once (:func:`fp8_weight_block`, :func:`fp4_weight_block`); backends receive valid
operands and take the block from the same shapes. V4 uses 128x128 FP8 tiles and FP4 per 32; V4.1
adds 32x32 FP8 tiles (dense layers, shared experts) and FP4 per 16 (routed experts).
"""
from __future__ import annotations

import torch

from . import _checks as C
from ._checks import FLOATS, FP8, SCALE_DTYPES, ceil_div
from ._define import call, define_op
from ._prepare import prepare_for

BLOCK = 128   # FP8 block along K (activations) and N x K (weights)
FP4_BLOCK = 32
#: FP8 weight tiles (square, rows x K): 128 (V4) or 32 (V4.1)
FP8_WEIGHT_BLOCKS = (128, 32)
#: FP4 weight blocks along K: 32 (V4, MXFP4) or 16 (V4.1 routed experts)
FP4_WEIGHT_BLOCKS = (32, 16)
#: expert weights: float, FP8, or packed e2m1 (two FP4 values a byte)
WEIGHT_DTYPES = (*FLOATS, FP8, torch.uint8)


def _check_act_operand(op: str, a: torch.Tensor, a_s: torch.Tensor, name: str = "a",
                        scale_name: str = "a_s") -> int:
    """An fp8 activation ``name`` [..., K] and its scales ``scale_name`` [..., K/128]; returns K."""
    C.dtype(op, name, a, (FP8,))
    C.min_rank(op, name, a, 1, "[..., K]")
    k = a.shape[-1]
    C.divisible(op, f"{name}.shape[-1] (K)", k, BLOCK, "the FP8 block")
    C.dtype(op, scale_name, a_s, SCALE_DTYPES)
    C.shape(op, scale_name, a_s, (*a.shape[:-1], k // BLOCK), "[..., K/128]")
    return k


def fp8_weight_block(op: str, name: str, s: torch.Tensor, n: int, k: int, lead: tuple[int, ...] = ()) -> int:
    """The tile of FP8 weight scales ``name``: 128 for ``[*lead, ceil(N/128), K/128]``, 32 for
    ``[*lead, ceil(N/32), K/32]`` (K a multiple of 128, checked by the caller); else ShapeError."""
    C.dtype(op, name, s, SCALE_DTYPES)
    for block in FP8_WEIGHT_BLOCKS:
        if tuple(s.shape) == (*lead, ceil_div(n, block), k // block):
            return block
    pre = "".join(f"{d}, " for d in lead)
    raise C.ShapeError(f"{op}: {name} must be [{pre}ceil(N/128), K/128] (128x128 tiles) or [{pre}ceil(N/32), K/32] "
                       f"(32x32 tiles) with N={n}, K={k}, got {C.describe(s)}")


def fp4_weight_block(op: str, name: str, s: torch.Tensor, n: int, k: int, lead: tuple[int, ...] = ()) -> int:
    """The K block of packed-FP4 weight scales ``name``: 32 for ``[*lead, N, K/32]``, 16 for
    ``[*lead, N, K/16]`` (K a multiple of 32, checked by the caller); else ShapeError."""
    C.dtype(op, name, s, SCALE_DTYPES)
    for block in FP4_WEIGHT_BLOCKS:
        if tuple(s.shape) == (*lead, n, k // block):
            return block
    pre = "".join(f"{d}, " for d in lead)
    raise C.ShapeError(f"{op}: {name} must be [{pre}N, K/32] (a scale per 32) or [{pre}N, K/16] (a scale per 16) "
                       f"with N={n}, K={k}, got {C.describe(s)}")


def _check_scale_dtype(op: str, scale_dtype: torch.dtype, a_s: torch.Tensor) -> None:
    C.dtype_arg(op, "scale_dtype", scale_dtype, SCALE_DTYPES)
    if scale_dtype != a_s.dtype:
        raise C.DTypeError(f"{op}: a_s must have scale_dtype ({scale_dtype}), got {C.describe(a_s)}")


def _check_fp8_gemm(a, a_s, b, b_s, scale_dtype, out_dtype):
    op = "fp8_gemm"
    k = _check_act_operand(op, a, a_s)
    C.dtype(op, "b", b, (FP8,))
    C.rank(op, "b", b, (2,), "[N, K]")
    if b.shape[1] != k:
        raise C.ShapeError(f"{op}: b must be [N, K] with K = a.shape[-1] = {k}, got {C.describe(b)}")
    fp8_weight_block(op, "b_s", b_s, b.shape[0], k)
    _check_scale_dtype(op, scale_dtype, a_s)
    C.one_of(op, "out_dtype", out_dtype, FLOATS)
    C.same_device(op, a=a, a_s=a_s, b=b, b_s=b_s)


def _finite_scales(op):
    def check(a, a_s, b, b_s, *rest):
        C.finite(op, "a_s", a_s)
        C.finite(op, "b_s", b_s)
    return check


def _fake_gemm(a, a_s, b, b_s, scale_dtype, out_dtype):
    return a.new_empty((*a.shape[:-1], b.shape[0]), dtype=out_dtype)


define_op("fp8_gemm",
          "(Tensor a, Tensor a_s, Tensor b, Tensor b_s, ScalarType scale_dtype=float32, "
          "ScalarType out_dtype=bfloat16) -> Tensor",
          check=_check_fp8_gemm, fake=_fake_gemm, value_check=_finite_scales("fp8_gemm"))


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             scale_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``C[..., N] = A[..., K] @ B[N, K]^T``: A fp8 with scales ``[..., K/128]``, B fp8 with tile scales
    (fp32 or e8m0) ``[ceil(N/128), K/128]`` (128x128 tiles) or ``[ceil(N/32), K/32]`` (32x32 tiles);
    fp32 accumulation per weight-tile-wide K block; out ``out_dtype``."""
    return call.fp8_gemm(a, a_s, b, b_s, scale_dtype, out_dtype)


def prepare_gemm_weight(b: torch.Tensor, b_s: torch.Tensor) -> bool:
    """Once after loading: let the backend that serves ``fp8_gemm`` (b fp8 ``[N, K]``, tile scales as
    :func:`fp8_gemm` takes them) or ``fp4_gemm`` (b packed uint8 ``[N, K/2]``, scales as :func:`fp4_gemm`)
    on b's device prepare this weight for its later calls with these very tensors (the reference backend
    decodes it to fp32 once instead of in every call; results unchanged, fp32 memory held while the weight
    lives). Returns whether the backend kept a preparation. Its preparer takes ``(b, b_s)``."""
    op = "prepare_gemm_weight"
    C.dtype(op, "b", b, (FP8, torch.uint8))
    C.rank(op, "b", b, (2,), "[N, K] (FP4: [N, K/2])")
    if b.dtype == FP8:
        C.divisible(op, "b.shape[1] (K)", b.shape[1], BLOCK, "the FP8 block")
        fp8_weight_block(op, "b_s", b_s, b.shape[0], b.shape[1])
    else:
        C.divisible(op, "2 * b.shape[1] (K)", 2 * b.shape[1], BLOCK, "the FP8 block")
        fp4_weight_block(op, "b_s", b_s, b.shape[0], 2 * b.shape[1])
    C.same_device(op, b=b, b_s=b_s)
    return prepare_for("fp8_gemm" if b.dtype == FP8 else "fp4_gemm", b.device, b, b_s)


def _check_fp4_gemm(a, a_s, b, b_s, scale_dtype, out_dtype):
    op = "fp4_gemm"
    k = _check_act_operand(op, a, a_s)
    C.dtype(op, "b", b, (torch.uint8,))
    C.rank(op, "b", b, (2,), "[N, K/2] packed e2m1")
    if 2 * b.shape[1] != k:
        raise C.ShapeError(f"{op}: b must be [N, K/2] with K = a.shape[-1] = {k}, got {C.describe(b)}")
    fp4_weight_block(op, "b_s", b_s, b.shape[0], k)
    _check_scale_dtype(op, scale_dtype, a_s)
    C.one_of(op, "out_dtype", out_dtype, FLOATS)
    C.same_device(op, a=a, a_s=a_s, b=b, b_s=b_s)


define_op("fp4_gemm",
          "(Tensor a, Tensor a_s, Tensor b, Tensor b_s, ScalarType scale_dtype=float32, "
          "ScalarType out_dtype=bfloat16) -> Tensor",
          check=_check_fp4_gemm, fake=_fake_gemm, value_check=_finite_scales("fp4_gemm"))


def fp4_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             scale_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``C = A @ B^T`` with A fp8 (+ ``[..., K/128]`` scales) and B packed e2m1 ``[N, K/2]`` with block
    scales per 32 (``[N, K/32]``, MXFP4) or per 16 (``[N, K/16]``) along K."""
    return call.fp4_gemm(a, a_s, b, b_s, scale_dtype, out_dtype)


def weight_kind(op: str, name: str, w: torch.Tensor, scale: torch.Tensor | None, k: int,
                scale_name: str) -> str:
    """Classify an expert weight stack ``[E, N, K]``: 'float', 'fp8' or 'fp4'; checks its scales."""
    C.dtype(op, name, w, WEIGHT_DTYPES)
    C.rank(op, name, w, (3,), "[E, N, K] (FP4: [E, N, K/2])")
    e, n = w.shape[0], w.shape[1]
    if w.dtype in FLOATS:
        if scale is not None:
            raise C.DTypeError(f"{op}: {scale_name} must be None for {w.dtype} {name} (the float recipe takes "
                               f"no scales), got {C.describe(scale)}")
        if w.shape[2] != k:
            raise C.ShapeError(f"{op}: {name} must be [E, N, K] with K = {k}, got {C.describe(w)}")
        return "float"
    if scale is None:
        raise C.DTypeError(f"{op}: a quantized {name} ({C.describe(w)}) needs {scale_name}, got None")
    if w.dtype == FP8:
        if w.shape[2] != k:
            raise C.ShapeError(f"{op}: {name} must be [E, N, K] with K = {k}, got {C.describe(w)}")
        C.divisible(op, f"{name}.shape[-1] (K)", k, BLOCK, "the FP8 block")
        fp8_weight_block(op, scale_name, scale, n, k, (e,))
        return "fp8"
    # packed e2m1 (uint8)
    if 2 * w.shape[2] != k:
        raise C.ShapeError(f"{op}: {name} must be packed [E, N, K/2] with K = {k}, got {C.describe(w)}")
    C.divisible(op, f"{name}.shape[-1] (K/2) times 2", k, FP4_BLOCK, "the FP4 block")
    fp4_weight_block(op, scale_name, scale, n, k, (e,))
    return "fp4"


def _check_grouped_gemm(x, w, group_offsets, x_scale, w_scale, out_dtype):
    op = "grouped_gemm"
    C.dtype(op, "x", x, (*FLOATS, FP8))
    C.rank(op, "x", x, (2,), "[M, K]")
    C.dtype(op, "w", w, WEIGHT_DTYPES)
    m, k = x.shape
    if x.dtype in FLOATS:
        if x_scale is not None:
            raise C.DTypeError(f"{op}: x_scale must be None for {x.dtype} x (the float recipe takes no scales), "
                               f"got {C.describe(x_scale)}")
        kind = weight_kind(op, "w", w, w_scale, k, "w_scale")
        if kind != "float" or w.dtype != x.dtype:
            raise C.DTypeError(f"{op}: a {x.dtype} x takes w of the same dtype, got {C.describe(w)}")
    else:
        if x_scale is None or w_scale is None:
            raise C.DTypeError(f"{op}: an fp8 x needs x_scale and w_scale, got "
                               f"x_scale {'None' if x_scale is None else C.describe(x_scale)}, "
                               f"w_scale {'None' if w_scale is None else C.describe(w_scale)}")
        _check_act_operand(op, x, x_scale, "x", "x_scale")
        kind = weight_kind(op, "w", w, w_scale, k, "w_scale")
        if kind == "float":
            raise C.DTypeError(f"{op}: an fp8 x takes fp8 or packed-FP4 w, got {C.describe(w)}")
    C.dtype(op, "group_offsets", group_offsets, (torch.int64,))
    C.shape(op, "group_offsets", group_offsets, (w.shape[0] + 1,), "[E+1]")
    C.one_of(op, "out_dtype", out_dtype, FLOATS)
    C.same_device(op, x=x, w=w, group_offsets=group_offsets, x_scale=x_scale, w_scale=w_scale)


def check_group_offsets(op: str, group_offsets: torch.Tensor, rows: int) -> None:
    """Values: 0 first, ``rows`` last, non-decreasing."""
    if group_offsets.numel() == 0:
        return
    first, last = int(group_offsets[0]), int(group_offsets[-1])
    if first != 0 or last != rows or bool((group_offsets[1:] < group_offsets[:-1]).any()):
        got = group_offsets.tolist() if group_offsets.numel() <= 16 else f"first {first}, last {last}"
        raise C.RangeError(f"{op}: group_offsets must start at 0, end at M={rows} and never decrease, got {got}")


def _value_check_grouped(x, w, group_offsets, x_scale, w_scale, out_dtype):
    check_group_offsets("grouped_gemm", group_offsets, x.shape[0])
    C.finite("grouped_gemm", "x_scale", x_scale)
    C.finite("grouped_gemm", "w_scale", w_scale)


define_op("grouped_gemm",
          "(Tensor x, Tensor w, Tensor group_offsets, Tensor? x_scale=None, Tensor? w_scale=None, "
          "ScalarType out_dtype=bfloat16) -> Tensor",
          check=_check_grouped_gemm,
          fake=lambda x, w, go, xs, ws, od: x.new_empty((x.shape[0], w.shape[1]), dtype=od),
          value_check=_value_check_grouped)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_offsets: torch.Tensor, *,
                 x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Rows ``group_offsets[e]:group_offsets[e+1]`` of ``x [M, K]`` times ``w[e]^T`` -> ``[M, N]``.

    Recipes: float x with float w; fp8 x (+ x_scale ``[M, K/128]``) with fp8 w (+ ``[E, ceil(N/128), K/128]``
    128x128 or ``[E, ceil(N/32), K/32]`` 32x32 tile scales) or packed FP4 w ``[E, N, K/2]`` (+ scales
    ``[E, N, K/32]`` or ``[E, N, K/16]``).
    """
    return call.grouped_gemm(x, w, group_offsets, x_scale, w_scale, out_dtype)
