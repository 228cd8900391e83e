"""FP8 / FP4 GEMMs and the grouped (MoE) GEMM on Ascend.

A2 and A3 have no FP8 cube. Two documented ways to run V4's FP8/FP4 weights there:

1. **bf16 dequant at run time** (what these contract ops do on A2/A3): ``fp32(y) * s`` per block,
   cast to bf16 when every scale is e8m0 (``fp8 x 2**k`` is exact in bf16) and the output is bf16,
   else kept in fp32; then the NPU matmul (``aclnnMatmul`` / ``npu_grouped_matmul``) with fp32
   accumulation. Exact products, so it matches the reference up to summation order.
2. **int8 W8A8 at load time** (what vllm-ascend ships for DeepSeek-V4-Flash on A2/A3): weights
   converted once by :mod:`v4hal.backends.ascend.convert`, activations per-token int8 by
   ``npu_dynamic_quant``, ``npu_quant_matmul``. Lossy; its error against the reference is measured
   and written in docs/ascend.md.

On 950, e8m0-scaled operands run natively as **MXFP8** through ``torch_npu.npu_quant_matmul``
(``group_sizes=[1, 1, 32]``, e8m0 scale dtype codes): V4's 1x128 activation scales and 128x128
weight tiles are expanded to the per-32 MX scales (exact: each 32-block inherits its 128-block's
power of two), and FP4 weights are re-encoded as FP8 codes (every e2m1 value is an e4m3 value)
keeping their per-32 e8m0 scales. fp32-scaled operands take path 1.

V4.1 weight formats: FP8 weights with 32x32 tiles map onto MX mode exactly (each output row takes
its tile row's scale, one per 32 along K: already MX's granularity). Packed FP4 weights with a scale
per 16 do not: an MX scale covers 32 values along K and the two halves' powers of two differ, so
those take path 1 on every chip (bf16/fp32 dequant with the per-16 scales, then the matmul).

``grouped_gemm``: ``npu_grouped_matmul`` with ``x=[X]``, ``weight=[W^T]`` (a transposed ``[E, K, N]``
view), ``group_type=0``, ``group_list_type=0`` (cumulative ``group_offsets[1:]``), ``split_item=3``.
Quantized recipes are dequantized as in path 1 first (the grouped MX path of 950 takes scale layouts
we could not verify; not wired).
"""
from __future__ import annotations

import torch

from v4hal.backends.reference import gemm as ref
from v4hal.backends.reference import quant as ref_quant
from v4hal.hal import formats as F
from v4hal.hal.registry import implements

from . import binding, limits, runtime
from ._route import schema_args
from .limits import ALL, DEQUANT, fallback_when

QUANT_MATMUL = (("torch_npu", "npu_quant_matmul"),)
GROUPED_MATMUL = (("torch_npu", "npu_grouped_matmul"),)
_HALF = (torch.bfloat16, torch.float16)
_E8M0 = F.E8M0_DTYPE


def _empty(a: limits.Args) -> bool:
    return a["a"].numel() == 0 or a["b"].shape[0] == 0


limits.plan("fp8_gemm", {"A2": DEQUANT + " (no FP8 cube)", "A3": DEQUANT + " (no FP8 cube)",
                         "950": "torch_npu.npu_quant_matmul MXFP8"})
FP8_GEMM_LIMITS = (
    fallback_when("a_s or b_s not e8m0 (MX needs power-of-two scales)",
                  lambda a: a["a_s"].dtype != _E8M0 or a["b_s"].dtype != _E8M0, ("950",), DEQUANT),
    fallback_when("K % 32 != 0 or K, N > 65535",
                  lambda a: a["b"].shape[1] % 32 != 0 or max(a["b"].shape) > 65535, ("950",), DEQUANT),
    fallback_when("out_dtype not bf16/fp16", lambda a: a["out_dtype"] not in _HALF, ("950",), DEQUANT),
    fallback_when("empty tensor", _empty),
)
limits.plan("fp4_gemm", {"A2": DEQUANT + " (no FP4 cube)", "A3": DEQUANT + " (no FP4 cube)",
                         "950": "torch_npu.npu_quant_matmul MXFP8 (FP4 weight codes re-encoded as FP8)"})
