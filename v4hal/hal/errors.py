"""Error types raised by v4hal before any kernel runs.

Every message names the argument, what was expected and what came, e.g.
``sparse_attn: topk_idxs must be int32 [b, m, k], got int64 [2, 3, 4]``.
"""
from __future__ import annotations


class V4HalError(Exception):
    """Base class of every error v4hal raises on purpose."""


class ShapeError(V4HalError, ValueError):
    """A tensor has the wrong rank or sizes, or sizes that disagree."""


class DTypeError(V4HalError, TypeError):
    """A tensor has a dtype the op does not take."""


class DeviceError(V4HalError, ValueError):
    """Tensors of one call live on different devices."""


class RangeError(V4HalError, ValueError):
    """A value is outside its allowed range (indices, non-finite scales, bad options)."""


class NonFiniteError(RangeError):
    """A tensor that must be finite holds a NaN or Inf (a value check; raised before the op's kernel runs)."""


class BackendUnavailableError(V4HalError, RuntimeError):
    """An explicitly requested backend cannot serve the call; the message lists why."""


class MissingPackageError(V4HalError, ModuleNotFoundError):
    """An option needs a package the install lacks; the message names the extra that brings it."""
