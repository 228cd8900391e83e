"""Argument checks and error reporting shared by the ``v4hal`` commands.

The ``type=`` functions (numbers bounded on both sides by `int_in` / `float_in` / `byte_size`, `seed`,
`threads`, `writable_path`, `plot_path`, `readable_file`, `device`, `choice`, `choice_list`) run while
argparse parses, so a bad value is refused before a command does any work; they raise
``argparse.ArgumentTypeError``, which ``v4hal.apps.main`` prints as the one line
``v4hal <command>: error: argument --flag: <message>``. The checks that need several arguments at once
(`backends_on`) raise `v4hal.hal.errors.RangeError`; a command's ``main`` decorated with `reports_errors`
prints any `V4HalError` as that one line and returns exit status 2 (``--debug``: re-raises). Output files
are written with `write_json` or inside `output_errors`, which turn a failed write (disk full, no
permission) into `OutputError`, reported the same way.
"""
from __future__ import annotations

import argparse
import contextlib
import decimal
import functools
import json
import math
import os
import re
import sys
import tempfile
from typing import Any, Callable, Iterator, Sequence, Union

from v4hal.bench.report import format_bytes
from v4hal.extras import require_type
from v4hal.hal.errors import RangeError, V4HalError

__all__ = ["EXIT_USAGE", "error_line", "reports_errors", "bounded", "int_in", "float_in", "positive_int",
           "non_negative_int", "positive_float", "non_negative_float", "MAX_SEED", "seed", "cpu_count", "threads",
           "parse_bytes", "byte_size", "format_bytes", "writable_path", "plot_path", "OutputError", "output_errors",
           "write_bytes", "write_json", "readable_file", "device", "model_preset", "device_types", "backend_names",
           "choice", "choice_list", "split_list", "backends_on", "unavailable_reason"]

Choices = Union[Sequence[str], Callable[[], Sequence[str]]]
Main = Callable[[argparse.Namespace], int]

#: exit status of a command refused for bad input (argparse's convention)
EXIT_USAGE = 2


def error_line(command: str | None, message: str) -> str:
    """``v4hal <command>: error: <message>`` on one line (the message's lines joined by "; ")."""
    text = "; ".join(line.strip() for line in str(message).splitlines() if line.strip()) or "(no message)"
    return f"{f'v4hal {command}' if command else 'v4hal'}: error: {text}"


