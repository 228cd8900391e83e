"""Continuous batching on the V4 graph: requests arrive and leave, and every step mixes prefill chunks with
decode tokens in one `V4Model.forward_batch` call over the `CachePool`'s paged caches.

A step takes one token from every request that is decoding, then fills the rest of the ``chunk`` token
budget with prefill chunks, oldest request first (a prompt may span many steps). After the step each
request whose known tokens are all computed picks its next token (greedy unless ``choose`` says
otherwise); a request that has its ``max_new_tokens`` leaves and its pages go back to the pool. Every
page-aligned prefix of a prompt is registered as the prefill passes it, so a later request that starts
with the same tokens computes only its suffix (registered prefixes hold pages until the pool needs them back).

A step is one transaction: the pool is checkpointed, the step computes everything (pages, forward, token
choices, checks), and only then commits; any exception rolls the pool and the engine back to before the
step. When the pool runs out of pages, prefill chunks wait first, then the youngest running request is
preempted (its pages freed, itself requeued to recompute its prompt and the tokens it has so far). A
request whose activations go non-finite fails alone; the others' tokens come from a forward without it.
An engine is driven by one thread at a time: a call that finds another in progress raises
`EngineBusyError` at once.
"""
from __future__ import annotations

import operator
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from v4hal.hal.errors import NonFiniteError, RangeError, V4HalError

from .batch import ForwardBatch
from .pages import PoolExhaustedError
from .pool import CachePool

__all__ = ["Engine", "EngineRequest", "StepStats", "EngineBusyError", "STATUSES"]

#: ``choose(req_id, logits [vocab] fp32) -> token id``: how a request picks its next token
Chooser = Callable[[Hashable, torch.Tensor], int]

#: what `EngineRequest.status` can be
STATUSES = ("waiting", "running", "finished", "aborted", "failed")


class EngineBusyError(V4HalError, RuntimeError):
    """The engine is in use by another call (an `Engine` is driven by one thread at a time)."""


def greedy(_req_id: Hashable, logits: torch.Tensor) -> int:
    """The arg-max token."""
    return int(logits.argmax())


@dataclass
class EngineRequest:
    """A request in the engine: ``prompt`` token ids, ``max_new_tokens`` to generate, ``output`` so far, the
    logits each generated token was chosen from (``keep_logits``), the MTP logits after each (``mtp``), the
    prompt tokens reused from a registered prefix at its first admission, ``status`` (one of `STATUSES`),
    ``error`` (why it failed), and how often it was preempted."""

    req_id: Hashable
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    draft_logits: list[torch.Tensor] = field(default_factory=list)
    prefix_len: int = 0
    done: bool = False
    status: str = "waiting"
    error: str | None = None
    preemptions: int = 0


@dataclass
class StepStats:
    """One step: requests and tokens in it (prefill, recomputation after preemption included, and decode),
    wall time, pages in use after it, requests preempted and requests failed in it."""

    requests: int
    prefill_tokens: int
    decode_tokens: int
    seconds: float
    pages_in_use: dict[str, int]
    preemptions: int = 0
    failed: int = 0


@dataclass
class _Step:
    """What one step changes, built up before anything is committed (the queues are changed in place, and
    put back from ``running`` / ``waiting``, their state before the step, on a rollback): the requests
    admitted, preempted and failed, the items that ran, and each one's chosen token and rows."""

    running: dict[Hashable, EngineRequest]
    waiting: list[EngineRequest]
    admitted: set[Hashable] = field(default_factory=set)
    prefix_lens: dict[Hashable, int] = field(default_factory=dict)
    preempted: list[EngineRequest] = field(default_factory=list)
    failed: dict[Hashable, str] = field(default_factory=dict)
    items: list[tuple[Hashable, int]] = field(default_factory=list)
    batch: ForwardBatch | None = None
    starts: dict[Hashable, int] = field(default_factory=dict)
    chosen: dict[Hashable, tuple[int, torch.Tensor]] = field(default_factory=dict)
    drafts: dict[Hashable, torch.Tensor] = field(default_factory=dict)


