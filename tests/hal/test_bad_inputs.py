"""Every public op, called with one argument made bad at a time, raises a v4hal error that names the op
and one of its arguments: never another exception, never a hang, never a result for an invalid call.

The table is the op table (``v4hal.public_ops()``) and the case catalogue (``v4hal.cases.tiny_cases``),
so an op added later is probed with no new test code. From each tiny valid case one argument at a
time is mutated, by rules read from the schema's argument types:

- tensors: a dtype no op takes (float64, int16, complex128); every other dtype some op takes; 0-d;
  a leading dim added; the last dim one larger; a ``meta`` tensor among CPU tensors; an index tensor
  with a value below -1 and one far past any bound; a NaN / Inf in a float tensor or a quantization
  scale; a tensor where an optional one is None;
- ints: -1, 0, 2**31, 2**62, 2**63 - 1; floats: NaN, +-Inf, -1, 0, +-1e300; strings: an unknown
  option; dtypes: float64 and int16.

A mutation is *invalid by contract* when no op could accept it (a dtype no op takes, 0-d, a device
mix, an index out of every range, a NaN scale, a non-finite float or an int past int32 or negative):
the call must raise. Every other mutation may be valid (bf16 for an fp32 input, a longer ``topk_idxs``
row): the op's own checks decide, and the call must either return or raise a v4hal error.

``python tests/hal/test_bad_inputs.py`` prints the counts (calls tried / clean error / defect).
"""
from __future__ import annotations

import inspect
import math
import re
import signal
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import torch

import v4hal
from v4hal.cases import make_case, tiny_cases
from v4hal.hal.errors import RangeError, V4HalError
from v4hal.ops import OPS
from v4hal.ops.paged import PAGED_LAYOUTS

#: wall-clock bound of one probed call, seconds
TIME_LIMIT_S = 2.0

FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu
#: dtypes no op takes for any argument
FOREIGN_DTYPES = (torch.float64, torch.int16, torch.complex128)
#: dtypes some op takes for some argument (a swap to one of them may be valid)
KNOWN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, FP8, E8M0, torch.uint8, torch.int32, torch.int64,
                torch.complex64)
#: quantized operands: an op call holding one of these has quantization scales
QUANTIZED = (FP8, torch.uint8)
#: int scalars: out of every bound / possibly valid
BAD_INTS = (-1, 2**31, 2**62, 2**63 - 1)
OTHER_INTS = (0,)
#: float scalars: out of every bound / possibly valid
BAD_FLOATS = (math.nan, math.inf, -math.inf)
OTHER_FLOATS = (-1.0, 0.0, 1e300, -1e300)
#: index values out of every index range (-1 is "no entry" for some ops)
BAD_INDICES = (-2, 2**30)

DTYPE_NAMES = {str(d).replace("torch.", "") for d in (*FOREIGN_DTYPES, *KNOWN_DTYPES, torch.int8, torch.bool)}


@dataclass
class Probe:
    """One call: ``args`` (schema order) is the tiny case ``case`` of ``op`` with ``arg`` mutated by ``what``."""

    op: str
    case: int
    arg: str
    kind: str          # the argument's schema type
    what: str
    args: list[Any]
    invalid: bool      # invalid by contract: the call must raise


@dataclass
class Outcome:
    probe: Probe
    status: str        # "error" (clean v4hal error), "result", or a defect: "defect: ..."
    error: BaseException | None = None

    @property
    def defect(self) -> bool:
        return self.status.startswith("defect")


# ------------------------------------------------------------------------------ mutations
def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t


def _retype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if t.is_complex() and not dtype.is_complex:
            t = t.real
        if dtype == torch.bool:
            return t.to(torch.float32) != 0
        if dtype.is_complex:
            return t.to(torch.float32).to(dtype) if not t.is_complex() else t.to(dtype)
        return t.to(torch.float32).to(dtype)


def _zero_d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)[0].clone() if t.numel() else torch.empty((), dtype=t.dtype)


