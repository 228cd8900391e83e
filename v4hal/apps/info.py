"""``v4hal info``: the op x backend x device matrix, each unavailable cell with its reason."""
from __future__ import annotations

import argparse

from v4hal.apps.args import choice_list, device_types, reports_errors, split_list, writable_path, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``v4hal info``."""
    parser.add_argument("--json", default=None, type=writable_path, help="write the matrix to this JSON file")
    parser.add_argument("--devices", default=None, type=choice_list(device_types, "device type"),
                        help="comma-separated device types (default: those present)")


@reports_errors("info")
def main(args: argparse.Namespace) -> int:
    """``v4hal info``."""
    from v4hal.hal.info import format_info, info

    devices = split_list(args.devices) if args.devices else None
    data = info(devices)
    print(format_info(data))
    if args.json:
        write_json(args.json, data)
    return 0
