"""The ``v4hal`` command: info, parity, run, bench, cost."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

# subcommand -> (module with add_arguments(parser) and main(args), help)
SUBCOMMANDS = {
    "info": ("v4hal.cli", "the op x backend x device matrix, each unavailable cell with its reason"),
    "parity": ("v4hal.parity", "every op (or --model) on every available backend vs the reference"),
    "run": ("v4hal.model.cli", "run a DeepSeek-V4 model: prefill a prompt, decode tokens, report tokens/s"),
    "bench": ("v4hal.bench.cli", "operator microbenchmarks against device ceilings and peers"),
    "cost": ("v4hal.bench.cost_cli", "per-token FLOPs and KV-cache bytes of V3.2 / V4-Flash / V4-Pro vs context"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``v4hal info``."""
    parser.add_argument("--json", default=None, help="write the matrix to this JSON file")
    parser.add_argument("--devices", default=None, help="comma-separated devices (default: those present)")


def main(args: argparse.Namespace) -> int:
    """``v4hal info``."""
    from v4hal.hal.info import format_info, info

    devices = [d.strip() for d in args.devices.split(",")] if args.devices else None
    data = info(devices)
    print(format_info(data))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=1)
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (the others are listed by name)."""
    parser = argparse.ArgumentParser(prog="v4hal", description="DeepSeek-V4 operators on CUDA/Triton, Ascend and CPU")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in SUBCOMMANDS else None).parse_args(argv)
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(cli())
