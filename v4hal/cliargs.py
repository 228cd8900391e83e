"""Argument checks and error reporting shared by the ``v4hal`` commands.

The ``type=`` functions (`positive_int`, `non_negative_int`, `non_negative_float`, `writable_path`,
`readable_file`, `device`, `choice`, `choice_list`) run while argparse parses, so a bad value is refused
before a command does any work; they raise ``argparse.ArgumentTypeError``, which ``v4hal.cli`` prints as
the one line ``v4hal <command>: error: argument --flag: <message>``. The checks that need several
arguments at once (`backends_on`) raise `v4hal.hal.errors.RangeError`; a command's ``main`` decorated with
`reports_errors` prints any `V4HalError` as that one line and returns exit status 2 (``--debug``: re-raises).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile
from typing import Any, Callable, Sequence, Union

from v4hal.hal.errors import RangeError, V4HalError

__all__ = ["EXIT_USAGE", "error_line", "reports_errors", "positive_int", "non_negative_int", "positive_float",
           "non_negative_float", "writable_path", "readable_file", "device", "model_preset", "device_types",
           "backend_names", "choice", "choice_list", "split_list", "backends_on"]

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


def _at_least(parse: Callable[[str], Any], least: float, strict: bool, kind: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``parse(text)``, which must be > ``least`` (``strict``) or >= ``least``."""
    bound = f"{'>' if strict else '>='} {least:g}"

    def check(text: str) -> Any:
        value = parse(text)
        if value < least or (strict and value == least):
            raise argparse.ArgumentTypeError(f"expected {kind} {bound}, got {text!r}")
        return value
    check.__doc__ = f"{kind[0].upper()}{kind[1:]} {bound}."
    return check


positive_int = _at_least(_int, 1, False, "an integer")
non_negative_int = _at_least(_int, 0, False, "an integer")
positive_float = _at_least(_float, 0, True, "a number")
non_negative_float = _at_least(_float, 0, False, "a number")


def writable_path(text: str) -> str:
    """A file path the command can write: its folder exists and takes a new file (a probe file is created
    there and removed), and the path itself is not a folder nor an existing read-only file."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    if os.path.isdir(text):
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
    """The name of a model preset (``v4-mini``, ``v4-flash``, ``v4-pro``; case and ``_`` / ``-`` are free)."""
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

    from v4hal.hal import dispatch
    from v4hal.hal.info import available_backends
    from v4hal.ops import public_ops

    dev = torch.device(device_name).type
    available = available_backends(dev)
    for name in names:
        if name in available:
            continue
        reason = ""
        for op in public_ops():
            row = next((r for r in dispatch.explain(op, dev) if r["backend"] == name), None)
            if row is not None and row.get("reason"):
                reason = row["reason"]
                break
        raise RangeError(f"{flag}: backend {name!r} serves no op on {device_name} here"
                         f"{f' ({reason})' if reason else ''}; available: {', '.join(available)}")
