"""Triton ``moe_gate`` (routing) and ``moe_experts`` (the routed SwiGLU experts).

The numerics are the reference backend's (``reference/moe.py``, ``reference/moe_experts.py``).

``moe_gate``
    1. ``_gate_kernel``: the gate GEMM ``logits = fp32(x) @ fp32(weight)^T`` fused with the score
       function (``sqrtsoftplus`` = ``sqrt(softplus)`` with torch's threshold 20, ``softmax`` over the
       experts, ``sigmoid``) and the bias that only steers the choice. It writes the unbiased scores
       and, with a bias, ``scores + bias``. Both operands are converted to fp32 in registers before
       ``tl.dot``: the reference's fp32 GEMM. On a GPU 16-bit inputs use the plain TF32 MMA (their
       values are exact in TF32, so every product is exact and the sums are fp32), fp32 inputs
       three TF32 products (``tf32x3``, about fp32). The element-wise score functions tile the
       experts (``BLOCK_E``) so that small token counts still spread over many programs; softmax
       needs the whole row, so one program holds all ``E`` columns of its tokens (``E`` <=
       ``MAX_SOFTMAX_EXPERTS``).
    2. ``torch.topk`` of the choice scores (as :mod:`.indexer` does; descending order, so the
       indices come in the reference's order when the scores agree).
    3. ``_route_kernel``: gathers the unbiased scores of the chosen experts, divides by their sum
       (``sqrtsoftplus`` / ``sigmoid``; IEEE division), multiplies by ``route_scale`` and writes the
       int32 ids. Hash routing skips step 2: the same kernel reads ``tid2eid[input_ids[t]]``.

``moe_experts`` (all on the device, no host synchronisation, no Python loop over experts)
    1. quantized weights: :func:`.quant.act_quant` of ``x`` once per token (block 128; power-of-two
       scales stored as e8m0 when the weight scales are e8m0, plain fp32 scales otherwise: the
       reference's choice), then the Triton dispatch (:func:`.moe_permute.moe_dispatch`) moves the
       FP8 bytes and the same gather kernel moves the scale rows; float weights: dispatch of ``x``;
    2. two grouped GEMMs (:func:`.grouped.grouped_gemm`): ``gate = W1 x``, ``up = W3 x`` in x's dtype;
    3. ``_swiglu_kernel``: clamp (``swiglu_limit > 0``), ``h = w_route * (silu(gate) * up)`` in fp32,
       rounded to x's dtype, and for quantized weights re-quantized in the same pass (FP8 per 128
       block through :func:`.quant.fp8_block_quant`, the epilogue of ``act_quant``: bit-identical to
       ``act_quant`` of the rounded ``h``);
    4. grouped GEMM ``y = W2 h`` (x's dtype);
    5. the Triton combine (:func:`.moe_permute.moe_combine`) with unit weights: ``out[t] = sum_j y`` in
       fp32 in slot order, one cast (the routing weight was applied before ``W2``).
    Design cost on a GPU: ``x_sorted`` is read twice (separate w1 and w3 GEMMs: fusing them needs a
    concatenated ``[E, 2I, D]`` weight, which the op's signature does not hand over).

Verified where: under the Triton interpreter against the reference (``tests/triton/test_moe_compress.py``):
``moe_gate`` with fp32/fp16/bf16 inputs (the kernel's MMA operands are fp32 there), all three score
functions, with and without bias, hash routing; ``moe_experts`` with fp32 and fp16 float weights, bf16
(whose grouped GEMMs run fp32 MMA operands under the interpreter), FP8 weights with e8m0 and fp32
scales and FP4 weights (FP8 MMA, which the interpreter computes exactly), empty experts, E = 1, T = 1,
swiglu_limit 0 and 10. GPU only: the TF32/tf32x3 MMA of the gate, the bf16 grouped-GEMM MMA, the
hardware float conversions (``SOFT=False``), the GPU tile sizes and all timing. The GPU tile
configurations were compiled for sm_90a with Triton's compiler and ptxas (no GPU: the
``tests/triton/sm90_compile.py`` machinery): no spills, the gate's 64x64 tiles use wgmma.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4hal.hal import formats as F
from v4hal.hal import requirements as R
from v4hal.hal.registry import implements

from .grouped import EXPERTS_WHY, MAX_EXPERTS, grouped_gemm
from .moe_permute import _gather_rows_kernel, _row_tiles, moe_combine, moe_dispatch
from .quant import (
    act_quant,
    bits_view,
    block_nonfinite,
    cast_out,
    cdiv,
    clamp_nan,
    fp8_block_quant,
    interpreting,
    next_pow2,
    tl_dtype,
)

SCORE_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")
MAX_SOFTMAX_EXPERTS = 1024      # softmax: one program holds a whole [BLOCK_T, E] row block
SOFTPLUS_THRESHOLD = 20.0       # torch.nn.functional.softplus default: linear above it
QUANT_BLOCK = F.FP8_BLOCK       # activation quantization block of the expert GEMMs (128)


# ============================================================================ moe_gate
@triton.jit
def _gate_kernel(x_ptr, w_ptr, bias_ptr, scores_ptr, choice_ptr, ibias_ptr, imask_ptr,
                 T, E, D, s_xt, s_we, s_ot, gate_temp,
                 SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                 TEMP: tl.constexpr, IMAGE: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """scores[t, e] = score_func(fp32(x[t]) . fp32(w[e]) [/ gate_temp when TEMP]); choice = scores + bias
    (HAS_BIAS; with IMAGE, tokens whose ``imask[t]`` (uint8) is set add ``ibias`` instead).

    Grid ``(cdiv(T, BLOCK_T), cdiv(E, BLOCK_E))``; SCORE 0 = sqrtsoftplus, 1 = softmax (then
    ``BLOCK_E >= E``: one program per row block), 2 = sigmoid.
    """
    rt = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    rk = tl.arange(0, BLOCK_K)
    tmask = rt < T
    emask = re < E
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + rk
        kmask = kk < D
        xa = tl.load(x_ptr + rt[:, None] * s_xt + kk[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
        wb = tl.load(w_ptr + re.to(tl.int64)[None, :] * s_we + kk[:, None], mask=kmask[:, None] & emask[None, :],
                     other=0.0)
        acc = tl.dot(xa.to(tl.float32), wb.to(tl.float32), acc, input_precision=PREC)
    if TEMP:
        acc = tl.math.div_rn(acc, tl.full((BLOCK_T, BLOCK_E), 1.0, tl.float32) * gate_temp)

    if SCORE == 0:
        # softplus = log1p(exp(l)) below the threshold, l above; log1p(u) = log(1+u) * u / ((1+u) - 1)
        # (exact when 1 + u rounds to 1: then u itself)
        u = tl.exp(tl.minimum(acc, 20.0))
        one_u = 1.0 + u
        small = one_u == 1.0
        lp = tl.where(small, u, tl.log(one_u) * tl.math.div_rn(u, tl.where(small, 1.0, one_u - 1.0)))
        scores = tl.sqrt_rn(tl.where(acc > 20.0, acc, lp))
    elif SCORE == 1:
        lg = tl.where(emask[None, :], acc, float("-inf"))
        ex = tl.exp(lg - tl.max(lg, axis=1)[:, None])
        scores = tl.math.div_rn(ex, tl.broadcast_to(tl.sum(ex, axis=1)[:, None], (BLOCK_T, BLOCK_E)))
    else:
        scores = tl.math.div_rn(tl.full((BLOCK_T, BLOCK_E), 1.0, tl.float32), 1.0 + tl.exp(-acc))

    omask = tmask[:, None] & emask[None, :]
    offs = rt[:, None] * s_ot + re[None, :]
    tl.store(scores_ptr + offs, scores, mask=omask)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + re, mask=emask, other=0.0)
        if IMAGE:
            ibias = tl.load(ibias_ptr + re, mask=emask, other=0.0)
            img = tl.load(imask_ptr + rt, mask=tmask, other=0) != 0
            tl.store(choice_ptr + offs, scores + tl.where(img[:, None], ibias[None, :], bias[None, :]), mask=omask)
        else:
            tl.store(choice_ptr + offs, scores + bias[None, :], mask=omask)


@triton.jit
def _route_kernel(scores_ptr, pick_ptr, ids_ptr, table_ptr, w_out_ptr, i_out_ptr,
                  T, E, K, s_tab, route_scale, norm_eps,
                  HASH: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr, K_P2: tl.constexpr):
    """Per token: expert ids (``pick[t]`` from top-k, or ``table[ids[t]]`` when HASH), their unbiased
    scores, divided by ``sum + norm_eps`` (NORM), times route_scale -> weights fp32 / ids int32 ``[T, K]``."""
    rt = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rj = tl.arange(0, K_P2)
    mask = (rt < T)[:, None] & (rj < K)[None, :]
    if HASH:
        tok = tl.load(ids_ptr + rt, mask=rt < T, other=0).to(tl.int64)
        idx = tl.load(table_ptr + tok[:, None] * s_tab + rj[None, :], mask=mask, other=0).to(tl.int64)
    else:
        idx = tl.load(pick_ptr + rt[:, None] * K + rj[None, :], mask=mask, other=0).to(tl.int64)
    w = tl.load(scores_ptr + rt[:, None] * E + idx, mask=mask, other=0.0)
    if NORM:
        total = tl.where(rt < T, tl.sum(w, axis=1) + norm_eps, 1.0)        # padding rows: no 0 / 0
        w = tl.math.div_rn(w, tl.broadcast_to(total[:, None], (BLOCK_T, K_P2)))
    w = w * route_scale
    tl.store(w_out_ptr + rt[:, None] * K + rj[None, :], w, mask=mask)
    tl.store(i_out_ptr + rt[:, None] * K + rj[None, :], idx.to(tl.int32), mask=mask)


def _gate_tiles(t: int, e: int, softmax: bool, interp: bool) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_E, BLOCK_K, num_warps) of the gate kernel."""
    if interp:
        block_t, block_e = 16, 16
    else:
        block_t = 16 if t <= 16 else (32 if t <= 256 else 64)
        # few tokens: narrow expert tiles so that the weight stream spreads over many programs
        block_e = 16 if t <= 64 else 64
    if softmax:
        block_e = max(16, next_pow2(e))
        block_t = min(block_t, max(16, 8192 // block_e))
    num_warps = 4 if block_t * block_e <= 4096 else 8
    return block_t, block_e, 64, num_warps


def _softmax_experts(args: R.Args) -> int | None:
    """E when the scores are a softmax (the only score function that needs a whole row), else None."""
    return args["weight"].shape[0] if args.get("score_func") == "softmax" else None


@implements("moe_gate", "triton", requires=(
    R.at_most("experts E with softmax scores", MAX_SOFTMAX_EXPERTS, _softmax_experts,
              why="one program holds a whole row of scores"),
    R.min_capability(8, 0, tensor="x", why="TF32 MMA of the gate GEMM")))
def moe_gate(x: torch.Tensor, weight: torch.Tensor, topk: int, bias: torch.Tensor | None = None,
             score_func: str = "sqrtsoftplus", route_scale: float = 1.0, tid2eid: torch.Tensor | None = None,
             input_ids: torch.Tensor | None = None, gate_temp: float = 1.0, image_bias: torch.Tensor | None = None,
             image_mask: torch.Tensor | None = None, norm_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token of x ``[T, D]`` (float) over the ``E`` experts of weight ``[E, D]`` (float).

    V4.1: the logits are divided by ``gate_temp`` (IEEE division in the kernel); ``image_bias`` fp32
    ``[E]`` replaces bias on the tokens where ``image_mask`` bool ``[T]`` is set; ``norm_eps`` is added
    to the normalising sum.

    bias fp32 ``[E]`` steers the choice only; tid2eid int ``[vocab, topk]`` with input_ids int ``[T]``
    replaces the top-k (hash routing; ranges are the ops layer's value checks). Returns weights fp32
    ``[T, topk]`` (unbiased chosen scores, normalised for sqrtsoftplus/sigmoid, times route_scale) and
    int32 ids ``[T, topk]`` (descending choice score; hash routing: the table's order).
    """
    t, d = x.shape
    e = weight.shape[0]
    device = x.device
    out_w = torch.empty((t, topk), dtype=torch.float32, device=device)
    out_i = torch.empty((t, topk), dtype=torch.int32, device=device)
    if t == 0:
        return out_w, out_i
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    interp = interpreting(x)
    hashed = tid2eid is not None
    use_bias = bias is not None and not hashed
    bias = bias.contiguous() if use_bias else None
    scores = torch.empty((t, e), dtype=torch.float32, device=device)
    choice = torch.empty((t, e), dtype=torch.float32, device=device) if use_bias else scores
    image = use_bias and image_bias is not None and image_mask is not None
    if d == 0:
        # no features: every logit is 0 (no kernel launch needed; 0 / gate_temp is 0)
        scores.copy_(_score_of_zero(score_func, e, device).expand(t, e))
        if use_bias:
            step_bias = torch.where(image_mask.unsqueeze(1), image_bias, bias) if image else bias
            torch.add(scores, step_bias, out=choice)
    else:
        block_t, block_e, block_k, warps = _gate_tiles(t, e, score_func == "softmax", interp)
        prec = "tf32x3" if torch.float32 in (x.dtype, weight.dtype) else "tf32"
        ibias = image_bias.contiguous() if image else scores
        imask = image_mask.contiguous().view(torch.uint8) if image else scores
        _gate_kernel[(cdiv(t, block_t), cdiv(e, block_e))](
            x, weight, bias if use_bias else scores, scores, choice, ibias, imask, t, e, d,
            x.stride(0), weight.stride(0), scores.stride(0), float(gate_temp),
            SCORE=SCORE_FUNCS.index(score_func), HAS_BIAS=use_bias, PREC=prec,
            TEMP=gate_temp != 1.0, IMAGE=image,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k, num_warps=warps)
    if hashed:
        pick = out_i                                      # unused by the HASH kernel
        ids, table = input_ids.contiguous(), tid2eid
        table = table if table.stride(-1) == 1 else table.contiguous()
    else:
        pick = choice.topk(topk, dim=-1).indices          # int64 [T, topk], descending
        ids, table = out_i, out_i                          # unused without HASH
    block_t = 16 if interp else 64
    _route_kernel[(cdiv(t, block_t),)](
        scores, pick, ids, table, out_w, out_i, t, e, topk, table.stride(0) if hashed else 0, float(route_scale),
        float(norm_eps),
        HASH=hashed, NORM=score_func != "softmax", BLOCK_T=block_t, K_P2=next_pow2(topk), num_warps=4)
    return out_w, out_i


def _score_of_zero(score_func: str, e: int, device: torch.device) -> torch.Tensor:
    """The score of a zero logit (D = 0): fp32 ``[E]`` on ``device``."""
    zero = torch.zeros(e, dtype=torch.float32, device=device)
    if score_func == "softmax":
        return zero.softmax(-1)
    if score_func == "sigmoid":
        return zero.sigmoid()
    return torch.nn.functional.softplus(zero).sqrt()


# ============================================================================ moe_experts
@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, w_ptr, s2f_ptr, h_ptr, hs_ptr, R, I, limit, amax_floor, max_inv,
                   CLAMP: tl.constexpr, QUANT: tl.constexpr, POW2: tl.constexpr, S_E8M0: tl.constexpr,
                   OUT: tl.constexpr, SOFT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """h[r] = round_x(w_flat[s2f[r]] * (silu(gate[r]) * up[r])) with the swiglu clamp (CLAMP).

    QUANT: ``BLOCK_I`` is the 128 quantization block; h is then written as e4m3 bytes with the block
    scale in ``hs[r, block]`` (fp32, or the e8m0 byte when S_E8M0), exactly :func:`act_quant` of the
    rounded h. Grid ``(cdiv(R, BLOCK_R), cdiv(I, BLOCK_I))``.
    """
    rr = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ri = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    rmask = rr < R
    mask = rmask[:, None] & (ri < I)[None, :]
    offs = rr[:, None] * I + ri[None, :]
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CLAMP:
        u = clamp_nan(u, limit)
        g = tl.minimum(g, limit, propagate_nan=tl.PropagateNan.ALL)
    flat = tl.load(s2f_ptr + rr, mask=rmask, other=0)
    wr = tl.load(w_ptr + flat, mask=rmask, other=0.0)
    silu = tl.math.div_rn(g, 1.0 + tl.exp(-g))
    h = cast_out(wr[:, None] * (silu * u), OUT, SOFT)
    if QUANT:
        hf = h.to(tl.float32)
        bad = block_nonfinite(hf, 1)[:, None]   # act_quant's rule: NaN scale and payload for inf/NaN blocks
        amax = tl.maximum(tl.max(tl.abs(hf), axis=1), amax_floor)[:, None]
        hq, _, stored = fp8_block_quant(hf, amax, bad, max_inv, POW2, S_E8M0, SOFT)
        tl.store(h_ptr + offs, hq, mask=mask)
        s_offs = rr * tl.num_programs(1) + tl.program_id(1)
        tl.store(hs_ptr + s_offs[:, None], stored, mask=rmask[:, None])
    else:
        tl.store(h_ptr + offs, h, mask=mask)


def _swiglu(gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor, sorted_to_flat: torch.Tensor,
            swiglu_limit: float, out_dtype: torch.dtype,
            quant: tuple[bool, bool] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch :func:`_swiglu_kernel`: gate/up ``[R, I]`` -> h ``[R, I]`` in out_dtype, or with ``quant``
    = (pow2 scales, e8m0 storage) FP8 h and its scales ``[R, I/128]``."""
    r, inter = gate.shape
    dev = gate.device
    interp = interpreting(gate)
    if quant is None:
        h = torch.empty((r, inter), dtype=out_dtype, device=dev)
        hs = None
        block_i = min(128, next_pow2(inter))
    else:
        pow2, e8m0 = quant
        h = torch.empty((r, inter), dtype=F.FP8_DTYPE, device=dev)
        hs = torch.empty((r, inter // QUANT_BLOCK), dtype=torch.uint8 if e8m0 else torch.float32, device=dev)
        block_i = QUANT_BLOCK
    if r == 0 or inter == 0:
        return h, (hs.view(F.E8M0_DTYPE) if quant is not None and quant[1] else hs)
    block_r = 16 if interp else max(1, 2048 // block_i)     # sm_90: 16 x 128 tiles stay under ~150 registers
    pow2, e8m0 = quant if quant is not None else (False, False)
    _swiglu_kernel[(cdiv(r, block_r), cdiv(inter, block_i))](
        gate, up, weights, sorted_to_flat, h.view(torch.uint8) if quant is not None else h,
        hs if hs is not None else gate, r, inter, float(swiglu_limit), F.FP8_AMAX_FLOOR, F.FP8_MAX_INV,
        CLAMP=swiglu_limit > 0, QUANT=quant is not None, POW2=pow2, S_E8M0=e8m0, OUT=tl_dtype(out_dtype),
        SOFT=interp, BLOCK_R=block_r, BLOCK_I=block_i, num_warps=4)
    if hs is not None and e8m0:
        hs = hs.view(F.E8M0_DTYPE)
    return h, hs


def _gather_scale_rows(s: torch.Tensor, sorted_to_flat: torch.Tensor, k: int) -> torch.Tensor:
    """``s[sorted_to_flat // k]`` (rows of per-token activation scales, copied as bits) on the device."""
    n = sorted_to_flat.shape[0]
    cols = s.shape[1]
    out = torch.empty((n, cols), dtype=s.dtype, device=s.device)
    if n and cols:
        block_r, block_d = _row_tiles(cols, s.element_size())
        _gather_rows_kernel[(cdiv(n, block_r), cdiv(cols, block_d))](
            bits_view(s.contiguous()), sorted_to_flat, bits_view(out), n, cols, k,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return out


@implements("moe_experts", "triton", requires=(
    R.at_most("experts E", MAX_EXPERTS, "w1.shape[0]", why=EXPERTS_WHY),
    R.min_capability(8, 9, tensor="w1", only_for=(F.FP8_DTYPE, torch.uint8), why="FP8 activations and MMA"),
    R.min_capability(8, 0, tensor="w1", only_for=(torch.bfloat16,), why="bf16 MMA")))
def moe_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                w1_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                w3_scale: torch.Tensor | None = None, swiglu_limit: float = 0.0) -> torch.Tensor:
    """Routed SwiGLU experts: ``out[t] = sum_j W2[e] (weights[t, j] * silu(W1[e] x) * (W3[e] x))``, e = indices[t, j].

    x float ``[T, D]``; weights fp32 ``[T, k]``; indices int32 ``[T, k]`` in ``[0, E)`` (range checked by
    the ops layer); w1/w3 ``[E, I, D]`` and w2 ``[E, D, I]`` of x's float dtype, or FP8 with 128x128 tile
    scales ``[E, ceil(N/128), ceil(K/128)]`` (float32 or e8m0), or packed FP4 uint8 ``[E, N, K/2]``
    with e8m0 scales ``[E, N, K/32]``. ``swiglu_limit > 0`` clamps ``W3 x`` to ``[-limit, limit]`` and
    ``W1 x`` to ``<= limit``. Returns ``[T, D]`` in x's dtype.
    """
    t, d = x.shape
    k = indices.shape[1]
    e = w1.shape[0]
    if t == 0 or k == 0 or d == 0:
        return torch.zeros((t, d), dtype=x.dtype, device=x.device)
    idx = indices if indices.dtype == torch.int32 else indices.to(torch.int32)
    route = weights.contiguous().view(-1)
    x = x.contiguous()
    if w1.dtype not in (F.FP8_DTYPE, torch.uint8):
        xs, offsets, s2f = moe_dispatch(x, idx, e)
        gate = grouped_gemm(xs, w1, offsets, out_dtype=x.dtype)
        up = grouped_gemm(xs, w3, offsets, out_dtype=x.dtype)
        h, _ = _swiglu(gate, up, route, s2f, swiglu_limit, x.dtype, None)
        y = grouped_gemm(h, w2, offsets, out_dtype=x.dtype)
    else:
        e8m0 = w1_scale.dtype == F.E8M0_DTYPE
        sfmt, sdtype = ("ue8m0", F.E8M0_DTYPE) if e8m0 else (None, torch.float32)
        xq, xq_s = act_quant(x, QUANT_BLOCK, sfmt, sdtype)          # once per token; rows moved below
        xq_sorted, offsets, s2f = moe_dispatch(xq, idx, e)
        xs_sorted = _gather_scale_rows(xq_s, s2f, k)
        gate = grouped_gemm(xq_sorted, w1, offsets, xs_sorted, w1_scale, x.dtype)
        up = grouped_gemm(xq_sorted, w3, offsets, xs_sorted, w3_scale, x.dtype)
        hq, hq_s = _swiglu(gate, up, route, s2f, swiglu_limit, x.dtype, (True if e8m0 else False, e8m0))
        y = grouped_gemm(hq, w2, offsets, hq_s, w2_scale, x.dtype)
    ones = torch.ones((t, k), dtype=torch.float32, device=x.device)
    return moe_combine(y, ones, s2f)


__all__ = ["moe_gate", "moe_experts", "SCORE_FUNCS", "MAX_SOFTMAX_EXPERTS", "MAX_EXPERTS"]
