"""A plain ``pip install v4hal`` (no extras) imports every module and runs the commands.

Two guards, both cheap:

- statically, every ``import`` of a third-party package anywhere in ``v4hal/`` names a core dependency
  of ``pyproject.toml``, or an optional package of `v4hal.extras.OPTIONAL` (whose extra must exist and
  list it) imported only by a backend that probes for it first or inside a ``try``; everything else goes
  through `v4hal.extras.require`, whose error names the extra;
- dynamically, a subprocess hides every installed distribution that the core dependencies do not pull in
  (a meta path hook in front of the path finder: to that process they are not installed), imports every
  module of the package and runs ``v4hal cost``, ``info``, ``parity``, ``bench`` and ``run``; an option
  needing an extra is refused with one line naming it.

The packaging files are checked too: the license is shipped and matches the declared one, ``py.typed`` is
package data, and no product file points outside the repository.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from v4hal.extras import OPTIONAL

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "v4hal"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

#: import name of each core dependency's distribution (where they differ, the distribution is the key)
IMPORT_NAMES = {"PyYAML": "yaml"}
#: package folders imported only once their package is found (the backend's availability probe)
GATED = {"triton": PACKAGE / "backends" / "triton"}


def _dist(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0)


def _import_name(dist: str) -> str:
    return IMPORT_NAMES.get(dist, dist.lower().replace("-", "_"))


CORE = {_import_name(_dist(r)) for r in PYPROJECT["project"]["dependencies"]}


def _third_party_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, inside a ``try``) of every absolute import in ``path`` that is not stdlib
    nor v4hal."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_try: bool) -> None:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "v4hal":
                found.append((top, node.lineno, in_try))
        for child in ast.iter_child_nodes(node):
            visit(child, in_try or isinstance(node, ast.Try) and child in node.body)

    visit(tree, False)
    return found


def test_every_import_is_a_core_dependency_or_guarded() -> None:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for top, line, in_try in _third_party_imports(path):
            gated = top in GATED and GATED[top] in path.parents
            if top in CORE or gated or (top in OPTIONAL and in_try):
                continue
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    assert not bad, ("a plain install lacks these: make the package a core dependency in pyproject.toml or "
                     "import it through v4hal.extras.require: " + "; ".join(bad))


def test_every_optional_package_is_in_its_extra() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    for module, (dist, extra) in OPTIONAL.items():
        assert extra in extras, f"{module}: extra {extra!r} is not declared in pyproject.toml"
        assert dist in {_dist(r) for r in extras[extra]}, f"{module}: extra {extra!r} does not install {dist}"
        assert module not in CORE, f"{module} is a core dependency and an optional one"


def test_readme_documents_every_extra() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for extra in PYPROJECT["project"]["optional-dependencies"]:
        assert f"`{extra}`" in readme, f"README.md does not document the extra {extra!r}"
    for req in PYPROJECT["project"]["dependencies"]:
        assert _dist(req) in readme, f"README.md does not list the core dependency {_dist(req)}"


def test_license_and_type_marker_ship() -> None:
    project = PYPROJECT["project"]
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert project["license"] == "MIT" and license_text.startswith("MIT License")
    assert "LICENSE" in project["license-files"]
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["v4hal"]


def test_product_files_point_nowhere_outside_the_repository() -> None:
    files = [*PACKAGE.rglob("*.py"), ROOT / "README.md", ROOT / "pyproject.toml", *(ROOT / "docs").glob("*.md"),
             *(ROOT / "bench").glob("*.md")]
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in files
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"(^|[\s(`'\"/.])shared/|/work/", line)]
    assert not hits, f"paths outside the repository in {hits}"


# ---------------------------------------------------------------- the base install, emulated
PROBE = r'''
import importlib, importlib.machinery, importlib.util, importlib.metadata as md, json, pkgutil, re, sys, contextlib, io

core = json.loads(sys.argv[1])
keep, todo = set(), list(core)
while todo:                       # the core requirements and what they require, extras followed
    dist, _, rest = re.match(r"([A-Za-z0-9._-]+)(\[[^]]*\])?", todo.pop()).group(0).partition("[")
    dist, extras = dist.lower().replace("_", "-"), {e.strip() for e in rest.rstrip("]").split(",") if e.strip()}
    for extra in extras | {""}:
        if (dist, extra) in keep:
            continue
        keep.add((dist, extra))
        try:
            reqs = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue
        for r in reqs:
            req, _, marker = r.partition(";")
            wants = re.findall(r"extra\s*==\s*['\"]([^'\"]+)", marker)
            if (wants and extra in wants) or (not wants and not extra):
                todo.append(req.strip())
keep = {dist for dist, _ in keep}
hidden = set()
for top, dists in md.packages_distributions().items():
    if top != "v4hal" and all(d.lower().replace("_", "-") not in keep for d in dists):
        hidden.add(top)
hidden -= set(sys.stdlib_module_names) | {m.partition(".")[0] for m in sys.modules}   # site's own imports


class NotInstalled(importlib.machinery.PathFinder):
    """The path finder, blind to the hidden distributions' packages."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)


sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = NotInstalled
import v4hal
from v4hal.apps.main import cli

failed = []
for mod in pkgutil.walk_packages(v4hal.__path__, "v4hal."):
    if mod.name.startswith("v4hal.backends.triton.") and importlib.util.find_spec("triton") is None:
        continue
    try:
        importlib.import_module(mod.name)
    except ImportError as e:
        failed.append(f"{mod.name}: {e}")
runs = {}
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = cli(argv)
    runs[" ".join(argv)] = [rc, err.getvalue().strip().splitlines()[-1:] if rc else []]
print(json.dumps({"hidden": sorted(hidden), "failed": failed, "runs": runs}))
'''


def test_base_install_imports_and_runs(tmp_path: Path) -> None:
    plot = str(tmp_path / "p.png")
    shapes = tmp_path / "cases.yaml"
    shapes.write_text("- {op: rms_norm, t: 4, d: 64}\n")
    commands = [["cost"], ["info"], ["parity", "--ops", "rms_norm"],
                ["bench", "--quick", "--ops", "rms_norm", "--repeats", "1", "--no-progress"],
                ["run", "--model", "v4-mini", "--prompt-len", "4", "--max-new-tokens", "2", "--threads", "1"],
                ["cost", "--plot", plot], ["bench", "--quick", "--plot", plot], ["bench", "--shapes", str(shapes)]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "V4HAL_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    core = PYPROJECT["project"]["dependencies"]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(core), json.dumps(commands)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"matplotlib", "yaml"} <= set(out["hidden"]), out["hidden"]     # the emulation hides the extras
    assert not out["failed"], out["failed"]
    runs = out["runs"]
    for argv in commands[:5]:
        assert runs[" ".join(argv)] == [0, []], (argv, runs[" ".join(argv)])
    for argv, dist, extra in ((commands[5], "matplotlib", "plot"), (commands[6], "matplotlib", "plot"),
                              (commands[7], "PyYAML", "bench")):
        rc, (line,) = runs[" ".join(argv)]
        assert rc == 2 and f"needs {dist}, which is not installed" in line and f"v4hal[{extra}]" in line, line
        assert line.startswith(f"v4hal {argv[0]}: error: argument --"), line


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import v4hal.extras as extras
    from v4hal.hal.errors import MissingPackageError, V4HalError

    assert extras.require("json", "a test").dumps([1]) == "[1]"              # present: the module
    monkeypatch.setitem(extras.OPTIONAL, "v4hal_absent_pkg", ("absent-dist", "plot"))
    with pytest.raises(MissingPackageError, match=r"^plot_rows needs absent-dist, which is not installed: "
                                                  r"pip install 'v4hal\[plot\]' \(or pip install absent-dist\)$") as e:
        extras.require("v4hal_absent_pkg.sub", "plot_rows")
    assert isinstance(e.value, V4HalError) and isinstance(e.value, ModuleNotFoundError)
