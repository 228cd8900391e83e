"""The ``v4hal`` command: info, parity, run, bench, cost.

Bad input (an argument argparse refuses, or any `v4hal.V4HalError` a command raises) ends the command
with one line on stderr, ``v4hal <command>: error: <message>``, and exit status 2; ``--debug`` (before or
after the command name) shows the traceback of a `V4HalError` instead. Other exceptions are bugs and keep
their traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from v4hal.apps.args import EXIT_USAGE, error_line
from v4hal.hal.errors import V4HalError

# subcommand -> (module with add_arguments(parser) and main(args), help)
SUBCOMMANDS = {
    "info": ("v4hal.apps.info", "the op x backend x device matrix, each unavailable cell with its reason"),
    "parity": ("v4hal.apps.parity", "every op (or --model) on every available backend vs the reference"),
    "run": ("v4hal.apps.run", "run a DeepSeek-V4 model: prefill a prompt, decode tokens, report tokens/s"),
    "bench": ("v4hal.apps.bench", "operator microbenchmarks against device ceilings and peers"),
    "cost": ("v4hal.apps.cost", "per-token FLOPs and KV-cache bytes of V3.2 / V4-Flash / V4-Pro vs context"),
}


class CommandLineError(Exception):
    """argparse refused the command line (unknown flag, bad value); the message is argparse's."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise `CommandLineError` (printed by `cli` as one line) instead of
    printing the usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(message)


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the traceback of an error instead of one line")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (the others are listed by name)."""
    parser = Parser(prog="v4hal", description="DeepSeek-V4 operators on CUDA/Triton, Ascend and CPU")
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        _add_debug(p, argparse.SUPPRESS)        # also accepted after the command name
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def _fail(command: str | None, message: str) -> int:
    print(error_line(command, message), file=sys.stderr)
    return EXIT_USAGE


def cli(argv: list[str] | None = None) -> int:
    """Run ``v4hal`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    known = command if command in SUBCOMMANDS else None
    try:
        args = build_parser(known).parse_args(argv)
    except CommandLineError as e:
        return _fail(known, str(e))
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except V4HalError as e:
        if getattr(args, "debug", False):
            raise
        return _fail(args.command, str(e))


if __name__ == "__main__":
    sys.exit(cli())
