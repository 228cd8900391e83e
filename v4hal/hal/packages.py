"""A package's own modules, found on disk: packages import their modules through these instead of
keeping a list by hand, so a new module is picked up by being there."""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Collection

from .errors import RangeError


def module_names(package: str, *, exclude: Collection[str] = ()) -> list[str]:
    """Full names of the modules and subpackages directly inside ``package`` (a dotted package
    name; importing it is fine from the package's own ``__init__``), sorted; private ``_``-prefixed
    names and the short names in ``exclude`` are left out."""
    path = getattr(importlib.import_module(package), "__path__", None)
    if path is None:
        raise RangeError(f"module_names: package must name a package, got {package!r}: {package} is a module, "
                         "not a package")
    names = sorted(info.name for info in pkgutil.iter_modules(path))
    return [f"{package}.{name}" for name in names if not name.startswith("_") and name not in exclude]


def import_modules(package: str, *, exclude: Collection[str] = ()) -> list[ModuleType]:
    """Import every module :func:`module_names` finds in ``package``, in that order; returns them."""
    return [importlib.import_module(name) for name in module_names(package, exclude=exclude)]
