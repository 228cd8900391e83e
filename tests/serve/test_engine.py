"""The `Engine` as a runtime drives it: a step that raises changes nothing and can be retried, abort, checks at
the door, preemption when the pool runs out, a request with non-finite activations failing alone, and one
thread at a time. Every request must end with the tokens (and, where stated, the logits) it gets alone."""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import v4hal
from v4hal.hal import dispatch
from v4hal.hal.errors import NonFiniteError, RangeError
from v4hal.model import ModelConfig, V4Model, write_random_checkpoint
from v4hal.serve import CachePool, Engine, EngineBusyError
from v4hal.serve.batch import POSITION_KINDS, RATIO, first_needed_position, kinds_of

from .helpers import snapshot

MINI = ModelConfig.preset("v4-mini")
BS = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[V4Model]:
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield V4Model.from_pretrained(write_random_checkpoint(MINI, tmp_path_factory.mktemp("mini"), seed=0))
    torch.set_num_threads(prev)


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MINI.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _engine(model: V4Model, blocks: dict[str, int] | None = None, block_size: int = BS, **kw) -> Engine:
    return Engine(model, CachePool(MINI, block_size=block_size, blocks=blocks), **kw)


def _alone(model: V4Model, prompt: list[int], new: int, **kw) -> tuple[list[int], list[torch.Tensor]]:
    """Tokens and logits of one request alone in a roomy pool."""
    e = _engine(model, keep_logits=True, **kw)
    e.add("x", prompt, new)
    r = e.run()["x"]
    assert r.status == "finished"
    return r.output, r.logits


def _state(e: Engine) -> object:
    """Everything of the engine and its pool that a failed step must leave as it was."""
    reqs = [*e.waiting, *e.running.values(), *e.finished.values()]
    return (snapshot(e.pool), [r.req_id for r in e.waiting], list(e.running), list(e.finished),
            [(r.req_id, list(r.output), len(r.logits), r.status, r.preemptions, r.prefix_len) for r in reqs],
            len(e.steps), e.tokens_computed, e.preemptions, e.pool.stats())


