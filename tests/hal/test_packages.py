"""Packages import their modules by finding them (``v4hal.hal.packages``), not from lists kept by
hand: a module added to a package is imported with it, and every module that declares an op, a case
or an implementation is among those a package imports."""
from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import v4hal
from v4hal.hal import registry
from v4hal.hal.errors import RangeError
from v4hal.hal.packages import import_modules, module_names
from v4hal.ops import NOT_DECLARING

ROOT = Path(v4hal.__file__).parent


def _write_package(root: Path, name: str, files: list[str]) -> None:
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from v4hal.hal.packages import import_modules\n\n"
                                     "LOADED = import_modules(__name__)\n")
    for f in files:
        path = pkg / f
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")


def test_a_new_module_is_picked_up(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_package(tmp_path, "toy_pkg", ["b.py", "a.py", "_private.py", "sub/__init__.py", "sub/deep.py",
                                         "notes.txt"])
    try:
        pkg = importlib.import_module("toy_pkg")
        assert [m.__name__ for m in pkg.LOADED] == ["toy_pkg.a", "toy_pkg.b", "toy_pkg.sub"]
        assert "toy_pkg._private" not in sys.modules and "toy_pkg.sub.deep" not in sys.modules
        (tmp_path / "toy_pkg" / "c.py").write_text("")
        importlib.invalidate_caches()
        assert module_names("toy_pkg") == ["toy_pkg.a", "toy_pkg.b", "toy_pkg.c", "toy_pkg.sub"]
        assert module_names("toy_pkg", exclude=("b", "sub")) == ["toy_pkg.a", "toy_pkg.c"]
        with pytest.raises(RangeError, match="toy_pkg.a is a module, not a package"):
            module_names("toy_pkg.a")
    finally:
        for name in [n for n in sys.modules if n == "toy_pkg" or n.startswith("toy_pkg.")]:
            del sys.modules[name]


def _calls(path: Path, names: set[str]) -> bool:
    """True when the module's code calls one of ``names`` (``f(...)``, ``mod.f(...)`` or ``@f(...)``)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            fn = node.func
            if (isinstance(fn, ast.Name) and fn.id in names) or (isinstance(fn, ast.Attribute) and fn.attr in names):
                return True
    return False


def _declaring(package: str, names: set[str]) -> set[str]:
    """Every module of ``package`` (private ones too) whose code calls one of ``names``."""
    pkg_dir = ROOT.parent.joinpath(*package.split("."))
    return {f"{package}.{p.stem}" for p in pkg_dir.glob("*.py") if p.stem != "__init__" and _calls(p, names)}


# (package, what a declaring module calls, what the package leaves out, only declaring modules there)
PACKAGES = [
    ("v4hal.ops", {"define_op"}, NOT_DECLARING, True),
    ("v4hal.cases", {"register_case"}, (), True),
    ("v4hal.backends.reference", {"implements"}, (), True),
    ("v4hal.backends.triton", {"implements"}, (), True),
    ("v4hal.backends.cuda", {"implements"}, (), True),
    ("v4hal.backends.ascend", {"implements"}, (), False),   # also its helpers: binding, limits, register, ...
]


@pytest.mark.parametrize(("package", "names", "exclude", "exact"), PACKAGES, ids=[p[0] for p in PACKAGES])
def test_every_declaring_module_is_found(package, names, exclude, exact):
    declaring = _declaring(package, names)
    assert declaring, f"{package}: no module calls {names}"
    found = set(module_names(package, exclude=exclude))
    assert declaring <= found, f"{package}: not found by the discovery: {sorted(declaring - found)}"
    if exact:   # helpers there are private modules
        assert found == declaring, f"{package}: found modules that declare nothing: {sorted(found - declaring)}"


def test_the_ops_and_cases_packages_import_what_they_find():
    from v4hal import cases
    from v4hal.ops import OPS

    own = {d.module for d in OPS.values() if d.module.startswith("v4hal.ops.")}   # not a test's or plugin's ops
    assert own == set(module_names("v4hal.ops", exclude=NOT_DECLARING))
    assert all(name in sys.modules for name in module_names(cases.__name__))


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda", "ascend"])
def test_each_backend_declares_from_the_modules_it_finds(backend):
    package = registry.BACKENDS[backend].module
    import_modules(package)
    modules = {decl.fn.__module__ for decl in registry.declarations(backend).values()}
    assert modules <= set(module_names(package)), sorted(modules - set(module_names(package)))


def test_import_v4hal_loads_no_backend():
    """``import v4hal`` (the ops and the cases found on disk) imports no backend module and none of
    triton, torch_npu or cupy: backends load on first use."""
    code = ("import sys, v4hal, v4hal.cases\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'torch_npu', 'cupy')"
            " or m.startswith('v4hal.backends')))\n")
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", PYTHONPATH=str(ROOT.parent))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout
