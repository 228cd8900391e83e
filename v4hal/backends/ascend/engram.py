"""Engram on Ascend: hashing, the FP8 table lookup and the gate run the reference on the NPU tensors.

No CANN op on A2, A3 or 950 hashes n-grams, gathers e4m3 rows with ue8m0 scales or computes the
signed-square-root gate, so the three ops are listed in ``v4hal info`` as reference fallbacks on every
chip. The lookup's host path: a table in host memory is gathered on the host (torch's CPU index) and
only the ``[T, n, W]`` rows are copied to the NPU, as the reference does for any accelerator.
"""
from __future__ import annotations

import torch

from v4hal.backends.reference import engram as ref
from v4hal.hal.registry import implements

from . import limits
from ._route import always_reference
from .limits import always

for _op in ("engram_hash", "engram_lookup", "engram_gate"):
    limits.plan(_op, {})
NO_HASH_OP = (always("no CANN op computes the Engram n-gram hash"),)
NO_LOOKUP_OP = (always("no CANN op gathers e4m3 rows with ue8m0 scales; a host table is gathered on the host"),)
NO_GATE_OP = (always("no CANN op computes the Engram signed-square-root gate"),)


@implements("engram_hash", "ascend", requires=NO_HASH_OP)
def engram_hash(ids: torch.Tensor, cu_seqlens: torch.Tensor, history: torch.Tensor, multipliers: torch.Tensor,
                primes: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows ``[T, (N - 1) H]``, new history ``[B, N - 1]``) (reference on the NPU tensors)."""
    return always_reference("engram_hash", ref.engram_hash, ids, cu_seqlens, history, multipliers, primes, pad_id)


@implements("engram_lookup", "ascend", requires=NO_LOOKUP_OP)
def engram_lookup(rows: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``out_dtype [T, n, W]`` on rows' device (reference; a host table is gathered on the host)."""
    return always_reference("engram_lookup", ref.engram_lookup, rows, table, scales, out_dtype)


@implements("engram_gate", "ascend", requires=NO_GATE_OP)
def engram_gate(streams: torch.Tensor, kv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                token_mask: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Streams after the Engram update, like streams (reference on the NPU tensors)."""
    return always_reference("engram_gate", ref.engram_gate, streams, kv, q_weight, k_weight, token_mask, eps)