def _readable(pool: CachePool) -> dict[tuple, torch.Tensor]:
    """Every cache entry some later step reads: per request, what a continuation at its ``computed`` reads;
    per registered prefix, what a continuation at its length reads (window and state positions from their
    first needed position, every compressed entry), by owner, layer cache and entry."""
    out = {}
    owners = [(("req", rid), st.computed, st.tables) for rid, st in pool.requests.items()]
    owners += [(("prefix", e.tokens), e.length, e.pages) for e in pool.prefix.lru_order()]
    for owner, done, tables in owners:
        for s in pool.specs:
            bs = pool.block_sizes[s.kind]
            lo = first_needed_position(MINI, done, s.kind) if s.kind in POSITION_KINDS else 0
            idx = torch.arange(lo, done // RATIO[s.kind])
            blocks = torch.tensor(tables[s.kind], dtype=torch.int64)[idx // bs] if len(idx) else idx
            assert bool((blocks >= 0).all()), (owner, s)
            t = getattr(pool.layers[s.layer], s.name)
            out[(owner, s.layer, s.name)] = (t[blocks, idx % bs] if s.layout is None else
                                             v4hal.paged_cache_read(t, (blocks * bs + idx % bs).int(), s.layout))
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- exception-safe step
class _Flaky:
    """Greedy, but raises once at the ``at``-th call (or every call for ``rid`` when ``always``)."""

    def __init__(self, at: int = -1, rid: object = None) -> None:
        self.calls, self.at, self.rid = 0, at, rid

    def __call__(self, rid: object, logits: torch.Tensor) -> int:
        self.calls += 1
        if self.calls == self.at or rid == self.rid:
            raise ValueError("step failed")
        return int(logits.argmax())


@pytest.mark.parametrize("where", ["chooser", "forward", "advance", "interrupt"])
def test_a_step_that_raises_changes_nothing_and_a_retry_gives_the_undisturbed_tokens(
        model: V4Model, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The third step raises: in the chooser (after another request's pick), in the forward (a kernel), in
    the pool's commit (after the cache writes and the releases are sealed) or as a KeyboardInterrupt."""
    prompts = _prompts([20, 9, 33])
    ref = _engine(model, keep_logits=True)
    for i, p in enumerate(prompts):
        ref.add(i, p, 4)
    ref.run()
    flaky = _Flaky(at=8 if where == "chooser" else -1)     # step 3 (3 picks a step): the second request's pick
    e = _engine(model, choose=flaky, keep_logits=True)
    for i, p in enumerate(prompts):
        e.add(i, p, 4)
    e.step()
    e.step()
    before, pages = _state(e), _readable(e.pool)
    error: type[BaseException] = {"interrupt": KeyboardInterrupt}.get(where, ValueError)
    if where != "chooser":
        target = e.model if where in ("forward", "interrupt") else e.pool
        name = "forward_batch" if target is e.model else "advance_batch"
        real = getattr(target, name)

        def fail_once(*args, **kw):
            monkeypatch.setattr(target, name, real)
            real(*args, **kw)
            raise error("step failed")

        monkeypatch.setattr(target, name, fail_once)
    with pytest.raises(error, match="step failed"):
        e.step()
    assert _state(e) == before and _same(_readable(e.pool), pages)
    e.run()
    assert {i: r.output for i, r in e.finished.items()} == {i: r.output for i, r in ref.finished.items()}
    assert all(torch.equal(x, y) for i in ref.finished for x, y in zip(e.finished[i].logits, ref.finished[i].logits))


def test_what_a_failed_forward_wrote_is_overwritten_before_it_is_read(model: V4Model,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The failed forward writes the caches of other tokens at the step's positions (128 .. 149: window,
    compressed, indexer and compressor-state entries, the ratio-128 block started); the retry computes those
    positions in chunks of 5, so each later chunk runs over stale bytes of the failed one until it writes
    its own. Logits and tokens equal those of the same schedule without the failure."""
    prompt = _prompts([150], seed=6)[0]

    def run(fail: bool) -> list[torch.Tensor]:
        e = _engine(model, chunk=64, keep_logits=True, reuse_prefixes=False)
        e.add("a", prompt, 4)
        e.step()
        e.step()
        if fail:
            real = e.model.forward_batch

            def other_tokens(batch, pool):
                monkeypatch.setattr(e.model, "forward_batch", real)
                real(dataclasses.replace(batch, input_ids=(batch.input_ids * 7 + 1) % MINI.vocab_size), pool)
                raise ValueError("step failed")

            monkeypatch.setattr(e.model, "forward_batch", other_tokens)
            with pytest.raises(ValueError):
                e.step()
        e.chunk = 5
        e.run()
        return e.finished["a"].logits

    want, got = run(False), run(True)
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("bad", [1000, -1, 2.0, True, "3", None])
def test_a_choice_outside_the_vocabulary_is_refused(model: V4Model, bad: object) -> None:
    e = _engine(model, choose=lambda rid, logits: bad)
    e.add("a", _prompts([5])[0], 3)
    before = _state(e)
    with pytest.raises(RangeError, match=r"choose returned .* for request 'a'; expected an int token id in "
                                         r"\[0, vocab_size = 512\)"):
        e.step()
    assert _state(e) == before and not e.finished


def test_integer_scalars_are_valid_choices(model: V4Model) -> None:
    e = _engine(model, choose=lambda rid, logits: np.int64(logits.argmax()) if rid == "a" else logits.argmax())
    p = _prompts([6, 7])
    e.add("a", p[0], 3)
    e.add("b", p[1], 3)
    e.run()
    assert e.finished["a"].output == _alone(model, p[0], 3)[0] and e.finished["b"].output == _alone(model, p[1], 3)[0]


# ---------------------------------------------------------------------- abort
def test_abort_drops_waiting_and_running_requests_and_frees_their_pages(model: V4Model) -> None:
    prompts = _prompts([40, 12, 25, 8])
    e = _engine(model, chunk=32, reuse_prefixes=False)
    for i, p in enumerate(prompts[:3]):
        e.add(i, p, 5)
    e.step()                                    # 0 prefills 32 tokens; 1 and 2 wait for budget
    e.step()
    assert e.pool.requests[1].computed > 0
    held = {k: len([b for b in t if b >= 0]) for k, t in e.pool.requests[1].tables.items()}
    in_use = e.pool.pages_in_use()
    assert e.abort(1) is True
    assert e.pool.pages_in_use() == {k: in_use[k] - held[k] for k in in_use} and 1 not in e.pool.requests
    e.add(3, prompts[3], 5)
    assert e.abort(3) is True                   # still waiting
    assert (e.finished[1].status, e.finished[3].status) == ("aborted", "aborted")
    with pytest.raises(RangeError, match="request 'zz' is not known"):
        e.abort("zz")
    e.run()
    assert e.abort(0) is False                  # already finished: nothing to do
    for i in (0, 2):
        assert e.finished[i].output == _alone(model, prompts[i], 5, reuse_prefixes=False)[0]
    assert e.pool.pages_in_use() == dict.fromkeys(e.pool.kinds, 0)


def test_abort_recovers_from_a_request_whose_step_always_fails(model: V4Model) -> None:
    """A request whose chooser always raises blocks every step until it is aborted; the rest are unharmed."""
    prompts = _prompts([10, 14])
    e = _engine(model, choose=_Flaky(rid="bad"))
    e.add("bad", prompts[0], 3)
    e.add("ok", prompts[1], 3)
    for _ in range(2):
        with pytest.raises(ValueError):
            e.step()
    e.abort("bad")
    e.run()
    assert e.finished["ok"].output == _alone(model, prompts[1], 3)[0] and e.finished["bad"].output == []


# ---------------------------------------------------------------------- validation at the door
@pytest.mark.parametrize("req_id, prompt, new, message", [
    ("a", [1.9, "7", True], 2, r"request 'a': prompt\[0\] must be an int token id in \[0, vocab_size = 512\), "
                              r"got float 1.9"),
    ("a", [3, "7"], 2, r"prompt\[1\] must be an int token id .*got str '7'"),
    ("a", [3, True], 2, r"prompt\[1\] .*got bool True"),
    ("a", [3, 512], 2, r"prompt\[1\] .*got int 512"),
    ("a", [-1], 2, r"prompt\[0\] .*got int -1"),
    ("a", torch.tensor([1.0, 2.0]), 2, r"request 'a': prompt must hold integer token ids, got a torch.float32 Tensor"),
    ("a", np.array([1.0]), 2, r"prompt must hold integer token ids, got a float64 ndarray"),
    ("a", np.array([True]), 2, r"prompt must hold integer token ids, got a bool ndarray"),
    ("a", torch.ones(2, 2, dtype=torch.int64), 2, r"a prompt tensor or array must be 1-D, got shape \[2, 2\]"),
    ("a", [3, np.True_], 2, r"prompt\[1\] .*got bool np.True_"),
    ("a", torch.tensor([3, 600]), 2, r"prompt\[1\] .*got int 600"),
    ("a", "abc", 2, r"prompt must be a sequence of int token ids, got str"),
    ("a", [], 2, r"request 'a': prompt must hold at least one token"),
    ("a", [1, 2], 0, r"request 'a': max_new_tokens must be an int >= 1, got 0"),
    ("a", [1, 2], True, r"max_new_tokens must be an int >= 1, got True"),
    ([1], [1, 2], 2, r"req_id must be hashable, got list \[1\]"),
    ((1, [2]), [1, 2], 2, r"req_id must be hashable, got tuple"),
    ("a", [1] * 4000, 100, r"request 'a': prompt \(4000\) \+ max_new_tokens \(100\) - 1 exceeds max_seq_len"),
])
def test_add_refuses_bad_requests(model: V4Model, req_id: object, prompt: object, new: object, message: str) -> None:
    e = _engine(model)
    with pytest.raises(RangeError, match=message):
        e.add(req_id, prompt, new)
    assert e.idle


def test_add_refuses_duplicates_and_requests_the_pool_cannot_hold_alone(model: V4Model) -> None:
    e = _engine(model, blocks={"token": 3, "c4": 2}, chunk=16)
    e.add("a", [1, 2, 3], 2)
    with pytest.raises(RangeError, match="request 'a': the id is already known"):
        e.add("a", [4], 2)
    # 140 positions: 35 ratio-4 entries fill 3 c4 pages of 16; the pool has 2
    with pytest.raises(RangeError, match=r"request 'b': 140 positions .* \(c4: 3 pages, the pool has 2\)"):
        e.add("b", [5] * 100, 41)
    # a window of 16 positions and a chunk of 16 span at most 3 token pages, a chunk of 40 up to 5
    e.add("c", [5] * 100, 28)
    with pytest.raises(RangeError, match=r"token: 5 pages, the pool has 3"):
        Engine(model, e.pool, chunk=40).add("d", [5] * 100, 2)
    assert [r.req_id for r in e.waiting] == ["a", "c"]


def test_add_takes_numpy_and_torch_integers(model: V4Model) -> None:
    p = _prompts([9])[0]
    e = _engine(model)
    e.add("np", np.array(p, dtype=np.int32), 3)
    e.add("torch", torch.tensor(p), 3)
    e.add("scalars", [np.int64(t) for t in p[:-1]] + [torch.tensor(p[-1])], np.int16(3))
    e.run()
    want = _alone(model, p, 3)[0]
    assert all(r.output == want and r.prompt == p for r in e.finished.values())


# ---------------------------------------------------------------------- preemption
def test_preemption_lets_requests_that_fit_alone_finish_together(model: V4Model) -> None:
    """Pages of 4 entries: requests of 23 and 21 positions each need 2 c4 pages (5 entries) at the end; the
    pool has 3. The younger is preempted when the pages run out mid-decode, recomputes its prompt and
    tokens, and both get their tokens alone."""
    prompts = _prompts([10, 8], seed=1)
    new = 14
    e = _engine(model, blocks={"c4": 3}, block_size=4)
    for i, p in enumerate(prompts):
        e.add(i, p, new)
    e.run()
    assert [r.status for r in e.finished.values()] == ["finished", "finished"]
    for i, p in enumerate(prompts):
        assert e.finished[i].output == _alone(model, p, new)[0], i
    assert e.preemptions >= 1 and e.finished[1].preemptions == e.preemptions and e.finished[0].preemptions == 0
    assert sum(s.preemptions for s in e.steps) == e.preemptions
    recomputed = sum(s.prefill_tokens for s in e.steps) - sum(map(len, prompts))
    assert recomputed > 0 and e.tokens_computed == sum(s.prefill_tokens + s.decode_tokens for s in e.steps)
    for entry in list(e.pool.prefix.lru_order()):
        e.pool.evict_prefix(entry)
    assert e.pool.pages_in_use() == dict.fromkeys(e.pool.kinds, 0)


def test_a_failed_step_that_preempted_and_evicted_restores_every_page(model: V4Model) -> None:
    """Fail the steps of a tight run that preempt a request or evict registered prefixes: the bookkeeping and
    the bytes of every page held before come back, and the retried run ends with the undisturbed tokens."""
    prompts = _prompts([12, 10, 9], seed=2)
    prompts[2][:8] = prompts[0][:8]                    # a registered prefix to reuse
    new = 14

    def start(choose=None) -> Engine:
        e = _engine(model, blocks={"c4": 4, "token": 14}, block_size=4, choose=choose)
        for i, p in enumerate(prompts):
            e.add(i, p, new)
        return e

    ref = start()
    events = []
    while not ref.idle:
        prefixes = len(ref.pool.prefix)
        stats = ref.step()
        if stats.preemptions or len(ref.pool.prefix) < prefixes:
            events.append(len(ref.steps) - 1)
    assert events
    fail_at = {events[0], events[-1]}
    state = {"step": 0, "failing": False}

    def choose(rid: object, logits: torch.Tensor) -> int:
        if state["failing"]:
            raise ValueError("step failed")
        return int(logits.argmax())

    e = start(choose)
    while not e.idle:
        if len(e.steps) in fail_at:
            fail_at.discard(len(e.steps))
            before, pages = _state(e), _readable(e.pool)
            state["failing"] = True
            with pytest.raises(ValueError):
                e.step()
            state["failing"] = False
            assert _state(e) == before and _same(_readable(e.pool), pages)
        e.step()
    assert {i: r.output for i, r in e.finished.items()} == {i: r.output for i, r in ref.finished.items()}
    assert e.preemptions == ref.preemptions and e.pool.stats() == ref.pool.stats()


def test_arrivals_aborts_failures_and_preemptions_mixed(model: V4Model) -> None:
    """Requests arriving over time into a pool of 3 c4 pages of 4 entries, one aborted mid-decode, a chooser
    that raises now and then (the step retried): every other request ends with the tokens it gets alone,
    the aborted one with a prefix of them, and every page comes back."""
    rng = torch.Generator().manual_seed(8)
    prompts = _prompts([10, 6, 13, 8, 11], seed=8)
    new = 12
    alone = [_alone(model, p, new, block_size=4)[0] for p in prompts]
    raise_at = set(torch.randint(0, 120, (8,), generator=rng).tolist())
    calls = [0]

    def choose(rid: object, logits: torch.Tensor) -> int:
        calls[0] += 1
        if calls[0] in raise_at:
            raise ValueError("step failed")
        return int(logits.argmax())

    e = _engine(model, blocks={"c4": 3}, block_size=4, choose=choose)
    arrive = {0: [0, 1], 2: [2], 5: [3], 9: [4]}
    step = failures = 0
    while arrive or not e.idle:
        for i in arrive.pop(step, []):
            e.add(i, prompts[i], new)
        if step == 7 and 2 not in e.finished:
            assert e.abort(2)
        try:
            e.step()
            step += 1
        except ValueError:
            failures += 1
    assert failures >= 1 and e.preemptions >= 1
    assert e.finished[2].status == "aborted" and e.finished[2].output == alone[2][:len(e.finished[2].output)]
    for i in (0, 1, 3, 4):
        assert (e.finished[i].status, e.finished[i].output) == ("finished", alone[i]), i
    for entry in list(e.pool.prefix.lru_order()):
        e.pool.evict_prefix(entry)
    assert e.pool.pages_in_use() == dict.fromkeys(e.pool.kinds, 0)


# ---------------------------------------------------------------------- failure isolation
@contextmanager
def _poisoned(model: V4Model, token: int) -> Iterator[None]:
    """The embedding row of ``token`` set to NaN for the duration."""
    w = model.embed.weight
    keep = w[token].clone()
    with torch.no_grad():
        w[token] = float("nan")
    try:
        yield
    finally:
        with torch.no_grad():
            w[token] = keep


@pytest.fixture(params=["checks on", "checks off"])
def value_checks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "checks off":
        monkeypatch.setenv("V4HAL_CHECK_VALUES", "0")
    dispatch.refresh()
    yield request.param
    monkeypatch.undo()
    dispatch.refresh()


def test_a_non_finite_request_fails_alone(model: V4Model, value_checks: str) -> None:
    """One request's prompt holds a token with a NaN embedding: it fails with the reason, the others finish
    with the tokens and logits they get alone (every kept result comes from a forward without it)."""
    prompts = _prompts([20, 7, 26, 11], seed=3)
    bad = 5
    prompts = [[t if t != bad else bad + 1 for t in p] for p in prompts]
    prompts[2][-4] = bad
    alone = [_alone(model, p, 4) for p in prompts]
    with _poisoned(model, bad):
        e = _engine(model, keep_logits=True)
        for i, p in enumerate(prompts):
            e.add(i, p, 4)
        e.run()
    r = e.finished[2]
    assert (r.status, r.done, r.output) == ("failed", True, [])
    reason = "non-finite activations: act_quant: x must be finite" if value_checks == "checks on" \
        else "non-finite logits"
    assert r.error.startswith(f"request 2 failed: {reason}")
    assert sum(s.failed for s in e.steps) == 1
    for i in (0, 1, 3):
        got = e.finished[i]
        assert got.status == "finished" and got.error is None and got.output == alone[i][0]
        assert all(torch.equal(a, b) for a, b in zip(got.logits, alone[i][1])), i
    assert e.pool.requests == {} and 2 not in e.running


def test_without_isolation_a_step_runs_one_forward(model: V4Model, value_checks: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``isolate_failures=False`` (collective forwards): one forward per step; with checks off the request
    with non-finite logits fails and the others finish with their tokens, with checks on the value check's
    error rolls the step back and propagates."""
    prompts = _prompts([12, 9], seed=7)
    bad = 5
    prompts = [[t if t != bad else bad + 1 for t in p] for p in prompts]
    prompts[1][3] = bad
    e = _engine(model, isolate_failures=False)
    forwards = [0]
    real = e.model.forward_batch

    def counted(*args, **kw):
        forwards[0] += 1
        return real(*args, **kw)

    monkeypatch.setattr(e.model, "forward_batch", counted)
    for i, p in enumerate(prompts):
        e.add(i, p, 3)
    with _poisoned(model, bad):
        if value_checks == "checks on":
            before = _state(e)
            with pytest.raises(NonFiniteError, match="act_quant: x must be finite"):
                e.step()
            assert _state(e) == before and forwards[0] == 1
            return
        e.run()
    assert forwards[0] == len(e.steps)
    assert (e.finished[1].status, e.finished[1].error) == ("failed", "request 1 failed: non-finite logits")
    assert e.finished[0].status == "finished" and e.finished[0].output == _alone(model, prompts[0], 3)[0]


# ---------------------------------------------------------------------- one owner
def test_one_engine_refuses_a_second_thread(model: V4Model) -> None:
    inside, go = threading.Event(), threading.Event()

    def choose(rid: object, logits: torch.Tensor) -> int:
        inside.set()
        assert go.wait(30)
        return int(logits.argmax())

    prompts = _prompts([8, 5])
    e = _engine(model, choose=choose)
    e.add("a", prompts[0], 3)
    t = threading.Thread(target=e.run)
    t.start()
    try:
        assert inside.wait(30)
        for call in (e.step, e.run, lambda: e.add("b", prompts[1], 3), lambda: e.abort("a")):
            with pytest.raises(EngineBusyError, match=r"in use \(run in thread \d+\); an Engine is driven by one "
                                                      r"thread at a time"):
                call()
    finally:
        go.set()
        t.join(60)
    assert not t.is_alive() and e.finished["a"].output == _alone(model, prompts[0], 3)[0]


def test_calls_from_the_chooser_are_refused_and_on_step_may_add(model: V4Model) -> None:
    prompts = _prompts([8, 5, 6])
    e = _engine(model, choose=lambda rid, logits: e.add("late", prompts[2], 2) or 0)
    e.add("a", prompts[0], 2)
    with pytest.raises(EngineBusyError, match=r"Engine.add: the engine is in use \(step"):
        e.step()
    assert [r.req_id for r in e.waiting] == ["a"] and not e.running

    e = _engine(model)
    e.add("a", prompts[0], 3)
    e.run(on_step=lambda stats: None if "b" in e.finished or len(e.steps) != 1 else e.add("b", prompts[1], 3))
    assert e.finished["b"].output == _alone(model, prompts[1], 3)[0]


def test_two_engines_in_two_threads(model: V4Model) -> None:
    prompts = _prompts([12, 9, 15, 6], seed=4)
    want = {i: _alone(model, p, 4)[0] for i, p in enumerate(prompts)}
    engines = [_engine(model), _engine(model)]
    for i, p in enumerate(prompts):
        engines[i % 2].add(i, p, 4)
    errors: list[BaseException] = []

    def drive(e: Engine) -> None:
        try:
            e.run()
        except BaseException as exc:          # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert {i: r.output for e in engines for i, r in e.finished.items()} == want


# ---------------------------------------------------------------------- the pool's side
def test_pool_checkpoint_rolls_back_every_call() -> None:
    pool = CachePool(MINI, block_size=BS, blocks={"token": 12, "c4": 4}, allocate=False)
    prompt = list(range(40))
    pool.add_request("a", prompt)
    pool.advance_batch(pool.schedule([("a", 40)]), register_prefixes=True)
    before = snapshot(pool), pool.stats()
    cp = pool.checkpoint()
    with pytest.raises(RangeError, match="a checkpoint is already open"):
        pool.checkpoint()
    pool.add_request("b", prompt[:32] + [7] * 30)           # reuses a prefix of a
    pool.append_tokens("a", [3])
    pool.advance_batch(pool.schedule([("a", 1), ("b", 30)]), register_prefixes=True)
    pool.release("a")
    for entry in list(pool.prefix.lru_order()):
        pool.evict_prefix(entry)
    pool.rollback(cp)
    assert (snapshot(pool), pool.stats()) == before
    with pytest.raises(RangeError, match="not this pool's open one"):
        pool.commit(cp)
    cp = pool.checkpoint()
    pool.release("a")
    pool.commit(cp)
    assert "a" not in pool.requests and pool.checkpoint() is not None


@pytest.mark.parametrize("block_size, chunk, length", [(16, 64, 300), (4, 7, 150), (16, 1, 90), (8, 40, 600)])
def test_request_peak_pages_bounds_what_one_request_holds(block_size: int, chunk: int, length: int) -> None:
    """One request computed in steps of up to ``chunk`` tokens starting at every alignment: the most pages it
    holds of each kind is at most `request_peak_pages`, and the bound is reached or missed by one page."""
    pool = CachePool(MINI, block_size=block_size, blocks=dict.fromkeys(kinds_of(MINI), 4000), allocate=False)
    bound = pool.request_peak_pages(length, chunk)
    peak = dict.fromkeys(pool.kinds, 0)
    for first in range(1, min(chunk, length) + 1, max(1, chunk // 5)):
        pool.add_request("r", [1] * length)
        done = 0
        while done < length:
            n = min(first if done == 0 else chunk, length - done)
            batch = pool.schedule([("r", n)])
            for k, t in pool.requests["r"].tables.items():
                peak[k] = max(peak[k], sum(b >= 0 for b in t))
            pool.advance_batch(batch)
            done += n
        pool.release("r")
    assert all(bound[k] - 1 <= peak[k] <= bound[k] for k in pool.kinds), (peak, bound)


def test_pop_finished_hands_over_and_forgets_the_requests_that_left(model: V4Model) -> None:
    """`Engine.pop_finished` returns the requests that left since the last call (finished and aborted alike)
    and the engine keeps none of them: the next call returns only later ones, a popped id is unknown to
    `abort`, and it may be added again."""
    prompts = _prompts([9, 40, 5])
    e = _engine(model, chunk=32, reuse_prefixes=False)
    for i, p in enumerate(prompts):
        e.add(i, p, 2)
    assert e.pop_finished() == {}
    e.abort(2)
    while 0 not in e.finished:
        e.step()
    got = e.pop_finished()
    assert 0 in got and got[2].status == "aborted" and got[0].output == _alone(model, prompts[0], 2)[0]
    assert not e.finished and not set(got) & set(e.running)
    with pytest.raises(RangeError, match="request 0 is not known"):
        e.abort(0)
    e.run()
    rest = e.pop_finished()
    assert set(rest) == {0, 1, 2} - set(got) and {**got, **rest}[1].output == _alone(model, prompts[1], 2)[0]
    assert e.pop_finished() == {} and not e.finished
    e.add(0, prompts[0], 2)                     # a popped id may come back
    e.run()
    assert e.pop_finished()[0].output == got[0].output
