"""Triton mHC (manifold-constrained hyper-connections): split + Sinkhorn, fused pre, post, head.

Kernels:

- ``_hc_mix_kernel`` (split-K): for a block of tokens and one slice of the ``hc*D`` axis,
  the partial mixes ``x_flat @ hc_fn^T`` (fp32 MMA, three TF32 products on a GPU) and the
  partial sum of squares of ``x_flat``, written to a small ``[splits, T, MIXP]`` buffer. The
  split keeps a decode batch (few tokens, ``hc*D`` = 16384 or 28672) spread over the GPU.
- ``_hc_apply_kernel``: per (token block, D block) it reduces the partials, applies the RMS
  factor ``rsqrt(mean(x_flat^2) + norm_eps)`` to the mixes, computes
  ``pre = sigmoid(mix*scale0 + base) + eps`` and the pre-weighted sum ``y = sum_j pre[j] x[j]``
  for its D block; the programs of the first D block also compute ``post`` and the Sinkhorn
  ``comb`` and store them. ``hc_pre`` is these two kernels; ``hc_head`` the same two with the
  head's ``[hc, hc*D]`` projection and no post/comb; ``hc_mix`` the same two storing ``pre`` instead of
  forming ``y`` (so its pre, post and comb are hc_pre's bits).
- ``_hc_collapse_kernel``: ``y = sum_j pre[j] x[j]`` with a given ``pre`` per (token block, D block).
- ``_hc_split_kernel``: ``hc_split_sinkhorn`` on given mixes.
- ``_hc_post_kernel``: ``out[k] = post[k] * x + sum_j comb[j, k] * residual[j]`` per (token, D block).

Sinkhorn on a ``[BLOCK_T, HCP, HCP]`` tile (``HCP`` = hc padded to a power of two; padded
entries are kept at exactly 0): row softmax + eps, a column normalisation, then
``iters - 1`` rounds of (row, column), every division by ``(sum + eps)``, as the reference.
Everything is fp32; ``y`` is cast to x's dtype, hc_post's output to residual's dtype, both
rounded to nearest even (under the interpreter by :func:`._cast.cast_out`'s integer rounding).

Verified where: numerics of all kernels under the Triton interpreter (CPU) for fp32/fp16/bf16 x
(the only MMA here is fp32 x fp32); the GPU tiles compile for sm_90a without spills
(``tests/triton/test_sm90_compile.py``, no GPU needed); GPU numerics and speed only on a GPU.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from v4hal.hal import requirements as R
from v4hal.hal.registry import implements

from ._attn_common import FP32_DOT_PRECISION, cdiv, next_pow2, on_interpreter
from ._cast import cast_out

MAX_HC = 8   # the (2+hc)*hc mixes padded to <= 128 MMA columns; one [hc, hc] Sinkhorn tile


def _hc_limit(value: str) -> R.Requirement:
    return R.at_most("hc", MAX_HC, value,
                     why="the (2+hc)*hc mixes padded to <= 128 MMA columns; [hc, hc] Sinkhorn tile")


@triton.jit
def _comb_sinkhorn(logits, valid, eps, ITERS):
    """Row softmax (+eps) of ``logits`` [BT, HCP, HCP] (invalid entries = -inf), then Sinkhorn."""
    mx = tl.max(logits, 2)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    e = tl.exp(logits - mx[:, :, None])
    den = tl.sum(e, 2)
    den = tl.where(den > 0.0, den, 1.0)
    c = tl.where(valid, e / den[:, :, None] + eps, 0.0)
    c = c / (tl.sum(c, 1)[:, None, :] + eps)
    for _ in range(ITERS - 1):
        c = c / (tl.sum(c, 2)[:, :, None] + eps)
        c = c / (tl.sum(c, 1)[:, None, :] + eps)
    return c


@triton.jit
def _hc_mix_kernel(x_ptr, fn_ptr, part_ptr, sq_ptr, T, KT, MIX, K_SPLIT, s_xt, s_fn,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, MIXP: tl.constexpr, PREC: tl.constexpr):
    """part[split, t, j] = sum_{k in split} x[t, k] * fn[j, k];  sq[split, t] = sum_{k in split} x[t, k]^2."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_j = tl.arange(0, MIXP)
    j_ok = offs_j < MIX
    k_lo = pid_s * K_SPLIT
    x_rows = x_ptr + offs_t.to(tl.int64) * s_xt
    f_rows = fn_ptr + offs_j.to(tl.int64) * s_fn
    acc = tl.zeros([BLOCK_T, MIXP], tl.float32)
    sq = tl.zeros([BLOCK_T], tl.float32)
    for k0 in range(0, K_SPLIT, BLOCK_K):
        kk = k_lo + k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < KT
        xt = tl.load(x_rows[:, None] + kk[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        ft = tl.load(f_rows[:, None] + kk[None, :], mask=j_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(ft), acc, input_precision=PREC)
        sq += tl.sum(xt * xt, 1)
    base = pid_s.to(tl.int64) * T
    tl.store(part_ptr + (base + offs_t)[:, None] * MIXP + offs_j[None, :], acc, mask=t_ok[:, None])
    tl.store(sq_ptr + base + offs_t, sq, mask=t_ok)


@triton.jit
def _hc_apply_kernel(part_ptr, sq_ptr, scale_ptr, base_ptr, x_ptr, y_ptr, post_ptr, comb_ptr, pre_ptr,
                     T, D, HC, SPLITS, KT, norm_eps, hc_eps, ITERS, s_xt, s_xh, s_yt,
                     BLOCK_T: tl.constexpr, HCP: tl.constexpr, MIXP: tl.constexpr, BLOCK_D: tl.constexpr,
                     HEAD: tl.constexpr, SOFT: tl.constexpr, MIX_ONLY: tl.constexpr):
    """Reduce the split-K partials, RMS-scale, split (+Sinkhorn), and y = sum_j pre[j] * x[j] for one D block
    (``MIX_ONLY``: store pre instead of forming y)."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    jj = tl.arange(0, HCP)
    j_ok = jj < HC
    tj_ok = t_ok[:, None] & j_ok[None, :]

    sq = tl.zeros([BLOCK_T], tl.float32)
    pre_m = tl.zeros([BLOCK_T, HCP], tl.float32)
    for sp in range(SPLITS):
        row = sp * T + offs_t
        sq += tl.load(sq_ptr + row, mask=t_ok, other=0.0)
        pre_m += tl.load(part_ptr + row[:, None] * MIXP + jj[None, :], mask=tj_ok, other=0.0)
    rs = tl.rsqrt(sq / KT + norm_eps)
    scale0 = tl.load(scale_ptr)
    pre = tl.sigmoid(pre_m * rs[:, None] * scale0 + tl.load(base_ptr + jj, mask=j_ok, other=0.0)[None, :]) + hc_eps
    pre = tl.where(j_ok[None, :], pre, 0.0)

    if not HEAD:
        if pid_d == 0:
            kk = tl.arange(0, HCP)
            valid = j_ok[:, None] & (kk < HC)[None, :]                     # [HCP, HCP]
            cidx = 2 * HC + jj[:, None] * HC + kk[None, :]
            post_m = tl.zeros([BLOCK_T, HCP], tl.float32)
            comb_m = tl.zeros([BLOCK_T, HCP, HCP], tl.float32)
            for sp in range(SPLITS):
                row = sp * T + offs_t
                post_m += tl.load(part_ptr + row[:, None] * MIXP + (HC + jj)[None, :], mask=tj_ok, other=0.0)
                comb_m += tl.load(part_ptr + row[:, None, None] * MIXP + cidx[None, :, :],
                                  mask=t_ok[:, None, None] & valid[None, :, :], other=0.0)
            scale1 = tl.load(scale_ptr + 1)
            scale2 = tl.load(scale_ptr + 2)
            post = 2.0 * tl.sigmoid(post_m * rs[:, None] * scale1
                                    + tl.load(base_ptr + HC + jj, mask=j_ok, other=0.0)[None, :])
            tl.store(post_ptr + offs_t.to(tl.int64)[:, None] * HC + jj[None, :], post, mask=tj_ok)
            logits = comb_m * rs[:, None, None] * scale2 + tl.load(base_ptr + cidx, mask=valid, other=0.0)[None, :, :]
            logits = tl.where(valid[None, :, :], logits, float("-inf"))
            comb = _comb_sinkhorn(logits, valid[None, :, :], hc_eps, ITERS)
            tl.store(comb_ptr + offs_t.to(tl.int64)[:, None, None] * (HC * HC)
                     + (jj[:, None] * HC + kk[None, :])[None, :, :],
                     comb, mask=t_ok[:, None, None] & valid[None, :, :])

    if MIX_ONLY:
        tl.store(pre_ptr + offs_t.to(tl.int64)[:, None] * HC + jj[None, :], pre, mask=tj_ok)
    else:
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        xm = tj_ok[:, :, None] & d_ok[None, None, :]
        xt = tl.load(x_ptr + offs_t.to(tl.int64)[:, None, None] * s_xt + jj[None, :, None] * s_xh
                     + offs_d[None, None, :], mask=xm, other=0.0).to(tl.float32)
        y = tl.sum(pre[:, :, None] * xt, 1)
        tl.store(y_ptr + offs_t.to(tl.int64)[:, None] * s_yt + offs_d[None, :],
                 cast_out(y, y_ptr.dtype.element_ty, SOFT), mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _hc_collapse_kernel(x_ptr, pre_ptr, y_ptr, T, D, HC, s_xt, s_xh, s_yt,
                        BLOCK_T: tl.constexpr, HCP: tl.constexpr, BLOCK_D: tl.constexpr, SOFT: tl.constexpr):
    """y[t, d] = sum_j pre[t, j] * x[t, j, d] (fp32, in order j = 0..HC-1 as one masked reduction)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    jj = tl.arange(0, HCP)
    tj_ok = t_ok[:, None] & (jj < HC)[None, :]
    pre = tl.load(pre_ptr + offs_t.to(tl.int64)[:, None] * HC + jj[None, :], mask=tj_ok, other=0.0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    xt = tl.load(x_ptr + offs_t.to(tl.int64)[:, None, None] * s_xt + jj[None, :, None] * s_xh + offs_d[None, None, :],
                 mask=tj_ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
    y = tl.sum(pre[:, :, None] * xt, 1)
    tl.store(y_ptr + offs_t.to(tl.int64)[:, None] * s_yt + offs_d[None, :],
             cast_out(y, y_ptr.dtype.element_ty, SOFT), mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _hc_split_kernel(mix_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, T, HC, MIX, eps, ITERS,
                     BLOCK_T: tl.constexpr, HCP: tl.constexpr):
    """hc_split_sinkhorn on rows of mixes [T, MIX]."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    jj = tl.arange(0, HCP)
    kk = tl.arange(0, HCP)
    j_ok = jj < HC
    tj_ok = t_ok[:, None] & j_ok[None, :]
    valid = j_ok[:, None] & (kk < HC)[None, :]
    rows = mix_ptr + offs_t.to(tl.int64) * MIX
    pre_m = tl.load(rows[:, None] + jj[None, :], mask=tj_ok, other=0.0)
    post_m = tl.load(rows[:, None] + HC + jj[None, :], mask=tj_ok, other=0.0)
    cidx = 2 * HC + jj[:, None] * HC + kk[None, :]
    comb_m = tl.load(rows[:, None, None] + cidx[None, :, :], mask=t_ok[:, None, None] & valid[None, :, :], other=0.0)
    pre = tl.sigmoid(pre_m * tl.load(scale_ptr) + tl.load(base_ptr + jj, mask=j_ok, other=0.0)[None, :]) + eps
    post = 2.0 * tl.sigmoid(post_m * tl.load(scale_ptr + 1)
                            + tl.load(base_ptr + HC + jj, mask=j_ok, other=0.0)[None, :])
    logits = comb_m * tl.load(scale_ptr + 2) + tl.load(base_ptr + cidx, mask=valid, other=0.0)[None, :, :]
    logits = tl.where(valid[None, :, :], logits, float("-inf"))
    comb = _comb_sinkhorn(logits, valid[None, :, :], eps, ITERS)
    out_rows = offs_t.to(tl.int64)
    tl.store(pre_ptr + out_rows[:, None] * HC + jj[None, :], pre, mask=tj_ok)
    tl.store(post_ptr + out_rows[:, None] * HC + jj[None, :], post, mask=tj_ok)
    tl.store(comb_ptr + out_rows[:, None, None] * (HC * HC) + (jj[:, None] * HC + kk[None, :])[None, :, :], comb,
             mask=t_ok[:, None, None] & valid[None, :, :])


@triton.jit
def _hc_post_kernel(x_ptr, res_ptr, post_ptr, comb_ptr, out_ptr, D, HC, s_xt, s_rt, s_rh, s_ot, s_oh,
                    HCP: tl.constexpr, BLOCK_D: tl.constexpr, SOFT: tl.constexpr):
    """out[t, k, d] = post[t, k] * x[t, d] + sum_j comb[t, j, k] * res[t, j, d] (fp32)."""
    t = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    jj = tl.arange(0, HCP)
    j_ok = jj < HC
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    x = tl.load(x_ptr + t * s_xt + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + t * s_rt + jj[:, None] * s_rh + offs_d[None, :], mask=j_ok[:, None] & d_ok[None, :],
                  other=0.0).to(tl.float32)                                       # [j, d]
    post = tl.load(post_ptr + t * HC + jj, mask=j_ok, other=0.0)                   # [k]
    comb = tl.load(comb_ptr + t * HC * HC + jj[:, None] * HC + jj[None, :],
                   mask=j_ok[:, None] & j_ok[None, :], other=0.0)                  # [j, k]
    mixed = tl.sum(comb[:, :, None] * res[:, None, :], 0)                          # [k, d]
    out = post[:, None] * x[None, :] + mixed
    tl.store(out_ptr + t * s_ot + jj[:, None] * s_oh + offs_d[None, :],
             cast_out(out, out_ptr.dtype.element_ty, SOFT), mask=j_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# launchers


def _mix_partials(x2: torch.Tensor, hc_fn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Launch the split-K mixes kernel on ``x2 [T, hc*D]``; returns (partials, sumsq partials, splits, MIXP)."""
    t, kt = x2.shape
    mix = hc_fn.shape[0]
    mixp = max(16, next_pow2(mix))
    interp = on_interpreter(x2)
    # GPU tiles chosen by ptxas register counts at sm_90 (no spills with three-TF32 products)
    block_t = 16 if interp or t <= 16 else (32 if t <= 2048 else 64)
    block_k = 128 if interp else 64
    n_tblk = cdiv(t, block_t)
    target = 8 if interp else 2 * _sm_count(x2.device)
    splits = max(1, min(cdiv(kt, block_k), cdiv(target, n_tblk)))
    k_split = max(block_k, cdiv(cdiv(kt, splits), block_k) * block_k)
    splits = max(1, cdiv(kt, k_split))
    part = torch.empty(splits, t, mixp, dtype=torch.float32, device=x2.device)
    sq = torch.empty(splits, t, dtype=torch.float32, device=x2.device)
    kwargs = {} if interp else {"num_warps": 4, "num_stages": 2 if block_t == 64 else 3}
    _hc_mix_kernel[(n_tblk, splits)](x2, hc_fn, part, sq, t, kt, mix, k_split, x2.stride(0), hc_fn.stride(0),
                                     BLOCK_T=block_t, BLOCK_K=block_k, MIXP=mixp, PREC=FP32_DOT_PRECISION,
                                     **kwargs)
    return part, sq, splits, mixp


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for anything else: the interpreter)."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _apply(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, norm_eps: float,
           hc_eps: float, iters: int, head: bool,
           outs: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
           pre: torch.Tensor | None = None) -> None:
    """Shared body of hc_pre / hc_head / hc_mix: x ``[..., hc, D]`` -> fills y (and post, comb unless head);
    with ``pre`` (fp32 ``[..., hc]``, hc_mix) fills pre, post and comb and leaves y alone."""
    y, post, comb = outs
    hc, dim = x.shape[-2], x.shape[-1]
    t = math.prod(x.shape[:-2])
    if t == 0:
        return
    if hc == 0:  # no copies: nothing to sum (only hc_head can get here)
        y.zero_()
        return
    xc = x.contiguous().reshape(t, hc, dim)
    part, sq, splits, mixp = _mix_partials(xc.reshape(t, hc * dim), hc_fn.contiguous())
    interp = on_interpreter(x)
    hcp = next_pow2(hc)
    block_t = 4
    block_d = max(16, min(next_pow2(dim), 64 if interp else 1024 // hcp))
    mix_only = pre is not None
    # D = 0 still writes post / comb; hc_mix forms no y: one program per token block
    grid = (cdiv(t, block_t), 1 if mix_only else max(1, cdiv(dim, block_d)))
    y2 = y.view(t, dim) if y is not None else xc.view(t, hc * dim)
    kwargs = {} if interp else {"num_warps": 4}
    _hc_apply_kernel[grid](part, sq, hc_scale, hc_base, xc, y2,
                           post if post is not None else y2, comb if comb is not None else y2,
                           pre if mix_only else y2,
                           t, dim, hc, splits, hc * dim, float(norm_eps), float(hc_eps), int(iters),
                           xc.stride(0), xc.stride(1), y2.stride(0),
                           BLOCK_T=block_t, HCP=hcp, MIXP=mixp, BLOCK_D=block_d, HEAD=head, SOFT=interp,
                           MIX_ONLY=mix_only, **kwargs)


@implements("hc_split_sinkhorn", "triton", requires=(_hc_limit("hc_mult"),))
def hc_split_sinkhorn(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_mult: int = 4,
                      sinkhorn_iters: int = 20, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixes fp32 ``[..., (2+hc)*hc]`` -> pre ``[..., hc]``, post ``[..., hc]``, comb ``[..., hc, hc]`` (fp32)."""
    hc = hc_mult
    lead = mixes.shape[:-1]
    pre = torch.empty(*lead, hc, dtype=torch.float32, device=mixes.device)
    post = torch.empty(*lead, hc, dtype=torch.float32, device=mixes.device)
    comb = torch.empty(*lead, hc, hc, dtype=torch.float32, device=mixes.device)
    hc_split_sinkhorn_into((pre, post, comb), mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, eps)
    return pre, post, comb


def hc_split_sinkhorn_into(outs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], mixes: torch.Tensor,
                           hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_mult: int = 4, sinkhorn_iters: int = 20,
                           eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`hc_split_sinkhorn` writing into contiguous fp32 ``(pre, post, comb)``; returns them."""
    pre, post, comb = outs
    hc = hc_mult
    mix = (2 + hc) * hc
    t = mixes.numel() // mix
    if t == 0:
        return pre, post, comb
    m2 = mixes.reshape(t, mix).contiguous()
    block_t = 16 if on_interpreter(mixes) else 64
    kwargs = {} if on_interpreter(mixes) else {"num_warps": 4}
    _hc_split_kernel[(cdiv(t, block_t),)](m2, hc_scale.contiguous(), hc_base.contiguous(), pre, post, comb,
                                          t, hc, mix, float(eps), int(sinkhorn_iters),
                                          BLOCK_T=block_t, HCP=next_pow2(hc), **kwargs)
    return pre, post, comb


@implements("hc_pre", "triton", requires=(_hc_limit("hc_mult"),))
def hc_pre(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
           norm_eps: float = 1e-6, hc_mult: int = 4, sinkhorn_iters: int = 20,
           hc_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float ``[..., hc, D]``, hc_fn fp32 ``[(2+hc)*hc, hc*D]`` -> y ``[..., D]`` (x's dtype), post, comb fp32."""
    hc, dim = hc_mult, x.shape[-1]
    lead = x.shape[:-2]
    y = torch.empty(*lead, dim, dtype=x.dtype, device=x.device)
    post = torch.empty(*lead, hc, dtype=torch.float32, device=x.device)
    comb = torch.empty(*lead, hc, hc, dtype=torch.float32, device=x.device)
    return hc_pre_into((y, post, comb), x, hc_fn, hc_scale, hc_base, norm_eps, hc_mult, sinkhorn_iters, hc_eps)


def hc_pre_into(outs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor, hc_fn: torch.Tensor,
                hc_scale: torch.Tensor, hc_base: torch.Tensor, norm_eps: float = 1e-6, hc_mult: int = 4,
                sinkhorn_iters: int = 20, hc_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`hc_pre` writing into contiguous ``(y, post, comb)``; returns them."""
    y, post, comb = outs
    _apply(x, hc_fn, hc_scale.contiguous(), hc_base.contiguous(), norm_eps, hc_eps, sinkhorn_iters, False,
           (y, post, comb))
    return y, post, comb


@implements("hc_mix", "triton", requires=(_hc_limit("hc_mult"),))
def hc_mix(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
           norm_eps: float = 1e-6, hc_mult: int = 4, sinkhorn_iters: int = 20,
           hc_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float ``[..., hc, D]`` -> pre, post ``[..., hc]``, comb ``[..., hc, hc]`` (fp32): hc_pre's kernels
    storing pre instead of the collapse."""
    hc = hc_mult
    lead = x.shape[:-2]
    pre = torch.empty(*lead, hc, dtype=torch.float32, device=x.device)
    post = torch.empty(*lead, hc, dtype=torch.float32, device=x.device)
    comb = torch.empty(*lead, hc, hc, dtype=torch.float32, device=x.device)
    _apply(x, hc_fn, hc_scale.contiguous(), hc_base.contiguous(), norm_eps, hc_eps, sinkhorn_iters, False,
           (None, post, comb), pre=pre.view(-1, hc))
    return pre, post, comb


@implements("hc_collapse", "triton", requires=(_hc_limit("x.shape[-2]"),))
def hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """x float ``[..., hc, D]``, pre fp32 ``[..., hc]`` -> ``sum_j pre[j] * x[j]`` ``[..., D]`` in x's dtype."""
    hc, dim = x.shape[-2], x.shape[-1]
    y = torch.empty(*x.shape[:-2], dim, dtype=x.dtype, device=x.device)
    t = math.prod(x.shape[:-2])
    if t == 0 or dim == 0:
        return y
    xc = x.contiguous().reshape(t, hc, dim)
    y2 = y.view(t, dim)
    interp = on_interpreter(x)
    hcp = next_pow2(hc)
    block_t = 4
    block_d = max(16, min(next_pow2(dim), 64 if interp else 1024 // hcp))
    kwargs = {} if interp else {"num_warps": 4}
    _hc_collapse_kernel[(cdiv(t, block_t), cdiv(dim, block_d))](
        xc, pre.contiguous().reshape(t, hc), y2, t, dim, hc, xc.stride(0), xc.stride(1), y2.stride(0),
        BLOCK_T=block_t, HCP=hcp, BLOCK_D=block_d, SOFT=interp, **kwargs)
    return y


@implements("hc_head", "triton", requires=(_hc_limit("x.shape[-2]"),))
def hc_head(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
            norm_eps: float = 1e-6, hc_eps: float = 1e-6) -> torch.Tensor:
    """x float ``[..., hc, D]``, hc_fn fp32 ``[hc, hc*D]``, hc_scale ``[1]``, hc_base ``[hc]``
    -> ``[..., D]`` (x's dtype)."""
    y = torch.empty(*x.shape[:-2], x.shape[-1], dtype=x.dtype, device=x.device)
    return hc_head_into(y, x, hc_fn, hc_scale, hc_base, norm_eps, hc_eps)


def hc_head_into(y: torch.Tensor, x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor,
                 hc_base: torch.Tensor, norm_eps: float = 1e-6, hc_eps: float = 1e-6) -> torch.Tensor:
    """:func:`hc_head` writing into contiguous ``y [..., D]`` (x's dtype); returns it."""
    _apply(x, hc_fn, hc_scale.contiguous(), hc_base.contiguous(), norm_eps, hc_eps, 1, True, (y, None, None))
    return y


@implements("hc_post", "triton", requires=(_hc_limit("residual.shape[-2]"),))
def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """x ``[..., D]``, residual ``[..., hc, D]``, post fp32 ``[..., hc]``, comb fp32 ``[..., hc, hc]`` ->
    ``[..., hc, D]`` in residual's dtype: ``out[k] = post[k] * x + sum_j comb[j, k] * residual[j]``."""
    out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    return hc_post_into(out, x, residual, post, comb)


def hc_post_into(out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor,
                 comb: torch.Tensor) -> torch.Tensor:
    """:func:`hc_post` writing into contiguous ``out`` (residual's shape and dtype); returns it."""
    hc, dim = residual.shape[-2], residual.shape[-1]
    t = out.numel() // max(1, hc * dim) if dim and hc else 0
    if t == 0:
        return out
    x2 = x.contiguous().reshape(t, dim)
    r3 = residual.contiguous().reshape(t, hc, dim)
    o3 = out.view(t, hc, dim)
    hcp = next_pow2(hc)
    interp = on_interpreter(x)
    block_d = max(16, min(next_pow2(dim), 256 if interp else 2048 // hcp))
    kwargs = {} if interp else {"num_warps": 4}
    _hc_post_kernel[(t, cdiv(dim, block_d))](x2, r3, post.contiguous(), comb.contiguous(), o3, dim, hc,
                                             x2.stride(0), r3.stride(0), r3.stride(1), o3.stride(0), o3.stride(1),
                                             HCP=hcp, BLOCK_D=block_d, SOFT=interp, **kwargs)
    return out
