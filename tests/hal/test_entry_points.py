"""An open backend set: a package installed next to v4hal adds a backend through the entry point
group ``v4hal.backends``. Each test writes a tiny distribution (a ``*.dist-info`` with an
``entry_points.txt``, and the backend's module) into a temporary folder on ``sys.path``."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import v4hal
from v4hal.hal import registry

TOY_MODULE = '''
"""A third-party backend: serves rms_norm on CPU tensors when asked for (fills the output with 7)."""
import torch

from v4hal.hal.registry import BackendSpec, implements, register_declared

BACKEND = BackendSpec("toy", "{module}", ("cpu",), "a toy backend from an installed package")


def probe():
    return None


@implements("rms_norm", "toy")
def rms_norm(x, weight, eps):
    return torch.full_like(x, 7.0)


def load():
    register_declared("toy", devices={{"cpu": ()}}, priority=-1, explicit_only=("cpu",))
'''


def write_distribution(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """``root/<dist>-0.1.dist-info/{METADATA,entry_points.txt}`` and ``root/<module>.py`` files."""
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = ["[v4hal.backends]"] + [f"{name} = {target}" for name, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Put ``tmp_path`` on sys.path; afterwards forget every backend and module it added."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(registry.BACKENDS)
    modules_before = set(sys.modules)
    yield tmp_path
    for name in set(registry.BACKENDS) - before:
        registry.unregister_backend(name)
        del registry.BACKENDS[name]
    for module in set(sys.modules) - modules_before:
        if module.startswith("v4hal_toy"):
            del sys.modules[module]


def test_entry_point_backend_is_listed_and_serves_when_asked(installed):
    write_distribution(installed, "v4hal-toy-backend", {"toy": "v4hal_toy_a"},
                       {"v4hal_toy_a": TOY_MODULE.format(module="v4hal_toy_a")})
    assert "toy" not in registry.BACKENDS
    assert registry.discover_backends() == ["toy"]
    spec = registry.BACKENDS["toy"]
    assert spec.module == "v4hal_toy_a" and spec.distribution == "v4hal-toy-backend"

    data = v4hal.info(["cpu"])
    assert data["backends"]["toy"] is None
    assert data["descriptions"]["toy"] == "a toy backend from an installed package"
    row = next(r for r in data["ops"]["rms_norm"]["cpu"] if r["backend"] == "toy")
    assert row["status"] == "explicit only"
    assert "toy" in v4hal.available_backends("cpu")

    x, w = torch.randn(2, 8), torch.ones(8)
    with v4hal.use_backend("toy"):
        assert torch.equal(v4hal.rms_norm(x, w), torch.full_like(x, 7.0))
    assert not torch.equal(v4hal.rms_norm(x, w), torch.full_like(x, 7.0))   # automatic choice: unchanged
    with v4hal.use_backend("toy"), pytest.raises(v4hal.BackendUnavailableError, match="toy"):
        v4hal.hadamard_transform(torch.randn(2, 8))                          # an op it does not implement


def test_entry_point_to_a_spec_object(installed):
    source = TOY_MODULE.format(module="v4hal_toy_b").replace('"toy"', '"toy_b"')
    write_distribution(installed, "v4hal-toy-b", {"toy_b": "v4hal_toy_b:BACKEND"}, {"v4hal_toy_b": source})
    assert registry.discover_backends() == ["toy_b"]
    with v4hal.use_backend(rms_norm="toy_b"):
        assert float(v4hal.rms_norm(torch.randn(1, 4), torch.ones(4))[0, 0]) == 7.0


def test_broken_entry_points_are_reasons_not_crashes(installed):
    write_distribution(installed, "v4hal-toy-broken",
                       {"toy_missing": "v4hal_toy_nowhere", "toy_nospec": "v4hal_toy_c", "reference": "v4hal_toy_c"},
                       {"v4hal_toy_c": "VALUE = 1\n"})
    with pytest.warns(RuntimeWarning, match="'reference' is a built-in backend"):
        added = registry.discover_backends()
    assert sorted(added) == ["toy_missing", "toy_nospec"]
    reasons = v4hal.info(["cpu"])["backends"]
    assert "failed to load" in reasons["toy_missing"] and "ModuleNotFoundError" in reasons["toy_missing"]
    assert "neither a BackendSpec nor a module" in reasons["toy_nospec"]
    assert registry.BACKENDS["reference"].module == "v4hal.backends.reference"
    with v4hal.use_backend("toy_missing"), pytest.raises(v4hal.BackendUnavailableError, match="failed to load"):
        v4hal.rms_norm(torch.randn(1, 4), torch.ones(4))
    assert v4hal.rms_norm(torch.ones(1, 4), torch.ones(4)).shape == (1, 4)   # the rest of v4hal is unaffected


def test_entry_points_are_not_read_at_import():
    code = ("import v4hal\nfrom v4hal.hal import registry\n"
            "assert not registry.BACKENDS._discovered\n"
            "assert 'reference' in registry.BACKENDS and not registry.BACKENDS._discovered\n"
            "list(registry.BACKENDS)\nassert registry.BACKENDS._discovered\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
