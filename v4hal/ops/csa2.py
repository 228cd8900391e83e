"""The V4.1 (CSA2) ragged KV compressor: ratio 2 (gated pooling of two tokens) or ratio 1 (one entry per
token), no overlapping windows and no position bias, with the unfinished groups kept in a paged fp32
state cache across calls.

``csa2_compressor_ragged`` does what a V4.1 KV-source layer's compressor does for many requests at their
own positions: the fp32 projections ``x @ wkv^T`` (and ``x @ wgate^T`` at ratio 2), the per-channel softmax
over the two tokens of a group weighting their kv, RMSNorm of the entry in x's dtype (the *latent*, which
the index-source layer's indexer keys are computed from), then rope on its last ``rope_head_dim`` dims
at the group's first position ``g * ratio``. It stops before the FP4 round trip, which is the write into
the compressed cache. Only KV-source layers run it; the layers that reuse a source read its cache.

State cache (ratio 2 only): position ``p`` of request ``i`` owns row ``p % blk`` of block
``state_block_table[i, p // blk]``, holding ``[kv (D) | gate logit (D)]`` in fp32; an id 0 means
"not kept" (block 0 is never written). Ratio 1 keeps no state: ``state_cache`` and ``state_block_table``
are neither read nor written (pass e.g. a ``[1, 1, 2*D]`` cache and a ``[B, 0]`` table).
"""
from __future__ import annotations

import torch

from . import _checks as C
from ._define import call, define_op
from .ragged_compress import check_ragged_shapes, check_ragged_values

#: The CSA2 compression ratios: 2 (pooled pairs, KV-source encoder layers) and 1 (per token).
CSA2_RATIOS: tuple[int, ...] = (1, 2)


def _check(x, wkv, wgate, norm_weight, freqs_cis, state_cache, state_block_table, cu_seqlens, start_pos,
           ratio, norm_eps):
    op = "csa2_compressor_ragged"
    C.one_of(op, "ratio", ratio, CSA2_RATIOS)
    C.eps_arg(op, "norm_eps", norm_eps)
    C.dtype(op, "x", x, C.FLOATS)
    C.rank(op, "x", x, (2,), "[T, H]")
    h = x.shape[1]
    C.dtype(op, "norm_weight", norm_weight, (torch.float32, torch.bfloat16))
    C.rank(op, "norm_weight", norm_weight, (1,), "[D]")
    d = norm_weight.shape[0]
    if d < 2:
        raise C.ShapeError(f"{op}: norm_weight must be [D] with D >= 2, got {C.describe(norm_weight)}")
    C.dtype(op, "wkv", wkv, (torch.float32, torch.bfloat16))
    C.shape(op, "wkv", wkv, (d, h), "[D, H]")
    if ratio == 1:
        if wgate is not None:
            raise C.ShapeError(f"{op}: wgate must be None at ratio 1 (no gate), got {C.describe(wgate)}")
    else:
        if wgate is None:
            raise C.ShapeError(f"{op}: wgate must be a [D, H] = [{d}, {h}] tensor at ratio 2, got None")
        C.dtype(op, "wgate", wgate, (wkv.dtype,))
        C.shape(op, "wgate", wgate, (d, h), "[D, H]")
    check_ragged_shapes(op, d, 2 * d, "2*D", freqs_cis, state_cache, state_block_table, cu_seqlens, start_pos)
    C.same_device(op, x=x, wkv=wkv, wgate=wgate, norm_weight=norm_weight, freqs_cis=freqs_cis,
                  state_cache=state_cache, state_block_table=state_block_table, cu_seqlens=cu_seqlens,
                  start_pos=start_pos)


