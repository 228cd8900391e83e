"""Reference block-scaled GEMMs: FP8 x FP8 (128x128 or 32x32 weight tiles), FP8 x packed FP4 (a
scale per 32 or per 16 along K), and the grouped (MoE, contiguous layout) GEMM over E expert
matrices. Pure PyTorch, fp32 accumulation.

Accumulation follows the public DeepSeek-V4 ``inference/kernel.py`` (``fp8_gemm_kernel``,
``fp4_gemm_kernel``): the product of each 128-wide K slice is computed in fp32 and then scaled,
``acc += (A_kb @ B_kb^T) * (a_s[kb] * b_s[n // 128, kb])``. For FP4 weights the e8m0 scale of
every 32-wide slice is folded into the decoded weight first (a power of two times an e2m1 value
is exact in fp32), so each 128-wide slice is scaled by the activation scale only; this equals
the kernel's per-32 scaling up to fp32 summation order. The public ops take K a multiple of 128
(checked in :mod:`v4hal.ops.gemm`); the arithmetic here walks ``ceil(K/128)`` blocks, so a direct
call with a partial last block (``ceil(K/128)`` scales) computes the same formula.

The weight block is read from the weight scales' shape (validated by :mod:`v4hal.ops.gemm`).
With 32x32 FP8 tiles (V4.1) the K step is the tile: ``acc += (A_kb . B_kb) * (a_s[kb // 4] *
b_s[n // 32, kb])`` over 32-wide slices, the activation keeping its 1x128 scales. FP4 weights with
a scale per 16 (V4.1 routed experts) fold their scales into the decoded weight like per-32 ones.

The grouped GEMM has no Python loop over experts: experts are bucketed by their row count
(power-of-two classes), each bucket is padded to its largest group and multiplied with one
``torch.bmm`` (per K block for the quantized recipes); padding waste is below 2x per bucket and
bucket chunks are sized to bound memory. Only experts that own rows are dequantized, in every call,
unless the stack was decoded once ahead (:func:`prepare_weights`, what ``prepare_moe_experts``
asks of this backend after a model loads): the calls then gather rows of the fp32 stack, the same bits.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from v4hal.hal import formats as F
from v4hal.hal.registry import implements
from v4hal.ops._checks import contents_key
from v4hal.ops._prepare import register_preparer

from ._rows import pad_rows, row_matmul

_BLOCK = F.FP8_BLOCK                 # activation K block / FP8 weight tile
_SMALL_BLOCK = 32                    # V4.1 FP8 weight tile (32x32)
_CHUNK_ELEMS = 1 << 25               # fp32 elements per bmm operand before a bucket is split


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fp8_weight_block(b_s: torch.Tensor, k: int) -> int:
    """The tile of valid FP8 weight scales ``[..., ceil(N/wb), ceil(K/wb)]``: 128 or 32."""
    return _BLOCK if b_s.shape[-1] == _ceil_div(k, _BLOCK) else _SMALL_BLOCK


def fp4_weight_block(b_s: torch.Tensor, k: int) -> int:
    """The K block of valid packed-FP4 weight scales ``[..., N, K/wb]``: 32 or 16."""
    return k // b_s.shape[-1]


def _fp4_weight_to_float(b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 ``[..., N, K/2]`` with scales ``[..., N, K/wb]`` (wb 32 or 16) -> fp32 ``[..., N, K]`` (exact)."""
    block = fp4_weight_block(b_s, 2 * b.shape[-1])
    vals = F.e2m1_decode(F.unpack_fp4(b)).unflatten(-1, (-1, block))
    return (vals * F.scale_to_float(b_s).unsqueeze(-1)).flatten(-2)


def _fp8_weight_scales(b_s: torch.Tensor, n: int, block: int = _BLOCK) -> torch.Tensor:
    """Tile scales ``[..., ceil(N/block), KB]`` -> fp32 per output row ``[..., N, KB]``."""
    return F.scale_to_float(b_s).repeat_interleave(block, dim=-2)[..., :n, :]


