"""The Ascend MC2 transport (NPU, HCCL group): torch_npu ``npu_moe_distribute_dispatch_v2`` /
``npu_moe_distribute_combine_v2`` (A2, A3).

Written against the op-plugin documentation of the two ops and called as vllm-ascend's MC2
dispatcher calls them; torch_npu is imported only when this transport is probed or used. It cannot
run on this project's CPU machines: the tests drive it against a one-rank stand-in with the
documented signatures, and it is unverified on hardware.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import v4hal.parallel.comm as comm
from v4hal.hal import devices
from v4hal.hal.errors import BackendUnavailableError, DTypeError

from .layout import EPHandle, expert_range

__all__ = ["AscendMC2", "hccl_comm_name"]

_OPS = ("npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2")


def hccl_comm_name(group: dist.ProcessGroup, rank: int) -> str:
    """The HCCL communicator name the MC2 ops take as ``group_ep`` (torch_npu >= 2.1 form)."""
    return group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)


@dataclass(kw_only=True)
class _AscendState:
    """MC2 bookkeeping of one dispatch: what ``combine_v2`` must be given back."""

    common: dict[str, Any]                  # EP arguments shared by dispatch and combine (must match)
    expert_ids: torch.Tensor                # int32 [T, k]
    weights: torch.Tensor                   # fp32 [T, k] gate weights (applied by combine_v2)
    assist: torch.Tensor                    # assist_info_for_combine of the dispatch
    ep_recv_counts: torch.Tensor            # ep_send_counts of the combine
    tp_recv_counts: torch.Tensor | None     # A3: tp_send_counts of the combine
    expand_scales: torch.Tensor | None      # A2: expand_scales of the combine
    rows: int                               # rows of expand_x (the combine takes them all back)


class AscendMC2:
    """MC2 dispatch / combine.

    Arguments: ``group_ep`` = the HCCL communicator name of the group, ``expert_shard_type=0``,
    ``shared_expert_rank_num=0``, ``global_bs = max_T * W`` (ranks may hold different token counts),
    ``expert_token_nums_type=1`` (counts per local expert); on A3 also ``group_tp`` (the same name),
    ``tp_world_size=1``, ``tp_rank_id=0``; on A2 the gate weights go in as ``expert_scales`` because
    its combine requires ``expand_scales``. ``expand_x`` comes back grouped by local expert.
    ``combine_v2`` multiplies by ``expert_scales`` itself, so the gate weights are applied there
    (``weights_at_combine``): the experts run unweighted, i.e. the weight is applied after w2 instead
    of before (equal up to rounding); ``partial_sums`` has no meaning here. The FP8 payload has no MC2
    equivalent (its ``quant_mode=2`` is int8 per token): ``fp8=True`` is refused. ``timeout`` bounds
    the max-T exchange (none when `ep_dispatch` hands over ``max_tokens`` from its agreement); the MC2 ops
    themselves are bounded by HCCL (``HCCL_EXEC_TIMEOUT``).
    """

    name = "ascend"
    device_type: str | None = "npu"

    def unavailable(self, device: torch.device, group: dist.ProcessGroup | None) -> str | None:
        """None when the MC2 ops can move ``device`` tensors over ``group``, else the reason."""
        if device.type != "npu":
            return f"the Ascend MC2 ops move NPU tensors, got {device}"
        if group is not None and str(dist.get_backend(group)).lower() != "hccl":
            return f"the Ascend MC2 ops need an HCCL group, got {str(dist.get_backend(group)).lower()}"
        npu = devices.torch_npu_module()
        if npu is None:
            return f"torch_npu is unavailable: {devices.npu_reason()}"
        missing = [f for f in _OPS if not hasattr(npu, f)]
        return f"torch_npu lacks {', '.join(missing)}" if missing else None

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, group: dist.ProcessGroup, *,
                 num_experts: int, fp8: bool, scale_fmt: str | None, timeout: float | None,
                 max_tokens: int | None = None
                 ) -> tuple[torch.Tensor, None, EPHandle]:
        """bf16/fp16 x ``[T, D]`` -> (expand_x ``[N, D]``, None: the weights travel to the combine, handle)."""
        if fp8:
            raise BackendUnavailableError("ep_dispatch: the Ascend MC2 dispatch has no FP8 128-block payload "
                                          "(quant_mode=2 is int8 per token); use fp8=False or transport='all_to_all'")
        if x.dtype not in (torch.bfloat16, torch.float16):
            raise DTypeError(f"ep_dispatch: npu_moe_distribute_dispatch_v2 takes bf16/fp16 x, got {x.dtype}")
        npu = devices.torch_npu_module()
        chip = devices.npu_chip()
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        lo, hi = expert_range(num_experts, world, rank, "ep_dispatch")
        name = hccl_comm_name(group, rank)
        if max_tokens is None:
            t = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
            comm.wait(dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group, async_op=True), "ep_dispatch (max T)",
                      group, timeout)
            max_tokens = int(t)
        common: dict[str, Any] = dict(group_ep=name, ep_world_size=world, ep_rank_id=rank, moe_expert_num=num_experts,
                                      expert_shard_type=0, shared_expert_rank_num=0, global_bs=max_tokens * world)
        if chip == "A3":
            common.update(group_tp=name, tp_world_size=1, tp_rank_id=0)
        ids = indices.to(torch.int32)
        extra: dict[str, Any] = {"expert_scales": weights} if chip == "A2" else {}
        expand_x, _, assist, token_nums, ep_recv, tp_recv, expand_scales = npu.npu_moe_distribute_dispatch_v2(
            x=x, expert_ids=ids, quant_mode=0, expert_token_nums_type=1, **extra, **common)
        counts = token_nums.to(torch.int64)
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        n = int(offsets[-1])
        stats = {"tokens": float(x.shape[0]), "received_copies": float(n)}
        state = _AscendState(common=common, expert_ids=ids, weights=weights, assist=assist, ep_recv_counts=ep_recv,
                             tp_recv_counts=tp_recv if chip == "A3" else None,
                             expand_scales=expand_scales if chip == "A2" else None, rows=expand_x.shape[0])
        handle = EPHandle(transport=self.name, group=group, world_size=world, rank=rank, num_tokens=x.shape[0],
                          topk=indices.shape[1], num_experts=num_experts, num_local_experts=hi - lo,
                          dim=x.shape[1], dtype=x.dtype, group_offsets=offsets, timeout=timeout,
                          weights_at_combine=True, stats=stats, state=state)
        return expand_x[:n], None, handle

    def combine(self, y: torch.Tensor, handle: EPHandle, *, out_dtype: torch.dtype | None,
                partial_sums: bool) -> torch.Tensor:
        """``combine_v2`` (gate weights applied there) -> ``[T, D]``."""
        npu = devices.torch_npu_module()
        st: _AscendState = handle.state
        full = y.new_zeros(st.rows, handle.dim)
        full[:y.shape[0]] = y
        extra: dict[str, Any] = {}
        if st.tp_recv_counts is not None:
            extra["tp_send_counts"] = st.tp_recv_counts
        if st.expand_scales is not None:
            extra["expand_scales"] = st.expand_scales
        out = npu.npu_moe_distribute_combine_v2(
            expand_x=full, expert_ids=st.expert_ids, assist_info_for_combine=st.assist,
            ep_send_counts=st.ep_recv_counts, expert_scales=st.weights, **extra, **st.common)
        return out.to(out_dtype or y.dtype)
