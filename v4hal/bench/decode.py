"""The timed greedy decode loop: one prefill, then one-token steps, each phase timed on its own.

`timed_decode` is the loop every runner times (``v4hal run``, its expert-parallel ranks, the single-request
baseline of the serving driver); `DecodeRun.figures` turns a run into the tokens/s figures they report.
The first of ``max_new_tokens`` comes from the prefill, so a run decodes ``max_new_tokens - 1`` steps.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from v4hal.hal.errors import DTypeError, RangeError, ShapeError
from v4hal.hal.platform import platform_of

__all__ = ["DecodeRun", "timed_decode"]


@dataclass
class DecodeRun:
    """A timed greedy run: ``tokens`` int64 ``[B, max_new_tokens]`` (column 0 from the prefill), ``logits``
    the last step's ``[B, vocab]``, ``prefill_s`` / ``decode_s`` the seconds of the prefill and of the
    ``max_new_tokens - 1`` decode steps (each ended by a device sync)."""

    tokens: torch.Tensor
    logits: torch.Tensor
    prefill_s: float
    decode_s: float

    @property
    def decode_steps(self) -> int:
        return self.tokens.shape[1] - 1

    def figures(self, prompt_len: int) -> dict[str, Any]:
        """``prefill_s``, ``prefill_tok_s`` (prompt tokens of every row over the prefill time), ``decode_s``,
        ``decode_tok_s`` (decoded tokens of every row over the decode time; None with one new token)."""
        batch, steps = self.tokens.shape[0], self.decode_steps
        return {"prefill_s": self.prefill_s, "prefill_tok_s": batch * prompt_len / self.prefill_s,
                "decode_s": self.decode_s,
                "decode_tok_s": batch * steps / self.decode_s if steps and self.decode_s > 0 else None}


def timed_decode(model: Callable[[torch.Tensor, int], torch.Tensor], prompt: torch.Tensor, max_new_tokens: int, *,
                 start: Callable[[], None] | None = None, after_prefill: Callable[[], None] | None = None,
                 on_step: Callable[[int], None] | None = None) -> DecodeRun:
    """Greedy generation timed phase by phase: ``model(prompt, 0)`` (``prompt`` int64 ``[B, S]``) gives the
    first token of each row, then ``max_new_tokens - 1`` calls ``model(tokens[:, i-1:i], S + i - 1)``; each
    call returns logits ``[B, vocab]`` and the argmax is the next token. Each phase ends with the device's
    sync (`v4hal.hal.platform.Platform.synchronize` of ``prompt.device``) before its clock stops.

    ``start``: called before the clock starts (a barrier between ranks); ``after_prefill``: called after
    the prefill is timed, before the decode clock starts (reading counters); ``on_step(i)``: after decode
    step ``i`` (a progress bar), inside the timed loop."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise RangeError(f"timed_decode: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ShapeError(f"timed_decode: prompt must be [batch, length >= 1], got {list(prompt.shape)}")
    if prompt.dtype != torch.long:
        raise DTypeError(f"timed_decode: prompt must be int64 token ids, got {prompt.dtype}")
    sync = platform_of(prompt.device).synchronize
    prompt_len = prompt.shape[1]
    tokens = torch.empty(prompt.shape[0], max_new_tokens, dtype=torch.long, device=prompt.device)
    if start is not None:
        start()
    t0 = time.perf_counter()
    logits = model(prompt, 0)
    tokens[:, 0] = logits.argmax(dim=-1)
    sync()
    prefill_s = time.perf_counter() - t0
    if after_prefill is not None:
        after_prefill()
    t1 = time.perf_counter()
    for i in range(1, max_new_tokens):
        logits = model(tokens[:, i - 1:i], prompt_len + i - 1)
        tokens[:, i] = logits.argmax(dim=-1)
        if on_step is not None:
            on_step(i)
    sync()
    decode_s = time.perf_counter() - t1
    return DecodeRun(tokens, logits, prefill_s, decode_s)
