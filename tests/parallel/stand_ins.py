"""Test-only stand-ins for DeepEP and torch_npu's MC2 ops, single rank (W = 1), with the documented
signatures (DeepEP ``deep_ep/buffer.py``; op-plugin ``torch_npu-npu_moe_distribute_{dispatch,combine}_v2.md``).

Python itself rejects an argument name the real API does not have; the bodies check the documented
dtypes / chip rules and compute the documented result for one rank, so the transports in
``v4hal/parallel/deepep.py`` and ``v4hal/parallel/ascend_mc2.py`` can be run end to end on the CPU.
Never installed as packages: the rank function puts them into ``sys.modules`` of its own (forked)
process only.
"""
from __future__ import annotations

import types
from typing import Any

import torch


# --------------------------------------------------------------------------- deep_ep (one rank)
class _Config:
    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return hidden_bytes * 1024

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0


class Buffer:
    """``deep_ep.Buffer`` for a one-rank group: every expert is local, so recv = send."""

    calls: list[str] = []

    def __init__(self, group: Any, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 12, allow_nvlink_for_low_latency_mode: bool = True) -> None:
        assert group.size() == 1
        self.group, self.num_nvl_bytes, self.num_rdma_bytes = group, num_nvl_bytes, num_rdma_bytes
        Buffer.calls.append("init")

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> _Config:
        return _Config()

    @staticmethod
    def get_combine_config(num_ranks: int) -> _Config:
        return _Config()

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Any = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        assert topk_idx.dtype == torch.int64, "topk_idx must be int64"
        t = topk_idx.shape[0]
        per_expert = torch.bincount(topk_idx.reshape(-1), minlength=num_experts).int()
        return (torch.tensor([t], dtype=torch.int32), None, per_expert, torch.ones(t, 1, dtype=torch.bool), None)

    def dispatch(self, x: Any, handle: Any = None, num_tokens_per_rank: Any = None,
                 num_tokens_per_rdma_rank: Any = None, is_token_in_rank: Any = None,
                 num_tokens_per_expert: Any = None, topk_idx: Any = None,
                 topk_weights: Any = None, expert_alignment: int = 1, config: Any = None, previous_event: Any = None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        if isinstance(x, tuple):
            assert x[0].dtype == torch.float8_e4m3fn and x[1].dtype == torch.float32
            assert x[1].shape == (x[0].shape[0], x[0].shape[1] // 128)
        else:
            assert x.dtype == torch.bfloat16
        assert topk_idx.dtype == torch.int64 and topk_weights.dtype == torch.float32
        assert num_tokens_per_rank is not None and is_token_in_rank is not None and num_tokens_per_expert is not None
        Buffer.calls.append("dispatch")
        counts = num_tokens_per_expert.tolist()
        return x, topk_idx.clone(), topk_weights.clone(), counts, ("handle",), None

    def combine(self, x: torch.Tensor, handle: tuple, topk_weights: Any = None, config: Any = None,
                previous_event: Any = None, async_finish: bool = False, allocate_on_comm_stream: bool = False):
        assert x.dtype == torch.bfloat16 and handle == ("handle",)
        Buffer.calls.append("combine")
        return x.clone(), None, None


def deep_ep_module() -> types.ModuleType:
    mod = types.ModuleType("deep_ep")
    mod.Buffer = Buffer
    return mod


# --------------------------------------------------------------------------- torch_npu MC2 (one rank)
class MC2:
    """``npu_moe_distribute_dispatch_v2`` / ``combine_v2`` for ``ep_world_size == 1`` on chip ``chip``."""

    def __init__(self, chip: str) -> None:
        self.chip = chip
        self.calls: list[dict[str, Any]] = []

    def npu_moe_distribute_dispatch_v2(self, x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *,
                                       scales=None, x_active_mask=None, expert_scales=None, elastic_info=None,
                                       group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0,
                                       shared_expert_num=1, shared_expert_rank_num=0, quant_mode=0, global_bs=0,
                                       expert_token_nums_type=1, comm_alg="", zero_expert_num=0, copy_expert_num=0,
                                       const_expert_num=0):
        assert x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16)
        assert expert_ids.dtype == torch.int32 and expert_ids.shape[0] == x.shape[0]
        assert ep_world_size == 1 and ep_rank_id == 0 and isinstance(group_ep, str) and group_ep
        assert moe_expert_num % (ep_world_size - shared_expert_rank_num) == 0
        assert quant_mode == 0 and expert_token_nums_type == 1 and shared_expert_rank_num == 0
        if self.chip == "A3":
            assert group_tp and tp_world_size == 1 and tp_rank_id == 0 and expert_scales is None
        else:
            assert expert_scales is not None and expert_scales.dtype == torch.float32
            assert expert_scales.shape == expert_ids.shape and group_tp == ""
        self.calls.append({"op": "dispatch", "global_bs": global_bs})
        bs, k = expert_ids.shape
        flat = expert_ids.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        a = bs * min(moe_expert_num, k)
        expand_x = x.new_zeros(a, x.shape[1])
        expand_x[:order.numel()] = x[order // k]
        counts = torch.bincount(flat, minlength=moe_expert_num).to(torch.int64)
        assist = torch.zeros(a * 128, dtype=torch.int32)
        assist[:order.numel()] = order.to(torch.int32)
        ep_recv = torch.cumsum(counts, 0).to(torch.int32)
        tp_recv = torch.zeros(1, dtype=torch.int32) if self.chip == "A3" else None
        expand_scales = None
        if self.chip == "A2":
            expand_scales = torch.zeros(a, dtype=torch.float32)
            expand_scales[:order.numel()] = expert_scales.reshape(-1)[order]
        return expand_x, None, assist, counts, ep_recv, tp_recv, expand_scales

    def npu_moe_distribute_combine_v2(self, expand_x, expert_ids, assist_info_for_combine, ep_send_counts,
                                      expert_scales, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *,
                                      tp_send_counts=None, x_active_mask=None, expand_scales=None,
                                      shared_expert_x=None, group_tp="", tp_world_size=0, tp_rank_id=0,
                                      expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0, global_bs=0,
                                      comm_quant_mode=0):
        assert expert_scales.dtype == torch.float32 and expert_scales.shape == expert_ids.shape
        if self.chip == "A3":
            assert tp_send_counts is not None and group_tp and tp_world_size == 1
        else:
            assert expand_scales is not None, "A2: expand_scales is required"
        assert global_bs == self.calls[-1]["global_bs"], "EP arguments must match the dispatch's"
        self.calls.append({"op": "combine"})
        bs, k = expert_ids.shape
        order = assist_info_for_combine[:bs * k].long()
        flat = torch.empty(bs * k, expand_x.shape[1], dtype=torch.float32)
        flat[order] = expand_x[:bs * k].float()
        out = (flat.reshape(bs, k, -1) * expert_scales.unsqueeze(2)).sum(dim=1)
        return out.to(expand_x.dtype)