def _grow_last(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:
        return t.reshape(1)
    u = _bytes_view(t)
    pad = torch.zeros((*u.shape[:-1], 1), dtype=u.dtype)
    return torch.cat([u, pad], dim=-1).view(t.dtype)


def _poison(t: torch.Tensor, value: float) -> torch.Tensor:
    out = t.clone()
    if t.dtype == E8M0:
        out.view(torch.uint8).reshape(-1)[0] = 255      # the e8m0 NaN byte
    else:
        out.reshape(-1)[0] = value
    return out


def _set_index(t: torch.Tensor, value: int) -> torch.Tensor:
    out = t.clone()
    flat = out.reshape(-1)
    flat[0 if value < 0 else -1] = value
    return out


def _is_scale(name: str, args: dict[str, Any]) -> bool:
    """A quantization scale: ``s``, ``*_s`` or ``*_scale`` of a call with an fp8 or packed-FP4 operand."""
    named = name == "s" or name.endswith("_s") or name.endswith("_scale")
    return named and any(isinstance(a, torch.Tensor) and a.dtype in QUANTIZED for a in args.values())


def _tensor_mutations(name: str, t: torch.Tensor, args: dict[str, Any]) -> Iterator[tuple[str, Any, bool]]:
    for d in FOREIGN_DTYPES:
        yield f"dtype {d}", _retype(t, d), True
    for d in KNOWN_DTYPES:
        if d != t.dtype:
            yield f"dtype {d}", _retype(t, d), False
    yield "0-d", _zero_d(t), True
    yield "leading dim added", t.unsqueeze(0), False
    yield "last dim + 1", _grow_last(t), False
    others = [a for k, a in args.items() if k != name and isinstance(a, torch.Tensor)]
    if others:
        yield "on meta", torch.empty_like(t, device="meta"), True
    if t.dtype in (torch.int32, torch.int64) and t.numel():
        for v in BAD_INDICES:
            yield f"index {v}", _set_index(t, v), True
    if (t.is_floating_point() and t.dtype != FP8 and t.numel()) or (t.dtype == E8M0 and t.numel()):
        scale = _is_scale(name, args)
        values = (math.nan,) if t.dtype == E8M0 else (math.nan, math.inf)
        for v in values:
            yield f"holds {v}", _poison(t, v), scale


def _scalar_mutations(kind: str) -> Iterator[tuple[str, Any, bool]]:
    base = kind.removesuffix("?")
    if base in ("int", "SymInt"):
        yield from ((f"= {v}", v, True) for v in BAD_INTS)
        yield from ((f"= {v}", v, False) for v in OTHER_INTS)
    elif base == "float":
        yield from ((f"= {v}", v, True) for v in BAD_FLOATS)
        yield from ((f"= {v}", v, False) for v in OTHER_FLOATS)
    elif base == "str":
        yield "= 'bogus'", "bogus", True
    elif base == "ScalarType":
        yield from ((f"= {d}", d, True) for d in (torch.float64, torch.int16))


def schema_types(op: str) -> dict[str, str]:
    """Argument name -> type as the schema spells it (``Tensor?``, ``int``, ``ScalarType``, ``float?``)."""
    schema = OPS[op].schema
    inner = schema[schema.index("(") + 1:schema.rindex("->")].strip().removesuffix(")")
    kinds = {}
    for part in inner.split(", "):
        if part.strip() == "*":
            continue
        kind, name = part.split("=", 1)[0].split()
        kinds[name] = kind
    return kinds


def probes(op: str) -> Iterator[Probe]:
    """Every single-argument mutation of every tiny case of ``op``."""
    kinds = schema_types(op)
    for i, (_, shape) in enumerate(tiny_cases(op)):
        base = make_case(op, shape)
        named = dict(zip(OPS[op].arg_names, base))
        for pos, name in enumerate(OPS[op].arg_names):
            kind, value = kinds[name], base[pos]
            if "Tensor" in kind and isinstance(value, torch.Tensor):
                muts = _tensor_mutations(name, value, named)
            elif kind == "Tensor?" and value is None:
                muts = iter([("a tensor given", torch.zeros(1), False)])
            else:
                muts = _scalar_mutations(kind)
            for what, new, invalid in muts:
                args = list(base)
                args[pos] = new
                yield Probe(op, i, name, kind, what, args, invalid)


# ------------------------------------------------------------------------------ running a probe
class _TimedOut(BaseException):
    """Raised in the main thread by the alarm (a BaseException: no ``except Exception`` swallows it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _TimedOut()


def arg_names(op: str) -> set[str]:
    """The schema's argument names and the public wrapper's parameter names."""
    names = set(OPS[op].arg_names)
    wrapper = OPS[op].wrapper
    if wrapper is not None:
        names |= set(inspect.signature(wrapper).parameters)
    return names


def _names_arg(message: str, names: set[str], only: str | None = None) -> bool:
    """Whether ``message`` names one of ``names`` (or ``only``) as an argument, not inside another word."""
    wanted = [only] if only is not None else sorted(names)
    return any(re.search(rf"(?:^|[\s(,\[])({re.escape(n)})(?=[\s.,\[)=:]|$)", message.split(": ", 1)[-1])
               for n in wanted)


def run_probe(p: Probe) -> Outcome:
    """Call the op on the reference backend under the time bound and classify what happened."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    try:
        with v4hal.use_backend("reference"):
            OPS[p.op].call(*p.args)
    except _TimedOut as e:
        return Outcome(p, f"defect: no answer within {TIME_LIMIT_S} s", e)
    except V4HalError as e:
        msg = str(e)
        if not msg.startswith(f"{p.op}: "):
            return Outcome(p, "defect: message does not start with the op", e)
        if "\n" in msg:
            return Outcome(p, "defect: message spans lines", e)
        if not _names_arg(msg, arg_names(p.op)):
            return Outcome(p, "defect: message names no argument", e)
        scalar = "Tensor" not in p.kind
        if scalar and p.invalid and not _names_arg(msg, set(), only=p.arg):
            return Outcome(p, f"defect: message does not name {p.arg}", e)
        if scalar and p.invalid and p.kind.removesuffix("?") in ("int", "float") \
                and not isinstance(e, RangeError):
            return Outcome(p, f"defect: {type(e).__name__} for an out-of-range scalar", e)
        return Outcome(p, "error", e)
    except Exception as e:  # noqa: BLE001 - any other exception is what the probe looks for
        return Outcome(p, f"defect: {type(e).__name__}", e)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if p.invalid:
        return Outcome(p, "defect: returned a result")
    return Outcome(p, "result")


_OUTCOMES: dict[str, list[Outcome]] = {}


def run_op(op: str) -> list[Outcome]:
    """The outcomes of every probe of ``op`` (run once per process; both tests read them)."""
    if op not in _OUTCOMES:
        _OUTCOMES[op] = [run_probe(p) for p in probes(op)]
    return _OUTCOMES[op]


def describe(o: Outcome) -> str:
    p = o.probe
    err = "" if o.error is None else f": {type(o.error).__name__}: {str(o.error)[:200]}"
    return f"{p.op}[{p.case}] {p.arg} {p.what} -> {o.status}{err}"


# ------------------------------------------------------------------------------ tests
@pytest.fixture(autouse=True)
def _value_checks_on(monkeypatch):
    monkeypatch.setenv("V4HAL_CHECK_VALUES", "1")
    v4hal.hal.dispatch.refresh()


@pytest.mark.parametrize("op", [op for op in v4hal.public_ops() if tiny_cases(op)])
def test_bad_inputs_raise_a_v4hal_error_naming_an_argument(op):
    outcomes = run_op(op)
    assert outcomes, f"{op}: no probes"
    defects = [describe(o) for o in outcomes if o.defect]
    assert not defects, f"{len(defects)} of {len(outcomes)} probes of {op}:\n" + "\n".join(defects)


def _referenced_names(message: str) -> set[str]:
    """Words the message uses as argument names: its subject (the first word, when a verb, a comma or
    a parenthesis follows), every ``name.shape``, and every snake_case word that is not a dtype."""
    body = message.split(": ", 1)[-1]
    found = set(re.findall(r"^([A-Za-z_]\w*)(?= must| values| \(|,)", body))
    found |= set(re.findall(r"\b([A-Za-z_]\w*)\.shape\b", body))
    found |= {w for w in re.findall(r"\b([a-z][a-z0-9]*(?:_[a-z0-9]+)+)\b", body) if w not in DTYPE_NAMES}
    return found


@pytest.mark.parametrize("op", [op for op in v4hal.public_ops() if tiny_cases(op)])
def test_error_messages_use_the_argument_names(op):
    """Every argument a message of ``op`` refers to is a schema or wrapper argument of ``op`` (no ``x_s``
    for ``x_scale``)."""
    allowed = arg_names(op) | set(OPS) | set(PAGED_LAYOUTS)   # layout names are values, not arguments
    unknown = {}
    for o in run_op(op):
        if o.status == "error":
            bad = _referenced_names(str(o.error)) - allowed
            if bad:
                unknown.setdefault(tuple(sorted(bad)), str(o.error))
    assert not unknown, f"{op}: messages name what is not an argument: {unknown}"


def main() -> int:
    """Print the counts per op and overall, and every defect."""
    import os

    os.environ["V4HAL_CHECK_VALUES"] = "1"
    v4hal.hal.dispatch.refresh()
    total: Counter[str] = Counter()
    defects = []
    for op in v4hal.public_ops():
        if not tiny_cases(op):
            continue
        outcomes = run_op(op)
        c = Counter("defect" if o.defect else o.status for o in outcomes)
        total.update(c)
        total["tried"] += len(outcomes)
        print(f"{op:20s} tried {len(outcomes):4d}  clean error {c['error']:4d}  accepted {c['result']:4d}  "
              f"defect {c['defect']:3d}")
        defects += [describe(o) for o in outcomes if o.defect]
    print("\n".join(defects))
    print(f"TOTAL tried {total['tried']} clean error {total['error']} accepted {total['result']} "
          f"defect {total['defect']}")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
