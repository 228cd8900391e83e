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
    a2 = F.fp8_to_float(a.reshape(-1, k))
    sa = F.scale_to_float(a_s).reshape(-1, kb_count)
    sb = _fp8_weight_scales(b_s, n)                                    # [N, KB]
    bf = F.fp8_to_float(b)
    scales = sa.unsqueeze(1) * sb                                      # [M, N, KB]: a_s[kb] * b_s[n // 128, kb]
    acc = torch.zeros(a2.shape[0], n, dtype=torch.float32, device=a.device)
    for kb in range(kb_count):
        sl = slice(kb * _BLOCK, min(k, (kb + 1) * _BLOCK))
        acc += (a2[:, sl] @ bf[:, sl].T) * scales[..., kb]
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
    a2 = F.fp8_to_float(a.reshape(-1, k))
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


class GroupPlan:
    """How the rows of a grouped GEMM are batched, independent of the operands' values.

    Experts that own rows are bucketed by size class ``ceil(log2(count))``; each class becomes
    one padded batch ``[c, rows_max, K]`` (slot ``(i, r)`` = row ``offs[ex[i]] + r`` of x, zero
    padding past a shorter group). Built once per set of offsets and reused by every GEMM over
    the same grouping (the three projections of an MoE layer).
    """

    def __init__(self, group_offsets: torch.Tensor, distinct: list[int], m: int) -> None:
        """group_offsets int ``[E+1]`` (valid); distinct: its distinct group sizes, ascending."""
        self.m = m
        self.single = group_offsets.shape[0] == 2        # E == 1: one group holds every row
        self.whole = False
        # per class: (experts [c], source rows [c, rows_max], valid slots [c, rows_max] or None)
        self.classes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        if self.single or m == 0:
            return
        sizes: dict[int, list[int]] = {}
        for c in distinct:   # host bookkeeping over the distinct counts (ints), ascending
            if c > 0:
                sizes.setdefault((c - 1).bit_length(), []).append(c)      # bit_length(c - 1) = ceil(log2 c)
        offs = group_offsets.long()
        counts = offs.diff()
        active = torch.nonzero(counts).squeeze(1)                      # experts owning rows, ascending
        active_counts = counts[active]
        for members in sizes.values():
            lo, rows_max = members[0], members[-1]
            if len(sizes) == 1:
                experts, expert_counts = active, active_counts
            else:
                in_class = (active_counts >= lo) & (active_counts <= rows_max)
                experts, expert_counts = active[in_class], active_counts[in_class]
            pos = torch.arange(rows_max, device=offs.device)
            src = offs[experts].unsqueeze(1) + pos                     # [c, rows_max]
            valid = None
            if lo < rows_max:                                          # some group is shorter: padding
                valid = pos < expert_counts.unsqueeze(1)
                src = src.clamp_max(m - 1)
            self.classes.append((experts, src, valid))
        # one unpadded class: its rows, in order, are all of x's rows
        self.whole = len(self.classes) == 1 and self.classes[0][2] is None