def reports_errors(command: str) -> Callable[[Main], Main]:
    """Decorate the ``main(args)`` of ``v4hal <command>``: a `V4HalError` it raises is printed to stderr as
    `error_line` and ``main`` returns `EXIT_USAGE`; with ``args.debug`` the error propagates (traceback).
    Other exceptions (bugs) propagate unchanged."""
    def wrap(fn: Main) -> Main:
        @functools.wraps(fn)
        def main(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except V4HalError as e:
                if getattr(args, "debug", False):
                    raise
                print(error_line(command, str(e)), file=sys.stderr)
                return EXIT_USAGE
        return main
    return wrap


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def bounded(parse: Callable[[str], Any], kind: str, least: float | None = None, most: float | None = None, *,
            strict: bool = False, why: str = "") -> Callable[[str], Any]:
    """An argparse ``type=``: ``parse(text)`` (`_int` or `_float`), which must be >= ``least`` (> with
    ``strict``) and <= ``most`` (None: no bound on that side); ``why`` is appended to the refusal (what the
    upper bound protects)."""
    def num(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    low = None if least is None else f"{'>' if strict else '>='} {num(least)}"
    if least is not None and most is not None and not strict:
        bound = f"in [{num(least)}, {num(most)}]"
    else:
        bound = " and ".join(b for b in (low, None if most is None else f"<= {num(most)}") if b)
    tail = f" ({why})" if why else ""

    def check(text: str) -> Any:
        value = parse(text)
        if (least is not None and (value < least or (strict and value == least))) or \
                (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"expected {kind} {bound}, got {text!r}{tail}")
        return value
    check.__doc__ = f"{kind[0].upper()}{kind[1:]} {bound}."
    check.__name__ = f"{'int' if parse is _int else 'number'}_{bound.replace(' ', '_')}"
    return check


def int_in(least: int | None, most: int | None, why: str = "") -> Callable[[str], int]:
    """An argparse ``type=`` for an integer in ``[least, most]`` (None: unbounded on that side)."""
    return bounded(_int, "an integer", least, most, why=why)


def float_in(least: float | None, most: float | None, strict: bool = False, why: str = "") -> Callable[[str], float]:
    """An argparse ``type=`` for a finite number in ``[least, most]`` (``(least, most]`` with ``strict``)."""
    return bounded(_float, "a number", least, most, strict=strict, why=why)


positive_int = int_in(1, None)
non_negative_int = int_in(0, None)
positive_float = float_in(0, None, strict=True)
non_negative_float = float_in(0, None)

#: seeds are taken in [0, 2**32 - 1] (torch generators overflow past 2**64 - 1; derived seeds add offsets)
MAX_SEED = 2**32 - 1
#: a seed flag's ``type=``
seed = int_in(0, MAX_SEED)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads(text: str) -> int:
    """A thread count in [1, the CPUs this process may run on]."""
    return int_in(1, cpu_count(), "the CPUs this process may use")(text)


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
          "p": 1 << 50, "pb": 1 << 50, "pib": 1 << 50}


def parse_bytes(text: str) -> int:
    """``"512M"``, ``"1.5G"``, ``"2GiB"``, ``"4096"`` -> bytes (binary units: 1K = 1024; no unit: bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 512M, 1.5G or 2GiB, got {text!r}")
    return int(decimal.Decimal(m.group(1)) * _UNITS[unit])       # exact: no float overflow or rounding


def byte_size(least: int, most: int) -> Callable[[str], int]:
    """An argparse ``type=`` for a size (`parse_bytes`) in ``[least, most]`` bytes."""
    def check(text: str) -> int:
        value = parse_bytes(text)
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"expected a size in [{format_bytes(least)}, {format_bytes(most)}], "
                                             f"got {text!r}")
        return value
    check.__name__ = "byte_size"
    return check


def writable_path(text: str) -> str:
    """A file path the command can write: its folder exists and takes a new file (a probe file is created
    there and removed), and the path itself is not a folder nor an existing read-only file."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    if os.path.isdir(text) or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} is a folder, expected a file path")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise argparse.ArgumentTypeError(f"cannot write {text}: {folder} {what}")
    if os.path.exists(text) and not os.access(text, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: the file is read-only")
    try:
        fd, probe = tempfile.mkstemp(prefix=".v4hal-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {text}: cannot create a file in {folder} "
                                         f"({e.strerror or e})") from None
    return text


#: A `writable_path` for a PNG chart; matplotlib must be installed (it draws the chart): refused while the
#: command line is parsed, with the extra that brings it.
plot_path = require_type("matplotlib", "a PNG chart", writable_path)


class OutputError(V4HalError, OSError):
    """A command could not write its output file (disk full, no permission, a folder in the way ...)."""


@contextlib.contextmanager
def output_errors(path: str, flag: str) -> Iterator[None]:
    """Turn an `OSError` raised inside the block (writing ``path``, the value of ``flag``) into `OutputError`
    naming the flag, the path and the reason; a partly written regular file is removed."""
    try:
        yield
    except OSError as e:
        if os.path.isfile(path):
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise OutputError(f"{flag}: cannot write {path}: {e.strerror or e}") from e


def write_bytes(path: str, data: bytes, flag: str) -> None:
    """Write ``data`` to ``path`` (the value of ``flag``); `OutputError` when the write fails (no partial file
    left, see `output_errors`). Writers that swallow write errors (matplotlib's ``savefig`` to a full disk)
    render into memory first and write through this."""
    with output_errors(path, flag), open(path, "wb") as f:
        f.write(data)


def write_json(path: str, data: Any, flag: str = "--json", indent: int = 1) -> None:
    """Write ``data`` as JSON to ``path`` (the value of ``flag``); `OutputError` when the write fails.
    The text is built first, so a failed write leaves no partial file (see `output_errors`)."""
    write_bytes(path, json.dumps(data, indent=indent, default=str).encode("utf-8"), flag)


def readable_file(text: str) -> str:
    """An existing regular file the command can read."""
    if not os.path.isfile(text):
        what = "is not a regular file" if os.path.exists(text) else "does not exist"
        raise argparse.ArgumentTypeError(f"{text} {what}")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"cannot read {text}")
    return text


