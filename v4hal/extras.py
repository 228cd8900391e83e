"""Optional packages: which extra of ``pip install v4hal[...]`` brings each, and importing one on demand.

The base install (torch, safetensors, tqdm) runs every command; a few options need more. `require` imports
such a package where it is used and, when it is missing, raises `MissingPackageError` with the one line
that names the option, the package and the install command; `require_type` does the same check while
argparse parses the option, so the command is refused before it does any work.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
from types import ModuleType
from typing import Callable

from v4hal.hal.errors import MissingPackageError

__all__ = ["OPTIONAL", "missing", "require", "require_type"]

#: import name -> (distribution on PyPI, the extra of ``v4hal`` that installs it). Packages imported
#: through a backend's availability probe (triton; torch_npu and CANN, installed by hand) are reported
#: by ``v4hal info`` instead.
OPTIONAL: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "plot"),
    "yaml": ("PyYAML", "bench"),
    "triton": ("triton", "cuda"),
    "tokenizers": ("tokenizers", "v41"),
    "numpy": ("numpy", "v41"),
}


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def install_hint(module: str) -> str:
    """``pip install 'v4hal[plot]'`` (or the distribution itself for a package no extra brings)."""
    dist, extra = OPTIONAL.get(_top(module), (_top(module), None))
    return f"pip install 'v4hal[{extra}]' (or pip install {dist})" if extra else f"pip install {dist}"


def missing(module: str, purpose: str) -> str | None:
    """None when ``module`` can be found, else the message: ``--plot needs matplotlib, which is not
    installed: pip install 'v4hal[plot]' (or pip install matplotlib)``."""
    try:
        found = importlib.util.find_spec(_top(module)) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return f"{purpose} needs {OPTIONAL.get(_top(module), (_top(module),))[0]}, which is not installed: " \
           f"{install_hint(module)}"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (dotted names allowed: ``matplotlib.pyplot``) for ``purpose`` (what needs it, e.g.
    ``"--plot"``); `MissingPackageError` naming the extra when its package is not installed."""
    why = missing(module, purpose)
    if why is not None:
        raise MissingPackageError(why)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise MissingPackageError(f"{purpose} needs {module}, which failed to import ({e}): "
                                  f"{install_hint(module)}") from e


def require_type(module: str, purpose: str, parse: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse ``type=`` function: ``parse(text)`` after checking that ``module`` is installed, so the
    option is refused while the command line is parsed (one line naming the extra)."""
    def check(text: str) -> str:
        why = missing(module, purpose)
        if why is not None:
            raise argparse.ArgumentTypeError(why)
        return parse(text)

    check.__name__ = getattr(parse, "__name__", "value")
    check.__doc__ = f"{(parse.__doc__ or '').strip()} Needs {module} ({install_hint(module)})."
    return check