def _check_offsets(group_offsets: torch.Tensor, e: int, m: int) -> list[int]:
    """Validate group_offsets int64 ``[E+1]``; returns the distinct per-expert row counts, ascending."""
    op = "grouped_gemm"
    if group_offsets.dtype not in (torch.int64, torch.int32) or tuple(group_offsets.shape) != (e + 1,):
        raise ShapeError(f"{op}: group_offsets must be int64 [E+1] = [{e + 1}], got {_describe(group_offsets)}")
    first, last = group_offsets[[0, -1]].tolist()
    # E == 1: the one count is last - first (no host round trip for it)
    distinct = [last - first] if e == 1 else torch.unique(group_offsets.long().diff()).tolist()
    if first != 0 or last != m or (distinct and distinct[0] < 0):
        raise RangeError(f"{op}: group_offsets must start at 0, end at M={m} and not decrease, "
                         f"got first {first}, last {last}")
    return distinct


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` for an integer index into dim 0 (index_select when t is contiguous: the same
    values and the same contiguous layout as advanced indexing, with less overhead)."""
    if t.is_contiguous():
        return t.index_select(0, index.reshape(-1)).view(*index.shape, *t.shape[1:])
    return t[index]


def _bucket_product(xp: torch.Tensor, xs: torch.Tensor | None, wf: torch.Tensor, ws: torch.Tensor | None,
                    k_blocks: int) -> torch.Tensor:
    """One bucket: padded rows xp fp32 ``[c, R, K]`` times wf fp32 ``[c, N, K]`` -> fp32 ``[c, R, N]``.

    xs fp32 ``[c, R, KB]`` row scales (None: float recipe, one bmm over all of K); ws fp32
    ``[c, N, KB]`` weight scales (None when folded into wf): one bmm per K block, scaled, summed.
    """
    if xs is None:
        return torch.bmm(xp, wf.transpose(1, 2))
    k = xp.shape[2]
    scales = xs.unsqueeze(2) if ws is None else xs.unsqueeze(2) * ws.unsqueeze(1)       # [c, R, 1 or N, KB]
    o = torch.zeros(xp.shape[0], xp.shape[1], wf.shape[1], dtype=torch.float32, device=xp.device)
    for kb in range(k_blocks):
        sl = slice(kb * _BLOCK, min(k, (kb + 1) * _BLOCK))
        o += torch.bmm(xp[:, :, sl], wf[:, :, sl].transpose(1, 2)) * scales[..., kb]
    return o


def _grouped_matmul(plan: GroupPlan, n: int, x_rows: torch.Tensor, x_row_scales: torch.Tensor | None,
                    weights: list[Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]],
                    k_blocks: int) -> list[torch.Tensor]:
    """Shared driver of the grouped GEMM: one fp32 ``[M, N]`` result per entry of ``weights``.

    x_rows fp32 ``[M, K]``; x_row_scales fp32 ``[M, KB]`` or None (float recipe); each
    ``weights[i](expert_ids)`` gives fp32 ``[c, N, K]`` and fp32 per-row weight scales ``[c, N, KB]``
    (or None when already folded in); ``expert_ids=None`` means every expert (E == 1).
    The padded rows of each bucket are built once and shared by all weight stacks.
    """
    m, device, k = plan.m, x_rows.device, x_rows.shape[1]
    if m == 0 or n == 0:
        return [torch.zeros(m, n, dtype=torch.float32, device=device) for _ in weights]
    if plan.single:   # one bucket of one expert, no padding
        xp = x_rows.contiguous().unsqueeze(0)
        xs = None if x_row_scales is None else x_row_scales.contiguous().unsqueeze(0)
        return [_bucket_product(xp, xs, *fn(None), k_blocks)[0] for fn in weights]
    outs: list[torch.Tensor | None] = [None] * len(weights)
    for experts, src_all, valid_all in plan.classes:
        rows_max = src_all.shape[1]
        per_expert = max(n * k, rows_max * k, rows_max * n)
        chunk = max(1, _CHUNK_ELEMS // max(per_expert, 1))
        for start in range(0, experts.shape[0], chunk):
            ex, src = experts[start:start + chunk], src_all[start:start + chunk]
            valid = None if valid_all is None else valid_all[start:start + chunk]
            xp = _rows(x_rows, src).contiguous()                               # [c, rows_max, K]
            xs = None if x_row_scales is None else _rows(x_row_scales, src).contiguous()   # [c, rows_max, KB]
            if valid is not None:
                xp.masked_fill_(~valid.unsqueeze(-1), 0.0)
                if xs is not None:
                    xs.masked_fill_(~valid.unsqueeze(-1), 0.0)
            whole = plan.whole and chunk >= experts.shape[0]
            for i, fn in enumerate(weights):
                o = _bucket_product(xp, xs, *fn(ex), k_blocks)                 # [c, rows_max, N]
                if whole:
                    outs[i] = o.reshape(m, n)      # the bucket is every row of x, in order
                    continue
                if outs[i] is None:
                    outs[i] = torch.zeros(m, n, dtype=torch.float32, device=device)
                if valid is not None:
                    outs[i][src[valid]] = o[valid]
                else:
                    outs[i][src.reshape(-1)] = o.reshape(-1, n)
    return outs


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
    return grouped_gemms(x, [(w, w_scale)], group_offsets, x_scale, out_dtype)[0]


def grouped_gemms(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None]],
                  group_offsets: torch.Tensor, x_scale: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.bfloat16, plan: GroupPlan | None = None) -> list[torch.Tensor]:
    """:func:`grouped_gemm` of one x against several weight stacks ``[(w, w_scale), ...]`` of one
    recipe and shape (the MoE gate and up projections): the same results as separate calls, with
    the validation, row grouping and activation decoding done once. ``plan``: a `GroupPlan` of
    these (already valid) offsets, which then are not checked again."""
    recipe = _recipe(x, weights[0][0], x_scale, weights[0][1])
    for w, w_scale in weights[1:]:
        if _recipe(x, w, x_scale, w_scale) != recipe or w.shape != weights[0][0].shape:
            raise ShapeError(f"grouped_gemms: every weight must share the first one's recipe and shape "
                             f"{_describe(weights[0][0])}, got {_describe(w)}")
    m, k = x.shape
    e, n = weights[0][0].shape[:2]
    if plan is None:
        plan = GroupPlan(group_offsets, _check_offsets(group_offsets, e, m), m)
    k_blocks = _ceil_div(k, _BLOCK)

    def gather(t: torch.Tensor, ex: torch.Tensor | None) -> torch.Tensor:
        """Experts ex of t (None: all, E == 1; a contiguous t then is its own gather, no copy)."""
        if ex is None:
            return t if t.is_contiguous() else t[torch.zeros(1, dtype=torch.long, device=t.device)]
        return _rows(t, ex)

    def expert_weights(w: torch.Tensor, w_scale: torch.Tensor | None):
        """ex -> (fp32 weights [c, N, K], fp32 per-row scales [c, N, KB] or None when folded in)."""
        if recipe == "float":
            return lambda ex: (gather(w, ex).float(), None)
        if recipe == "fp8":
            return lambda ex: (F.fp8_to_float(gather(w, ex)), _fp8_weight_scales(gather(w_scale, ex), n))
        return lambda ex: (_fp4_weight_to_float(gather(w, ex), gather(w_scale, ex)), None)

    if recipe == "float":
        x_rows, row_scales = x.float(), None
    else:
        x_rows, row_scales = F.fp8_to_float(x), F.scale_to_float(x_scale)
    outs = _grouped_matmul(plan, n, x_rows, row_scales, [expert_weights(w, w_scale) for w, w_scale in weights],
                           k_blocks)
    return [o.to(out_dtype) for o in outs]
