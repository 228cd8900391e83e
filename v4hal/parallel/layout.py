"""The expert layout of an EP group and the handle a dispatch leaves for its combine.

Layout: ``E`` routed experts over the ``W`` ranks of the EP group, rank ``r`` owning experts
``[r*E/W, (r+1)*E/W)`` (local id = global id - r*E/W). Every transport returns the rows it
delivers grouped by local expert, delimited by ``EPHandle.group_offsets``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from v4hal.hal.errors import RangeError

__all__ = ["EPHandle", "expert_range", "expand_rows", "FP8_BLOCK"]

#: block size of an FP8 dispatch payload (``act_quant`` over 128 columns, one scale per block)
FP8_BLOCK = 128


@dataclass(kw_only=True)
class EPHandle:
    """What `ep_combine` needs to undo `ep_dispatch` (and what the dispatch did); built by keyword only.

    ``transport``: the name of the transport that made it (its combine undoes the dispatch).
    ``group_offsets`` int64 ``[E_local + 1]`` delimits the rows of each local expert in the dispatch
    output. ``weights_at_combine`` is True when the transport applies the gate weights in the combine
    (then `ep_dispatch` returned None for the weights and the experts must not apply them).
    ``stats``: bytes and rows this rank sent (``dispatch_bytes`` / ``combine_bytes`` all payload,
    ``*_remote`` without the part that stays on this rank, ``count_bytes`` the counts exchange).
    ``state``: the transport's own bookkeeping (its type belongs to the transport).
    """

    transport: str
    group: dist.ProcessGroup
    world_size: int
    rank: int
    num_tokens: int
    topk: int
    num_experts: int
    num_local_experts: int
    dim: int
    dtype: torch.dtype
    group_offsets: torch.Tensor
    timeout: float | None
    weights_at_combine: bool = False
    stats: dict[str, float] = field(default_factory=dict)
    state: Any = None

    def local_expert_ids(self) -> torch.Tensor:
        """int32 ``[N]``: the local expert of each dispatched row."""
        counts = self.group_offsets[1:] - self.group_offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.num_local_experts, dtype=torch.int32,
                                                    device=counts.device), counts)


def expert_range(num_experts: int, world_size: int, rank: int, op: str = "ep") -> tuple[int, int]:
    """``[lo, hi)`` global expert ids owned by ``rank``; `RangeError` when ``E`` is not divisible by ``W``."""
    if num_experts <= 0 or num_experts % world_size:
        raise RangeError(f"{op}: num_experts must be a positive multiple of the EP group size {world_size} "
                         f"(rank r holds experts [r*E/W, (r+1)*E/W)), got {num_experts}")
    per = num_experts // world_size
    return rank * per, (rank + 1) * per


def expand_rows(recv_lids: torch.Tensor, num_local_experts: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of received rows grouped by local expert.

    recv_lids int ``[R, k]`` (local expert per slot, -1 = not here) -> (copy_pos int64 ``[N]``: flat
    ``row*k + j`` of each copy, stably sorted by local expert; order int64 ``[N]``: copy i is the
    ``order[i]``-th copy in ascending ``row*k + j`` order; group_offsets int64 ``[E_local + 1]``).
    """
    flat = recv_lids.reshape(-1).long()
    pos = torch.nonzero(flat >= 0).squeeze(1)                        # ascending row*k + j
    lids = flat[pos]
    order = torch.argsort(lids, stable=True)
    counts = torch.bincount(lids, minlength=num_local_experts)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return pos[order], order, offsets
