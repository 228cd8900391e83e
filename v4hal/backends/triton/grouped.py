"""Triton grouped (MoE, contiguous layout) GEMM: rows ``group_offsets[e]:group_offsets[e+1]`` of
``x [M, K]`` times expert ``e``'s ``w[e]^T``.

Recipes (the same kernel as :mod:`.gemm`, ``GROUPED=True``): float x with float w of the same
dtype; fp8 x + 1x128 scales with fp8 w + 128x128 tile scales; fp8 x + 1x128 scales with packed
MXFP4 w ``[E, N, K/2]`` + per-32 scales (nibbles moved into e4m3 bytes in registers, FP8 MMA).

No host synchronisation: the grid is sized from shapes alone, ``cdiv(M, BLOCK_M) + min(E, M)``
virtual row tiles (an upper bound of ``sum_e cdiv(rows_e, BLOCK_M)``) times the N tiles. Each program reads
the ``E + 1`` offsets (one vector load), computes every expert's tile count and their prefix sum
on the device, finds the expert that owns its virtual tile and exits when the tile lies past the
last expert's rows. A tile never straddles two experts, so each weight tile is read for one
expert; empty experts own no tile. Tile sizes follow the average rows per expert (``M / E``, known
on the host): 16-row tiles for decode-like routing, 64x128 tiles at hundreds of rows per expert
(design target: >= 50% of the measured FP8 ceiling at >= 512 rows per expert on an H200).

Verified where: under the interpreter with fp8 x fp8 and fp8 x FP4 (the FP8 ``tl.dot`` a GPU runs
too), fp32 and fp16 float recipes, and bf16 (upcast to fp32 MMA operands there), with empty
experts, E = 1 and tiles crossing expert boundaries. bf16 MMA operands, the GPU tile
configurations and performance: GPU only.
"""
from __future__ import annotations

import torch

from v4hal.hal import formats as F
from v4hal.hal import requirements as R
from v4hal.hal.registry import implements

from .gemm import B_FLOAT, B_FP4, B_FP8, GemmConfig, launch_gemm, mma_dtype
from .quant import on_interpreter

MAX_EXPERTS = 4096           # every program reads all E+1 offsets as one vector
EXPERTS_WHY = "every program reads the E+1 group offsets as one vector"

# Under the interpreter: 16-row tiles so that small test groups cross tile and expert edges.
INTERPRETER_CONFIG_SCALED = GemmConfig(block_m=16, block_n=256, block_k=128, group_m=2, num_warps=4, num_stages=1)
INTERPRETER_CONFIG_FLOAT = GemmConfig(block_m=16, block_n=256, block_k=64, group_m=2, num_warps=4, num_stages=1)


def grouped_config(m: int, n: int, k: int, e: int, b_kind: int, device: torch.device) -> GemmConfig:
    """Tile configuration of a grouped GEMM with ``m`` rows over ``e`` experts."""
    if on_interpreter(device):
        return INTERPRETER_CONFIG_FLOAT if b_kind == B_FLOAT else INTERPRETER_CONFIG_SCALED
    avg = m / max(e, 1)
    if b_kind == B_FP4:          # K steps of 32 (one weight scale each): deeper pipelines
        if avg <= 16:
            return GemmConfig(16, 64, 32, group_m=1, num_warps=4, num_stages=6)
        if avg <= 64:
            return GemmConfig(64, 64, 32, group_m=8, num_warps=4, num_stages=4)
        return GemmConfig(128, 64, 32, group_m=8, num_warps=8, num_stages=4)   # 128x128 spills (sm_90a)
    block_k = 64 if b_kind == B_FLOAT else 128
    if avg <= 16:
        return GemmConfig(16, 128 if b_kind == B_FP8 else 64, block_k, group_m=1, num_warps=4, num_stages=4)
    if avg <= 64:
        return GemmConfig(64, 64, block_k, group_m=8, num_warps=4, num_stages=3)
    return GemmConfig(64, 128, block_k, group_m=16, num_warps=4, num_stages=3 if b_kind == B_FP8 else 4)


def _recipe(x: torch.Tensor, w: torch.Tensor) -> int:
    """The weight kind of a valid operand combination (B_FLOAT / B_FP8 / B_FP4)."""
    if x.dtype != F.FP8_DTYPE:
        return B_FLOAT
    return B_FP8 if w.dtype == F.FP8_DTYPE else B_FP4


@implements("grouped_gemm", "triton", requires=(
    R.at_most("experts E", MAX_EXPERTS, "w.shape[0]", why=EXPERTS_WHY),
    R.min_capability(8, 9, tensor="x", only_for=(F.FP8_DTYPE,), why="FP8 MMA"),
    R.min_capability(8, 0, tensor="x", only_for=(torch.bfloat16,), why="bf16 MMA")))
def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_offsets: torch.Tensor,
                 x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Grouped GEMM over the contiguous expert layout; out ``[M, N]`` in ``out_dtype``.

    x ``[M, K]`` (float, or fp8 + x_scale ``[M, K/128]``), w ``[E, N, K]`` (same float dtype, or fp8 +
    w_scale ``[E, ceil(N/128), K/128]``, or packed FP4 uint8 ``[E, N, K/2]`` + w_scale ``[E, N, K/32]``),
    group_offsets int64 ``[E+1]`` (0 first, M last, non-decreasing; read on the device only).
    """
    b_kind = _recipe(x, w)
    e = w.shape[0]
    m, k = x.shape
    n = w.shape[1]
    cfg = grouped_config(m, n, k, e, b_kind, x.device)
    dot, prec = mma_dtype(b_kind, x.dtype, x.device)
    return launch_gemm(x, x_scale, w, w_scale, out_dtype, b_kind, cfg,
                       group_offsets=group_offsets.contiguous(), dot=dot, prec=prec)


__all__ = ["grouped_gemm", "grouped_config", "MAX_EXPERTS"]
