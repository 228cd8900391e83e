"""The ragged KV compressor on Ascend: ``compressor_ragged`` -> vllm-ascend's ``_C_ascend.compressor``.

The CANN op computes what our op does (projections, gated pooling with overlap, RMSNorm, interleaved
rope on the last 64 dims) over a TH batch (``cu_seqlens``, ``start_pos``), with the state in a paged
fp32 cache. Our state layout is the op's ``cache_mode=1`` (continuous) layout, so the cache and the
block table pass through unchanged: position ``p`` of request ``i`` lives in row ``p % blk`` of block
``state_block_table[i, p // blk]`` as ``[kv | score + ape]``, a block id 0 is never written, and the
block stride may be padded (the op takes ``stride(0)``). What the adapter builds:

- ``rope_sin`` / ``rope_cos``: one fp32 row of 64 per output row, the entry's first position taken
  from our complex table and each frequency repeated for its pair (``rotary_mode=2``, interleave).
  The rows are those :func:`..reference.ragged_compress.entry_rows` lists, computed on the device,
  so no ``compressor_metadata`` call is needed (that op also builds KV-cache slots we do not use);
- ``norm_weight``: x's dtype on A3, fp32 on 950 (what each kernel reads);
- the output rows past the completed entries (the op leaves them unspecified): zeros, and -1 in
  ``entry_req`` / ``entry_pos``.

Numerics: the kernel normalizes the fp32 pooled entry and ropes it in fp32, casting once; the model
(and our reference) cast the pooled entry to x's dtype before the norm and round after the norm and
after the rope: the two differ by bf16 rounding. The weights must already be in x's dtype: the kernel
multiplies bf16 by bf16 (with fp32 accumulation), which is exact for V4, whose checkpoints store these
weights in bf16; fp32 weights run the reference (no silent rounding). Chips: the op's README lists
A3 and 950 (A2 is not supported there), so A2 runs the reference. The ``custom`` tier's compressor
has another schema (separate kv/score states, no ``cache_mode``) and is not bound.
"""
from __future__ import annotations

import torch

from v4hal.backends.reference import ragged_compress as ref
from v4hal.hal.registry import implements
from v4hal.ops.ragged_compress import coff_of, max_entries

from . import limits
from ._route import route
from .limits import always, fallback_when

COMPRESSOR = (("_C_ascend", "compressor"),)
#: (D, coff, ratio) of the op's three modes: C4A, C4Li, C128A
MODES = ((512, 2, 4), (128, 2, 4), (512, 1, 128))
ROPE_DIM = 64
_HALF = (torch.bfloat16, torch.float16)


def _mode(a: limits.Args) -> tuple[int, int, int]:
    return a["norm_weight"].shape[0], coff_of(a["ratio"]), a["ratio"]


def _hidden_ok(h: int) -> bool:
    return 1024 <= h <= 10240 and h % 512 == 0


def _block_ok(blk: int) -> bool:
    return blk % 16 == 0 and 16 <= blk <= 1024


limits.plan("compressor_ragged", {c: "_C_ascend.compressor (TH x, cache_mode=1, rotary_mode=2)" for c in ("A3", "950")},
            note="A2: not supported by the CANN compressor (its README)")
COMPRESSOR_LIMITS = (
    always("the CANN compressor does not support A2", ("A2",)),
    fallback_when("not one of the modes C4A (D=512, ratio 4), C4Li (D=128, ratio 4), C128A (D=512, ratio 128)",
                  lambda a: _mode(a) not in MODES),
    fallback_when("rope_head_dim != 64", lambda a: 2 * a["freqs_cis"].shape[1] != ROPE_DIM),
    fallback_when("hidden size H outside 1024..10240 or not a multiple of 512",
                  lambda a: not _hidden_ok(a["x"].shape[1])),
    fallback_when("x not bf16/fp16", lambda a: a["x"].dtype not in _HALF),
    fallback_when("wkv/wgate not in x's dtype (the kernel multiplies x by bf16/fp16 weights; V4's are bf16 values)",
                  lambda a: a["wkv"].dtype != a["x"].dtype),
    fallback_when("norm_weight not in x's dtype (A3 reads it so)",
                  lambda a: a["norm_weight"].dtype != a["x"].dtype, ("A3",)),
    fallback_when("state block size not a multiple of 16 in 16..1024",
                  lambda a: not _block_ok(a["state_cache"].shape[1])),
    fallback_when("no tokens or no requests", lambda a: a["x"].shape[0] == 0 or a["start_pos"].shape[0] == 0),
)


def rope_rows(freqs_cis: torch.Tensor, entry: torch.Tensor, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(sin, cos) [n, rope_head_dim]`` at positions ``entry * ratio``, each frequency repeated for its
    interleaved pair."""
    f = freqs_cis[(entry * ratio).clamp_max(freqs_cis.shape[0] - 1)]
    return (f.imag.float().repeat_interleave(2, dim=-1).contiguous(),
            f.real.float().repeat_interleave(2, dim=-1).contiguous())


@implements("compressor_ragged", "ascend", requires=COMPRESSOR_LIMITS)
def compressor_ragged(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, ape: torch.Tensor,
                      norm_weight: torch.Tensor, freqs_cis: torch.Tensor, state_cache: torch.Tensor,
                      state_block_table: torch.Tensor, cu_seqlens: torch.Tensor, start_pos: torch.Tensor,
                      ratio: int, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(entries [N, D], entry_req int32 [N], entry_pos int32 [N])`` of the completed entries; state_cache
    updated in place (see :func:`v4hal.ops.ragged_compress.compressor_ragged`)."""
    args = (x, wkv, wgate, ape, norm_weight, freqs_cis, state_cache, state_block_table, cu_seqlens, start_pos,
            ratio, norm_eps)
    chip, op, why = route("compressor_ragged", COMPRESSOR, *args)
    if op is None:
        return limits.fallback("compressor_ragged", chip, why, ref.compressor_ragged, *args)
    n = max_entries(x.shape[0], ratio, start_pos.shape[0])
    valid, req, entry = ref.entry_rows(cu_seqlens, start_pos, ratio, n)
    sin, cos = rope_rows(freqs_cis, entry, ratio)
    weight = norm_weight.float() if chip == "950" else norm_weight
    out = op(x.contiguous(), wkv.contiguous(), wgate.contiguous(), state_cache, ape.contiguous(),
             weight.contiguous(), sin, cos, state_block_table=state_block_table.contiguous(),
             cu_seqlens=cu_seqlens.contiguous(), seqused=None, start_pos=start_pos.contiguous(),
             rope_head_dim=ROPE_DIM, cmp_ratio=ratio, coff=coff_of(ratio), norm_eps=float(norm_eps),
             rotary_mode=2, cache_mode=1)
    entries = torch.where(valid.unsqueeze(1), out, torch.zeros((), dtype=out.dtype, device=out.device))
    entry_req = torch.where(valid, req, -1).to(torch.int32)
    entry_pos = torch.where(valid, entry, -1).to(torch.int32)
    return entries, entry_req, entry_pos
