"""Reference block-scaled GEMMs: FP8 x FP8 (128x128 weight tiles), FP8 x MXFP4, and the grouped
(MoE, contiguous layout) GEMM over E expert matrices. Pure PyTorch, fp32 accumulation.

Accumulation follows the public DeepSeek-V4 ``inference/kernel.py`` (``fp8_gemm_kernel``,
``fp4_gemm_kernel``): the product of each 128-wide K slice is computed in fp32 and then scaled,
``acc += (A_kb @ B_kb^T) * (a_s[kb] * b_s[n // 128, kb])``. For FP4 weights the e8m0 scale of
every 32-wide slice is folded into the decoded weight first (a power of two times an e2m1 value
is exact in fp32), so each 128-wide slice is scaled by the activation scale only; this equals
the kernel's per-32 scaling up to fp32 summation order. K need not be a multiple of 128 (the
last block is partial, scales are ``ceil(K/128)`` wide).

The grouped GEMM has no Python loop over experts: experts are bucketed by their row count
(power-of-two classes), each bucket is padded to its largest group and multiplied with one
``torch.bmm`` (per K block for the quantized recipes); padding waste is below 2x per bucket and
bucket chunks are sized to bound memory. Only experts that own rows are dequantized.
"""
from __future__ import annotations

from typing import Callable

import torch

from v4hal.hal import formats as F
from v4hal.hal.errors import DTypeError, RangeError, ShapeError

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_SCALES = (torch.float32, F.E8M0_DTYPE)
_BLOCK = F.FP8_BLOCK                 # activation K block / FP8 weight tile
_FP4_BLOCK = F.FP4_BLOCK             # FP4 weight K block
_CHUNK_ELEMS = 1 << 25               # fp32 elements per bmm operand before a bucket is split


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"


def _check_scale(op: str, name: str, s: torch.Tensor, shape: tuple[int, ...]) -> None:
    if s.dtype not in _SCALES:
        raise DTypeError(f"{op}: {name} must be float32 or float8_e8m0fnu, got {_describe(s)}")
    if tuple(s.shape) != tuple(shape):
        raise ShapeError(f"{op}: {name} must be {list(shape)}, got {_describe(s)}")


def _check_act(op: str, a: torch.Tensor, a_s: torch.Tensor, scale_dtype: torch.dtype) -> None:
    if a.dtype != F.FP8_DTYPE or a.dim() < 1:
        raise DTypeError(f"{op}: a must be float8_e4m3fn [..., K], got {_describe(a)}")
    _check_scale(op, "a_s", a_s, (*a.shape[:-1], _ceil_div(a.shape[-1], _BLOCK)))
    if a_s.dtype != scale_dtype:
        raise DTypeError(f"{op}: a_s must have scale_dtype {scale_dtype}, got {_describe(a_s)}")


