"""Continuous batching on the V4 graph: requests arrive and leave, and every step mixes prefill chunks with
decode tokens in one `V4Model.forward_batch` call over the `CachePool`'s paged caches.

A step takes one token from every request that is decoding, then fills the rest of the ``chunk`` token
budget with prefill chunks, oldest request first (a prompt may span many steps). After the step each
request whose prompt is complete picks its next token (greedy unless ``choose`` says otherwise); a request
that has its ``max_new_tokens`` leaves and its pages go back to the pool. Every page-aligned prefix of a
prompt is registered as the prefill passes it, so a later request that starts with the same tokens computes
only its suffix (registered prefixes hold pages until the pool needs them back).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from v4hal.hal.errors import RangeError

from .pages import PoolExhaustedError
from .pool import CachePool

__all__ = ["Engine", "EngineRequest", "StepStats"]

#: ``choose(req_id, logits [vocab] fp32) -> token id``: how a request picks its next token
Chooser = Callable[[Hashable, torch.Tensor], int]


def greedy(_req_id: Hashable, logits: torch.Tensor) -> int:
    """The arg-max token."""
    return int(logits.argmax())


@dataclass
class EngineRequest:
    """A request in the engine: ``prompt`` token ids, ``max_new_tokens`` to generate, ``output`` so far, the
    logits each generated token was chosen from (``keep_logits``), the MTP logits after each (``mtp``) and
    the prompt tokens reused from a registered prefix."""

    req_id: Hashable
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    draft_logits: list[torch.Tensor] = field(default_factory=list)
    prefix_len: int = 0
    done: bool = False


@dataclass
class StepStats:
    """One step: requests and tokens in it (prefill and decode), wall time, pages in use after it."""

    requests: int
    prefill_tokens: int
    decode_tokens: int
    seconds: float
    pages_in_use: dict[str, int]


class Engine:
    """Continuous batching of ``model`` (a `V4Model`) over ``pool`` (a `CachePool` of the model's config).

    ``chunk``: token budget of one step (decode tokens first, then prefill chunks); ``choose``: next-token
    rule (greedy by default); ``keep_logits``: keep each request's logits rows (tests, parity runs);
    ``reuse_prefixes``: register the prompts' page-aligned prefixes for later requests; ``mtp``: also run
    the MTP block every step and keep its logits (drafts of the token after next) per request.
    """

    def __init__(self, model: torch.nn.Module, pool: CachePool, *, chunk: int = 64, choose: Chooser | None = None,
                 keep_logits: bool = False, reuse_prefixes: bool = True, mtp: bool = False) -> None:
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise RangeError(f"Engine: chunk must be an int >= 1, got {chunk!r}")
        if pool.cfg != model.config:
            raise RangeError("Engine: pool must be built for the model's config")
        self.model, self.pool, self.chunk = model, pool, chunk
        self.choose = choose or greedy
        self.keep_logits, self.reuse_prefixes = keep_logits, reuse_prefixes
        if mtp and not len(model.mtp):
            raise RangeError("Engine: mtp=True needs a model with an MTP block (n_mtp_layers >= 1)")
        self.mtp = mtp
        self.waiting: list[EngineRequest] = []          # arrived, not yet in the pool
        self.running: dict[Hashable, EngineRequest] = {}
        self.finished: dict[Hashable, EngineRequest] = {}
        self.steps: list[StepStats] = []
        self.tokens_computed = 0

    def add(self, req_id: Hashable, prompt: Sequence[int], max_new_tokens: int) -> None:
        """Queue a request (it joins the pool at the next step)."""
        known = set(self.running) | set(self.finished) | {r.req_id for r in self.waiting}
        if req_id in known:
            raise RangeError(f"Engine.add: req_id {req_id!r} is already known")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise RangeError(f"Engine.add: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise RangeError("Engine.add: prompt must hold at least one token")
        if len(prompt) + max_new_tokens - 1 > self.model.config.max_seq_len:
            raise RangeError(f"Engine.add: prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) - 1 exceeds "
                             f"max_seq_len = {self.model.config.max_seq_len}")
        self.waiting.append(EngineRequest(req_id, prompt, max_new_tokens))

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def _admit(self) -> None:
        for r in self.waiting:
            st = self.pool.add_request(r.req_id, r.prompt)
            r.prefix_len = st.prefix_len
            self.running[r.req_id] = r
        self.waiting.clear()

    def _plan(self) -> list[tuple[Hashable, int]]:
        items, budget = [], self.chunk
        prefill = []
        for rid, r in self.running.items():
            st = self.pool.requests[rid]
            if st.computed >= len(r.prompt):          # decoding: its last chosen token
                items.append((rid, 1))
                budget -= 1
            else:
                prefill.append((rid, len(r.prompt) - st.computed))
        for rid, left in prefill:
            if budget <= 0:
                break
            n = min(left, budget)
            items.append((rid, n))
            budget -= n
        return items

    def _schedule(self, items: list[tuple[Hashable, int]]):
        """The step's batch and its items; when the pool cannot hold every item's pages, prefill chunks wait
        (the newest first) so that the rest still runs. `PoolExhaustedError` when nothing fits."""
        while True:
            try:
                return self.pool.schedule(items, device=self.model.device), items
            except PoolExhaustedError:
                prefill = [i for i, (rid, _) in enumerate(items)
                           if self.pool.requests[rid].computed < len(self.running[rid].prompt)]
                if not prefill or len(items) == 1:
                    raise
                del items[prefill[-1]]

    def step(self) -> StepStats | None:
        """Run one step (None when nothing is left to do)."""
        self._admit()
        items = self._plan()
        if not items:
            return None
        t0 = time.perf_counter()
        batch, items = self._schedule(items)
        out = self.model.forward_batch(batch, self.pool)
        logits = out.logits.float().cpu()
        prefill = decode = 0
        done = []
        for b, (rid, n) in enumerate(items):
            r, start = self.running[rid], batch.start_positions[b]
            if start >= len(r.prompt):
                decode += n
            else:
                prefill += n
            if start + n < len(r.prompt):             # prompt not complete yet: no token to pick
                continue
            tok = self.choose(rid, logits[b])
            r.output.append(tok)
            if self.keep_logits:
                r.logits.append(logits[b])
            if len(r.output) >= r.max_new_tokens:
                done.append(rid)
            else:
                self.pool.append_tokens(rid, [tok])
        if self.mtp:
            self._drafts(batch, out)
        self.pool.advance_batch(batch, register_prefixes=self.reuse_prefixes)
        for rid in done:
            self.running[rid].done = True
            self.pool.release(rid)
            self.finished[rid] = self.running.pop(rid)
        self.tokens_computed += batch.num_tokens
        stats = StepStats(len(items), prefill, decode, time.perf_counter() - t0, self.pool.pages_in_use())
        self.steps.append(stats)
        return stats

    def _drafts(self, batch, out) -> None:
        """The MTP block's logits at each request's last new token (the step's tokens, each followed by the
        next known token: the prompt's, or the one just chosen); kept per request."""
        nxt = []
        for b, rid in enumerate(batch.req_ids):
            r, start = self.running[rid], batch.start_positions[b]
            seq = r.prompt + r.output
            nxt.extend(seq[start + 1:start + 1 + batch.query_lens[b]])
        ids = torch.tensor(nxt, dtype=torch.int64, device=self.model.device)
        drafts = self.model.mtp_forward_batch(out, ids).float().cpu()
        for b, rid in enumerate(batch.req_ids):
            r = self.running[rid]
            if batch.start_positions[b] + batch.query_lens[b] >= len(r.prompt):
                r.draft_logits.append(drafts[b])

    def run(self, on_step: Callable[[StepStats], None] | None = None) -> dict[Hashable, EngineRequest]:
        """Step until every queued request is finished; ``on_step`` after each step (progress)."""
        while not self.idle:
            stats = self.step()
            if stats is not None and on_step is not None:
                on_step(stats)
        return self.finished
