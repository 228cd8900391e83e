"""Triton lightning indexer: ``I[b, s, t] = sum_h w[b, s, h] * relu(q[b, s, h] . k[b, t])`` and its top-k.

Kernel layout: a program owns ``BLOCK_S`` queries of one batch row and ``BLOCK_T`` keys. The
``BLOCK_S * HP`` (query, head) pairs are flattened onto the M side of one MMA
(``[BLOCK_S*HP, D] @ [D, BLOCK_T]``, ``HP`` = heads padded to a power of two, padded heads
masked to zero), so each key tile is read once for all heads and queries of the block. ReLU
and the head weights are applied to the fp32 accumulator, and the heads are summed by a
reshape to ``[BLOCK_S, HP, BLOCK_T]``. With ``MASK`` the same kernel writes ``-inf`` where the
causal rule hides entry t from query i (``t >= (start_pos + i + 1) // ratio``);
:func:`indexer_topk` then takes ``torch.topk`` of those masked scores (a Triton top-k over
the row is not worth it at these widths) and maps masked picks to -1, valid ones to
``t + offset``.

q and k may have different float dtypes (the op allows it): then both are converted to fp32
in the kernel. Weights of any float dtype are read as fp32.

Verified where: numerics under the Triton interpreter (CPU) with fp32/fp16 operands and bf16
inputs converted to fp32 in the kernel before ``tl.dot``; the GPU tiles compile for sm_90a
without spills (``tests/triton/test_sm90_compile.py``, no GPU needed). The bf16 MMA numerics
and the speed are checked only on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4hal.backends.reference.attention import top_entries as ref_top_entries
from v4hal.hal import requirements as R
from v4hal.hal.registry import implements

from ._attn_common import cdiv, dot_precision, dot_upcast, next_pow2, on_interpreter

MAX_INDEX_HEADS = 128   # all heads of a query sit in one MMA tile
_REQUIRES = (R.at_most("indexer heads H", MAX_INDEX_HEADS, "q.shape[2]", why="all heads of a query in one MMA tile"),
             R.min_capability(8, 0, tensor="q", only_for=(torch.bfloat16,), why="bf16 tl.dot"),
             R.min_capability(8, 0, tensor="k", only_for=(torch.bfloat16,), why="bf16 tl.dot"))


@triton.jit
def _index_scores_kernel(q_ptr, k_ptr, w_ptr, out_ptr,
                         S, T, H, D, start_pos, ratio,
                         s_qb, s_qs, s_qh, s_kb, s_kt, s_wb, s_ws, s_ob, s_os,
                         BLOCK_S: tl.constexpr, HP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                         EVEN_D: tl.constexpr, MASK: tl.constexpr, TO_F32: tl.constexpr, PREC: tl.constexpr):
    """program_id(0) = b * cdiv(S, BLOCK_S) + query block, program_id(1) = key block."""
    pid = tl.program_id(0)
    pid_t = tl.program_id(1)
    n_sblk = tl.cdiv(S, BLOCK_S)
    b = (pid // n_sblk).to(tl.int64)
    s0 = (pid % n_sblk) * BLOCK_S

    rows = tl.arange(0, BLOCK_S * HP)
    s_idx = s0 + rows // HP
    h_idx = rows % HP
    r_ok = (s_idx < S) & (h_idx < H)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_d = tl.arange(0, BLOCK_D)

    q_rows = q_ptr + b * s_qb + s_idx.to(tl.int64) * s_qs + h_idx * s_qh
    k_rows = k_ptr + b * s_kb + offs_t.to(tl.int64) * s_kt
    acc = tl.zeros([BLOCK_S * HP, BLOCK_T], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        if EVEN_D:
            qm = r_ok[:, None]
            km = t_ok[:, None]
        else:
            qm = r_ok[:, None] & (dd[None, :] < D)
            km = t_ok[:, None] & (dd[None, :] < D)
        qt = tl.load(q_rows[:, None] + dd[None, :], mask=qm, other=0.0)
        kt = tl.load(k_rows[:, None] + dd[None, :], mask=km, other=0.0)
        if TO_F32:
            qt = qt.to(tl.float32)
            kt = kt.to(tl.float32)
        acc = tl.dot(qt, tl.trans(kt), acc, input_precision=PREC)

    w = tl.load(w_ptr + b * s_wb + s_idx.to(tl.int64) * s_ws + h_idx, mask=r_ok, other=0.0).to(tl.float32)
    acc = tl.maximum(acc, 0.0) * w[:, None]
    score = tl.sum(tl.reshape(acc, [BLOCK_S, HP, BLOCK_T]), axis=1)   # [BLOCK_S, BLOCK_T]

    offs_s = s0 + tl.arange(0, BLOCK_S)
    if MASK:
        limit = (start_pos + offs_s + 1) // ratio
        score = tl.where(offs_t[None, :] < limit[:, None], score, float("-inf"))
    o_ptrs = out_ptr + b * s_ob + offs_s.to(tl.int64)[:, None] * s_os + offs_t[None, :]
    tl.store(o_ptrs, score, mask=(offs_s[:, None] < S) & t_ok[None, :])


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, *, mask: bool,
            start_pos: int, ratio: int) -> torch.Tensor:
    b, s, h, d = q.shape
    t = k.shape[1]
    if out.numel() == 0:
        return out
    if h == 0 or d == 0:
        out.zero_()
        if mask:
            _mask_in_torch(out, start_pos, ratio)
        return out
    q, k, weights = _last_contiguous(q), _last_contiguous(k), _last_contiguous(weights)
    hp = next_pow2(h)
    interp = on_interpreter(q)
    same = q.dtype == k.dtype
    to_f32 = (not same) or dot_upcast(q.dtype, q.device)
    f32_mma = to_f32 or q.dtype == torch.float32
    # GPU tiles from ptxas register counts at sm_90: 128 (query, head) rows x 64 keys for 16-bit
    # MMAs, 64 x 32 when the MMA runs on fp32 operands (three TF32 products)
    rows = 64 if interp or f32_mma else 128
    block_s = max(1, rows // hp)
    block_s = max(max(1, 16 // hp), min(block_s, next_pow2(s)))
    block_t = 32 if interp or f32_mma else 64
    block_d = max(16, min(128, next_pow2(d)))
    prec = dot_precision(torch.float32 if to_f32 else q.dtype)
    grid = (b * cdiv(s, block_s), cdiv(t, block_t))
    kwargs = {} if interp else {"num_warps": 4 if block_s * hp * block_t <= 8192 else 8, "num_stages": 2}
    _index_scores_kernel[grid](q, k, weights, out, s, t, h, d, start_pos, ratio,
                               q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                               weights.stride(0), weights.stride(1), out.stride(0), out.stride(1),
                               BLOCK_S=block_s, HP=hp, BLOCK_T=block_t, BLOCK_D=block_d,
                               EVEN_D=d % block_d == 0, MASK=mask, TO_F32=to_f32, PREC=prec, **kwargs)
    return out


def _mask_in_torch(out: torch.Tensor, start_pos: int, ratio: int) -> None:
    """The causal mask for the degenerate no-head case (no kernel launch: every score is 0)."""
    s, t = out.shape[1], out.shape[2]
    limit = (torch.arange(start_pos, start_pos + s, device=out.device) + 1) // ratio
    out.masked_fill_(torch.arange(t, device=out.device).view(1, 1, t) >= limit.view(1, s, 1), float("-inf"))


def index_scores_into(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`index_scores` writing into fp32 ``out [b, s, t]`` (last dim contiguous); returns it."""
    return _launch(out, q, k, weights, mask=False, start_pos=0, ratio=1)


