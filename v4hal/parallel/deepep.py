"""The DeepEP transport (CUDA, NCCL group): DeepEP's normal (high-throughput) kernels.

Written against DeepEP's documented API (``deep_ep/buffer.py``: ``Buffer``, ``get_dispatch_layout``,
``dispatch``, ``combine``); ``deep_ep`` is imported only when this transport is probed or used.
It cannot run on this project's CPU machines: the tests drive it against a one-rank stand-in with
the documented signatures, and it is unverified on hardware.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import v4hal
from v4hal.hal.errors import DTypeError

from .layout import FP8_BLOCK, EPHandle, expand_rows

__all__ = ["DeepEP"]


@dataclass(kw_only=True)
class _DeepEPState:
    """DeepEP bookkeeping of one dispatch."""

    buffer: Any                   # the deep_ep.Buffer that dispatched
    handle: Any                   # DeepEP's communication handle
    copy_pos: torch.Tensor        # int64 [N]: flat row*k + j of each grouped copy
    rows: int                     # rows DeepEP delivered to this rank


def _backend(group: dist.ProcessGroup) -> str:
    return str(dist.get_backend(group)).lower()


class DeepEP:
    """DeepEP normal kernels, intranode or internode.

    Dispatch sends each token once per rank (``get_dispatch_layout`` + ``Buffer.dispatch``, bf16 or
    (fp8, fp32 scales [T, D/128]) payload) and returns ``recv_topk_idx`` as local ids (-1 elsewhere),
    which `expand_rows` turns into the grouped-by-local-expert layout of `ep_dispatch`. Combine sums the
    copies of each received row in fp32, casts to bf16 and calls ``Buffer.combine`` (an unweighted sum
    over ranks). That per-rank bf16 partial sum is DeepEP's format: results equal `moe_experts` within
    one extra bf16 rounding, not bit for bit (``partial_sums`` is therefore always in effect).
    ``timeout`` is not applied: DeepEP bounds its own CPU waits (``NUM_CPU_TIMEOUT_SECS`` in its C++
    runtime).
    """

    name = "deepep"
    device_type: str | None = "cuda"

    def __init__(self) -> None:
        self._buffers: dict[int, Any] = {}

    def unavailable(self, device: torch.device, group: dist.ProcessGroup | None) -> str | None:
        """None when DeepEP can move ``device`` tensors over ``group``, else the reason."""
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

    def _buffer(self, group: dist.ProcessGroup, hidden_bytes: int) -> Any:
        """One ``deep_ep.Buffer`` per group, grown when a call needs more room."""
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
                 num_experts: int, fp8: bool, scale_fmt: str | None, timeout: float | None,
                 max_tokens: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, EPHandle]:
        """bf16 x ``[T, D]`` -> (x_local ``[N, D]``, weights fp32 ``[N]``, handle); `DTypeError` for other dtypes."""
        if x.dtype != torch.bfloat16:
            raise DTypeError(f"ep_dispatch: DeepEP dispatches bf16 tokens, got x {x.dtype}")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        e_local = num_experts // world
        buf = self._buffer(group, x.shape[1] * max(x.element_size(), 2))
        topk_idx = indices.to(torch.int64)
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
        payload: Any = x
        if fp8:
            payload = v4hal.act_quant(x, FP8_BLOCK, scale_fmt, torch.float32)     # DeepEP takes fp32 scales
        recv_x, recv_idx, recv_w, _, deep_handle, _ = buf.dispatch(
            payload, topk_idx=topk_idx, topk_weights=weights, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        if fp8:
            recv_x = v4hal.dequant_fp8(recv_x[0], recv_x[1], FP8_BLOCK, out_dtype=x.dtype)
        k = indices.shape[1]
        copy_pos, _, offsets = expand_rows(recv_idx, e_local)
        x_local = recv_x[torch.div(copy_pos, k, rounding_mode="floor")]
        w_local = recv_w.reshape(-1)[copy_pos].float()
        stats = {"tokens": float(x.shape[0]), "received_rows": float(recv_x.shape[0]),
                 "received_copies": float(copy_pos.numel())}
        state = _DeepEPState(buffer=buf, handle=deep_handle, copy_pos=copy_pos, rows=recv_x.shape[0])
        handle = EPHandle(transport=self.name, group=group, world_size=world, rank=rank, num_tokens=x.shape[0],
                          topk=k, num_experts=num_experts, num_local_experts=e_local, dim=x.shape[1],
                          dtype=x.dtype, group_offsets=offsets, timeout=timeout, stats=stats, state=state)
        return x_local, w_local, handle

    def combine(self, y: torch.Tensor, handle: EPHandle, *, out_dtype: torch.dtype | None,
                partial_sums: bool) -> torch.Tensor:
        """One bf16 partial sum per received row through ``Buffer.combine`` -> ``[T, D]``."""
        st: _DeepEPState = handle.state
        rows = torch.zeros(st.rows, handle.dim, dtype=torch.float32, device=y.device)
        rows.index_add_(0, torch.div(st.copy_pos, handle.topk, rounding_mode="floor"), y.float())
        combined, _, _ = st.buffer.combine(rows.to(torch.bfloat16), st.handle)
        return combined.to(out_dtype or y.dtype)
