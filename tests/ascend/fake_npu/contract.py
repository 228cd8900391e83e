"""Shared state and schema checks of the stand-in CANN ops (test-only).

Every stand-in op validates its call the way the documented op does (argument names come from the
Python signatures, which mirror the torch_npu 2.14 / vllm-ascend / custom_ops schemas; dtypes,
shapes, layouts and chip limits are checked here) and raises :class:`ContractViolation` -- a
``RuntimeError`` like the real ``TORCH_CHECK`` failures -- naming the op, the argument and the rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

SOC = {"A2": 223, "A3": 253, "950": 260}
MAX_TOKENS = (1 << 63) - 1


class ContractViolation(RuntimeError):
    """A call that the documented CANN op would reject."""


@dataclass
class FakeState:
    """Which chip the stand-ins pretend to be, and the calls they received."""

    chip: str = "A2"
    calls: list[tuple[str, str]] = field(default_factory=list)

    @property
    def soc(self) -> int:
        return SOC[self.chip]


STATE = FakeState()


def called(tier: str, name: str) -> None:
    STATE.calls.append((tier, name))


def require(ok: bool, op: str, msg: str) -> None:
    """Raise :class:`ContractViolation` ``"<op>: <msg>"`` unless ``ok``."""
    if not ok:
        raise ContractViolation(f"{op}: {msg}")


def chips(op: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    require(STATE.chip in allowed, op, f"not supported on {STATE.chip} (supported: {', '.join(allowed)})")


def desc(t: Any) -> str:
    if not isinstance(t, torch.Tensor):
        return repr(t)
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"


def tensor(op: str, name: str, t: Any, *, dtypes: Iterable[torch.dtype] | None = None,
           ndim: int | Iterable[int] | None = None, shape: tuple[int | None, ...] | None = None,
           contiguous: bool = False) -> torch.Tensor:
    """Check one tensor argument; ``None`` in ``shape`` matches any size."""
    require(isinstance(t, torch.Tensor), op, f"{name} must be a Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        require(t.dtype in dtypes, op, f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {desc(t)}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        require(t.dim() in dims, op, f"{name} must have {dims} dims, got {desc(t)}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
        require(ok, op, f"{name} must be shaped {list(shape)}, got {desc(t)}")
    if contiguous:
        require(t.is_contiguous(), op, f"{name} must be contiguous")
    return t


def cumulative(op: str, name: str, t: Any, total: int | None = None, leading_zero: bool = False) -> list[int]:
    """An int32 prefix-sum tensor: non-decreasing, optionally starting at 0 and ending at ``total``."""
    tensor(op, name, t, dtypes=(torch.int32,), ndim=1)
    vals = [int(v) for v in t.tolist()]
    require(all(b >= a for a, b in zip(vals, vals[1:])), op, f"{name} must be non-decreasing, got {vals}")
    require(all(v >= 0 for v in vals), op, f"{name} must be >= 0, got {vals}")
    if leading_zero:
        require(len(vals) > 0 and vals[0] == 0, op, f"{name} must start at 0, got {vals}")
    if total is not None:
        require(len(vals) > 0 and vals[-1] == total, op, f"{name} must end at {total}, got {vals}")
    return vals


def valid_first(op: str, name: str, idx: torch.Tensor) -> None:
    """Rows of an index list hold their valid entries first, then only -1."""
    invalid = idx < 0
    after = torch.cummax(invalid.to(torch.int8), dim=-1).values.bool()
    require(bool((after == invalid).all()), op, f"{name}: every row must hold its valid entries first, then -1")
    require(bool((idx >= -1).all()), op, f"{name}: entries must be >= -1")


def paged_kv(op: str, name: str, t: Any, d: int, *, dtypes: Iterable[torch.dtype]) -> tuple[int, int]:
    """A paged cache ``[blocks, block_size, 1, d]`` with block_size a multiple of 16 up to 1024."""
    tensor(op, name, t, dtypes=dtypes, ndim=4)
    require(t.shape[2] == 1, op, f"{name}: KV_N must be 1, got {desc(t)}")
    require(t.shape[3] == d, op, f"{name}: head dim must be {d}, got {desc(t)}")
    blk = t.shape[1]
    require(blk % 16 == 0 and 16 <= blk <= 1024, op, f"{name}: block_size must be a multiple of 16 <= 1024, got {blk}")
    return t.shape[0], blk


def block_table(op: str, name: str, t: Any, b: int, blocks: int, blk: int, max_len: int) -> None:
    """int32 ``[B, >= ceil(max_len / blk)]`` with ids of existing blocks."""
    tensor(op, name, t, dtypes=(torch.int32,), ndim=2)
    require(t.shape[0] == b, op, f"{name}: first dim must be B={b}, got {desc(t)}")
    need = -(-max_len // blk)
    require(t.shape[1] >= need, op,
            f"{name}: needs >= {need} columns for {max_len} tokens in blocks of {blk}, got {desc(t)}")
    if need:
        used = t[:, :need]
        require(bool(((used >= 0) & (used < blocks)).all()), op, f"{name}: block ids must lie in [0, {blocks})")


def defaults(op: str, pre_tokens: int, next_tokens: int) -> None:
    require(pre_tokens == MAX_TOKENS and next_tokens == MAX_TOKENS, op,
            f"pre_tokens/next_tokens support only the default 2**63-1, got {pre_tokens}, {next_tokens}")


def pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0