def _fp4_weight_to_float(b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 ``[..., N, K/2]`` with scales ``[..., N, K/32]`` -> fp32 ``[..., N, K]`` (exact)."""
    vals = F.e2m1_decode(F.unpack_fp4(b)).unflatten(-1, (-1, _FP4_BLOCK))
    return (vals * F.scale_to_float(b_s).unsqueeze(-1)).flatten(-2)


def _fp8_weight_scales(b_s: torch.Tensor, n: int) -> torch.Tensor:
    """Tile scales ``[..., ceil(N/128), KB]`` -> fp32 per output row ``[..., N, KB]``."""
    return F.scale_to_float(b_s).repeat_interleave(_BLOCK, dim=-2)[..., :n, :]


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             scale_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``C[..., n] = sum_kb (A_kb . B[n]_kb) * a_s[..., kb] * b_s[n // 128, kb]`` in fp32.

    a fp8 ``[..., K]``, a_s ``[..., ceil(K/128)]`` (dtype ``scale_dtype``: float32 or e8m0);
    b fp8 ``[N, K]``, b_s ``[ceil(N/128), ceil(K/128)]`` (float32 or e8m0). Out ``[..., N]`` in
    ``out_dtype``.
    """
    op = "fp8_gemm"
    _check_act(op, a, a_s, scale_dtype)
    if b.dtype != F.FP8_DTYPE or b.dim() != 2 or b.shape[1] != a.shape[-1]:
        raise ShapeError(f"{op}: b must be float8_e4m3fn [N, K={a.shape[-1]}], got {_describe(b)}")
    n, k = b.shape
    kb_count = _ceil_div(k, _BLOCK)
    _check_scale(op, "b_s", b_s, (_ceil_div(n, _BLOCK), kb_count))
    a2 = a.reshape(-1, k).float()
    sa = F.scale_to_float(a_s).reshape(-1, kb_count)
    sb = _fp8_weight_scales(b_s, n)                                    # [N, KB]
    bf = b.float()
    acc = torch.zeros(a2.shape[0], n, dtype=torch.float32, device=a.device)
    for kb in range(kb_count):
        sl = slice(kb * _BLOCK, min(k, (kb + 1) * _BLOCK))
        acc += (a2[:, sl] @ bf[:, sl].T) * (sa[:, kb:kb + 1] * sb[:, kb])
    return acc.to(out_dtype).reshape(*a.shape[:-1], n)


def fp4_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             scale_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``C = A @ B^T`` with A fp8 ``[..., K]`` + a_s ``[..., ceil(K/128)]`` (``scale_dtype``) and B
    packed e2m1 uint8 ``[N, K/2]`` + e8m0 scales ``[N, K/32]``; fp32 accumulation, out ``[..., N]``."""
    op = "fp4_gemm"
    _check_act(op, a, a_s, scale_dtype)
    k = a.shape[-1]
    if b.dtype != torch.uint8 or b.dim() != 2 or 2 * b.shape[1] != k:
        raise ShapeError(f"{op}: b must be uint8 (packed e2m1) [N, K/2={k // 2}], got {_describe(b)}")
    if k % _FP4_BLOCK:
        raise ShapeError(f"{op}: K ({k}) must be divisible by {_FP4_BLOCK}")
    n = b.shape[0]
    _check_scale(op, "b_s", b_s, (n, k // _FP4_BLOCK))
    kb_count = _ceil_div(k, _BLOCK)
    a2 = a.reshape(-1, k).float()
    sa = F.scale_to_float(a_s).reshape(-1, kb_count)
    bf = _fp4_weight_to_float(b, b_s)
    acc = torch.zeros(a2.shape[0], n, dtype=torch.float32, device=a.device)
    for kb in range(kb_count):
        sl = slice(kb * _BLOCK, min(k, (kb + 1) * _BLOCK))
        acc += (a2[:, sl] @ bf[:, sl].T) * sa[:, kb:kb + 1]
    return acc.to(out_dtype).reshape(*a.shape[:-1], n)


# ------------------------------------------------------------------------------- grouped GEMM
def _recipe(x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor | None,
            w_scale: torch.Tensor | None) -> str:
    """Validate the operand combination of :func:`grouped_gemm`; returns 'float', 'fp8' or 'fp4'."""
    op = "grouped_gemm"
    if x.dim() != 2 or w.dim() != 3:
        raise ShapeError(f"{op}: x must be [M, K] and w [E, N, K(/2)], got x {_describe(x)}, w {_describe(w)}")
    m, k = x.shape
    e, n = w.shape[:2]
    if x.dtype in _FLOATS:
        if w.dtype != x.dtype:
            raise DTypeError(f"{op}: float x takes w of the same dtype {x.dtype}, got w {_describe(w)}")
        if x_scale is not None or w_scale is not None:
            raise DTypeError(f"{op}: the float recipe takes no scales, got x_scale/w_scale")
        if w.shape[2] != k:
            raise ShapeError(f"{op}: w must be [E, N, K={k}], got {_describe(w)}")
        return "float"
    if x.dtype != F.FP8_DTYPE:
        raise DTypeError(f"{op}: x must be float or float8_e4m3fn [M, K], got {_describe(x)}")
    if x_scale is None or w_scale is None:
        raise DTypeError(f"{op}: fp8 x needs x_scale and w_scale")
    _check_scale(op, "x_scale", x_scale, (m, _ceil_div(k, _BLOCK)))
    if w.dtype == F.FP8_DTYPE:
        if w.shape[2] != k:
            raise ShapeError(f"{op}: fp8 w must be [E, N, K={k}], got {_describe(w)}")
        _check_scale(op, "w_scale", w_scale, (e, _ceil_div(n, _BLOCK), _ceil_div(k, _BLOCK)))
        return "fp8"
    if w.dtype == torch.uint8:
        if 2 * w.shape[2] != k or k % _FP4_BLOCK:
            raise ShapeError(f"{op}: FP4 w must be uint8 [E, N, K/2={k // 2}] with K % 32 == 0, got {_describe(w)}")
        _check_scale(op, "w_scale", w_scale, (e, n, k // _FP4_BLOCK))
        return "fp4"
    raise DTypeError(f"{op}: w must be float, float8_e4m3fn or uint8 (packed e2m1), got {_describe(w)}")


def _check_offsets(group_offsets: torch.Tensor, e: int, m: int) -> torch.Tensor:
    """group_offsets int64 ``[E+1]`` -> per-expert row counts int64 ``[E]`` (validated)."""
    op = "grouped_gemm"
    if group_offsets.dtype not in (torch.int64, torch.int32) or tuple(group_offsets.shape) != (e + 1,):
        raise ShapeError(f"{op}: group_offsets must be int64 [E+1] = [{e + 1}], got {_describe(group_offsets)}")
    offs = group_offsets.long()
    counts = offs[1:] - offs[:-1]
    first, last = int(offs[0]), int(offs[-1])
    if first != 0 or last != m or bool((counts < 0).any()):
        raise RangeError(f"{op}: group_offsets must start at 0, end at M={m} and not decrease, "
                         f"got first {first}, last {last}")
    return counts


def _grouped_matmul(m: int, n: int, counts: torch.Tensor, group_offsets: torch.Tensor,
                    x_rows: torch.Tensor, x_row_scales: torch.Tensor | None,
                    weights: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
                    k_blocks: int) -> torch.Tensor:
    """Shared driver of the grouped GEMM: returns fp32 ``[M, N]``.

    x_rows fp32 ``[M, K]``; x_row_scales fp32 ``[M, KB]`` or None (float recipe);
    ``weights(expert_ids)`` gives fp32 ``[c, N, K]`` and fp32 per-row weight scales ``[c, N, KB]``
    (or None when already folded in).
    """
    device = x_rows.device
    k = x_rows.shape[1]
    out = torch.zeros(m, n, dtype=torch.float32, device=device)
    if m == 0 or n == 0:
        return out
    e = counts.shape[0]
    offs = group_offsets.long()
    row_expert = torch.repeat_interleave(torch.arange(e, device=device), counts)           # [M]
    row_pos = torch.arange(m, device=device) - offs[row_expert]                              # [M]
    active = torch.nonzero(counts > 0).squeeze(1)
    # size class: ceil(log2(count)); a class holds groups within a factor 2 of each other
    size_class = torch.ceil(torch.log2(counts[active].double())).long()
    for cls in torch.unique(size_class).tolist():
        experts = active[size_class == cls]
        rows_max = int(counts[experts].max())
        per_expert = max(n * k, rows_max * k, rows_max * n)
        chunk = max(1, _CHUNK_ELEMS // max(per_expert, 1))
        for start in range(0, experts.shape[0], chunk):
            ex = experts[start:start + chunk]
            c = ex.shape[0]
            slot = torch.full((e,), -1, dtype=torch.long, device=device)
            slot[ex] = torch.arange(c, device=device)
            rows = torch.nonzero(slot[row_expert] >= 0).squeeze(1)
            rs, rp = slot[row_expert[rows]], row_pos[rows]
            xp = torch.zeros(c, rows_max, k, dtype=torch.float32, device=device)
            xp[rs, rp] = x_rows[rows]
            wf, ws = weights(ex)                                                   # [c, N, K], [c, N, KB]
            if x_row_scales is None:
                o = torch.bmm(xp, wf.transpose(1, 2))
            else:
                xs = torch.zeros(c, rows_max, k_blocks, dtype=torch.float32, device=device)
                xs[rs, rp] = x_row_scales[rows]
                o = torch.zeros(c, rows_max, n, dtype=torch.float32, device=device)
                for kb in range(k_blocks):
                    sl = slice(kb * _BLOCK, min(k, (kb + 1) * _BLOCK))
                    part = torch.bmm(xp[:, :, sl], wf[:, :, sl].transpose(1, 2))
                    scale = xs[:, :, kb:kb + 1] if ws is None else xs[:, :, kb:kb + 1] * ws[:, None, :, kb]
                    o += part * scale
            out[rows] = o[rs, rp]
    return out


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_offsets: torch.Tensor,
                 x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Grouped (MoE, contiguous layout) GEMM: rows ``group_offsets[e]:group_offsets[e+1]`` of x
    times expert e's ``w[e]^T``.

    Recipes: float x ``[M, K]`` with w ``[E, N, K]`` of the same dtype; fp8 x + x_scale
    ``[M, ceil(K/128)]`` with fp8 w + w_scale ``[E, ceil(N/128), ceil(K/128)]`` (same per-block
    formula as :func:`fp8_gemm`); fp8 x + x_scale with packed FP4 w uint8 ``[E, N, K/2]`` + e8m0
    w_scale ``[E, N, K/32]`` (as :func:`fp4_gemm`). group_offsets int64 ``[E+1]`` (0 first, M last,
    non-decreasing). fp32 accumulation; out ``[M, N]`` in ``out_dtype``.
    """
    recipe = _recipe(x, w, x_scale, w_scale)
    m, k = x.shape
    e, n = w.shape[:2]
    counts = _check_offsets(group_offsets, e, m)
    k_blocks = _ceil_div(k, _BLOCK)
    if recipe == "float":
        def weights(ex: torch.Tensor) -> tuple[torch.Tensor, None]:
            return w[ex].float(), None
        row_scales = None
    elif recipe == "fp8":
        def weights(ex: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return w[ex].float(), _fp8_weight_scales(w_scale[ex], n)
        row_scales = F.scale_to_float(x_scale)
    else:
        def weights(ex: torch.Tensor) -> tuple[torch.Tensor, None]:
            return _fp4_weight_to_float(w[ex], w_scale[ex]), None
        row_scales = F.scale_to_float(x_scale)
    out = _grouped_matmul(m, n, counts, group_offsets, x.float(), row_scales, weights, k_blocks)
    return out.to(out_dtype)
