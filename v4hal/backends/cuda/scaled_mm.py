"""``fp8_gemm`` through cuBLASLt's DeepSeek-style block scaling (``torch._scaled_mm`` with 1x128
activation and 128x128 weight scales).

What torch exposes (``aten/src/ATen/native/cuda/ScaledBlas.cpp``; blockwise added with CUDA 12.9):
``torch._scaled_mm(A [M, K] row-major, B [K, N] column-major, scale_a, scale_b, out_dtype=...)``
picks the (1x128, 128x128) recipe from the scale shapes and strides:

* ``scale_a``: fp32 ``[M, ceil(K/128)]``, strides ``(1, M)`` (M-major),
* ``scale_b``: fp32 ``[ceil(K/128), ceil(N/128)]`` whose transpose is the row-major
  ``[ceil(N/128), ceil(K/128)]`` tile grid (our ``b_s`` layout). Some torch versions require that
  grid's row stride padded to a multiple of 4; with ``ceil(K/128) % 4 == 0`` both rules agree,
  hence the ``K % 512 == 0`` requirement (every V4 projection qualifies).

Weight tiles: only 128x128. cuBLASLt's Hopper blockwise recipes are (1x128, 128x128) and
(1x128, 1x128); there is no 32x32 weight tile, and the 1x32 block scaling torch exposes (MXFP8,
e8m0 scales in the swizzled layout) is Blackwell only. So V4.1's 32x32-tiled FP8 weights
(``b_s [ceil(N/32), K/32]``) are excluded by a requirement (``TILE_128``) and take the Triton kernel.

It is Hopper only (torch refuses other majors: "DeepSeek style (1x128, 128x128) scaling only
supported in CUDA for SM90") and needs cuBLASLt >= 12.9; ``K`` and ``N`` must be multiples of 16.
The product is ``sum_kb (A_kb . B_kb) * a_s * b_s`` with fp32 accumulation, the contract's formula.

Before it serves a call, a probe (once per device and output dtype) runs a small blockwise
product with non-uniform scales and compares it with the same formula in fp32 torch ops: a torch
that rejects the layout, or reads the scales differently, makes the requirement fail with the
reason instead of computing something else. e8m0 scales are widened to fp32 first (cuBLASLt's
blockwise recipe takes fp32 scales).

Verified where: only on a GPU (Hopper, torch built with CUDA >= 12.9). On this CPU-only machine the
requirements report why it does not serve.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import torch

from v4hal.hal import formats as F
from v4hal.hal import requirements as R
from v4hal.hal.devices import cuda_capability, cuda_reason
from v4hal.hal.registry import implements

BLOCK = 128
MIN_CUDA = (12, 9)
_PROBE_SHAPE = (48, 256, 1024)        # M, N, K of the probe product
_PROBE_MAX_DIFF = 1e-5                # calc_diff bound of the probe against fp32 torch math


def _cuda_version() -> tuple[int, int] | None:
    v = torch.version.cuda
    if not v:
        return None
    parts = v.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None


def _layouts(a2: torch.Tensor, a_s2: torch.Tensor, b: torch.Tensor,
             b_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Operands in the layouts ``torch._scaled_mm`` reads as (1x128, 128x128) block scaling."""
    sa = F.scale_to_float(a_s2).float()
    sa = sa.t().contiguous().t()                       # [M, KB], strides (1, M)
    sb = F.scale_to_float(b_s).float().contiguous()    # [NB, KB] row-major
    return a2.contiguous(), b.contiguous().t(), sa, sb.t()