FP4_GEMM_LIMITS = (
    fallback_when("a_s not e8m0 (MX needs power-of-two scales)", lambda a: a["a_s"].dtype != _E8M0, ("950",),
                  DEQUANT),
    fallback_when("FP4 weight scales per 16 along K (an MX scale covers 32)",
                  lambda a: fp4_block(a["b_s"], a["a"].shape[-1]) == 16, ("950",), DEQUANT),
    fallback_when("K, N > 65535", lambda a: max(a["a"].shape[-1], a["b"].shape[0]) > 65535, ("950",), DEQUANT),
    fallback_when("out_dtype not bf16/fp16", lambda a: a["out_dtype"] not in _HALF, ("950",), DEQUANT),
    fallback_when("empty tensor", _empty),
)
limits.plan("grouped_gemm", {c: "torch_npu.npu_grouped_matmul (quantized recipes dequantized first)" for c in ALL})
GROUPED_GEMM_LIMITS = (
    fallback_when("float recipe with out_dtype != x's dtype",
                  lambda a: a["w_scale"] is None and a["out_dtype"] != a["x"].dtype),
    fallback_when("more than 1024 experts (group_list limit)", lambda a: a["w"].shape[0] > 1024),
    fallback_when("K or N >= 65536 (inner-axis limit)", lambda a: max(a["x"].shape[1], a["w"].shape[1]) >= 65536),
    fallback_when("empty tensor", lambda a: a["x"].numel() == 0 or a["w"].shape[1] == 0),
)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fp8_block(b_s: torch.Tensor, k: int) -> int:
    """Tile of valid FP8 weight scales ``[..., ceil(N/wb), K/wb]``: 128 or 32 (V4.1)."""
    return 128 if b_s.shape[-1] == _ceil_div(k, 128) else 32


def fp4_block(b_s: torch.Tensor, k: int) -> int:
    """K block of valid packed-FP4 weight scales ``[..., N, K/wb]``: 32 or 16 (V4.1)."""
    return 32 if b_s.shape[-1] == _ceil_div(k, 32) else 16


def _compute_dtype(e8m0: bool, out_dtype: torch.dtype) -> torch.dtype:
    """bf16 is exact for fp8 x power-of-two scales; anything else stays fp32."""
    return torch.bfloat16 if e8m0 and out_dtype == torch.bfloat16 else torch.float32


