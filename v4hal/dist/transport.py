"""Which engine moves the tokens: torch.distributed all-to-all, DeepEP (CUDA) or Ascend MC2 (NPU).

Selection (`select_transport`): an explicit ``transport=`` argument, else ``$V4HAL_EP_TRANSPORT``,
else automatic: ``deepep`` for CUDA tensors on an NCCL group when ``deep_ep`` imports, ``ascend``
for NPU tensors on an HCCL group when torch_npu has ``npu_moe_distribute_dispatch_v2`` /
``combine_v2``, otherwise ``all_to_all`` (torch.distributed ``all_to_all_single``: gloo, NCCL,
HCCL). An explicit request that cannot be served raises `BackendUnavailableError` with the reason;
nothing falls back silently. `transport_reasons` lists why each transport is (un)available.

The DeepEP and Ascend adapters cannot run on this project's CPU machines: they are small, written
against the documented APIs (DeepEP ``deep_ep/buffer.py``: ``Buffer``, ``get_dispatch_layout``,
``dispatch``, ``combine``; torch_npu ``npu_moe_distribute_dispatch_v2`` / ``combine_v2`` as the
op-plugin docs and vllm-ascend's MC2 dispatcher call them) and are unverified on hardware.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import v4hal
from v4hal.hal.errors import BackendUnavailableError, DTypeError

from . import comm
from .ep import EPHandle, expand_rows, expert_range

__all__ = ["TRANSPORTS", "select_transport", "transport_reasons", "get_transport", "transport_by_name"]

TRANSPORTS = ("all_to_all", "deepep", "ascend")
ENV = "V4HAL_EP_TRANSPORT"


def _backend(group: dist.ProcessGroup) -> str:
    return str(dist.get_backend(group)).lower()


def _deepep_reason(device: torch.device, group: dist.ProcessGroup | None) -> str | None:
    if device.type != "cuda":
        return f"DeepEP moves CUDA tensors, got {device}"
    if group is not None and _backend(group) != "nccl":
        return f"DeepEP needs an NCCL group, got {_backend(group)}"
    try:
        if importlib.util.find_spec("deep_ep") is None:
            return "deep_ep is not installed"
        importlib.import_module("deep_ep")
    except Exception as exc:                   # broken install: report, never crash
        return f"deep_ep does not import: {type(exc).__name__}: {exc}"
    return None


def _ascend_reason(device: torch.device, group: dist.ProcessGroup | None) -> str | None:
    if device.type != "npu":
        return f"the Ascend MC2 ops move NPU tensors, got {device}"
    if group is not None and _backend(group) != "hccl":
        return f"the Ascend MC2 ops need an HCCL group, got {_backend(group)}"
    from v4hal.backends.ascend import runtime

    npu = runtime.torch_npu_module()
    if npu is None:
        return f"torch_npu is unavailable: {runtime.probe_reason()}"
    missing = [f for f in ("npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2") if not hasattr(npu, f)]
    return f"torch_npu lacks {', '.join(missing)}" if missing else None


def transport_reasons(device: torch.device | str, group: dist.ProcessGroup | None = None) -> dict[str, str | None]:
    """transport -> None when it can serve tensors on ``device`` over ``group``, else the reason."""
    dev = torch.device(device)
    return {"all_to_all": None, "deepep": _deepep_reason(dev, group), "ascend": _ascend_reason(dev, group)}


def select_transport(requested: str | None, device: torch.device | str, group: dist.ProcessGroup | None = None,
                     op: str = "ep") -> str:
    """The transport a call uses (see the module docstring for the order)."""
    dev = torch.device(device)
    name = requested if requested is not None else (os.environ.get(ENV) or None)
    if name is not None:
        if name not in TRANSPORTS:
            raise BackendUnavailableError(f"{op}: transport must be one of {', '.join(TRANSPORTS)}, got {name!r}")
        reason = transport_reasons(dev, group)[name]
        if reason is not None:
            raise BackendUnavailableError(f"{op}: transport {name!r} was requested but cannot serve: {reason}")
        return name
    if dev.type == "cuda" and _deepep_reason(dev, group) is None:
        return "deepep"
    if dev.type == "npu" and _ascend_reason(dev, group) is None:
        return "ascend"
    return "all_to_all"


def get_transport(requested: str | None, device: torch.device, group: dist.ProcessGroup, op: str) -> Any:
    """The adapter object of the selected transport, or None for the built-in all-to-all path."""
    name = select_transport(requested, device, group, op)
    return None if name == "all_to_all" else transport_by_name(name)


def transport_by_name(name: str) -> Any:
    """The adapter (``dispatch`` / ``combine``) of ``deepep`` or ``ascend``."""
    return {"deepep": _DEEPEP, "ascend": _ASCEND}[name]


# --------------------------------------------------------------------------- DeepEP
@dataclass
class _DeepEPState:
    buffer: Any
    handle: Any           # DeepEP's communication handle
    copy_pos: torch.Tensor
    rows: int


class _DeepEP:
    """DeepEP normal (high-throughput) kernels, intranode or internode.

    Dispatch sends each token once per rank (``get_dispatch_layout`` + ``Buffer.dispatch``, bf16 or
    (fp8, fp32 scales [T, D/128]) payload) and returns ``recv_topk_idx`` as local ids (-1 elsewhere),
    which `expand_rows` turns into the grouped-by-local-expert layout of `ep_dispatch`. Combine sums the
    copies of each received row in fp32, casts to bf16 and calls ``Buffer.combine`` (an unweighted sum
    over ranks). That per-rank bf16 partial sum is DeepEP's format: results equal `moe_experts` within
    one extra bf16 rounding, not bit for bit. ``timeout`` is not applied: DeepEP bounds its own CPU
    waits (``NUM_CPU_TIMEOUT_SECS`` in its C++ runtime).
    """

    name = "deepep"

    def __init__(self) -> None:
        self._buffers: dict[int, Any] = {}

    def _buffer(self, group: dist.ProcessGroup, hidden_bytes: int) -> Any:
        deep_ep = importlib.import_module("deep_ep")
        world = dist.get_world_size(group)
        nvl = rdma = 0
        for cfg in (deep_ep.Buffer.get_dispatch_config(world), deep_ep.Buffer.get_combine_config(world)):
            nvl = max(nvl, cfg.get_nvl_buffer_size_hint(hidden_bytes, world))
            rdma = max(rdma, cfg.get_rdma_buffer_size_hint(hidden_bytes, world))
        buf = self._buffers.get(id(group))
        if buf is None or buf.num_nvl_bytes < nvl or buf.num_rdma_bytes < rdma:
            buf = deep_ep.Buffer(group, nvl, rdma)
            self._buffers[id(group)] = buf
        return buf

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, group: dist.ProcessGroup, *,
                 num_experts: int, fp8: bool, scale_fmt: str | None, timeout: float | None
                 ) -> tuple[torch.Tensor, torch.Tensor, EPHandle]:
        if x.dtype != torch.bfloat16:
            raise DTypeError(f"ep_dispatch: DeepEP dispatches bf16 tokens, got x {x.dtype}")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        e_local = num_experts // world
        buf = self._buffer(group, x.shape[1] * max(x.element_size(), 2))
        topk_idx = indices.to(torch.int64)
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
        payload: Any = x
        if fp8:
            payload = v4hal.act_quant(x, 128, scale_fmt, torch.float32)        # DeepEP takes fp32 scales
        recv_x, recv_idx, recv_w, _, deep_handle, _ = buf.dispatch(
            payload, topk_idx=topk_idx, topk_weights=weights, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        if fp8:
            recv_x = v4hal.dequant_fp8(recv_x[0], recv_x[1], 128, out_dtype=x.dtype)
        k = indices.shape[1]
        copy_pos, _, offsets = expand_rows(recv_idx, e_local)
        x_local = recv_x[torch.div(copy_pos, k, rounding_mode="floor")]
        w_local = recv_w.reshape(-1)[copy_pos].float()
        stats = {"tokens": float(x.shape[0]), "received_rows": float(recv_x.shape[0]),
                 "received_copies": float(copy_pos.numel())}
        handle = EPHandle("deepep", group, world, rank, x.shape[0], k, num_experts, e_local, x.shape[1], x.dtype,
                          offsets, timeout, False, stats, _DeepEPState(buf, deep_handle, copy_pos, recv_x.shape[0]))
        return x_local, w_local, handle

    def combine(self, y: torch.Tensor, handle: EPHandle, *, out_dtype: torch.dtype | None) -> torch.Tensor:
        st: _DeepEPState = handle.state
        rows = torch.zeros(st.rows, handle.dim, dtype=torch.float32, device=y.device)
        rows.index_add_(0, torch.div(st.copy_pos, handle.topk, rounding_mode="floor"), y.float())
        combined, _, _ = st.buffer.combine(rows.to(torch.bfloat16), st.handle)
        return combined.to(out_dtype or y.dtype)


# --------------------------------------------------------------------------- Ascend MC2
def hccl_comm_name(group: dist.ProcessGroup, rank: int) -> str:
    """The HCCL communicator name the MC2 ops take as ``group_ep`` (torch_npu >= 2.1 form)."""
    return group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)


@dataclass
class _AscendState:
    common: dict[str, Any]          # EP arguments shared by dispatch and combine (must match)
    expert_ids: torch.Tensor
    weights: torch.Tensor
    assist: torch.Tensor
    ep_recv_counts: torch.Tensor
    tp_recv_counts: torch.Tensor | None
    expand_scales: torch.Tensor | None
    rows: int


class _Ascend:
    """torch_npu ``npu_moe_distribute_dispatch_v2`` / ``npu_moe_distribute_combine_v2`` (A2, A3).

    Called as vllm-ascend's MC2 dispatcher does: ``group_ep`` = the HCCL communicator name of the
    group, ``expert_shard_type=0``, ``shared_expert_rank_num=0``, ``global_bs = max_T * W`` (ranks may
    hold different token counts), ``expert_token_nums_type=1`` (counts per local expert); on A3 also
    ``group_tp`` (the same name), ``tp_world_size=1``, ``tp_rank_id=0``; on A2 the gate weights go
    in as ``expert_scales`` because its combine requires ``expand_scales``. ``expand_x`` comes back
    grouped by local expert. ``combine_v2`` multiplies by ``expert_scales`` itself, so the gate
    weights are applied there (``weights_at_combine``): the experts run unweighted, i.e. the weight
    is applied after w2 instead of before (equal up to rounding). The FP8 payload has no MC2
    equivalent (its ``quant_mode=2`` is int8 per token): ``fp8=True`` is refused. ``timeout`` is not
    applied: HCCL bounds its ops with ``HCCL_EXEC_TIMEOUT``.
    """

    name = "ascend"

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, group: dist.ProcessGroup, *,
                 num_experts: int, fp8: bool, scale_fmt: str | None, timeout: float | None
                 ) -> tuple[torch.Tensor, None, EPHandle]:
        from v4hal.backends.ascend import runtime

        if fp8:
            raise BackendUnavailableError("ep_dispatch: the Ascend MC2 dispatch has no FP8 128-block payload "
                                          "(quant_mode=2 is int8 per token); use fp8=False or transport='all_to_all'")
        if x.dtype not in (torch.bfloat16, torch.float16):
            raise DTypeError(f"ep_dispatch: npu_moe_distribute_dispatch_v2 takes bf16/fp16 x, got {x.dtype}")
        npu = runtime.torch_npu_module()
        chip = runtime.chip()
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        lo, hi = expert_range(num_experts, world, rank, "ep_dispatch")
        name = hccl_comm_name(group, rank)
        t = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        comm.wait(dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group, async_op=True), "ep_dispatch (max T)",
                  group, timeout)
        common: dict[str, Any] = dict(group_ep=name, ep_world_size=world, ep_rank_id=rank, moe_expert_num=num_experts,
                                      expert_shard_type=0, shared_expert_rank_num=0, global_bs=int(t) * world)
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
        state = _AscendState(common, ids, weights, assist, ep_recv, tp_recv if chip == "A3" else None,
                             expand_scales if chip == "A2" else None, expand_x.shape[0])
        handle = EPHandle("ascend", group, world, rank, x.shape[0], indices.shape[1], num_experts, hi - lo,
                          x.shape[1], x.dtype, offsets, timeout, True, stats, state)
        return expand_x[:n], None, handle

    def combine(self, y: torch.Tensor, handle: EPHandle, *, out_dtype: torch.dtype | None) -> torch.Tensor:
        from v4hal.backends.ascend import runtime

        npu = runtime.torch_npu_module()
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


_DEEPEP = _DeepEP()
_ASCEND = _Ascend()