def _value_check(x, wkv, wgate, norm_weight, freqs_cis, state_cache, state_block_table, cu_seqlens, start_pos,
                 ratio, norm_eps):
    op = "csa2_compressor_ragged"
    check_ragged_values(op, x, freqs_cis, state_cache if ratio > 1 else None,
                        state_block_table, cu_seqlens, start_pos, ratio, overlap=False)
    if ratio == 1 and state_block_table.numel():          # unused at ratio 1, but never a foreign block id
        ids = state_block_table.cpu()
        nb = state_cache.shape[0]
        if bool(((ids < 0) | (ids >= nb)).any()):
            raise C.RangeError(f"{op}: state_block_table ids must be in [0, {nb}) (0: no state kept), got "
                               f"[{int(ids.min())}, {int(ids.max())}]")


def _fake(x, wkv, wgate, norm_weight, freqs_cis, state_cache, state_block_table, cu_seqlens, start_pos,
          ratio, norm_eps):
    t, b = x.shape[0], start_pos.shape[0]
    n = torch.sym_min(t, t // ratio + b)
    d = norm_weight.shape[0]
    return (x.new_empty((n, d)), x.new_empty((n, d)), x.new_empty((n,), dtype=torch.int32),
            x.new_empty((n,), dtype=torch.int32))


define_op("csa2_compressor_ragged",
          "(Tensor x, Tensor wkv, Tensor? wgate, Tensor norm_weight, Tensor freqs_cis, Tensor(a!) state_cache, "
          "Tensor state_block_table, Tensor cu_seqlens, Tensor start_pos, int ratio, float norm_eps) "
          "-> (Tensor, Tensor, Tensor, Tensor)",
          check=_check, fake=_fake, value_check=_value_check,
          doc=C.ranges_doc(ratio="{1, 2}", norm_eps=C.EPS_RANGE) +
          " `wgate` is given at ratio 2 and None at ratio 1. Checked values: `cu_seqlens` non-decreasing from "
          "0 to T; `start_pos` >= 0; `freqs_cis` covers the first position of every completed entry; at ratio 2 "
          "every `state_block_table` row covers the positions its request touches, with ids in `[0, blocks)` (at "
          "ratio 1 the table is not read, but its ids must still be in `[0, blocks)`), no position this call "
          "reads in block 0, no two written positions sharing a state row, and no row "
          "both read and written.")


def csa2_compressor_ragged(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor | None, norm_weight: torch.Tensor,
                           freqs_cis: torch.Tensor, state_cache: torch.Tensor, state_block_table: torch.Tensor,
                           cu_seqlens: torch.Tensor, start_pos: torch.Tensor, ratio: int, norm_eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress the tokens of B requests (``x [T, H]`` float; request i is ``x[cu_seqlens[i]:cu_seqlens[i+1]]``
    at positions ``start_pos[i] ..``) into the entries they complete, V4.1's way.

    wkv: fp32 or bf16 ``[D, H]``; wgate: like wkv at ratio 2, None at ratio 1; norm_weight fp32 or bf16
    ``[D]``; freqs_cis complex64 ``[S, rope_head_dim/2]`` (the compress rope: rope on the last
    rope_head_dim dims, interleaved pairs, at the group's first position); state_cache fp32
    ``[blocks, blk, 2*D]`` (updated in place at ratio 2, untouched at ratio 1); state_block_table int32
    ``[B, M]``, cu_seqlens int32 ``[B+1]``, start_pos int32 ``[B]``; ratio 1 or 2.

    Returns ``(entries [N, D], latent [N, D]`` both in x's dtype, ``entry_req`` int32 ``[N]``, ``entry_pos``
    int32 ``[N])`` with ``N = min(T, T // ratio + B)``: the completed entries packed at the front, in request
    order then entry order; entry ``g`` of a request pools positions ``g*ratio .. g*ratio + ratio - 1`` and
    sits at position ``g*ratio``. ``latent`` is the normed entry before rope (the indexer keys' input);
    ``entries`` is it roped, before the FP4 round trip of the compressed cache. Unused rows hold zeros
    and -1.
    """
    return call.csa2_compressor_ragged(x, wkv, wgate, norm_weight, freqs_cis, state_cache, state_block_table,
                                       cu_seqlens, start_pos, int(ratio), float(norm_eps))