def _act_per32(a_s: torch.Tensor, k: int) -> torch.Tensor:
    """e8m0 ``[M, ceil(K/128)]`` -> e8m0 ``[M, K/32]`` (each 32-block takes its 128-block's scale)."""
    return a_s.view(torch.uint8).repeat_interleave(4, dim=-1)[..., : k // 32]


def _weight_per32(b_s: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """e8m0 tiles ``[ceil(N/wb), ceil(K/wb)]`` (wb 128 or 32) -> e8m0 ``[N, K/32]``."""
    wb = fp8_block(b_s, k)
    return b_s.view(torch.uint8).repeat_interleave(wb, dim=0)[:n].repeat_interleave(wb // 32, dim=1)[:, : k // 32]


def _mx_layout(s32: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R, K/32]`` -> ``[R, ceil(K/64), 2]`` (odd K/32 padded with one zero byte)."""
    if s32.shape[-1] % 2:
        s32 = torch.cat([s32, s32.new_zeros(s32.shape[0], 1)], dim=-1)
    return s32.reshape(s32.shape[0], -1, 2).contiguous()


def _dequant_reason(chip: str, why: str | None) -> str:
    """Why a GEMM took the dequant path (for :func:`limits.stats`)."""
    if why is not None:
        return why
    return f"no FP8/FP4 cube on {chip}" if chip != "950" else "npu_quant_matmul not installed"


def fp4_to_fp8_codes(b: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 uint8 ``[..., K/2]`` -> float8_e4m3fn ``[..., K]`` with the same values (exact)."""
    return F.e2m1_decode(F.unpack_fp4(b)).to(F.FP8_DTYPE)


def mx_matmul(op: binding.Bound, a2: torch.Tensor, a_s32: torch.Tensor, w: torch.Tensor, w_s32: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """MXFP8 ``a2 [M, K] @ w [N, K]^T`` with e8m0 per-32 scales ``[M, K/32]`` and ``[N, K/32]``."""
    e8m0 = runtime.dtype_code("float8_e8m0fnu")
    scale = _mx_layout(w_s32).transpose(0, 1).contiguous()             # [K/64, N, 2], as vllm-ascend stores it
    return op(a2.contiguous(), w.t().contiguous(), scale, pertoken_scale=_mx_layout(a_s32),
              scale_dtype=e8m0, pertoken_scale_dtype=e8m0, output_dtype=out_dtype, group_sizes=[1, 1, 32])


@implements("fp8_gemm", "ascend", requires=FP8_GEMM_LIMITS)
def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             scale_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a fp8 ``[..., K]`` + a_s ``[..., ceil(K/128)]``, b fp8 ``[N, K]`` + b_s ``[ceil(N/wb), ceil(K/wb)]``
    (wb 128 or 32) -> ``[..., N]`` in out_dtype (fp32 accumulation)."""
    n, k = b.shape
    e8m0 = a_s.dtype == F.E8M0_DTYPE and b_s.dtype == F.E8M0_DTYPE
    chip = runtime.chip()
    found = limits.unmet("fp8_gemm", chip, schema_args("fp8_gemm", (a, a_s, b, b_s, scale_dtype, out_dtype)))
    if found is not None and found[0] == limits.REFERENCE:
        return limits.fallback("fp8_gemm", chip, found[1], ref.fp8_gemm, a, a_s, b, b_s, scale_dtype, out_dtype)
    why = None if found is None else found[1]
    op = binding.lookup(QUANT_MATMUL) if chip == "950" and why is None else None
    lead = a.shape[:-1]
    if op is not None:
        limits.record("fp8_gemm", chip, f"native:{op.tier}.{op.name} MXFP8")
        out = mx_matmul(op, a.reshape(-1, k), _act_per32(a_s.reshape(-1, a_s.shape[-1]), k), b,
                        _weight_per32(b_s, n, k), out_dtype)
        return out.reshape(*lead, n)
    limits.record("fp8_gemm", chip, "dequant: " + _dequant_reason(chip, why))
    cd = _compute_dtype(e8m0, out_dtype)
    af = ref_quant.dequant_fp8(a, a_s, 128, out_dtype=cd)
    bf = ref_quant.dequant_fp8(b, b_s, fp8_block(b_s, k), out_dtype=cd)
    return torch.matmul(af, bf.t()).to(out_dtype)


@implements("fp4_gemm", "ascend", requires=FP4_GEMM_LIMITS)
def fp4_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             scale_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a fp8 ``[..., K]`` + a_s ``[..., ceil(K/128)]``, b packed e2m1 uint8 ``[N, K/2]`` + scales
    ``[N, K/32]`` or ``[N, K/16]`` -> ``[..., N]`` in out_dtype."""
    n, k = b.shape[0], a.shape[-1]
    e8m0 = a_s.dtype == F.E8M0_DTYPE
    chip = runtime.chip()
    found = limits.unmet("fp4_gemm", chip, schema_args("fp4_gemm", (a, a_s, b, b_s, scale_dtype, out_dtype)))
    if found is not None and found[0] == limits.REFERENCE:
        return limits.fallback("fp4_gemm", chip, found[1], ref.fp4_gemm, a, a_s, b, b_s, scale_dtype, out_dtype)
    why = None if found is None else found[1]
    op = binding.lookup(QUANT_MATMUL) if chip == "950" and why is None else None
    lead = a.shape[:-1]
    if op is not None:
        limits.record("fp4_gemm", chip, f"native:{op.tier}.{op.name} MXFP8")
        out = mx_matmul(op, a.reshape(-1, k), _act_per32(a_s.reshape(-1, a_s.shape[-1]), k),
                        fp4_to_fp8_codes(b), b_s.view(torch.uint8), out_dtype)
        return out.reshape(*lead, n)
    limits.record("fp4_gemm", chip, "dequant: " + _dequant_reason(chip, why))
    cd = _compute_dtype(e8m0, out_dtype)
    af = ref_quant.dequant_fp8(a, a_s, 128, out_dtype=cd)
    bf = ref_quant.dequant_fp4(b, b_s, fp4_block(b_s, k), out_dtype=cd)
    return torch.matmul(af, bf.t()).to(out_dtype)


@implements("grouped_gemm", "ascend", requires=GROUPED_GEMM_LIMITS)
def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_offsets: torch.Tensor, x_scale: torch.Tensor | None = None,
                 w_scale: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x ``[M, K]`` (float, or fp8 + x_scale ``[M, ceil(K/128)]``), w ``[E, N, K]`` (float / fp8 with
    128x128 or 32x32 tile scales / packed FP4 ``[E, N, K/2]`` with ``[E, N, K/32]`` or ``[E, N, K/16]``),
    group_offsets int64 ``[E+1]`` -> ``[M, N]`` in out_dtype."""
    recipe = "float" if w_scale is None else ("fp8" if w.dtype == F.FP8_DTYPE else "fp4")
    chip = runtime.chip()
    why = limits.violation("grouped_gemm", chip, schema_args("grouped_gemm", (
        x, w, group_offsets, x_scale, w_scale, out_dtype)))
    op = binding.lookup(GROUPED_MATMUL) if why is None else None
    if op is None:
        return limits.fallback("grouped_gemm", chip,
                               why or f"CANN op not installed ({binding.describe(GROUPED_MATMUL)})",
                               ref.grouped_gemm, x, w, group_offsets, x_scale, w_scale, out_dtype)
    limits.record("grouped_gemm", chip, f"native:{op.tier}.{op.name} ({recipe})")
    if recipe == "float":
        xs, ws = x, w
    else:
        assert x_scale is not None and w_scale is not None
        cd = _compute_dtype(x_scale.dtype == F.E8M0_DTYPE and w_scale.dtype == F.E8M0_DTYPE, out_dtype)
        xs = ref_quant.dequant_fp8(x, x_scale, 128, out_dtype=cd)
        k = x.shape[1]
        ws = (ref_quant.dequant_fp8(w, w_scale, fp8_block(w_scale, k), out_dtype=cd) if recipe == "fp8"
              else ref_quant.dequant_fp4(w, w_scale, fp4_block(w_scale, k), out_dtype=cd))
    out = op([xs.contiguous()], [ws.transpose(1, 2)], group_list=group_offsets[1:].to(torch.int64),
             split_item=3, group_type=0, group_list_type=0)[0]
    return out.to(out_dtype)