def device(text: str) -> str:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``, ``npu``) whose device is usable here."""
    import torch

    from v4hal.hal.devices import device_reason

    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:0, got {text!r}") \
            from None
    reason = device_reason(dev.type)
    if reason is not None:
        raise argparse.ArgumentTypeError(f"device {text!r} is not usable here: {reason}")
    if dev.index is not None and dev.type != "cpu":
        count = getattr(getattr(torch, dev.type, None), "device_count", lambda: 0)()
        if dev.index >= count:
            raise argparse.ArgumentTypeError(f"device {text!r}: index {dev.index} out of range ({count} "
                                             f"{dev.type} device(s) here)")
    return text


def _known(choices: Choices) -> list[str]:
    return list(choices() if callable(choices) else choices)


def split_list(text: str) -> list[str]:
    """The non-empty, stripped entries of a comma-separated list."""
    return [s.strip() for s in text.split(",") if s.strip()]


def choice(choices: Choices, what: str, normalize: Callable[[str], str] = str) -> Callable[[str], str]:
    """A ``type=`` function accepting one of ``choices`` (a list, or a function returning one, read when the
    argument is parsed); ``normalize`` maps the text before the lookup. Returns the text as given."""
    def parse(text: str) -> str:
        known = _known(choices)
        if normalize(text.strip()) not in known:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; expected one of: {', '.join(known)}")
        return text.strip()

    parse.__name__ = what.replace(" ", "_")
    return parse


def choice_list(choices: Choices, what: str) -> Callable[[str], str]:
    """A ``type=`` function accepting a comma-separated list of one or more of ``choices``; returns the
    entries joined by commas."""
    def parse(text: str) -> str:
        items = split_list(text)
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}s, got {text!r}")
        known = _known(choices)
        unknown = [i for i in items if i not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, unknown))}; expected one or "
                                             f"more of: {', '.join(known)}")
        return ",".join(items)

    parse.__name__ = what.replace(" ", "_") + "_list"
    return parse


def model_preset(text: str) -> str:
    """The name of a model preset (``v4-mini``, ``v4-flash``, ``v4-pro``, ``v41-flash``, ``v41-mini``; case and
    ``_`` / ``-`` are free)."""
    from v4hal.model.config import PRESETS

    return choice(list(PRESETS), "model preset", lambda s: s.lower().replace("_", "-"))(text)


def device_types() -> list[str]:
    """The registered device types (``v4hal.hal.devices``): cpu, cuda, npu, and any added ones."""
    from v4hal.hal.devices import registered_devices

    return list(registered_devices())


def backend_names() -> list[str]:
    """The registered backend names."""
    from v4hal.hal import registry

    return list(registry.BACKENDS)


def backends_on(names: Sequence[str], device_name: str, flag: str = "--backends") -> None:
    """Raise `RangeError` unless every backend in ``names`` serves some op on ``device_name`` here; the
    message names the backend and why it cannot (from the op table's explanations)."""
    import torch

    from v4hal.hal.info import available_backends

    dev = torch.device(device_name).type
    available = available_backends(dev)
    for name in names:
        if name in available:
            continue
        reason = unavailable_reason(name, dev)
        raise RangeError(f"{flag}: backend {name!r} serves no op on {device_name} here"
                         f"{f' ({reason})' if reason else ''}; available: {', '.join(available)}")


def unavailable_reason(name: str, device_name: str) -> str:
    """Why backend ``name`` serves no op on ``device_name`` here: the first reason the op table gives
    (`v4hal.hal.dispatch.explain`), else the backend's own (empty when neither says)."""
    import torch

    from v4hal.hal import dispatch, registry
    from v4hal.ops import public_ops

    dev = torch.device(device_name).type
    for op in public_ops():
        row = next((r for r in dispatch.explain(op, dev) if r["backend"] == name), None)
        if row is not None and row.get("reason"):
            return str(row["reason"])
    return registry.backend_reason(name) or ""
