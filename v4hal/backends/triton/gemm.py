"""Triton block-scaled GEMMs: ``fp8_gemm`` (FP8 x FP8, 1x128 activation and 128x128 weight scales)
and ``fp4_gemm`` (FP8 activations x packed MXFP4 weights), plus the kernel they share with the
grouped (MoE) GEMM of :mod:`.grouped`.

One kernel, specialised by constexprs, computes ``C[m, n] = sum_kb (A_kb . B[n]_kb) * scales``:

* ``B_KIND`` 0: float B (bf16/fp16/fp32), no scales, ``acc = dot(a, b, acc)``.
* ``B_KIND`` 1: FP8 B with 128x128 tile scales. Each 128-wide K block is one ``tl.dot`` into a
  fresh fp32 tile that is scaled by ``a_s[m, kb] * b_s[n // 128, kb]`` and added to the fp32
  accumulator (the public kernel's per-block promotion). On sm_90 Triton lets FP8 wgmma accumulate
  at the tensor cores' reduced precision inside one ``tl.dot``; the promotion to the fp32
  accumulator every 128 K bounds that error, as in DeepGEMM.
* ``B_KIND`` 2: packed e2m1 B ``[N, K/2]`` with a scale per 32 along K (``BLOCK_K`` = 32). Hopper
  has no FP4 MMA, so the kernel unpacks the nibbles in registers (low nibble = even k) and moves
  each e2m1 code's bits into an e4m3 byte (``s|ee|m`` -> ``s|00ee|m00``: the same value times
  ``2**-6``, exact, no float arithmetic), then runs the FP8 MMA against the FP8 activations. Each
  32-wide product is scaled by ``a_s[m, k // 128] * b_s[n, k // 32] * 2**6`` in fp32. The decode
  costs a handful of integer operations per weight, which is what must stay below the weight
  stream at small M.

Weight format variants (``WB``, read from the weight scales' shape by :func:`launch_gemm`): FP8
weights with 32x32 tiles (V4.1) step K by 32 (``BLOCK_K`` = 32, one ``tl.dot`` per tile, scaled by
``a_s[m, k // 128] * b_s[n // 32, k // 32]``); FP4 weights with a scale per 16 (V4.1 routed
experts) keep the 32-wide step (the FP8 MMA's K) and split it into two products over the masked
halves of the decoded weight tile, each scaled by its own per-16 scale.

``DOT`` is the MMA operand dtype (``None``: the operands' own dtype: FP8 for both quantized
recipes). It is a parameter so that the same kernel runs under the Triton interpreter with operands
its ``tl.dot`` computes correctly (fp8, fp16, fp32: not bf16) and on a GPU with bf16/fp8; every
conversion it implies is exact (fp8 and the e2m1-in-e4m3 codes fit fp16/bf16/fp32).

Scheduling (GPU): tiles follow a grouped ("swizzled") order so that ``GROUP_M`` row tiles reuse the
same weight columns while they are in L2; when the tile grid would leave most SMs idle (decode and
small-M projections) the K loop is split across programs (``SPLIT_K``) into an fp32 workspace that
is summed afterwards (deterministic: no atomics). Tile sizes by M follow what tuned Triton
blockwise-FP8 kernels use on H100/H200 (16x64 for M <= 16 up to 64x128 for large M, BLOCK_K = 128,
3-4 stages). The grouped GEMM adds an expert lookup on the device (see :mod:`.grouped`).

Verified where: under the interpreter (``tests/triton/test_quant_gemm.py``) with the FP8 MMA
operands a GPU uses for both ``fp8_gemm`` and ``fp4_gemm`` (the interpreter's fp8 ``tl.dot`` is
exact), plus fp16 and fp32 MMA operands for the FP4 path, split-K and the tile swizzle, against
the reference backend. The compiled kernels (wgmma / mma.sync code generation), the GPU tile
configurations and all performance figures (targets: >= 0.8x ``torch._scaled_mm`` blockwise at
V4-Flash projection shapes; FP4 faster than bf16 on dequantized weights at M <= 128) are exercised
only on a GPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from v4hal.hal import formats as F
from v4hal.hal.registry import implements

from ._cast import cast_out
from .quant import cdiv, fp8_gpu, interpreting, load_scale, next_pow2, on_interpreter, tl_dtype

SCALE_BLOCK = 128            # activation K block / FP8 weight tile
FP4_BLOCK = 32               # FP4 weight K block (and the K step of the FP4 recipe)
FP8_SMALL_BLOCK = 32         # V4.1 FP8 weight tile (32x32)
FP4_SMALL_BLOCK = 16         # V4.1 FP4 weight K block
FP32_PRECISION = "tf32x3"    # tl.dot input precision for fp32 operands on a GPU (about fp32 accurate)

B_FLOAT, B_FP8, B_FP4 = 0, 1, 2


# ============================================================================ the kernel
@triton.jit
def gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offs_ptr,
                M, N, K, E, num_m,
                s_am, s_ak, s_asm, s_ask,
                s_be, s_bn, s_bk, s_bse, s_bsn, s_bsk,
                s_cs, s_cm, s_cn,
                kb_per_split,
                A_SCALED: tl.constexpr, B_KIND: tl.constexpr,
                AS_E8M0: tl.constexpr, BS_E8M0: tl.constexpr,
                GROUPED: tl.constexpr, E_P2: tl.constexpr,
                DOT: tl.constexpr, PREC: tl.constexpr, EVEN_K: tl.constexpr,
                OUT: tl.constexpr, SOFT: tl.constexpr, WB: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr):
    """C tile ``[BLOCK_M, BLOCK_N]`` of ``A [M, K] @ B[N, K]^T`` (B of expert ``e`` when GROUPED).

    Grid: ``(num_m * cdiv(N, BLOCK_N), SPLIT_K)``. Dense: ``num_m = cdiv(M, BLOCK_M)``.
    Grouped: ``num_m = cdiv(M, BLOCK_M) + min(E, M)`` virtual row tiles (an upper bound of
    ``sum_e cdiv(rows_e, BLOCK_M)``: at most min(E, M) experts own rows, each adds at most one
    partial tile); each program finds its expert from ``offs_ptr`` (int64 ``[E+1]``) on the device
    and exits when its tile is past the last expert's rows. Split programs (``pid_k > 0`` or
    ``s_cs > 0``) write fp32 partial sums to ``c + pid_k * s_cs``. ``WB``: the weight block (FP8:
    the square tile, 128 or 32, equal to ``BLOCK_K``; FP4: the K block, 32 or 16; float: unused).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped tile order: GROUP_M row tiles sweep the N tiles together (L2 reuse of B columns)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    if GROUPED:
        # expert of this virtual row tile: experts own consecutive runs of cdiv(rows_e, BLOCK_M) tiles
        ei = tl.arange(0, E_P2)
        emask = ei < E
        lo = tl.load(offs_ptr + ei, mask=emask, other=0)
        hi = tl.load(offs_ptr + ei + 1, mask=emask, other=0)
        tiles = tl.where(emask, (hi - lo + BLOCK_M - 1) // BLOCK_M, 0)
        ends = tl.cumsum(tiles, 0)
        expert = tl.sum((ends <= pid_m).to(tl.int32), 0)
        if expert >= E:
            return
        sel = ei == expert
        tile0 = tl.sum(tl.where(sel, ends - tiles, 0), 0)
        m_start = tl.sum(tl.where(sel, lo, 0), 0) + (pid_m - tile0) * BLOCK_M
        m_end = tl.sum(tl.where(sel, hi, 0), 0)
        b_base = b_ptr + expert.to(tl.int64) * s_be
        bs_base = bs_ptr + expert.to(tl.int64) * s_bse
    else:
        m_start = pid_m.to(tl.int64) * BLOCK_M
        m_end = M
        b_base = b_ptr
        bs_base = bs_ptr

    rm = m_start + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < m_end
    nmask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)

    n_kb = tl.cdiv(K, BLOCK_K)
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, n_kb)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a_mask = mmask[:, None]
        else:
            a_mask = mmask[:, None] & (rk < K)[None, :]
        a = tl.load(a_ptr + rm64[:, None] * s_am + rk[None, :] * s_ak, mask=a_mask, other=0.0)
        if B_KIND == 2:
            # packed e2m1 [BLOCK_N, 16] -> e4m3 [BLOCK_N, 32]: the e2m1 bits s|ee|m placed as e4m3
            # s|00ee|m00 are the same value times 2**-6, exactly (code 1, 0.5, lands on the e4m3
            # subnormal 2**-7); the 2**6 and the block scale are applied to the fp32 product.
            rh = kb * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            pk = tl.load(b_base + rn64[:, None] * s_bn + rh[None, :] * s_bk,
                         mask=nmask[:, None], other=0).to(tl.int32)
            codes = tl.reshape(tl.join(pk & 0xF, pk >> 4), (BLOCK_N, BLOCK_K))
            e4m3 = (((codes & 8) << 4) | ((codes & 7) << 2)).to(tl.uint8)
            if WB == 16:
                # a scale per 16: the second half of the tile is a separate product (zeroed here)
                lo_half = (tl.arange(0, BLOCK_K) < 16)[None, :]
                b2 = tl.trans(tl.where(lo_half, 0, e4m3).to(tl.uint8).to(tl.float8e4nv, bitcast=True))
                e4m3 = tl.where(lo_half, e4m3, 0).to(tl.uint8)
            b = tl.trans(e4m3.to(tl.float8e4nv, bitcast=True))
        else:
            if EVEN_K:
                b_mask = nmask[None, :]
            else:
                b_mask = nmask[None, :] & (rk < K)[:, None]
            b = tl.load(b_base + rk[:, None] * s_bk + rn64[None, :] * s_bn, mask=b_mask, other=0.0)
        if DOT is not None:
            a = a.to(DOT)
            b = b.to(DOT)
        if A_SCALED:
            part = tl.dot(a, b, input_precision=PREC)
            a_s = load_scale(as_ptr, rm64 * s_asm + ((kb * BLOCK_K) // 128) * s_ask, mmask, AS_E8M0)
            if B_KIND == 1:
                b_s = load_scale(bs_base, (rn64 // WB) * s_bsn + kb * s_bsk, nmask, BS_E8M0)
                acc += part * (a_s[:, None] * b_s[None, :])
            elif WB == 16:
                if DOT is not None:
                    b2 = b2.to(DOT)
                part2 = tl.dot(a, b2, input_precision=PREC)
                b_s = load_scale(bs_base, rn64 * s_bsn + (2 * kb) * s_bsk, nmask, BS_E8M0) * 64.0
                b_s2 = load_scale(bs_base, rn64 * s_bsn + (2 * kb + 1) * s_bsk, nmask, BS_E8M0) * 64.0
                acc += part * (a_s[:, None] * b_s[None, :])
                acc += part2 * (a_s[:, None] * b_s2[None, :])
            else:
                b_s = load_scale(bs_base, rn64 * s_bsn + kb * s_bsk, nmask, BS_E8M0) * 64.0
                acc += part * (a_s[:, None] * b_s[None, :])
        else:
            acc = tl.dot(a, b, acc, input_precision=PREC)

    c_ptrs = c_ptr + pid_k.to(tl.int64) * s_cs + rm64[:, None] * s_cm + rn64[None, :] * s_cn
    cmask = mmask[:, None] & nmask[None, :]
    tl.store(c_ptrs, cast_out(acc, OUT, SOFT), mask=cmask)


# ============================================================================ configuration
@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options of one :func:`gemm_kernel` launch."""

    block_m: int
    block_n: int
    block_k: int             # K step; FP4 weights always step 32 (one weight scale per step)
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1          # requested K splits (dense only; clipped to the K blocks)


# Under the interpreter: one small configuration (fast, and small enough that the tests' shapes
# cross tile edges in M and N and run more than one tile group).
INTERPRETER_CONFIG = GemmConfig(block_m=32, block_n=256, block_k=128, group_m=2, num_warps=4, num_stages=1)


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_for(tiles: int, k_blocks: int, sms: int) -> int:
    """K splits that fill the SMs when the output tiles alone cannot (>= 4 K blocks per split)."""
    if tiles * 2 >= sms or k_blocks < 8:
        return 1
    return max(1, min(cdiv(sms, tiles), k_blocks // 4, 8))


def dense_config(m: int, n: int, k: int, b_kind: int, device: torch.device, wb: int = 0) -> GemmConfig:
    """Tile configuration for a dense (non-grouped) GEMM of ``[m, k] x [n, k]^T`` on ``device``
    (``block_k`` is forced to 32 for FP4 weights, and to the tile for FP8 weights, by
    :func:`launch_gemm`); ``wb``: the weight block (see :func:`weight_block`)."""
    if on_interpreter(device):
        return INTERPRETER_CONFIG
    if b_kind == B_FP4:
        # K steps of 32 (one weight scale each): deeper pipelines; every weight tile is decoded
        # once per row tile, so cover M with as few row tiles as possible
        bm = min(128, max(16, next_pow2(m)))
        if m > 128:
            # per-16 scales keep two products live: 128x128 spills on sm_90a, 128x64 does not
            cfg = GemmConfig(128, 64 if wb == FP4_SMALL_BLOCK else 128, FP4_BLOCK, group_m=8, num_warps=8,
                             num_stages=4)
        else:
            cfg = GemmConfig(bm, 64, FP4_BLOCK, group_m=8, num_warps=8 if bm >= 128 else 4,
                             num_stages=6 if bm <= 32 else 4)
    else:
        block_k = SCALE_BLOCK if b_kind == B_FP8 else 64
        if m <= 16:
            cfg = GemmConfig(16, 64, block_k, group_m=1, num_warps=4, num_stages=4)
        elif m <= 32:
            cfg = GemmConfig(32, 64, block_k, group_m=1, num_warps=4, num_stages=4)
        elif m <= 128:
            cfg = GemmConfig(64, 64, block_k, group_m=8, num_warps=4, num_stages=3)
        elif m <= 512:
            cfg = GemmConfig(64, 128, block_k, group_m=8, num_warps=4, num_stages=4)
        else:
            cfg = GemmConfig(64, 128, block_k, group_m=16, num_warps=4, num_stages=3)
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    return replace(cfg, split_k=_split_for(tiles, cdiv(k, SCALE_BLOCK), _num_sms(device)))


def mma_dtype(b_kind: int, operand: torch.dtype, device: torch.device):
    """(DOT, PREC) for :func:`gemm_kernel`: the MMA operand dtype (None = the operands' own) and the
    fp32 input precision. Both quantized recipes run the FP8 MMA, also under the interpreter."""
    if b_kind == B_FLOAT:
        if operand == torch.bfloat16 and on_interpreter(device):
            return tl.float32, None
        return None, (FP32_PRECISION if operand == torch.float32 else None)
    return None, None


# ============================================================================ launch
def _scale(s: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """Scale operand as the kernel reads it: fp32 as is, e8m0 as its bytes."""
    if s is None:
        return None, False
    if s.dtype == F.E8M0_DTYPE:
        return s.view(torch.uint8), True
    return s, False


def weight_block(b_kind: int, b_s: torch.Tensor | None, k: int) -> int:
    """The weight block of valid scales (see :mod:`v4hal.ops.gemm`): FP8 ``[.., ceil(N/wb), K/wb]`` ->
    128 or 32; FP4 ``[.., N, K/wb]`` -> 32 or 16; float weights -> 0."""
    if b_s is None or b_kind == B_FLOAT:
        return 0
    if b_kind == B_FP8:
        return SCALE_BLOCK if b_s.shape[-1] == cdiv(k, SCALE_BLOCK) else FP8_SMALL_BLOCK
    return FP4_BLOCK if b_s.shape[-1] == cdiv(k, FP4_BLOCK) else FP4_SMALL_BLOCK


def launch_gemm(a: torch.Tensor, a_s: torch.Tensor | None, b: torch.Tensor, b_s: torch.Tensor | None,
                out_dtype: torch.dtype, b_kind: int, config: GemmConfig,
                group_offsets: torch.Tensor | None = None, dot=None, prec=None) -> torch.Tensor:
    """Run :func:`gemm_kernel`: ``a [M, K]`` (fp8 with ``a_s [M, K/128]``, or float), ``b`` ``[N, K]``
    / ``[E, N, K]`` (FP4: ``K/2`` bytes) with ``b_s``; grouped when ``group_offsets`` (int64
    ``[E+1]``) is given. Returns ``[M, N]`` in ``out_dtype``. ``dot``/``prec``: MMA operand dtype and
    fp32 precision (see :func:`mma_dtype`)."""
    m, k = a.shape
    grouped = group_offsets is not None
    if grouped:
        e, n = b.shape[0], b.shape[1]
        s_b = (b.stride(0), b.stride(1), b.stride(2))
        s_bs = (b_s.stride(0), b_s.stride(1), b_s.stride(2)) if b_s is not None else (0, 0, 0)
    else:
        e, n = 1, b.shape[0]
        s_b = (0, b.stride(0), b.stride(1))
        s_bs = (0, b_s.stride(0), b_s.stride(1)) if b_s is not None else (0, 0, 0)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    a_s_arg, as_e8m0 = _scale(a_s)
    b_s_arg, bs_e8m0 = _scale(b_s)
    wb = weight_block(b_kind, b_s, k)
    bk = FP4_BLOCK if b_kind == B_FP4 else (wb if b_kind == B_FP8 else config.block_k)
    if a_s is not None and SCALE_BLOCK % bk:
        raise ValueError(f"launch_gemm: block_k must divide {SCALE_BLOCK} for scaled operands, got {bk}")
    k_blocks = cdiv(k, bk)
    split = 1 if grouped else max(1, min(config.split_k, k_blocks))
    kb_per_split = cdiv(k_blocks, split)
    split = cdiv(k_blocks, kb_per_split)
    if split > 1:
        target = torch.empty((split, m, n), dtype=torch.float32, device=a.device)
        s_c = (target.stride(0), target.stride(1), target.stride(2))
    else:
        target = out
        s_c = (0, out.stride(0), out.stride(1))
    num_m = cdiv(m, config.block_m) + (min(e, m) if grouped else 0)
    grid = (num_m * cdiv(n, config.block_n), split)
    gemm_kernel[grid](
        a, a_s_arg if a_s_arg is not None else a, b, b_s_arg if b_s_arg is not None else b, target,
        group_offsets if grouped else a,
        m, n, k, e, num_m,
        a.stride(0), a.stride(1),
        a_s_arg.stride(0) if a_s_arg is not None else 0, a_s_arg.stride(1) if a_s_arg is not None else 0,
        *s_b, *s_bs, *s_c,
        kb_per_split,
        A_SCALED=a_s is not None, B_KIND=b_kind, AS_E8M0=as_e8m0, BS_E8M0=bs_e8m0,
        GROUPED=grouped, E_P2=next_pow2(e + 1) if grouped else 1,
        DOT=dot, PREC=prec, EVEN_K=(k % bk == 0),
        OUT=tl_dtype(torch.float32 if split > 1 else out_dtype), SOFT=interpreting(a), WB=wb,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=bk, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if split > 1:
        out.copy_(target.sum(0))
    return out


# ============================================================================ public functions
@implements("fp8_gemm", "triton", requires=(fp8_gpu("a", "MMA"),))
def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             scale_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``C[..., n] = sum_kb (A_kb . B[n]_kb) * a_s[..., kb] * b_s[n // 128, kb]`` with fp32 accumulation.

    a fp8 ``[..., K]`` (K % 128 == 0), a_s ``[..., K/128]`` (``scale_dtype``: float32 or e8m0);
    b fp8 ``[N, K]``, b_s ``[ceil(N/128), K/128]`` or 32x32 tiles ``[ceil(N/32), K/32]`` (float32 or
    e8m0). Out ``[..., N]`` in ``out_dtype``.
    """
    k, n = a.shape[-1], b.shape[0]
    a2 = a.reshape(-1, k)
    m = a2.shape[0]
    cfg = dense_config(m, n, k, B_FP8, a.device)
    dot, prec = mma_dtype(B_FP8, a.dtype, a.device)
    out = launch_gemm(a2, a_s.reshape(m, k // SCALE_BLOCK), b, b_s, out_dtype, B_FP8, cfg, dot=dot, prec=prec)
    return out.reshape(*a.shape[:-1], n)


@implements("fp4_gemm", "triton", requires=(fp8_gpu("a", "MMA"),))
def fp4_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             scale_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``C = A @ B^T``: A fp8 ``[..., K]`` + a_s ``[..., K/128]`` (``scale_dtype``), B packed e2m1 uint8
    ``[N, K/2]`` (low nibble = even k) + scales ``[N, K/32]`` or ``[N, K/16]`` (e8m0 or float32). Out ``[..., N]``."""
    k, n = a.shape[-1], b.shape[0]
    a2 = a.reshape(-1, k)
    m = a2.shape[0]
    cfg = dense_config(m, n, k, B_FP4, a.device, weight_block(B_FP4, b_s, k))
    dot, prec = mma_dtype(B_FP4, a.dtype, a.device)
    out = launch_gemm(a2, a_s.reshape(m, k // SCALE_BLOCK), b, b_s, out_dtype, B_FP4, cfg, dot=dot, prec=prec)
    return out.reshape(*a.shape[:-1], n)


__all__ = ["fp8_gemm", "fp4_gemm", "gemm_kernel", "launch_gemm", "weight_block", "GemmConfig", "dense_config",
           "mma_dtype", "INTERPRETER_CONFIG", "B_FLOAT", "B_FP8", "B_FP4"]