def _act_scales_per(sa: torch.Tensor, step: int, k_steps: int) -> torch.Tensor:
    """fp32 activation scales per 128 ``[..., ceil(K/128)]`` -> per ``step``-wide K slice ``[..., k_steps]``."""
    if step == _BLOCK:
        return sa
    return sa.repeat_interleave(_BLOCK // step, dim=-1)[..., :k_steps]


def _decode_weights(w: torch.Tensor, w_scale: torch.Tensor | None, n: int,
                    step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights ``[..., N, K]`` (float / fp8) or ``[..., N, K/2]`` (packed FP4) with their scales -> fp32
    ``[..., N, K]`` and fp32 per-row scales ``[..., N, KB]`` (fp8, ``step``-wide K blocks) or None (float;
    FP4: folded into the weights). Element by element, so decoding a gathered subset of experts equals
    gathering the decoded stack."""
    if w.dtype == F.FP8_DTYPE:
        return F.fp8_to_float(w), _fp8_weight_scales(w_scale, n, step)
    if w.dtype == torch.uint8:
        return _fp4_weight_to_float(w, w_scale), None
    return w.float(), None


#: weights decoded once by `prepare_weights`: weight tensor -> (its `contents_key`, its scales' key, step,
#: fp32 weights ``[..., N, K]``, fp32 per-row scales ``[..., N, KB]`` or None)
_PREPARED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _fp8_step(w: torch.Tensor, w_scale: torch.Tensor | None) -> int:
    """The K width of one scaled block of a weight: its FP8 tile (128 or 32), else 128."""
    return fp8_weight_block(w_scale, w.shape[-1]) if w.dtype == F.FP8_DTYPE else _BLOCK


def prepare_weights(w: torch.Tensor, w_scale: torch.Tensor | None) -> bool:
    """Decode a weight once (`_decode_weights` of all of ``w``): later GEMM calls with this very ``w`` and
    ``w_scale`` use the fp32 form (the grouped GEMMs gather its experts' rows) instead of decoding the
    weight, or the picked experts, in every call; the results are the same bits. The entry is used only
    while both tensors keep the contents they had here (an in-place change, or other tensors, decode per
    call again) and lives as long as ``w``. Costs fp32 memory (4x an FP8 weight, 8x a packed FP4 one).
    Returns False (nothing kept) for fp32 weights, which the calls use as they are, and for inference
    tensors, which carry no version counter to tell a change.

    w: an expert stack ``[E, N, K]`` float / fp8 or uint8 ``[E, N, K/2]`` (FP4) with w_scale as
    `grouped_gemm` takes it (None for float), or one matrix ``[N, K]`` / ``[N, K/2]`` with b_s as
    `fp8_gemm` / `fp4_gemm` take it."""
    wkey = contents_key(w)
    skey = None if w_scale is None else contents_key(w_scale)
    if w.dtype == torch.float32 or wkey is None or (w_scale is not None and skey is None):
        return False
    step = _fp8_step(w, w_scale)
    with torch.no_grad():
        wf, sf = _decode_weights(w, w_scale, w.shape[-2], step)
    _PREPARED[w] = (wkey, skey, step, wf, sf)
    return True


def _prepared(w: torch.Tensor, w_scale: torch.Tensor | None,
              step: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The fp32 stack and per-row scales `prepare_weights` made of these very contents, or None."""
    got = _PREPARED.get(w)
    if got is None or got[0] != contents_key(w) or got[2] != step \
            or got[1] != (None if w_scale is None else contents_key(w_scale)):
        return None
    return got[3], got[4]


@implements("fp8_gemm", "reference")
def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             scale_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``C[..., n] = sum_kb (A_kb . B[n]_kb) * a_s[..., kb*wb // 128] * b_s[n // wb, kb]`` in fp32, over
    ``wb``-wide K slices (wb = the weight tile, 128 or 32).

    a fp8 ``[..., K]``, a_s ``[..., ceil(K/128)]`` (dtype ``scale_dtype``: float32 or e8m0);
    b fp8 ``[N, K]``, b_s ``[ceil(N/wb), ceil(K/wb)]`` (float32 or e8m0). Out ``[..., N]`` in
    ``out_dtype``.
    """
    n, k = b.shape
    wb = fp8_weight_block(b_s, k)
    kb_count = _ceil_div(k, wb)
    m = a.numel() // k if k else 0
    a2 = pad_rows(F.fp8_to_float(a.reshape(-1, k)))                     # rows padded once: row-invariant bits
    sa = _act_scales_per(pad_rows(F.scale_to_float(a_s).reshape(-1, _ceil_div(k, _BLOCK))), wb, kb_count)
    bf, sb = _prepared(b, b_s, wb) or _decode_weights(b, b_s, n, wb)   # fp32 [N, K], per-row scales [N, KB]
    scales = sa.unsqueeze(1) * sb                                      # [M, N, KB]: a_s[kb] * b_s[n // wb, kb]
    acc = torch.zeros(a2.shape[0], n, dtype=torch.float32, device=a.device)
    for kb in range(kb_count):
        sl = slice(kb * wb, min(k, (kb + 1) * wb))
        acc += (a2[:, sl] @ bf[:, sl].T) * scales[..., kb]
    return acc[:m].to(out_dtype).reshape(*a.shape[:-1], n)


@implements("fp4_gemm", "reference")
def fp4_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             scale_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``C = A @ B^T`` with A fp8 ``[..., K]`` + a_s ``[..., ceil(K/128)]`` (``scale_dtype``) and B
    packed e2m1 uint8 ``[N, K/2]`` + scales ``[N, K/32]`` or ``[N, K/16]`` (e8m0 or float32); fp32
    accumulation, out ``[..., N]``."""
    k, n = a.shape[-1], b.shape[0]
    kb_count = _ceil_div(k, _BLOCK)
    m = a.numel() // k if k else 0
    a2 = pad_rows(F.fp8_to_float(a.reshape(-1, k)))                     # rows padded once: row-invariant bits
    sa = pad_rows(F.scale_to_float(a_s).reshape(-1, kb_count))
    bf = (_prepared(b, b_s, _BLOCK) or _decode_weights(b, b_s, n, _BLOCK))[0]
    acc = torch.zeros(a2.shape[0], n, dtype=torch.float32, device=a.device)
    for kb in range(kb_count):
        sl = slice(kb * _BLOCK, min(k, (kb + 1) * _BLOCK))
        acc += (a2[:, sl] @ bf[:, sl].T) * sa[:, kb:kb + 1]
    return acc[:m].to(out_dtype).reshape(*a.shape[:-1], n)


# ------------------------------------------------------------------------------- grouped GEMM
def _recipe(x: torch.Tensor, w: torch.Tensor) -> str:
    """The operand combination of :func:`grouped_gemm`: 'float', 'fp8' (fp8 w) or 'fp4' (packed w)."""
    if x.dtype != F.FP8_DTYPE:
        return "float"
    return "fp8" if w.dtype == F.FP8_DTYPE else "fp4"


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


def _distinct_counts(group_offsets: torch.Tensor, e: int, m: int) -> list[int]:
    """The distinct per-expert row counts of valid ``group_offsets`` ``[E+1]``, ascending.

    The bucket shapes of the plan depend on them, so this reads the offsets on the host; it is
    skipped where the plan needs no buckets (one expert, or no rows)."""
    if e == 1 or m == 0:
        return [m]
    return torch.unique(group_offsets.long().diff()).tolist()


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` for an integer index into dim 0 (index_select when t is contiguous: the same
    values and the same contiguous layout as advanced indexing, with less overhead)."""
    if t.is_contiguous():
        return t.index_select(0, index.reshape(-1)).view(*index.shape, *t.shape[1:])
    return t[index]


def _bucket_product(xp: torch.Tensor, xs: torch.Tensor | None, wf: torch.Tensor, ws: torch.Tensor | None,
                    k_blocks: int, step: int = _BLOCK) -> torch.Tensor:
    """One bucket: padded rows xp fp32 ``[c, R, K]`` times wf fp32 ``[c, N, K]`` -> fp32 ``[c, R, N]``.

    xs fp32 ``[c, R, KB]`` row scales (None: float recipe, one bmm over all of K); ws fp32
    ``[c, N, KB]`` weight scales (None when folded into wf): one bmm per ``step``-wide K block
    (``KB = k_blocks`` of them), scaled, summed.
    """
    if xs is None:
        return row_matmul(xp, wf.transpose(1, 2))
    r = xp.shape[1]
    xp, xs = pad_rows(xp), pad_rows(xs)                                  # rows padded once: row-invariant bits
    k = xp.shape[2]
    scales = xs.unsqueeze(2) if ws is None else xs.unsqueeze(2) * ws.unsqueeze(1)       # [c, R, 1 or N, KB]
    o = torch.zeros(xp.shape[0], xp.shape[1], wf.shape[1], dtype=torch.float32, device=xp.device)
    for kb in range(k_blocks):
        sl = slice(kb * step, min(k, (kb + 1) * step))
        o += torch.bmm(xp[:, :, sl], wf[:, :, sl].transpose(1, 2)) * scales[..., kb]
    return o[:, :r]


def _grouped_matmul(plan: GroupPlan, n: int, x_rows: torch.Tensor, x_row_scales: torch.Tensor | None,
                    weights: list[Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]],
                    k_blocks: int, step: int = _BLOCK) -> list[torch.Tensor]:
    """Shared driver of the grouped GEMM: one fp32 ``[M, N]`` result per entry of ``weights``.

    x_rows fp32 ``[M, K]``; x_row_scales fp32 ``[M, KB]`` or None (float recipe); each
    ``weights[i](expert_ids)`` gives fp32 ``[c, N, K]`` and fp32 per-row weight scales ``[c, N, KB]``
    (or None when already folded in); ``expert_ids=None`` means every expert (E == 1). ``step``: the
    K width of one scaled block (``KB = k_blocks`` blocks; x_row_scales given per block).
    The padded rows of each bucket are built once and shared by all weight stacks.
    """
    m, device, k = plan.m, x_rows.device, x_rows.shape[1]
    if m == 0 or n == 0:
        return [torch.zeros(m, n, dtype=torch.float32, device=device) for _ in weights]
    if plan.single:   # one bucket of one expert, no padding
        xp = x_rows.contiguous().unsqueeze(0)
        xs = None if x_row_scales is None else x_row_scales.contiguous().unsqueeze(0)
        return [_bucket_product(xp, xs, *fn(None), k_blocks, step)[0] for fn in weights]
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
                o = _bucket_product(xp, xs, *fn(ex), k_blocks, step)           # [c, rows_max, N]
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


@implements("grouped_gemm", "reference")
def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_offsets: torch.Tensor,
                 x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Grouped (MoE, contiguous layout) GEMM: rows ``group_offsets[e]:group_offsets[e+1]`` of x
    times expert e's ``w[e]^T``.

    Recipes: float x ``[M, K]`` with w ``[E, N, K]`` of the same dtype; fp8 x + x_scale
    ``[M, ceil(K/128)]`` with fp8 w + w_scale ``[E, ceil(N/128), ceil(K/128)]`` (same per-block
    formula as :func:`fp8_gemm`; or 32x32 tiles ``[E, ceil(N/32), K/32]``); fp8 x + x_scale with packed
    FP4 w uint8 ``[E, N, K/2]`` + w_scale ``[E, N, K/32]`` or ``[E, N, K/16]`` (as :func:`fp4_gemm`).
    group_offsets int64 ``[E+1]`` (0 first, M last, non-decreasing). fp32 accumulation; out ``[M, N]``
    in ``out_dtype``.
    """
    return grouped_gemms(x, [(w, w_scale)], group_offsets, x_scale, out_dtype)[0]


def grouped_gemms(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None]],
                  group_offsets: torch.Tensor, x_scale: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.bfloat16, plan: GroupPlan | None = None) -> list[torch.Tensor]:
    """:func:`grouped_gemm` of one x against several weight stacks ``[(w, w_scale), ...]`` of one
    recipe and shape (the MoE gate and up projections): the same results as separate calls, with
    the row grouping and activation decoding done once. Every stack has the first one's dtype and
    shape (the caller's invariant). ``plan``: a `GroupPlan` of these offsets (built when None)."""
    recipe = _recipe(x, weights[0][0])
    m, k = x.shape
    e, n = weights[0][0].shape[:2]
    if plan is None:
        plan = GroupPlan(group_offsets, _distinct_counts(group_offsets, e, m), m)
    step = fp8_weight_block(weights[0][1], k) if recipe == "fp8" else _BLOCK   # K width of one scaled block
    k_blocks = _ceil_div(k, step)

    def gather(t: torch.Tensor, ex: torch.Tensor | None) -> torch.Tensor:
        """Experts ex of t (None: all, E == 1; a contiguous t then is its own gather, no copy)."""
        if ex is None:
            return t if t.is_contiguous() else t[torch.zeros(1, dtype=torch.long, device=t.device)]
        return _rows(t, ex)

    def expert_weights(w: torch.Tensor, w_scale: torch.Tensor | None):
        """ex -> (fp32 weights [c, N, K], fp32 per-row scales [c, N, KB] or None when folded in): rows of the
        prepared stack (`prepare_weights`), else the picked experts decoded in this call."""
        full = _prepared(w, w_scale, step)
        if full is not None:
            wf, sf = full
            return lambda ex: (gather(wf, ex), None if sf is None else gather(sf, ex))
        return lambda ex: _decode_weights(gather(w, ex), None if w_scale is None else gather(w_scale, ex), n, step)

    if recipe == "float":
        x_rows, row_scales = x.float(), None
    else:
        x_rows = F.fp8_to_float(x)
        row_scales = _act_scales_per(F.scale_to_float(x_scale), step, k_blocks)
    outs = _grouped_matmul(plan, n, x_rows, row_scales, [expert_weights(w, w_scale) for w, w_scale in weights],
                           k_blocks, step)
    return [o.to(out_dtype) for o in outs]


register_preparer("fp8_gemm", "reference", prepare_weights)
register_preparer("fp4_gemm", "reference", prepare_weights)
