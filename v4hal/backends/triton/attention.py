"""Triton sparse attention (shared-KV MQA over gathered rows, with an attention sink).

One kernel serves decode (``m`` = 1..4 query rows) and prefill (``m`` large): a program owns
one query row ``(b, m)`` and a block of ``BLOCK_H`` heads, so the heads sit on the M side of
both MMAs and every gathered KV tile is loaded once for all heads of the block:

    for each block of BLOCK_N indices of topk_idxs[b, m]:
        kv   = kv[b, idx]                        [BLOCK_N, d]   (-1 -> zero row, masked)
        s    = q @ kv^T * scale                  [BLOCK_H, BLOCK_N]  (-1 -> -inf)
        online softmax (running max m_i, sum l_i, exp2 domain)
        acc  = acc * alpha + p @ kv              [BLOCK_H, d]
    out = acc * exp(m_i - M) / (l_i * exp(m_i - M) + exp(sink - M)),  M = max(m_i, sink)

The sink joins the denominator only; the final max also takes the sink, as the reference
does, so a large sink cannot overflow. A row whose indices are all -1 has ``l_i = 0`` and
gives exactly 0 (also for ``attn_sink = -inf``). Duplicate indices count once per occurrence.
The probabilities are rounded to kv's dtype before the value product (as the public kernel
does: bf16 MMA operands).

Head counts: any ``h >= 1`` (head blocks are masked; ``h`` < 16 pads the MMA to 16 rows).
Head dim: up to ``MAX_HEAD_DIM`` = 512 (the whole row is one tile: ``[BLOCK_N, 512]`` in shared
memory, the ``[BLOCK_H, 512]`` fp32 accumulator in registers, which is why 64 heads need 8 warps
and ``BLOCK_H`` stops at 64).

GPU tiles (``_GPU_CONFIGS``, autotuned per head count, head dim and decode/prefill bucket):
16 or 32 heads per program use ``mma.sync`` and read each gathered KV tile once per head block
(the other head blocks of the row hit L2); 64 heads per program use Hopper's warpgroup MMA and
read it once per query row, at the cost of fewer programs (``b * m``). For the V4 decode target
(b=64, h=64, d=512, 640 keys) the reads are ~42 MB of gathered KV plus q; which tile wins
there is for the GPU bench to measure. fp32 inputs (a checking dtype) run a fixed small tile with
exact fp32 products (three-TF32 MMAs spill at d = 512).

Verified where: numerics under the Triton interpreter (CPU) with fp32 and fp16 operands, and with
bf16 inputs whose tiles the kernel converts to fp32 before ``tl.dot`` there (the interpreter's bf16
``tl.dot`` is wrong); the bf16 output is rounded to nearest even there by integer arithmetic
(``SOFT``, :mod:`._cast`: the interpreter's own cast truncates), on a GPU by the hardware cast.
Every GPU configuration compiles for sm_90a through Triton and ptxas without a GPU
(``tests/triton/test_sm90_compile.py``: registers, spills, shared memory). The bf16 MMA
numerics, the autotuner's choice and the speed are checked only on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4hal.hal import requirements as R
from v4hal.hal.registry import implements

from ._attn_common import cdiv, dot_precision, dot_upcast, next_pow2, on_interpreter, softmax_output, softmax_tile
from ._cast import cast_out

MAX_HEAD_DIM = 512
_LOG2E = 1.4426950408889634


@triton.jit
def _sparse_attn_kernel(q_ptr, kv_ptr, sink_ptr, idx_ptr, out_ptr,
                        M, H, K, D, qk_scale,
                        s_qb, s_qm, s_qh, s_kb, s_kn, s_ib, s_im, s_ob, s_om, s_oh,
                        BM_BUCKET,
                        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, SOFT: tl.constexpr):
    """One program: query row (b, m) = divmod(program_id(0), M), heads [pid1*BLOCK_H, +BLOCK_H).

    ``qk_scale`` is softmax_scale * log2(e) (scores live in the exp2 domain). ``BM_BUCKET``
    only keys the autotuner (decode vs prefill); the kernel does not read it. ``SOFT``: the
    interpreter's correctly rounded bf16 output cast (:func:`._cast.cast_out`).
    """
    pid_bm = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = (pid_bm // M).to(tl.int64)
    m = (pid_bm % M).to(tl.int64)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < H
    if EVEN_D:
        q_mask = h_ok[:, None]
    else:
        q_mask = h_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(q_ptr + b * s_qb + m * s_qm + offs_h[:, None] * s_qh + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    idx_row = idx_ptr + b * s_ib + m * s_im
    kv_base = kv_ptr + b * s_kb
    for start in range(0, K, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        idx = tl.load(idx_row + offs_n, mask=offs_n < K, other=-1)
        valid = idx >= 0
        if EVEN_D:
            kv_mask = valid[:, None]
        else:
            kv_mask = valid[:, None] & (offs_d[None, :] < D)
        kv = tl.load(kv_base + idx.to(tl.int64)[:, None] * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            kv = kv.to(tl.float32)
        m_i, l_i, acc = softmax_tile(q, kv, valid, m_i, l_i, acc, qk_scale, PREC)

    sink = tl.load(sink_ptr + offs_h, mask=h_ok, other=float("-inf"))
    o = softmax_output(m_i, l_i, acc, sink)
    if EVEN_D:
        o_mask = h_ok[:, None]
    else:
        o_mask = h_ok[:, None] & (offs_d[None, :] < D)
    tl.store(out_ptr + b * s_ob + m * s_om + offs_h[:, None] * s_oh + offs_d[None, :],
             cast_out(o, out_ptr.dtype.element_ty, SOFT), mask=o_mask)


def _prune_configs(configs, named_args, **kwargs):
    """Drop head blocks larger than the (padded) head count; keep at least one config."""
    cap = max(16, next_pow2(int(named_args["H"])))
    kept = [c for c in configs if c.kwargs["BLOCK_H"] <= cap]
    return kept or configs[:1]


_GPU_CONFIGS = [
    triton.Config({"BLOCK_H": 16, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_H": 16, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_H": 16, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_H": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_H": 32, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    # 64 heads per program: Hopper warpgroup MMA, one KV read per query row (ptxas: BN=16 no spill,
    # BN=32 spills 4 bytes)
    triton.Config({"BLOCK_H": 64, "BLOCK_N": 16}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_H": 64, "BLOCK_N": 32}, num_warps=8, num_stages=3),
]

_sparse_attn_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["H", "D", "BM_BUCKET", "UPCAST", "PREC"],
                                     prune_configs_by={"early_config_prune": _prune_configs})(_sparse_attn_kernel)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def sparse_attn_into(out: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor,
                     topk_idxs: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """:func:`sparse_attn` writing into ``out`` (``[b, m, h, d]``, q's dtype, last dim contiguous); returns it.

    Every element of ``out`` is written, so a poisoned buffer tests full coverage.
    """
    b, m, h, d = q.shape
    k = topk_idxs.shape[-1]
    if out.numel() == 0:
        return out
    if k == 0 or kv.shape[1] == 0:
        return out.zero_()
    q, kv, topk_idxs = _last_contiguous(q), _last_contiguous(kv), _last_contiguous(topk_idxs)
    sink = attn_sink.to(device=q.device, dtype=torch.float32).contiguous()
    block_d = max(16, next_pow2(d))
    upcast = dot_upcast(q.dtype, q.device)
    prec = dot_precision(torch.float32 if upcast else q.dtype)
    args = (q, kv, sink, topk_idxs, out, m, h, k, d, float(softmax_scale) * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
            topk_idxs.stride(0), topk_idxs.stride(1), out.stride(0), out.stride(1), out.stride(2),
            min(next_pow2(b * m), 4096))
    if on_interpreter(q):
        block_h = min(32, max(16, next_pow2(h)))
        grid = (b * m, cdiv(h, block_h))
        _sparse_attn_kernel[grid](*args, BLOCK_H=block_h, BLOCK_N=16, BLOCK_D=block_d, EVEN_D=block_d == d,
                                  UPCAST=upcast, PREC=prec, SOFT=True)
    elif q.dtype == torch.float32:
        # fp32 is a checking dtype, not a serving one: exact fp32 FMA products on one small tile
        # (three-TF32 MMAs spill heavily at d = 512 on sm_90 per ptxas).
        _sparse_attn_kernel[(b * m, cdiv(h, 16))](*args, BLOCK_H=16, BLOCK_N=16, BLOCK_D=block_d,
                                                  EVEN_D=block_d == d, UPCAST=False, PREC="ieee", SOFT=False,
                                                  num_warps=4, num_stages=2)
    else:
        def grid(meta):
            return (b * m, cdiv(h, meta["BLOCK_H"]))
        _sparse_attn_tuned[grid](*args, BLOCK_D=block_d, EVEN_D=block_d == d, UPCAST=upcast, PREC=prec, SOFT=False)
    return out


@implements("sparse_attn", "triton", requires=(
    R.at_most("head dim d", MAX_HEAD_DIM, "q.shape[-1]", why="one [BLOCK_N, d] KV tile per step"),
    R.min_capability(8, 0, tensor="q", only_for=(torch.bfloat16,), why="bf16 tl.dot")))
def sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                softmax_scale: float) -> torch.Tensor:
    """Sparse shared-KV attention with a per-head sink.

    q ``[b, m, h, d]`` float, kv ``[b, n, d]`` same dtype, attn_sink fp32 ``[h]`` (``-inf`` = no sink),
    topk_idxs int32 ``[b, m, k]`` in ``[-1, n)`` (not range-checked here: the op layer does it).
    Returns ``[b, m, h, d]`` in q's dtype; a row whose indices are all -1 is exactly 0.
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return sparse_attn_into(out, q, kv, attn_sink, topk_idxs, softmax_scale)
