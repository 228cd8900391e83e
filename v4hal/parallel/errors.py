"""Errors of the expert-parallel layer (all subclass `v4hal.hal.errors.V4HalError`)."""
from __future__ import annotations

from v4hal.hal.errors import V4HalError


class EPTimeoutError(V4HalError, TimeoutError):
    """An EP exchange did not complete: a peer rank died, closed its connection or never joined
    within the timeout. Raised on the surviving ranks instead of hanging."""


class EPGroupError(V4HalError, RuntimeError):
    """No usable process group: torch.distributed is not initialized, or the group does not fit the
    tensors (gloo needs CPU tensors, NCCL CUDA tensors, HCCL NPU tensors)."""


class EPRankError(V4HalError, RuntimeError):
    """`v4hal.parallel.launch.spawn`: one or more launched ranks failed; ``failures`` maps each failed rank
    to its exception (or a text when the rank died without one), ``results`` holds the return values
    of the ranks that finished (None for the others)."""

    def __init__(self, message: str, failures: dict[int, BaseException | str] | None = None,
                 results: list[object] | None = None) -> None:
        super().__init__(message)
        self.failures: dict[int, BaseException | str] = dict(failures or {})
        self.results: list[object] = list(results or [])
