"""The application layer: the ``v4hal`` command and the other command-line runners.

Library modules (everything outside this package) never import it; the runners here parse options, set up
the backend and threads, load a checkpoint, call the library and print its figures.

- ``main.py``: the ``v4hal`` command (`cli`, the console entry point): one subcommand per module below.
- ``info.py`` (``v4hal info``), ``parity.py`` (``v4hal parity``, ``--model``), ``run.py`` (``v4hal run``),
  ``serve.py`` (``v4hal run --requests N``), ``run_ep.py`` (``v4hal run --ep N``), ``bench.py``
  (``v4hal bench``), ``cost.py`` (``v4hal cost``), ``ep_bench.py`` (``python -m v4hal.apps.ep_bench``).
- ``args.py``: argument types and one-line error reporting; ``common.py``: the checkpoint, prompt, backend
  and thread setup the runners share.
"""
from __future__ import annotations

__all__ = ["cli"]


def cli(argv: list[str] | None = None) -> int:
    """Run the ``v4hal`` command (`v4hal.apps.main.cli`)."""
    from .main import cli as main_cli

    return main_cli(argv)