def _blockwise_mm(a2: torch.Tensor, a_s2: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    a_c, b_t, sa, sb = _layouts(a2, a_s2, b, b_s)
    return torch._scaled_mm(a_c, b_t, scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def _formula(a2: torch.Tensor, a_s2: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    """The contract's blockwise product in fp32 torch ops (probe oracle)."""
    k = a2.shape[1]
    sa = F.scale_to_float(a_s2).float()
    sb = F.scale_to_float(b_s).float().repeat_interleave(BLOCK, dim=0)[: b.shape[0]]
    af, bf = a2.float(), b.float()
    acc = torch.zeros(a2.shape[0], b.shape[0], dtype=torch.float32, device=a2.device)
    for kb in range(k // BLOCK):
        sl = slice(kb * BLOCK, (kb + 1) * BLOCK)
        acc += (af[:, sl] @ bf[:, sl].T) * (sa[:, kb:kb + 1] * sb[:, kb])
    return acc


@functools.lru_cache(maxsize=None)
def probe_reason(device_index: int, out_dtype: torch.dtype) -> str | None:
    """None when ``torch._scaled_mm`` blockwise runs on this GPU and matches the contract, else why not."""
    m, n, k = _PROBE_SHAPE
    device = torch.device("cuda", device_index)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, generator=gen).to(F.FP8_DTYPE)
    b = torch.randn(n, k, device=device, generator=gen).to(F.FP8_DTYPE)
    a_s = torch.rand(m, k // BLOCK, device=device, generator=gen) + 0.5
    b_s = torch.rand(n // BLOCK, k // BLOCK, device=device, generator=gen) + 0.5
    try:
        out = _blockwise_mm(a, a_s, b, b_s, out_dtype)
    except Exception as exc:  # the probe's purpose: turn "not supported here" into a reason
        return f"torch._scaled_mm blockwise (1x128, 128x128) is not supported here: {type(exc).__name__}: {exc}"
    ref = _formula(a, a_s, b, b_s).to(out_dtype).double()
    got = out.double()
    denom = float((ref * ref + got * got).sum())
    diff = 1.0 - 2.0 * float((ref * got).sum()) / denom if denom else 0.0
    if not diff < _PROBE_MAX_DIFF:
        return (f"torch._scaled_mm blockwise disagrees with the fp8_gemm contract in the probe "
                f"(calc_diff {diff:.2e} >= {_PROBE_MAX_DIFF:g}): its scale layout differs in this torch")
    return None


def _platform(args: Mapping[str, Any]) -> str | None:
    reason = cuda_reason()
    if reason is not None:
        return reason
    a = args.get("a")
    device = a.device if isinstance(a, torch.Tensor) else None
    cap = cuda_capability(device)
    if cap is None or cap[0] != 9:
        got = "none" if cap is None else f"{cap[0]}.{cap[1]}"
        return f"cuBLASLt (1x128, 128x128) block scaling is Hopper only (compute capability 9.x), got {got}"
    ver = _cuda_version()
    if ver is None or ver < MIN_CUDA:
        return (f"cuBLASLt block scaling needs CUDA >= {MIN_CUDA[0]}.{MIN_CUDA[1]}, "
                f"torch is built with {torch.version.cuda}")
    return None


PLATFORM = R.when("Hopper GPU (compute capability 9.x) and torch built with CUDA >= 12.9", _platform)
K_BLOCKS = R.divisible("K", 4 * BLOCK, "a.shape[-1]",
                       why="K/128 scale columns a multiple of 4: the block-scale layout")
N_ALIGNED = R.divisible("N", 16, "b.shape[0]", why="cuBLASLt operand alignment")


def _tile_128(args: Mapping[str, Any]) -> str | None:
    b, b_s = args.get("b"), args.get("b_s")
    if not isinstance(b, torch.Tensor) or not isinstance(b_s, torch.Tensor):
        return None
    k = b.shape[-1]
    if b_s.shape[-1] == -(-k // BLOCK):
        return None
    return (f"b_s {list(b_s.shape)} holds 32x32 weight tiles: cuBLASLt blockwise scaling on Hopper has "
            "128x128 weight tiles only")


TILE_128 = R.when("128x128 weight tiles (b_s [ceil(N/128), K/128]; no 32x32 recipe in cuBLASLt)", _tile_128)


def _probe(args: Mapping[str, Any]) -> str | None:
    if any(req.reason(args) is not None for req in (PLATFORM, K_BLOCKS, N_ALIGNED, TILE_128)):
        return None          # already reported by those requirements; no product is run
    a = args.get("a")
    out_dtype = args.get("out_dtype", torch.bfloat16)
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    return probe_reason(index, out_dtype)


PROBE = R.when("a probe product of torch._scaled_mm blockwise matches the contract (once per GPU and out dtype)",
               _probe)
REQUIREMENTS = (PLATFORM, K_BLOCKS, N_ALIGNED, TILE_128, PROBE)
PRIORITY = 20   # above the Triton kernels (10) and the reference (0) wherever REQUIREMENTS hold


@implements("fp8_gemm", "cuda", requires=REQUIREMENTS, devices=("cuda",), priority=PRIORITY)
def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             scale_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``C[..., n] = sum_kb (A_kb . B[n]_kb) * a_s[..., kb] * b_s[n // 128, kb]`` on cuBLASLt.

    a fp8 ``[..., K]``, a_s ``[..., K/128]`` (float32 or e8m0), b fp8 ``[N, K]``, b_s
    ``[ceil(N/128), K/128]`` (float32 or e8m0). Out ``[..., N]`` in ``out_dtype``.
    """
    k = a.shape[-1]
    n = b.shape[0]
    a2 = a.reshape(-1, k)
    m = a2.shape[0]
    if m == 0:
        return torch.empty((*a.shape[:-1], n), dtype=out_dtype, device=a.device)
    out = _blockwise_mm(a2, a_s.reshape(m, k // BLOCK), b, b_s, out_dtype)
    return out.reshape(*a.shape[:-1], n)


__all__ = ["fp8_gemm", "REQUIREMENTS", "PRIORITY", "TILE_128", "probe_reason"]