class Engine:
    """Continuous batching of ``model`` (a `V4Model`) over ``pool`` (a `CachePool` of the model's config).

    ``chunk``: token budget of one step (decode tokens first, then prefill chunks); ``choose``: next-token
    rule (greedy by default; it must return an int token id in ``[0, vocab_size)``); ``keep_logits``: keep
    each request's logits rows (tests, parity runs); ``reuse_prefixes``: register the prompts' page-aligned
    prefixes for later requests; ``mtp``: also run the MTP block every step and keep its logits (drafts of
    the token after next) per request; ``isolate_failures``: re-run forwards to isolate requests whose
    activations go non-finite (see `step`). Set it to False when a forward is collective (expert
    parallelism: every rank must run the same forwards each step); then a request with non-finite logits
    fails and the others keep that forward's results, and a `NonFiniteError` from a value check rolls the
    step back and propagates.

    ``finished[req_id]`` holds every request that left: finished, aborted or failed (see
    `EngineRequest.status`) until `pop_finished` hands them over. ``preemptions``: requests preempted so far.
    """

    def __init__(self, model: torch.nn.Module, pool: CachePool, *, chunk: int = 64, choose: Chooser | None = None,
                 keep_logits: bool = False, reuse_prefixes: bool = True, mtp: bool = False,
                 isolate_failures: bool = True) -> None:
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise RangeError(f"Engine: chunk must be an int >= 1, got {chunk!r}")
        if pool.cfg != model.config:
            raise RangeError("Engine: pool must be built for the model's config")
        self.model, self.pool, self.chunk = model, pool, chunk
        self.choose = choose or greedy
        self.keep_logits, self.reuse_prefixes = keep_logits, reuse_prefixes
        if mtp and not len(model.mtp):
            raise RangeError("Engine: mtp=True needs a model with an MTP block (n_mtp_layers >= 1)")
        self.mtp, self.isolate_failures = mtp, bool(isolate_failures)
        self.waiting: list[EngineRequest] = []          # arrived (or preempted), not in the pool
        self.running: dict[Hashable, EngineRequest] = {}
        self.finished: dict[Hashable, EngineRequest] = {}
        self.steps: list[StepStats] = []
        self.tokens_computed = 0
        self.preemptions = 0
        self._lock = threading.Lock()
        self._holder: tuple[int, str] | None = None     # (thread id, call) of the call holding the engine
        self._lent_to: int | None = None                # thread whose `run` is calling its on_step

    # ------------------------------------------------------------------ one owner
    @contextmanager
    def _owned(self, op: str) -> Iterator[None]:
        """Hold the engine for call ``op`` without waiting: `EngineBusyError` when another call holds it
        (calls from ``run``'s ``on_step``, in its thread, go through)."""
        me = threading.get_ident()
        if not self._lock.acquire(blocking=False):
            if self._lent_to == me:
                yield
                return
            held = self._holder
            who = f"{held[1]} in thread {held[0]}" if held else "another call"
            raise EngineBusyError(f"Engine.{op}: the engine is in use ({who}); an Engine is driven by one thread "
                                  f"at a time (serialize the calls, or give each thread its own Engine)")
        self._holder = (me, op)
        try:
            yield
        finally:
            self._holder = None
            self._lock.release()

    # ------------------------------------------------------------------ requests
    def add(self, req_id: Hashable, prompt: Sequence[int], max_new_tokens: int) -> None:
        """Queue a request (it joins the pool at the next step). Refused with a `RangeError` naming it: an
        unhashable or known id, a token that is not an int (numpy / torch integer scalars are) or is outside
        ``[0, vocab_size)``, an empty prompt, ``max_new_tokens`` not an int >= 1, more than ``max_seq_len``
        positions, or more pages of some kind at its worst moment than the pool has (it could not run even
        alone)."""
        with self._owned("add"):
            self.waiting.append(self._check_request(req_id, prompt, max_new_tokens))

    def _check_request(self, req_id: Hashable, prompt: Sequence[int], max_new_tokens: int) -> EngineRequest:
        try:
            hash(req_id)
        except TypeError:
            raise RangeError(f"Engine.add: req_id must be hashable, got {type(req_id).__name__} {req_id!r}") from None
        op = f"Engine.add: request {req_id!r}"
        if req_id in self.running or req_id in self.finished or any(r.req_id == req_id for r in self.waiting):
            raise RangeError(f"{op}: the id is already known (waiting, running or finished)")
        new = _as_int(max_new_tokens)
        if new is None or new < 1:
            raise RangeError(f"{op}: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        max_new_tokens = new
        tokens = self._check_tokens(op, prompt)
        cfg = self.model.config
        length = len(tokens) + max_new_tokens - 1                # positions computed: the last token is not
        if length > cfg.max_seq_len:
            raise RangeError(f"{op}: prompt ({len(tokens)}) + max_new_tokens ({max_new_tokens}) - 1 exceeds "
                             f"max_seq_len = {cfg.max_seq_len}")
        peak = self.pool.request_peak_pages(length, self.chunk)
        short = {k: (n, self.pool.allocators[k].capacity) for k, n in peak.items()
                 if n > self.pool.allocators[k].capacity}
        if short:
            what = ", ".join(f"{k}: {n} pages, the pool has {c}" for k, (n, c) in short.items())
            raise RangeError(f"{op}: {length} positions in steps of up to chunk = {self.chunk} tokens need more "
                             f"pages than the pool holds, even alone ({what})")
        return EngineRequest(req_id, tokens, max_new_tokens)

    def _check_tokens(self, op: str, prompt: object) -> list[int]:
        """The prompt's token ids as ints: a sequence of integers, or a 1-D integer tensor / array (read at once)."""
        if isinstance(prompt, torch.Tensor) or hasattr(prompt, "__array__") and hasattr(prompt, "dtype"):
            shape = list(prompt.shape)
            if len(shape) != 1:
                raise RangeError(f"{op}: a prompt tensor or array must be 1-D, got shape {shape}")
            dt = prompt.dtype
            whole = (not dt.is_floating_point and not dt.is_complex and dt != torch.bool) if isinstance(
                prompt, torch.Tensor) else getattr(dt, "kind", "") in "iu"
            if not whole:
                raise RangeError(f"{op}: prompt must hold integer token ids, got a {dt} {type(prompt).__name__}")
            prompt = prompt.tolist()
        elif isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise RangeError(f"{op}: prompt must be a sequence of int token ids, got {type(prompt).__name__}")
        out = []
        vocab = self.model.config.vocab_size
        for i, t in enumerate(prompt):
            tok = _as_int(t)
            if tok is None or not 0 <= tok < vocab:
                raise RangeError(f"{op}: prompt[{i}] must be an int token id in [0, vocab_size = {vocab}), "
                                 f"got {type(t).__name__} {t!r}")
            out.append(tok)
        if not out:
            raise RangeError(f"{op}: prompt must hold at least one token")
        return out

    def abort(self, req_id: Hashable) -> bool:
        """Drop a waiting or running request: its pages go back to the pool and it moves to ``finished``
        with status ``"aborted"`` (the tokens it has so far kept). False when it had already left (nothing
        to do); `RangeError` when the id was never added."""
        with self._owned("abort"):
            if req_id in self.finished:
                return False
            r = self.running.get(req_id)
            if r is not None:
                self.pool.release(req_id)
                del self.running[req_id]
            else:
                r = next((w for w in self.waiting if w.req_id == req_id), None)
                if r is None:
                    raise RangeError(f"Engine.abort: request {req_id!r} is not known (never added)")
                self.waiting.remove(r)
            self._leave(r, "aborted")
            return True

    def _leave(self, r: EngineRequest, status: str, error: str | None = None) -> None:
        r.status, r.error, r.done = status, error, True
        self.finished[r.req_id] = r

    def pop_finished(self) -> dict[Hashable, EngineRequest]:
        """The requests that left since the last call (finished, aborted or failed; ``finished`` until now),
        which the engine then forgets: a long run that pops them as they leave keeps no prompt or output of a
        request that is done. A popped id is unknown to the engine afterwards (`abort` refuses it, `add` may
        use it again)."""
        with self._owned("pop_finished"):
            out, self.finished = self.finished, {}
            return out

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # ------------------------------------------------------------------ steps
    def step(self) -> StepStats | None:
        """Run one step (None when nothing is left to do). Any exception leaves the engine and the pool as
        they were before the call, so the step can be retried (or the culprit aborted)."""
        with self._owned("step"):
            return self._step()

    def run(self, on_step: Callable[[StepStats], None] | None = None) -> dict[Hashable, EngineRequest]:
        """Step until every queued request has left; ``on_step`` after each step (it may call `add`,
        `abort` or `step` on this engine). Returns ``finished``."""
        with self._owned("run"):
            while not self.idle:
                stats = self._step()
                if stats is not None and on_step is not None:
                    lent, self._lent_to = self._lent_to, threading.get_ident()
                    try:
                        on_step(stats)
                    finally:
                        self._lent_to = lent
            return self.finished

    def _step(self) -> StepStats | None:
        t0 = time.perf_counter()
        cp = self.pool.checkpoint()
        s = _Step(self.running, self.waiting)          # the queues before the step, kept as they are
        self.running, self.waiting = dict(self.running), list(self.waiting)
        try:
            self._admit(s)
            batch = self._schedule(s)
            if batch is not None:
                self._compute(s, batch)
            self.pool.seal(cp)                      # no cache write follows
            stats = self._commit(s, t0)
        except BaseException:
            self.pool.rollback(cp)
            self.running, self.waiting = s.running, s.waiting
            raise
        self.pool.commit(cp)
        return stats

    def _admit(self, s: _Step) -> None:
        """Every waiting request into the pool (a preempted one with its prompt and output so far)."""
        for r in self.waiting:
            st = self.pool.add_request(r.req_id, r.prompt + r.output)
            s.prefix_lens[r.req_id] = st.prefix_len
            self.running[r.req_id] = r
            s.admitted.add(r.req_id)
        self.waiting = []

    def _decoding(self, rid: Hashable) -> bool:
        st = self.pool.requests[rid]
        return st.computed >= st.prompt_len

    def _plan(self, running: dict[Hashable, EngineRequest]) -> list[tuple[Hashable, int]]:
        items, budget = [], self.chunk
        prefill = []
        for rid in running:
            st = self.pool.requests[rid]
            if st.computed >= st.prompt_len:          # decoding: its last chosen token
                items.append((rid, 1))
                budget -= 1
            else:
                prefill.append((rid, st.prompt_len - st.computed))
        for rid, left in prefill:
            if budget <= 0:
                break
            n = min(left, budget)
            items.append((rid, n))
            budget -= n
        return items

    def _schedule(self, s: _Step) -> ForwardBatch | None:
        """The step's batch (None when nothing runs). When the pool cannot hold every item's pages, prefill
        chunks wait (the newest first); when decode tokens alone do not fit, the youngest running request is
        preempted (a request admitted in this step just goes back to waiting) and the step is planned again."""
        while True:
            items = self._plan(self.running)
            if not items:
                return None
            while True:
                try:
                    s.batch, s.items = self.pool.schedule(items, device=self.model.device), items
                    return s.batch
                except PoolExhaustedError:
                    prefill = [i for i, (rid, _) in enumerate(items) if not self._decoding(rid)]
                    if prefill and len(items) > 1:
                        del items[prefill[-1]]
                        continue
                    if len(self.running) == 1:         # alone and still short: `add` lets no such request in
                        raise
                break
            rid = next(reversed(self.running))
            r = self.running.pop(rid)
            self.pool.release(rid)
            if rid in s.admitted:
                s.admitted.discard(rid)
                s.prefix_lens.pop(rid, None)
            else:
                s.preempted.append(r)
            self.waiting.insert(0, r)

    def _compute(self, s: _Step, batch: ForwardBatch) -> None:
        """Forward the step's items, isolating requests whose activations go non-finite, and pick the tokens."""
        s.starts = dict(zip(batch.req_ids, batch.start_positions))
        ok = self._run(s, s.items, batch)
        s.items = [it for it in s.items if it[0] in ok]

    def _run(self, s: _Step, items: list[tuple[Hashable, int]], batch: ForwardBatch | None = None) -> set[Hashable]:
        """Forward ``items`` and pick their tokens; returns the requests that ran. A `NonFiniteError` (a value
        check) or a request's non-finite logits mark requests as failed in ``s.failed``: a failed forward is
        split in halves and run again until each culprit is alone, and requests that shared a forward with
        a non-finite one run again without it, so every kept result comes from a forward of finite requests."""
        if batch is None:
            batch = self.pool.build_batch(items, device=self.model.device)
        try:
            out = self.model.forward_batch(batch, self.pool)
            logits = out.logits.float().cpu()
            bad = [rid for (rid, _), fin in zip(items, torch.isfinite(logits).all(dim=-1).tolist()) if not fin]
            if not bad or not self.isolate_failures:
                self._choose(s, items, logits, skip=bad)
                if self.mtp:
                    self._drafts(s, batch, out)
                s.failed.update(dict.fromkeys(bad, "non-finite logits"))
                return {rid for rid, _ in items if rid not in bad}
        except NonFiniteError as e:
            if not self.isolate_failures:
                raise
            if len(items) == 1:
                s.failed[items[0][0]] = f"non-finite activations: {e}"
                return set()
            half = len(items) // 2
            return self._run(s, items[:half]) | self._run(s, items[half:])
        for rid in bad:
            s.failed[rid] = "non-finite logits"
        rest = [it for it in items if it[0] not in bad]
        return self._run(s, rest) if rest else set()

    def _choose(self, s: _Step, items: list[tuple[Hashable, int]], logits: torch.Tensor,
                skip: Sequence[Hashable] = ()) -> None:
        vocab = self.model.config.vocab_size
        for b, (rid, n) in enumerate(items):
            st = self.pool.requests[rid]
            if s.starts[rid] + n < len(st.tokens) or rid in skip:     # no token to pick (yet)
                continue
            got = self.choose(rid, logits[b])
            tok = _as_int(got)
            if tok is None or not 0 <= tok < vocab:
                raise RangeError(f"Engine.step: choose returned {type(got).__name__} {got!r} for request {rid!r}; "
                                 f"expected an int token id in [0, vocab_size = {vocab})")
            s.chosen[rid] = (tok, logits[b])

    def _drafts(self, s: _Step, batch: ForwardBatch, out) -> None:
        """The MTP block's logits at each request's last new token (the step's tokens, each followed by the
        next known token: the prompt's, or the one just chosen)."""
        nxt = []
        for rid, start, n in zip(batch.req_ids, batch.start_positions, batch.query_lens):
            seq = self.pool.requests[rid].tokens
            follow = seq[start + 1:start + 1 + n]
            nxt.extend(follow if len(follow) == n else follow + [s.chosen.get(rid, (0,))[0]])   # 0: failed
        ids = torch.tensor(nxt, dtype=torch.int64, device=self.model.device)
        drafts = self.model.mtp_forward_batch(out, ids).float().cpu()
        for b, rid in enumerate(batch.req_ids):
            if rid in s.chosen:
                s.drafts[rid] = drafts[b]

    def _commit(self, s: _Step, t0: float) -> StepStats | None:
        """Apply the step: pool first (tokens, positions, releases; each call checks before it changes
        anything), then the engine's own state, which cannot fail."""
        decode = sum(n for rid, n in s.items if s.starts[rid] >= self.pool.requests[rid].prompt_len)
        prefill = sum(n for _, n in s.items) - decode
        chosen = {rid: c for rid, c in s.chosen.items() if rid not in s.failed}
        finished = [rid for rid in chosen if len(self.running[rid].output) + 1 >= self.running[rid].max_new_tokens]
        for rid in s.failed:
            self.pool.release(rid)
        for rid, (tok, _) in chosen.items():
            if rid not in finished:
                self.pool.append_tokens(rid, [tok])
        if s.items:
            batch = self.pool.build_batch(s.items, device="cpu") if s.failed else s.batch
            self.pool.advance_batch(batch, register_prefixes=self.reuse_prefixes)
        for rid in finished:
            self.pool.release(rid)
        # the engine: nothing below raises
        for rid, r in self.running.items():
            if rid in s.admitted:
                if not r.preemptions:
                    r.prefix_len = s.prefix_lens[rid]
                r.status = "running"
        for r in s.preempted:
            r.preemptions += 1
            r.status = "waiting"
        for rid, (tok, row) in chosen.items():
            r = self.running[rid]
            r.output.append(tok)
            if self.keep_logits:
                r.logits.append(row)
            if rid in s.drafts:
                r.draft_logits.append(s.drafts[rid])
        for rid, why in s.failed.items():
            self._leave(self.running.pop(rid), "failed", f"request {rid!r} failed: {why}")
        for rid in finished:
            self._leave(self.running.pop(rid), "finished")
        self.preemptions += len(s.preempted)
        if not s.items and not s.failed and not s.preempted:
            return None
        self.tokens_computed += prefill + decode
        stats = StepStats(len(s.items), prefill, decode, time.perf_counter() - t0, self.pool.pages_in_use(),
                          len(s.preempted), len(s.failed))
        self.steps.append(stats)
        return stats


def _as_int(t: object) -> int | None:
    """``t`` as an int when it is an integer (int, numpy or 0-d torch integer scalar; never a bool), else None."""
    if isinstance(t, torch.Tensor):
        if t.dim() != 0 or t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
            return None
        return int(t)
    if isinstance(t, bool) or type(t).__name__ in ("bool", "bool_"):      # numpy's bool scalars too
        return None
    try:
        return operator.index(t)
    except TypeError:
        return None
