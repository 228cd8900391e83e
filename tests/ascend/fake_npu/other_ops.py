"""Schema checks + documented math of the MoE, quantization, GEMM, norm and rope stand-ins."""
from __future__ import annotations

from typing import Any

import torch

from v4hal.hal import formats as F

from . import kernels
from .contract import STATE, chips, desc, require, tensor

FLOATS = (torch.bfloat16, torch.float16, torch.float32)
HALF = (torch.bfloat16, torch.float16)
E8M0_CODE, FP4_CODE, FP8_CODE = 293, 296, 292


# --------------------------------------------------------------------------------------- gating
def gating(op: str, x: Any, k: int, bias: Any, input_ids: Any, tid2eid: Any, k_group: int, group_count: int,
           group_select_mode: int, renorm: int, norm_type: int, out_flag: bool, routed_scaling_factor: float,
           eps: float, norm_types: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tensor(op, "x", x, dtypes=FLOATS, ndim=2)
    t, e = x.shape
    require(e <= 2048, op, f"the expert count (x.shape[-1]) must be <= 2048, got {e}")
    require(norm_type in norm_types, op, f"norm_type must be one of {norm_types}, got {norm_type}")
    require(renorm == 0, op, f"renorm supports only 0, got {renorm}")
    require(group_select_mode in (0, 1), op, f"group_select_mode must be 0 or 1, got {group_select_mode}")
    require(group_count > 0 and e % group_count == 0 and e // group_count > 2, op,
            f"x.shape[-1] must split into group_count groups of more than 2, got E={e}, group_count={group_count}")
    require(-(-(e // group_count) // 32) * 32 * group_count <= 2048, op,
            "32-aligned group size x group_count must be <= 2048")
    require(1 <= k_group <= group_count, op, f"k_group must be in [1, group_count], got {k_group}")
    require(1 <= k <= e // group_count * k_group, op, f"k must be in [1, E/group_count*k_group], got {k}")
    if norm_type == 2:
        require(group_count == 1, op, "norm_type 2 (softplus) requires group_count == 1")
    if bias is not None:
        tensor(op, "bias", bias, dtypes=(x.dtype,), shape=(e,))
    require((input_ids is None) == (tid2eid is None), op, "input_ids and tid2eid go together")
    if input_ids is not None:
        tensor(op, "input_ids", input_ids, dtypes=(torch.int32, torch.int64), shape=(t,))
        tensor(op, "tid2eid", tid2eid, dtypes=(torch.int32, torch.int64), ndim=2)
        require(tid2eid.shape[1] == k, op, f"tid2eid's last dim must be k={k}, got {desc(tid2eid)}")
    y, idx, norm = kernels.gating(x, k, bias, input_ids, tid2eid, k_group, group_count, group_select_mode, norm_type,
                                  routed_scaling_factor, eps)
    return y, idx, (norm if out_flag else torch.zeros(0, dtype=torch.float32))


# ------------------------------------------------------------------------------ routing / unpermute
def init_routing_v2(op: str, x: Any, expert_idx: Any, scale: Any, offset: Any, active_num: int, expert_capacity: int,
                    expert_num: int, drop_pad_mode: int, expert_tokens_num_type: int, expert_tokens_num_flag: bool,
                    quant_mode: int, active_expert_range: list[int], row_idx_type: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """npu_moe_init_routing_v2 (op-plugin doc's numpy equivalent), dropless and unquantized."""
    tensor(op, "x", x, dtypes=FLOATS, ndim=2)
    tensor(op, "expert_idx", expert_idx, dtypes=(torch.int32,), ndim=2)
    t, k = expert_idx.shape
    require(x.shape[0] == t, op, f"x rows must match expert_idx rows, got {desc(x)} vs {desc(expert_idx)}")
    require(drop_pad_mode == 0, op, "the stand-in models dropless routing (drop_pad_mode=0)")
    require(quant_mode == -1 and scale is None and offset is None, op, "the stand-in models quant_mode=-1 only")
    require(row_idx_type in (0, 1), op, f"row_idx_type must be 0 or 1, got {row_idx_type}")
    require(expert_tokens_num_type in (0, 1, 2), op,
            f"expert_tokens_num_type must be 0, 1 or 2, got {expert_tokens_num_type}")
    limit = 5120 if expert_tokens_num_type == 2 else 10240
    require(0 <= expert_num <= limit, op, f"expert_num must be in [0, {limit}], got {expert_num}")
    start, end = (active_expert_range or [0, expert_num])
    require(0 <= start < end <= expert_num, op,
            f"active_expert_range must satisfy 0 <= start < end <= expert_num, got {active_expert_range}")
    require(active_num >= -1, op, f"active_num must be >= -1, got {active_num}")
    flat = expert_idx.reshape(-1).long()
    inside = (flat >= start) & (flat < end)
    key = torch.where(flat < start, torch.full_like(flat, torch.iinfo(torch.int32).max), flat)
    order = torch.sort(key, stable=True).indices
    n_valid = int(inside.sum())
    if row_idx_type == 1:
        row_idx = order.to(torch.int32)
    else:
        row_idx = torch.full_like(flat, -1)
        row_idx[order[:n_valid]] = torch.arange(n_valid, device=x.device)
        row_idx = row_idx.to(torch.int32)
    counts = torch.bincount(flat[inside] - start, minlength=end - start).to(torch.int64)
    if expert_tokens_num_type == 0:
        counts = torch.cumsum(counts, 0)
    elif expert_tokens_num_type == 2:
        nz = torch.nonzero(counts).squeeze(1)
        counts = torch.stack([nz + start, counts[nz]], dim=1)
    if not expert_tokens_num_flag:
        counts = torch.zeros(0, dtype=torch.int64)
    rows = n_valid if active_num in (-1, 0) else min(active_num, n_valid)
    expanded = x[torch.div(order[:rows], k, rounding_mode="floor")]
    return expanded, row_idx, counts, torch.zeros(0, dtype=torch.float32)


def token_unpermute(op: str, permuted_tokens: Any, sorted_indices: Any, probs: Any, padded_mode: bool,
                    restore_shape: Any) -> torch.Tensor:
    """npu_moe_token_unpermute: ``out[t] = sum_j probs[t, j] * permuted[sorted_indices[t*K + j]]``
    (sorted_indices maps each flat slot to its permuted row, as torch_npu's own test shows)."""
    tensor(op, "permuted_tokens", permuted_tokens, dtypes=FLOATS, ndim=2)
    rows = permuted_tokens.shape[0]
    tensor(op, "sorted_indices", sorted_indices, dtypes=(torch.int32,), shape=(rows,))
    require(not padded_mode and restore_shape is None, op, "the stand-in models padded_mode=False")
    require(bool((torch.sort(sorted_indices.long()).values == torch.arange(rows)).all()), op,
            "sorted_indices must be a permutation of the permuted rows")
    if probs is None:
        k = 1
        p = torch.ones(rows, 1)
    else:
        tensor(op, "probs", probs, dtypes=(permuted_tokens.dtype,), ndim=2)
        require(probs.numel() == rows, op, f"probs must hold one weight per permuted row, got {desc(probs)}")
        k, p = probs.shape[1], probs.float()
    gathered = permuted_tokens.float()[sorted_indices.long()].view(-1, k, permuted_tokens.shape[1])
    return (gathered * p.unsqueeze(-1)).sum(1).to(permuted_tokens.dtype)


# ----------------------------------------------------------------------------------- grouped GEMM
def grouped_matmul(op: str, x: Any, weight: Any, quant_args: dict[str, Any], group_list: Any, split_item: int,
                   group_type: Any, group_list_type: int, act_type: int, output_dtype: Any) -> list[torch.Tensor]:
    """npu_grouped_matmul, m-grouped single-tensor form (``group_type=0``, ``split_item`` 2/3), unquantized."""
    require(isinstance(x, list) and len(x) == 1 and isinstance(weight, list) and len(weight) == 1, op,
            "the stand-in models x=[X] and weight=[W] (single tensors)")
    require(all(v is None for v in quant_args.values()), op,
            "the stand-in models the unquantized recipe only, got "
            f"{[k for k, v in quant_args.items() if v is not None]}")
    require(split_item in (2, 3), op, f"single-tensor output needs split_item 2 or 3, got {split_item}")
    require(group_type == 0, op, f"group_type must be 0 (m-axis grouping), got {group_type}")
    require(act_type == 0, op, "act_type must be 0")
    xs, w = x[0], weight[0]
    tensor(op, "x[0]", xs, dtypes=FLOATS, ndim=2, contiguous=True)
    tensor(op, "weight[0]", w, dtypes=(xs.dtype,), ndim=3)
    e, kk, n = w.shape
    m, k = xs.shape
    require(kk == k, op, f"weight must be [E, K={k}, N], got {desc(w)}")
    require(max(k, n) < 65536, op, "inner axes must be < 65536")
    require(output_dtype in (None, xs.dtype), op, f"output_dtype must be None or x's dtype, got {output_dtype}")
    tensor(op, "group_list", group_list, dtypes=(torch.int64,), shape=(e,))
    require(e <= 1024, op, f"at most 1024 groups, got {e}")
    require(group_list_type in (0, 1), op, f"group_list_type must be 0 or 1 here, got {group_list_type}")
    vals = group_list.long()
    ends = vals if group_list_type == 0 else torch.cumsum(vals, 0)
    require(bool((vals >= 0).all()) and bool((ends[1:] >= ends[:-1]).all()) and int(ends[-1]) == m, op,
            f"group_list must describe the M={m} rows, got {vals.tolist()}")
    row_group = torch.bucketize(torch.arange(m), ends, right=True)
    out = torch.einsum("mk,mkn->mn", xs.float(), w.float()[row_group])
    return [out.to(xs.dtype)]


# ------------------------------------------------------------------------------------ quantizers
def dynamic_quant(op: str, x: Any, smooth_scales: Any, group_index: Any, dst_type: Any, quant_mode: str,
                  dst_type_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_dynamic_quant: per-row ``scale = rowMax(|x|) / DTYPE_MAX``, ``y = round(x / scale)``."""
    tensor(op, "x", x, dtypes=HALF)
    require(x.dim() > 1, op, f"x must have more than 1 dim, got {desc(x)}")
    require(smooth_scales is None and group_index is None, op, "the stand-in models no smooth_scales")
    require(quant_mode == "pertoken", op, f"quant_mode must be 'pertoken', got {quant_mode!r}")
    allowed = (None, torch.int8) + ((torch.float8_e4m3fn,) if STATE.chip == "950" else ())
    require(dst_type in allowed, op, f"dst_type must be one of {allowed} on {STATE.chip}, got {dst_type}")
    xf = x.float()
    dmax = 448.0 if dst_type == torch.float8_e4m3fn else 127.0
    scale = xf.abs().amax(-1) / dmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = xf / safe.unsqueeze(-1)
    y = F.fp8_round(q) if dst_type == torch.float8_e4m3fn else torch.round(q).clamp(-127, 127).to(torch.int8)
    return y, scale


def dynamic_mx_quant(op: str, x: Any, axis: int, round_mode: str, dst_type: Any, block_size: int, scale_alg: int,
                     dst_type_max: float, max_low_bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_dynamic_mx_quant (950): per 32-block e8m0 scale; ``scale_alg=1`` =
    ``2**ceil(log2(max(amax, max_low_bound) / dst_max))``, ``scale_alg=0`` = OCP
    ``2**(floor(log2(amax)) - emax)``; FP4 packed low nibble first; mxscale ``[M, ceil(K/64), 2]``."""
    chips(op, ("950",))
    tensor(op, "input", x, dtypes=HALF, ndim=2)
    require(axis == -1, op, "the stand-in models axis=-1")
    require(round_mode == "rint", op, f"round_mode must be 'rint', got {round_mode!r}")
    require(block_size == 32, op, f"block_size must be 32, got {block_size}")
    require(scale_alg in (0, 1), op, f"scale_alg must be 0 or 1, got {scale_alg}")
    require(dst_type in (FP4_CODE, FP8_CODE, torch.float8_e4m3fn), op,
            f"dst_type must be fp4_e2m1 (296) or fp8 e4m3, got {dst_type}")
    m, k = x.shape
    require(k % 32 == 0, op, f"the last dim must be a multiple of 32, got {k}")
    fp4 = dst_type == FP4_CODE
    dmax, emax = (6.0, 2) if fp4 else (448.0, 8)
    xb = x.float().view(m, k // 32, 32)
    amax = torch.maximum(xb.abs().amax(-1), torch.tensor(max_low_bound))
    if scale_alg == 1:
        s = F.pow2_ceil(amax / dmax)
    else:
        s = torch.exp2(torch.floor(torch.log2(amax)) - emax)
    v = (xb / s.unsqueeze(-1)).clamp(-dmax, dmax)
    y = F.pack_fp4(F.e2m1_encode(v).flatten(-2)) if fp4 else F.fp8_round(v).flatten(-2)
    sbytes = F.float_to_e8m0(s).view(torch.uint8)
    if sbytes.shape[1] % 2:
        sbytes = torch.cat([sbytes, sbytes.new_zeros(m, 1)], dim=1)
    return y, sbytes.view(m, -1, 2)


def quant_matmul(op: str, x1: Any, x2: Any, scale: Any, offset: Any, pertoken_scale: Any, bias: Any, output_dtype: Any,
                 x1_dtype: Any, x2_dtype: Any, pertoken_scale_dtype: Any, scale_dtype: Any, group_sizes: Any,
                 y_scale: Any) -> torch.Tensor:
    """npu_quant_matmul: int8 W8A8 (per-channel ``scale [N]``, per-token ``pertoken_scale [M]``) on every chip;
    MXFP8 (``group_sizes=[1, 1, 32]``, e8m0 scale dtypes, ``scale [K/64, N, 2]``, ``pertoken [M, K/64, 2]``) on 950."""
    require(offset is None and bias is None and y_scale is None, op, "the stand-in models no offset/bias/y_scale")
    tensor(op, "x1", x1, ndim=2, contiguous=True)
    tensor(op, "x2", x2, ndim=2)
    m, k = x1.shape
    require(x2.shape[0] == k, op, f"x2 must be [K={k}, N], got {desc(x2)}")
    n = x2.shape[1]
    require(k <= 65535 and n <= 65535, op, "the last dims of x1 and x2 must be <= 65535")
    if x1.dtype == torch.int8:
        require(x2.dtype == torch.int8, op, "x1 and x2 must share one dtype")
        require(group_sizes is None and scale_dtype is None and pertoken_scale_dtype is None, op,
                "int8 takes no MX arguments")
        tensor(op, "scale", scale, dtypes=(torch.float32, torch.bfloat16), ndim=1)
        require(scale.shape[0] in (1, n), op, f"scale must be [1] or [N={n}], got {desc(scale)}")
        tensor(op, "pertoken_scale", pertoken_scale, dtypes=(torch.float32,), shape=(m,))
        require(output_dtype == torch.bfloat16 or (output_dtype == torch.float16 and scale.dtype == torch.float32), op,
                f"int8 with pertoken_scale outputs bf16 (or fp16 with fp32 scale), got {output_dtype}")
        acc = torch.matmul(x1.double(), x2.double()).float()
        return (acc * pertoken_scale.unsqueeze(1) * scale.float().unsqueeze(0)).to(output_dtype)
    require(x1.dtype == torch.float8_e4m3fn, op, f"x1 must be int8 or float8_e4m3fn, got {desc(x1)}")
    chips(op + " (FP8/MX)", ("950",))
    require(x2.dtype == torch.float8_e4m3fn, op, "MXFP8 needs fp8 x2")
    require(list(group_sizes or []) == [1, 1, 32], op, f"MX mode needs group_sizes=[1, 1, 32], got {group_sizes}")
    require(scale_dtype == E8M0_CODE and pertoken_scale_dtype == E8M0_CODE, op,
            "MX scales need scale_dtype=pertoken_scale_dtype=float8_e8m0fnu (293), "
            f"got {scale_dtype}, {pertoken_scale_dtype}")
    require(k % 32 == 0, op, f"MX needs K % 32 == 0, got {k}")
    kb = k // 32
    pairs = -(-kb // 2)
    tensor(op, "scale", scale, dtypes=(torch.uint8, torch.float8_e8m0fnu), shape=(pairs, n, 2), contiguous=True)
    tensor(op, "pertoken_scale", pertoken_scale, dtypes=(torch.uint8, torch.float8_e8m0fnu), shape=(m, pairs, 2),
           contiguous=True)
    require(output_dtype in (torch.bfloat16, torch.float16), op,
            f"MX output_dtype must be bf16/fp16, got {output_dtype}")
    sa = F.e8m0_to_float(pertoken_scale.view(torch.uint8).reshape(m, -1)[:, :kb])          # [M, K/32]
    sb = F.e8m0_to_float(scale.view(torch.uint8).transpose(0, 1).reshape(n, -1)[:, :kb])   # [N, K/32]
    part = torch.einsum("mbk,bkn->mbn", x1.float().view(m, kb, 32), x2.float().view(kb, 32, n))
    out = (part * sa.unsqueeze(-1) * sb.t().unsqueeze(0)).sum(1)
    return out.to(output_dtype)


# ------------------------------------------------------------------------------------ norm / rope
def rms_norm(op: str, x: Any, gamma: Any, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    tensor(op, "self", x, dtypes=FLOATS)
    require(2 <= x.dim() <= 8, op, f"self must have 2-8 dims, got {desc(x)}")
    tensor(op, "gamma", gamma)
    require(tuple(gamma.shape) == tuple(x.shape[x.dim() - gamma.dim():]), op,
            f"gamma must match self's trailing dims, got {desc(gamma)}")
    pairs = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
             (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)}
    require((x.dtype, gamma.dtype) in pairs, op, f"unsupported (self, gamma) dtypes ({x.dtype}, {gamma.dtype})")
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def rotary_mul(op: str, x: Any, r1: Any, r2: Any, rotary_mode: str, rotate: Any) -> torch.Tensor:
    """npu_rotary_mul: ``x * cos + rotate(x) * sin``; interleave: rotate pairs (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])."""
    require(rotary_mode in ("half", "interleave"), op,
            f"rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    require(rotate is None, op, "the stand-in models rotate=None")
    tensor(op, "input", x, dtypes=FLOATS, ndim=(3, 4))
    tensor(op, "r1", r1, dtypes=(x.dtype,), ndim=x.dim())
    tensor(op, "r2", r2, dtypes=(x.dtype,), shape=tuple(r1.shape))
    d = x.shape[-1]
    require(d < 896 and d % 2 == 0, op, f"D must be even and < 896, got {d}")
    if rotary_mode == "interleave":
        if x.dim() == 3:   # TND with T1D
            require(tuple(r1.shape) == (x.shape[0], 1, d), op, f"TND interleave needs r1 [T, 1, D], got {desc(r1)}")
            require(x.shape[1] < 1000, op, f"N must be < 1000, got {x.shape[1]}")
        else:              # BSND with 1S1D
            require(tuple(r1.shape) == (1, x.shape[1], 1, d), op,
                    f"BSND interleave needs r1 [1, S, 1, D], got {desc(r1)}")
            require(x.shape[0] * x.shape[2] < 1000, op, "B*N must be < 1000")
        rot = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat((-x2, x1), dim=-1)
    return (x.float() * r1.float() + rot.float() * r2.float()).to(x.dtype)


def hc_pre(op: str, x: Any, hc_fn: Any, hc_scale: Any, hc_base: Any, hc_mult: int, iters: int, norm_eps: float,
           hc_eps: float, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vllm-ascend torch_binding checks of npu_hc_pre_v2: bf16 x ``[T, 4, D]`` / ``[B, S, 4, D]``, D 4096/7168."""
    tensor(op, "x", x, dtypes=(torch.bfloat16,), ndim=dims, contiguous=True)
    require(all(s > 0 for s in x.shape), op, f"x's shape must be positive, got {desc(x)}")
    require(hc_mult == 4 and x.shape[-2] == 4, op,
            f"hc_mult and the hc of x support only 4, got {hc_mult}, {x.shape[-2]}")
    d = x.shape[-1]
    require(d in (4096, 7168), op, f"the d of x supports only 4096 or 7168, got {d}")
    tensor(op, "hc_fn", hc_fn, dtypes=(torch.float32,), shape=(24, 4 * d))
    tensor(op, "hc_scale", hc_scale, dtypes=(torch.float32,), shape=(3,))
    tensor(op, "hc_base", hc_base, dtypes=(torch.float32,), shape=(24,))
    lead = x.shape[:-2]
    y, post, comb = kernels.hc_pre(x.reshape(-1, 4, d), hc_fn, hc_scale, hc_base, 4, iters, norm_eps, hc_eps)
    return y.to(torch.bfloat16).view(*lead, d), post.view(*lead, 4), comb.view(*lead, 4, 4)


def hc_post(op: str, x: Any, residual: Any, post: Any, comb: Any) -> torch.Tensor:
    """vllm-ascend torch_binding checks of npu_hc_post: x ``[B, S, D]``, residual ``[B, S, hc, D]``."""
    tensor(op, "x", x, dtypes=FLOATS, ndim=3)
    b, s, d = x.shape
    tensor(op, "residual", residual, dtypes=(x.dtype,), ndim=4)
    hc = residual.shape[2]
    require(tuple(residual.shape) == (b, s, hc, d), op, f"residual must be [B, S, hc, D], got {desc(residual)}")
    tensor(op, "post", post, dtypes=FLOATS, shape=(b, s, hc))
    tensor(op, "comb", comb, dtypes=(post.dtype,), shape=(b, s, hc, hc))
    return kernels.hc_post(x, residual, post, comb).to(residual.dtype)
