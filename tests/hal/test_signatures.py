"""Every implementation takes its op's declared arguments: the same names, in the same order, as
positional parameters, with the schema's defaults where it gives any (the op layer calls it with
the schema's arguments in order)."""
from __future__ import annotations

import pytest
import torch

from v4hal.hal import registry
from v4hal.hal.errors import RangeError
from v4hal.hal.packages import import_modules

BUILTIN = [spec.name for spec in registry.BUILTIN_BACKENDS]


@pytest.mark.parametrize("backend", BUILTIN)
def test_every_implementation_takes_the_declared_arguments(backend):
    # the modules each backend's load() imports (its package's public modules), without registering
    import_modules(registry.BACKENDS[backend].module)
    declared = registry.declarations(backend)
    assert declared, f"{backend}: no @implements declarations found"
    wrong = {op: registry.signature_mismatch(op, decl.fn) for op, decl in declared.items()}
    assert not {op: why for op, why in wrong.items() if why}, wrong


def _rms_wrong_name(x, w, eps=1e-6):
    return x


def _rms_wrong_order(x, eps, weight):
    return x


def _rms_wrong_default(x, weight, eps=1e-5):
    return x


def _rms_keyword_only(x, weight, *, eps=1e-6):
    return x


def _rms_star(*args):
    return args[0]


def _rms_right(x, weight, eps=1e-6):
    return x


@pytest.mark.parametrize(("fn", "says"), [
    (_rms_wrong_name, "it takes (x, w, eps=1e-06), the schema's arguments are (x, weight, eps)"),
    (_rms_wrong_order, "it takes (x, eps, weight)"),
    (_rms_wrong_default, "it gives eps the default 1e-05, the schema 1e-06"),
    (_rms_keyword_only, "it takes (x, weight, *, eps=1e-06)"),
    (_rms_star, "it takes (*args)"),
])
def test_a_mismatched_declaration_is_refused_when_its_backend_registers(fn, says):
    assert registry.signature_mismatch("rms_norm", fn).startswith(says)
    registry.implements("rms_norm", "sigcheck")(fn)
    try:
        with pytest.raises(RangeError, match=r"@implements\('rms_norm', 'sigcheck'\) on .*" + fn.__name__):
            registry.register_declared("sigcheck", devices={"cpu": ()}, priority=0)
        assert not registry.implementations("rms_norm", "cpu") or all(
            i.backend != "sigcheck" for i in registry.implementations("rms_norm", "cpu"))
    finally:
        registry._DECLARED.pop("sigcheck", None)


def test_matching_signatures_pass():
    assert registry.signature_mismatch("rms_norm", _rms_right) is None
    # dtype and None defaults compare as values of their own type
    def act_quant(x, block_size=128, scale_fmt=None, scale_dtype=torch.float32):
        return x
    assert registry.signature_mismatch("act_quant", act_quant) is None

    def act_quant_bad(x, block_size=128, scale_fmt=None, scale_dtype=torch.bfloat16):
        return x
    assert "scale_dtype" in registry.signature_mismatch("act_quant", act_quant_bad)
