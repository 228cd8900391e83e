"""Which engine moves the tokens: one `Transport` interface, three peers behind it.

- ``all_to_all`` (`AllToAll`, the default): torch.distributed ``all_to_all_single`` on any group
  (gloo, NCCL, HCCL).
- ``deepep`` (`DeepEP`): DeepEP's normal kernels, CUDA tensors on an NCCL group.
- ``ascend`` (`AscendMC2`): torch_npu ``npu_moe_distribute_dispatch_v2`` / ``combine_v2``, NPU
  tensors on an HCCL group.

`get_transport` is the one lookup from a name to its transport. Selection (`select_transport`): an
explicit ``transport=`` argument, else ``$V4HAL_EP_TRANSPORT``, else automatic: the transport made
for the tensors' device type (``deepep`` for CUDA, ``ascend`` for NPU) when it can serve, otherwise
``all_to_all``. An explicit request that cannot be served raises `BackendUnavailableError` with the
reason; nothing falls back silently. `transport_reasons` lists why each transport is (un)available.
"""
from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist

from v4hal.hal.errors import BackendUnavailableError

from .all_to_all import AllToAll
from .ascend_mc2 import AscendMC2
from .deepep import DeepEP
from .layout import EPHandle

__all__ = ["Transport", "TRANSPORTS", "DEFAULT_TRANSPORT", "get_transport", "select_transport",
           "transport_reasons"]

ENV = "V4HAL_EP_TRANSPORT"


@runtime_checkable
class Transport(Protocol):
    """Moves tokens to the ranks of their experts (`dispatch`) and the expert outputs back (`combine`).

    ``name`` is the key of `get_transport` and the ``EPHandle.transport`` of its handles;
    ``device_type`` the device type it is chosen for automatically (None: only on request or as the
    default). `ep_dispatch` / `ep_combine` check the arguments, and that every rank of the group makes the
    same call (payload dtype, D, k, E, payload format, transport), before calling a transport.
    """

    name: str
    device_type: str | None

    def unavailable(self, device: torch.device, group: dist.ProcessGroup | None) -> str | None:
        """None when it can move ``device`` tensors over ``group`` (None: any group), else the reason."""
        ...

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, group: dist.ProcessGroup, *,
                 num_experts: int, fp8: bool, scale_fmt: str | None, timeout: float | None,
                 max_tokens: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, EPHandle]:
        """x ``[T, D]``, weights fp32 ``[T, k]``, indices ``[T, k]`` -> (x_local ``[N, D]`` grouped by local
        expert, their gate weights fp32 ``[N]`` or None when the combine applies them, the handle).
        ``max_tokens``: the largest T over the group when the caller knows it (`ep_dispatch` does, from its
        agreement), None to let a transport that needs it find it."""
        ...

    def combine(self, y: torch.Tensor, handle: EPHandle, *, out_dtype: torch.dtype | None,
                partial_sums: bool) -> torch.Tensor:
        """y ``[N, D]`` (one row per dispatched row) -> ``[T, D]`` summed on each token's home rank.
        ``partial_sums`` asks for one partial sum per (token, rank); a transport that always combines
        its own way does so regardless."""
        ...


_REGISTRY: dict[str, Transport] = {t.name: t for t in (AllToAll(), DeepEP(), AscendMC2())}

#: transport names, the default first
TRANSPORTS: tuple[str, ...] = tuple(_REGISTRY)
DEFAULT_TRANSPORT = "all_to_all"


def get_transport(name: str, op: str = "ep") -> Transport:
    """The transport called ``name``; `BackendUnavailableError` for a name that is none of `TRANSPORTS`."""
    impl = _REGISTRY.get(name)
    if impl is None:
        raise BackendUnavailableError(f"{op}: transport must be one of {', '.join(TRANSPORTS)}, got {name!r}")
    return impl


def transport_reasons(device: torch.device | str, group: dist.ProcessGroup | None = None) -> dict[str, str | None]:
    """transport -> None when it can serve tensors on ``device`` over ``group``, else the reason."""
    dev = torch.device(device)
    return {name: impl.unavailable(dev, group) for name, impl in _REGISTRY.items()}


def select_transport(requested: str | None, device: torch.device | str, group: dist.ProcessGroup | None = None,
                     op: str = "ep") -> str:
    """The name of the transport a call uses (see the module docstring for the order)."""
    dev = torch.device(device)
    name = requested if requested is not None else (os.environ.get(ENV) or None)
    if name is not None:
        reason = get_transport(name, op).unavailable(dev, group)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: transport {name!r} was requested but cannot serve: {reason}")
        return name
    for impl in _REGISTRY.values():
        if impl.device_type == dev.type and impl.unavailable(dev, group) is None:
            return impl.name
    return DEFAULT_TRANSPORT
