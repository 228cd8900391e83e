"""Start N local ranks on 127.0.0.1 (`spawn`), each with an initialized process group.

``spawn(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in ``world_size`` processes
(``torch.multiprocessing``, start method "spawn" by default) after
``init_process_group(backend, init_method="tcp://127.0.0.1:<free port>", timeout=timeout_s)`` and
returns the ranks' return values in rank order (they travel back through ``torch.save`` files).

Failure handling, so nothing hangs: a rank that raises records its exception and exits; once any
rank has failed (exception or non-zero exit code), the others get ``timeout_s`` plus a grace period
to finish (their collectives raise `EPTimeoutError` within the process group's timeout), then they
are terminated; `EPRankError` reports every failed rank with its error. ``join_timeout_s`` bounds
the whole run.
"""
from __future__ import annotations

import datetime
import os
import shutil
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import EPRankError, EPTimeoutError

__all__ = ["free_port", "spawn"]

_GRACE_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, backend: str, timeout_s: float,
           threads: int | None, result_dir: str, args: tuple[Any, ...]) -> None:
    """Body of each launched process: init the group, run ``fn``, save its result or error."""
    import torch.distributed as dist

    out = Path(result_dir) / f"rank{rank}.pt"
    if threads:
        torch.set_num_threads(threads)
    try:
        try:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, TimeoutError) as exc:
            raise EPTimeoutError(f"spawn: rank {rank} of {world_size} could not join the {backend} group on "
                                 f"127.0.0.1:{port} within {timeout_s:g} s: {exc}") from exc
        result = fn(rank, world_size, *args)
        torch.save({"result": result}, out)
    except BaseException as exc:                   # report every failure to the parent
        record: dict[str, Any] = {"traceback": traceback.format_exc(), "type": type(exc).__name__, "text": str(exc)}
        try:
            torch.save({**record, "error": exc}, out)
        except Exception:                          # an exception that does not pickle
            torch.save(record, out)
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", timeout_s: float = 60.0,
          start_method: str = "spawn", threads: int | None = None, join_timeout_s: float | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local ranks; their return values in rank order.

    Args:
        fn: a module-level (picklable) function; the default process group is initialized when it runs.
        backend: torch.distributed backend ("gloo" on CPUs). ``timeout_s``: the group's collective timeout,
            also the bound on joining and on the other ranks once one has failed.
        start_method: "spawn" (default, fresh interpreters) or "fork" (faster start on Linux CPUs).
        threads: ``torch.set_num_threads`` in each rank (None: cpu_count // world_size, at least 1).
        join_timeout_s: bound on the whole run (None: unbounded while every rank is healthy).

    Raises:
        EPRankError: a rank raised or died; ``failures`` maps rank -> exception (or text).
        EPTimeoutError: ``join_timeout_s`` passed with ranks still running (they are terminated).
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise EPRankError(f"spawn: world_size must be >= 1, got {world_size}")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    result_dir = tempfile.mkdtemp(prefix="v4hal-ep-")
    port = free_port()
    try:
        ctx = mp.start_processes(_entry, args=(fn, world_size, port, backend, float(timeout_s), threads, result_dir,
                                               args), nprocs=world_size, join=False, start_method=start_method)
        procs = ctx.processes
        start = time.monotonic()
        failed_at: float | None = None
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if failed_at is None and any(_failed(p, result_dir, r) for r, p in enumerate(procs)):
                failed_at = now
            if failed_at is not None and now - failed_at > timeout_s + _GRACE_S:
                break
            if join_timeout_s is not None and now - start > join_timeout_s:
                left = [r for r, p in enumerate(procs) if p.exitcode is None]
                _terminate(procs)
                raise EPTimeoutError(f"spawn: {world_size} ranks still running after "
                                     f"join_timeout_s={join_timeout_s:g} s (ranks {left} terminated)")
            for p in procs:
                p.join(timeout=0.05)
        stuck = [r for r, p in enumerate(procs) if p.is_alive()]
        _terminate(procs)
        return _collect(procs, result_dir, world_size, stuck, timeout_s)
    finally:
        shutil.rmtree(result_dir, ignore_errors=True)


def _failed(proc: Any, result_dir: str, rank: int) -> bool:
    if proc.exitcode is not None and proc.exitcode != 0:
        return True
    path = Path(result_dir) / f"rank{rank}.pt"
    if proc.exitcode == 0 and not path.exists():
        return True
    if path.exists() and proc.exitcode is not None:
        return "result" not in _load(path)
    return False


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, weights_only=False)
    except Exception as exc:                    # a truncated file from a rank killed while writing
        return {"type": "UnreadableResult", "text": f"{path.name}: {exc}", "traceback": ""}


def _terminate(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _collect(procs: list[Any], result_dir: str, world_size: int, stuck: list[int], timeout_s: float) -> list[Any]:
    results: list[Any] = [None] * world_size
    failures: dict[int, BaseException | str] = {}
    causes: list[str] = []          # ranks that failed on their own (listed first, with tracebacks)
    followers: list[str] = []       # ranks whose exchange failed because of another rank
    for r, p in enumerate(procs):
        path = Path(result_dir) / f"rank{r}.pt"
        rec = _load(path) if path.exists() else None
        if rec is not None and "result" in rec:
            results[r] = rec["result"]
            continue
        if r in stuck:
            text = f"still running {timeout_s + _GRACE_S:g} s after another rank failed; terminated"
            failures[r] = text
        elif rec is None:
            text = f"exited with code {p.exitcode} without a result (killed or crashed)"
            failures[r] = text
        else:
            text = f"{rec.get('type')}: {rec.get('text')}"
            failures[r] = rec.get("error") or text
            if rec.get("type") == "EPTimeoutError":
                followers.append(f"rank {r}: {text}")
                continue
            if rec.get("traceback"):
                text += "\n    " + rec["traceback"].strip().replace("\n", "\n    ")
        causes.append(f"rank {r}: {text}")
    if failures:
        err = EPRankError(f"spawn: {len(failures)} of {world_size} ranks failed:\n" + "\n".join(causes + followers),
                          failures, results)
        first = next((f for f in failures.values() if isinstance(f, BaseException)), None)
        if first is not None:
            raise err from first
        raise err
    return results