@implements("index_scores", "triton", requires=_REQUIRES)
def index_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Indexer logits: q ``[b, s, H, D]``, k ``[b, t, D]``, weights ``[b, s, H]`` (floats) -> fp32 ``[b, s, t]``."""
    out = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float32, device=q.device)
    return _launch(out, q, k, weights, mask=False, start_pos=0, ratio=1)


def masked_index_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, start_pos: int,
                        ratio: int) -> torch.Tensor:
    """:func:`index_scores` with ``-inf`` where ``t >= (start_pos + i + 1) // ratio`` (computed in the kernel)."""
    out = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float32, device=q.device)
    return _launch(out, q, k, weights, mask=True, start_pos=start_pos, ratio=ratio)


@implements("indexer_topk", "triton", requires=_REQUIRES)
def indexer_topk(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, topk: int, start_pos: int = 0,
                 ratio: int = 4, offset: int = 0) -> torch.Tensor:
    """Causally masked top-k of the indexer logits.

    Returns int32 ``[b, s, min(topk, t)]``: entries in descending score order (equal scores: the lower entry first),
    ``entry + offset`` when ``entry < (start_pos + i + 1) // ratio``, else -1.
    """
    t = k.shape[1]
    scores = masked_index_scores(q, k, weights, start_pos, ratio)
    width = min(topk, t)
    s = q.shape[1]
    picks = ref_top_entries(scores, width)                                          # [b, s, width]
    limit = ((torch.arange(start_pos, start_pos + s, device=q.device) + 1) // ratio).view(1, s, 1)
    return torch.where(picks < limit, picks + offset, torch.full_like(picks, -1)).to(torch.int32)
