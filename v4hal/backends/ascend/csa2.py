"""V4.1's compressor on Ascend: ``csa2_compressor_ragged`` runs the reference on the NPU tensors.

The CANN ``_C_ascend.compressor`` has three modes, C4A / C4Li / C128A (V4's overlapping ratio 4 and
ratio 128, both with a position bias), none of which pools two tokens without overlap or passes one
token through at ratio 1. vllm-ascend's V4.1 path adds ``_C_ascend.compressor_v2`` (ratio 2 only, A2/A3,
opt-in there because its projections round to bf16), which pools over a per-request circular state
ring and leaves the norm and rope to the caller: its state layout is not this op's paged state
(position ``p`` in row ``p % blk`` of block ``table[i, p // blk]``), so it is not bound.
"""
from __future__ import annotations

import torch

from v4hal.backends.reference import csa2 as ref
from v4hal.hal.registry import implements

from . import limits
from ._route import always_reference
from .limits import always

limits.plan("csa2_compressor_ragged", {},
            note="_C_ascend.compressor has only V4's modes; compressor_v2 (ratio 2) keeps a ring state of "
                 "another layout")
NO_CSA2_OP = (always("no CANN compressor mode pools V4.1's groups over this op's paged state (the compressor's "
                     "modes are C4A/C4Li/C128A; compressor_v2 uses a ring state of another layout)"),)


@implements("csa2_compressor_ragged", "ascend", requires=NO_CSA2_OP)
def csa2_compressor_ragged(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor | None,
                           norm_weight: torch.Tensor, freqs_cis: torch.Tensor, state_cache: torch.Tensor,
                           state_block_table: torch.Tensor, cu_seqlens: torch.Tensor, start_pos: torch.Tensor,
                           ratio: int, norm_eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(entries, latent, entry_req, entry_pos)`` (reference on the NPU tensors; see
    :func:`v4hal.ops.csa2.csa2_compressor_ragged`)."""
    return always_reference("csa2_compressor_ragged", ref.csa2_compressor_ragged, x, wkv, wgate, norm_weight,
                            freqs_cis, state_cache, state_block_table, cu_seqlens, start_pos, ratio, norm_eps)
