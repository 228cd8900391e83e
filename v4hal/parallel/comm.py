"""torch.distributed plumbing of the EP layer: group lookup, bounded waits, uneven all-to-all.

Every collective here is issued with ``async_op=True`` and waited on with a bound: an explicit
``timeout`` (seconds) through ``Work.wait(timeout)``, else the process group's own timeout (the
``timeout=`` of ``init_process_group`` / ``new_group``, which gloo enforces inside each collective).
A timeout or a peer that closed its connection becomes `EPTimeoutError` naming the exchange, this
rank and the bound; any other failure of the collective propagates unchanged.
"""
from __future__ import annotations

import datetime
import re
from typing import Sequence

import torch
import torch.distributed as dist

from v4hal.hal.platform import platform_of_dist_backend

from .errors import EPGroupError, EPTimeoutError

__all__ = ["resolve_group", "group_timeout", "wait", "all_to_all", "all_gather_tensor", "device_fits_group",
           "exchange_device", "gather_ints"]

# gloo / NCCL / HCCL wording of a timeout, and of a lost peer
_TIMED_OUT = re.compile(r"timed out|timeout|failed to pass", re.IGNORECASE)
_LOST_PEER = re.compile(r"connection (reset|closed|refused)|closed by peer|broken pipe|peer|abort|"
                        r"failed to (recv|send)|socket", re.IGNORECASE)


def resolve_group(group: dist.ProcessGroup | None, op: str) -> dist.ProcessGroup:
    """``group`` or the default (WORLD) group; `EPGroupError` when torch.distributed is not initialized."""
    if not dist.is_available() or not dist.is_initialized():
        raise EPGroupError(f"{op}: torch.distributed is not initialized: call torch.distributed.init_process_group "
                           "(or run under v4hal.parallel.launch.spawn) before using expert parallelism")
    return dist.group.WORLD if group is None else group


def group_timeout(group: dist.ProcessGroup, device: torch.device | None = None) -> float | None:
    """The process group's collective timeout in seconds, when torch exposes it (None otherwise)."""
    dev = device if device is not None else torch.device("cpu")
    try:
        opts = group._get_backend(dev).options
        t = getattr(opts, "_timeout", None)
        return t.total_seconds() if isinstance(t, datetime.timedelta) else None
    except Exception:       # backends without options (or a device the group does not serve)
        return None


def device_fits_group(op: str, group: dist.ProcessGroup, device: torch.device) -> None:
    """gloo serves CPU tensors, NCCL CUDA tensors: a mismatch is an `EPGroupError` before any exchange."""
    backend = str(dist.get_backend(group)).lower()
    plat = platform_of_dist_backend(backend)
    wants = plat.name if plat is not None else None
    if wants is not None and device.type != wants:
        raise EPGroupError(f"{op}: the EP group runs {backend}, which exchanges {wants} tensors, got tensors on "
                           f"{device}")


def exchange_device(group: dist.ProcessGroup, hint: object = None) -> torch.device:
    """The device of small control tensors on ``group``: ``hint`` when it is a device the group's backend
    exchanges (gloo: CPU, NCCL: CUDA, HCCL: NPU), else that backend's device (CPU for other backends)."""
    plat = platform_of_dist_backend(str(dist.get_backend(group)))
    wants = plat.name if plat is not None else None
    if isinstance(hint, torch.device) and (wants is None or hint.type == wants):
        return hint
    return torch.device(wants or "cpu")


def wait(work: dist.Work, op: str, group: dist.ProcessGroup, timeout: float | None) -> None:
    """Wait for ``work`` at most ``timeout`` s (None: the group's own timeout); lost peers -> `EPTimeoutError`."""
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout=datetime.timedelta(seconds=float(timeout)))
    except (RuntimeError, dist.DistError, TimeoutError) as exc:
        text = str(exc)
        first = text.splitlines()[0] if text else ""
        where = f"{op}: rank {dist.get_rank(group)} of {dist.get_world_size(group)}"
        if isinstance(exc, TimeoutError) or _TIMED_OUT.search(text):
            bound = timeout if timeout is not None else group_timeout(group)
            bound_s = f"{bound:g} s" if bound is not None else "the process group's timeout"
            raise EPTimeoutError(f"{where}: the exchange did not complete within {bound_s}: a peer rank is dead, "
                                 f"stuck or never joined ({type(exc).__name__}: {first})") from exc
        if _LOST_PEER.search(text):
            raise EPTimeoutError(f"{where}: a peer rank closed its connection during the exchange (it died or "
                                 f"left the group) ({type(exc).__name__}: {first})") from exc
        raise


def all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int] | None,
               in_splits: Sequence[int] | None, group: dist.ProcessGroup, op: str,
               timeout: float | None) -> torch.Tensor:
    """One (possibly uneven) ``all_to_all_single`` along dim 0, bounded; returns ``out``."""
    work = dist.all_to_all_single(out, inp, output_split_sizes=None if out_splits is None else list(out_splits),
                                  input_split_sizes=None if in_splits is None else list(in_splits),
                                  group=group, async_op=True)
    wait(work, op, group, timeout)
    return out


def all_gather_tensor(t: torch.Tensor, group: dist.ProcessGroup, op: str, timeout: float | None) -> torch.Tensor:
    """``[W, *t.shape]``: every rank's ``t`` (same shape on all ranks), bounded."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    work = dist.all_gather(parts, t.contiguous(), group=group, async_op=True)
    wait(work, op, group, timeout)
    return torch.stack(parts)



def gather_ints(values: Sequence[int], group: dist.ProcessGroup, op: str, timeout: float | None,
                device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (ints, the same count L on every rank), in rank order: one bounded
    ``all_to_all_single`` of int64 ``[W, L]`` (this rank's row sent to every rank). An all-gather, done as an
    all-to-all because gloo answers that in about a third of the time of ``all_gather`` / ``all_reduce``."""
    world = dist.get_world_size(group)
    row = torch.tensor(list(values), dtype=torch.int64, device=device)
    out = torch.empty(world, row.numel(), dtype=torch.int64, device=device)
    all_to_all(out, row.unsqueeze(0).expand(world, -1).contiguous(), None, None, group, op, timeout)
    return out.tolist()
