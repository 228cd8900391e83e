"""Load-time weight conversions for Ascend, and the numerics each choice costs.

A2/A3 have no FP8/FP4 cube, so V4's FP8 (128x128 e8m0 tiles) and MXFP4 expert weights need one of:

- **bf16** (:func:`fp8_weight_to_float`, :func:`fp4_weight_to_float`): exact weights (every FP8/FP4
  value times a power of two is a bf16 value); run with bf16 activations, i.e. *without* V4's FP8
  activation round trip. Twice the FP8 bytes.
- **int8 W8A8** (:func:`fp8_weight_to_int8`, :func:`fp4_weight_to_int8`): per-output-channel
  symmetric int8 weights (``scale = amax_row / 127``) and per-token int8 activations from
  ``npu_dynamic_quant``, multiplied by ``npu_quant_matmul`` (int32 accumulation, bf16 output): the
  recipe vllm-ascend ships for DeepSeek-V4-Flash on A2/A3 (its checkpoints are converted offline).
  Same bytes as FP8; lossy twice (weights and activations).
- the **contract ops** ``fp8_gemm`` / ``fp4_gemm`` / ``grouped_gemm`` (runtime dequantization, exact,
  see :mod:`.gemm`).

On 950, :func:`fp4_weight_to_mxfp8` re-encodes MXFP4 experts as MXFP8 without loss (what the
``fp4_gemm`` adapter does per call) so the MX GEMM reads them directly.

``python -m v4hal.backends.ascend.convert`` prints :func:`measure` (error of each choice against the
reference ``fp8_gemm`` / ``fp4_gemm`` on V4-shaped layers); the figures are in docs/ascend.md.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from v4hal.backends.reference import gemm as ref_gemm
from v4hal.backends.reference import quant as ref_quant
from v4hal.compare import calc_diff
from v4hal.hal import formats as F
from v4hal.ops import _checks as C

from . import binding, gemm, limits, runtime

DYNAMIC_QUANT = (("torch_npu", "npu_dynamic_quant"),)
INT8_MAX = 127.0


@dataclass(frozen=True)
class Int8Weight:
    """W8A8 weight: int8 ``[K, N]`` (transposed once: ``npu_quant_matmul``'s x2 layout) and fp32 ``[N]``."""

    weight: torch.Tensor
    scale: torch.Tensor


def fp8_weight_to_float(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 ``[N, K]`` + tile scales ``[ceil(N/128), ceil(K/128)]`` -> ``dtype [N, K]`` (exact for e8m0)."""
    C.dtype("fp8_weight_to_float", "w", w, (F.FP8_DTYPE,))
    C.rank("fp8_weight_to_float", "w", w, (2,), "[N, K]")
    return ref_quant.dequant_fp8(w, s, 128, out_dtype=dtype)


def fp4_weight_to_float(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Packed e2m1 uint8 ``[N, K/2]`` + e8m0 ``[N, K/32]`` -> ``dtype [N, K]`` (exact)."""
    C.dtype("fp4_weight_to_float", "w", w, (torch.uint8,))
    C.rank("fp4_weight_to_float", "w", w, (2,), "[N, K/2]")
    return ref_quant.dequant_fp4(w, s, 32, out_dtype=dtype)


def int8_per_channel(w: torch.Tensor) -> Int8Weight:
    """float ``[N, K]`` -> symmetric int8 per output row (round half to even, ``scale = amax/127``)."""
    C.rank("int8_per_channel", "w", w, (2,), "[N, K]")
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(wf / scale.unsqueeze(1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return Int8Weight(q.t().contiguous(), scale.contiguous())


def fp8_weight_to_int8(w: torch.Tensor, s: torch.Tensor) -> Int8Weight:
    """V4 FP8 weight -> W8A8 int8 weight (dequantize exactly, then per-channel int8)."""
    return int8_per_channel(fp8_weight_to_float(w, s, torch.float32))


def fp4_weight_to_int8(w: torch.Tensor, s: torch.Tensor) -> Int8Weight:
    """V4 MXFP4 expert weight -> W8A8 int8 weight."""
    return int8_per_channel(fp4_weight_to_float(w, s, torch.float32))


def fp4_weight_to_mxfp8(w: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed e2m1 ``[N, K/2]`` + e8m0 ``[N, K/32]`` -> (float8_e4m3fn ``[N, K]``, the same e8m0 scales):
    lossless, since every e2m1 value is an e4m3 value."""
    C.dtype("fp4_weight_to_mxfp8", "s", s, (F.E8M0_DTYPE,))
    return gemm.fp4_to_fp8_codes(w), s


def dynamic_quant_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``npu_dynamic_quant``'s documented result: per-row ``scale = amax/127`` (fp32), ``y = round(x/scale)``
    int8 (a zero row gets scale 0 and y 0)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.round(xf / safe.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return y, scale


def w8a8_reference(x: torch.Tensor, w: Int8Weight, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The W8A8 result the NPU computes: int8 x int8 with exact integer accumulation, then
    ``* x_scale[m] * w_scale[n]`` in fp32, cast to ``out_dtype``."""
    k = x.shape[-1]
    xq, xs = dynamic_quant_reference(x.reshape(-1, k))
    acc = torch.matmul(xq.double(), w.weight.double())                # exact integer sums
    out = (acc.float() * xs.unsqueeze(1)) * w.scale.unsqueeze(0)
    return out.to(out_dtype).reshape(*x.shape[:-1], -1)


def w8a8_linear(x: torch.Tensor, w: Int8Weight, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x bf16/fp16 ``[..., K]`` -> ``[..., N]``: ``npu_dynamic_quant`` (int8, per token) +
    ``npu_quant_matmul(scale=w.scale [N] fp32, pertoken_scale [M] fp32, output_dtype=bf16)``.
    Without the ops (or outside their limits) it computes :func:`w8a8_reference`."""
    k = x.shape[-1]
    chip = runtime.chip()
    why = None
    if chip is None:
        why = "unknown Ascend chip"
    elif x.dtype not in (torch.bfloat16, torch.float16):
        why = "x not bf16/fp16 (npu_dynamic_quant input)"
    elif out_dtype != torch.bfloat16:
        why = "out_dtype not bf16 (fp32 weight scales with per-token scales give bf16)"
    elif max(k, w.weight.shape[1]) > 65535:
        why = "K or N > 65535"
    dq = mm = None
    if why is None:
        dq, mm = binding.lookup(DYNAMIC_QUANT), binding.lookup(gemm.QUANT_MATMUL)
        if dq is None or mm is None:
            why = "CANN op not installed (npu_dynamic_quant / npu_quant_matmul)"
    if why is not None or dq is None or mm is None:
        limits.record("w8a8_linear", chip, f"reference: {why}")
        return w8a8_reference(x, w, out_dtype)
    limits.record("w8a8_linear", chip, "native:torch_npu.npu_dynamic_quant+npu_quant_matmul")
    xq, xs = dq(x.reshape(-1, k).contiguous(), dst_type=torch.int8)
    out = mm(xq, w.weight, w.scale, pertoken_scale=xs, output_dtype=out_dtype)
    return out.reshape(*x.shape[:-1], -1)


# ------------------------------------------------------------------------------------ measurement
#: V4-Flash layer shapes (name, N, K, weight format): projections are FP8, routed experts MXFP4.
FLASH_LAYERS: tuple[tuple[str, int, int, str], ...] = (
    ("wq_a", 1024, 4096, "fp8"), ("wq_b", 8192, 1024, "fp8"), ("wkv", 512, 4096, "fp8"),
    ("wo_b", 4096, 8192, "fp8"), ("expert.w1", 2048, 4096, "fp4"), ("expert.w2", 4096, 2048, "fp4"),
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))



def _activations(m: int, k: int, outliers: bool, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, generator=gen)
    if outliers:  # a few hot channels, as in real LLM activations (x20 on 0.5% of channels)
        hot = torch.randperm(k, generator=gen)[: max(1, k // 200)]
        x[:, hot] *= 20.0
    return x.to(torch.bfloat16)


def measure(m: int = 64, seed: int = 0, layers: tuple[tuple[str, int, int, str], ...] = FLASH_LAYERS,
            outliers: tuple[bool, ...] = (False, True)) -> list[dict[str, object]]:
    """Error of each A2/A3 option against the reference V4 GEMM (FP8 act_quant with ue8m0 scales,
    then ``fp8_gemm`` / ``fp4_gemm``), on random V4-Flash-shaped layers with ``m`` tokens.

    Rows: layer, weight format, activation kind, option, calc_diff and relative L2 error against the
    reference, and the relative L2 error against the exact product of the *unquantized* activations
    with the (exactly dequantized) weights, which shows how much of a difference is V4's own FP8
    activation rounding.
    """
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, object]] = []
    for name, n, k, fmt in layers:
        w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
        if fmt == "fp8":
            wq, ws = ref_quant.quant_weight_fp8(w, 128, "ue8m0")
            w_float = fp8_weight_to_float(wq, ws, torch.float32)
            w_int8 = fp8_weight_to_int8(wq, ws)
        else:
            wq, ws = ref_quant.quant_weight_fp4(w, 32)
            w_float = fp4_weight_to_float(wq, ws, torch.float32)
            w_int8 = fp4_weight_to_int8(wq, ws)
        for hot in outliers:
            x = _activations(m, k, hot, gen)
            a, a_s = ref_quant.act_quant(x, 128, "ue8m0", F.E8M0_DTYPE)
            if fmt == "fp8":
                expect = ref_gemm.fp8_gemm(a, a_s, wq, ws, F.E8M0_DTYPE, torch.bfloat16)
            else:
                expect = ref_gemm.fp4_gemm(a, a_s, wq, ws, F.E8M0_DTYPE, torch.bfloat16)
            exact = torch.matmul(x.double(), w_float.double().t())  # unquantized activations, fp64
            options = {
                "reference V4 (fp8 act_quant + fp8/fp4_gemm)": expect,
                "dequant (contract op, runtime)": torch.matmul(
                    ref_quant.dequant_fp8(a, a_s, 128, torch.bfloat16), w_float.to(torch.bfloat16).t()),
                "bf16 weights, bf16 activations": torch.matmul(x, w_float.to(torch.bfloat16).t()),
                "int8 W8A8 (per-channel w, per-token x)": w8a8_reference(x, w_int8),
            }
            for option, got in options.items():
                rows.append({"layer": name, "shape": f"{n}x{k}", "weights": fmt,
                             "activations": "outlier channels" if hot else "gaussian", "option": option,
                             "calc_diff": calc_diff(got, expect), "rel_l2": _rel(got, expect),
                             "rel_l2_vs_exact": _rel(got, exact)})
    return rows


def format_rows(rows: list[dict[str, object]]) -> str:
    """A fixed-width table of :func:`measure`'s rows."""
    head = (f"{'layer':<10} {'shape':<10} {'w':<4} {'activations':<17} {'option':<44} {'calc_diff':>10} "
            f"{'rel_l2':>9} {'vs_exact':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['layer']:<10} {r['shape']:<10} {r['weights']:<4} {r['activations']:<17} "
                     f"{r['option']:<44} {r['calc_diff']:>10.2e} {r['rel_l2']:>9.2e} {r['rel_l2_vs_exact']:>9.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print (and optionally save) the conversion error table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows as JSON here")
    ns = parser.parse_args(argv)
    rows = measure(ns.tokens, ns.seed)
    print(format_rows(rows))
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
