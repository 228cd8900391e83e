"""Property tests of the checkpoint loader: random damage to a v4-mini checkpoint file (header length, header
JSON bytes, data offsets, dtype strings, shapes, file kinds and contents).

Every case either loads a complete model or raises a v4hal error naming the file or a tensor; nothing else
escapes, nothing takes long (each case runs under a 10 s SIGALRM bound and must end within 5 s). FIFOs, whose
opening would block in C with the GIL held, are covered in a subprocess by ``test_checkpoint_hostile.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from v4hal.hal.errors import V4HalError
from v4hal.model import V4Model

SHARD = "model0-mp1.safetensors"
# V4HAL_FUZZ_EXAMPLES=N: a deeper (random, not derandomized) run with N examples per family
_DEEP = int(os.environ.get("V4HAL_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_DEEP or 25, deadline=None, derandomize=not _DEEP, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class _Timeout(BaseException):
    """Raised by SIGALRM: a BaseException, so no `except Exception` in the loader can swallow it."""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, mini_fp8: Path) -> tuple[Path, bytes, dict, list[str]]:
    """(scratch checkpoint dir, original shard bytes, original header, tensor names)."""
    d = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(mini_fp8, d)
    raw = (d / SHARD).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return d, raw, header, [k for k in header if k != "__metadata__"]


def _pack(header: dict, body: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def _check(d: Path, names: list[str]) -> str:
    """Load ``d`` under a time bound: 'loaded' (then the model is complete) or 'error' (a v4hal error naming
    the shard file or a tensor). Any other exception fails the test."""
    def alarm(signum: int, frame: object) -> None:
        raise _Timeout("loader ran past 10 s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 10.0)
    t0 = time.perf_counter()
    try:
        model = V4Model.from_pretrained(d)
    except V4HalError as e:
        msg = str(e)
        assert SHARD in msg or any(name in msg for name in names), msg
        return "error"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        assert time.perf_counter() - t0 < 5.0
    assert not any(b.is_meta for b in model.buffers()), "a model came back with weights never loaded"
    return "loaded"


def _write(d: Path, data: bytes) -> None:
    f = d / SHARD
    if f.is_symlink() or not f.is_file():
        if f.is_dir() and not f.is_symlink():
            f.rmdir()
        else:
            f.unlink(missing_ok=True)
    f.write_bytes(data)


# ------------------------------------------------------------------------------ header length and bytes
@FUZZ
@given(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 2**16)))
def test_header_length(pristine, n: int) -> None:
    d, raw, _, names = pristine
    _write(d, struct.pack("<Q", n) + raw[8:])
    assert _check(d, names) == ("loaded" if raw[:8] == struct.pack("<Q", n) else "error")


@FUZZ
@given(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
       st.one_of(st.none(), st.floats(0, 1)))
def test_header_bytes(pristine, edits: list[tuple[float, int]], cut: float | None) -> None:
    """Random bytes written into the header JSON, optionally cut short (length field kept)."""
    d, raw, _, names = pristine
    n = struct.unpack("<Q", raw[:8])[0]
    h = bytearray(raw[8:8 + n])
    for where, byte in edits:
        h[int(where * n)] = byte
    if cut is not None:
        h = h[:int(cut * n)]
    _check_written(d, struct.pack("<Q", n) + bytes(h) + raw[8 + n:], names)


def _check_written(d: Path, data: bytes, names: list[str]) -> None:
    _write(d, data)
    _check(d, names)


# ------------------------------------------------------------------------------ header fields
_DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "I64", "I32", "I16", "I8", "U8",
           "BOOL", "U16", "U32", "U64", "C64", "F6_E2M3", "F8_E4M3FNUZ", "bf16", "", "float32", "\u00e9"]
_ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
                         lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                         max_leaves=6)


@FUZZ
@given(st.data())
def test_offsets(pristine, data: st.DataObject) -> None:
    d, raw, header, names = pristine
    n = struct.unpack("<Q", raw[:8])[0]
    h = json.loads(json.dumps(header))
    name = data.draw(st.sampled_from(names), label="tensor")
    lo, hi = h[name]["data_offsets"]
    how = data.draw(st.sampled_from(["shift", "swap", "random", "json"]), label="how")
    if how == "shift":
        delta = data.draw(st.integers(-64, 64), label="delta")
        h[name]["data_offsets"] = [lo + delta, hi + data.draw(st.sampled_from([0, delta]), label="end")]
    elif how == "swap":
        other = data.draw(st.sampled_from(names), label="other")
        h[name]["data_offsets"], h[other]["data_offsets"] = h[other]["data_offsets"], [lo, hi]
    elif how == "random":
        h[name]["data_offsets"] = data.draw(st.lists(st.integers(-2**64, 2**65), min_size=0, max_size=3),
                                            label="offsets")
    else:
        h[name]["data_offsets"] = data.draw(_ANY_JSON, label="offsets")
    _check_written(d, _pack(h, raw[8 + n:]), names)


@FUZZ
@given(st.data())
def test_dtype_strings(pristine, data: st.DataObject) -> None:
    d, raw, header, names = pristine
    n = struct.unpack("<Q", raw[:8])[0]
    h = json.loads(json.dumps(header))
    for name in data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True), label="tensors"):
        h[name]["dtype"] = data.draw(st.one_of(st.sampled_from(_DTYPES), _ANY_JSON), label="dtype")
    _check_written(d, _pack(h, raw[8 + n:]), names)


@FUZZ
@given(st.data())
def test_shapes(pristine, data: st.DataObject) -> None:
    d, raw, header, names = pristine
    n = struct.unpack("<Q", raw[:8])[0]
    h = json.loads(json.dumps(header))
    name = data.draw(st.sampled_from(names), label="tensor")
    shape = h[name]["shape"]
    how = data.draw(st.sampled_from(["permute", "scale", "random", "json"]), label="how")
    if how == "permute" and len(shape) > 1:
        h[name]["shape"] = shape[::-1]
    elif how == "scale" and shape:
        i = data.draw(st.integers(0, len(shape) - 1), label="dim")
        shape[i] = shape[i] * data.draw(st.sampled_from([0, 2, -1]), label="factor")
        h[name]["shape"] = shape
    elif how == "random":
        h[name]["shape"] = data.draw(st.lists(st.integers(-2**64, 2**64), max_size=4), label="shape")
    else:
        h[name]["shape"] = data.draw(_ANY_JSON, label="shape")
    _check_written(d, _pack(h, raw[8 + n:]), names)


@FUZZ
@given(st.data())
def test_header_keys(pristine, data: st.DataObject) -> None:
    """Tensors renamed, dropped, duplicated as other names; ``__metadata__`` replaced; extra fields."""
    d, raw, header, names = pristine
    n = struct.unpack("<Q", raw[:8])[0]
    h = json.loads(json.dumps(header))
    name = data.draw(st.sampled_from(names), label="tensor")
    how = data.draw(st.sampled_from(["rename", "drop", "metadata", "field", "value"]), label="how")
    if how == "rename":
        h[data.draw(st.text(max_size=20), label="new name")] = h.pop(name)
    elif how == "drop":
        del h[name]
    elif how == "metadata":
        h["__metadata__"] = data.draw(_ANY_JSON, label="metadata")
    elif how == "field":
        h[name][data.draw(st.text(max_size=8), label="field")] = data.draw(_ANY_JSON, label="value")
    else:
        h[name] = data.draw(_ANY_JSON, label="entry")
    _check_written(d, _pack(h, raw[8 + n:]), names)


# ------------------------------------------------------------------------------ file kinds and contents
@FUZZ
@given(st.sampled_from(["truncate", "append", "random", "empty", "directory", "dev-null", "dev-zero", "dangling",
                        "zeros-body"]),
       st.floats(0, 1), st.binary(max_size=64))
def test_file_kinds(pristine, kind: str, frac: float, junk: bytes) -> None:
    d, raw, _, names = pristine
    f = d / SHARD
    _write(d, b"")
    n = struct.unpack("<Q", raw[:8])[0]
    if kind == "truncate":
        f.write_bytes(raw[:int(frac * len(raw))])
    elif kind == "append":
        f.write_bytes(raw + junk)
    elif kind == "random":
        f.write_bytes(junk + raw[len(junk):int(frac * len(raw))])
    elif kind == "empty":
        pass
    elif kind == "directory":
        f.unlink()
        f.mkdir()
    elif kind in ("dev-null", "dev-zero"):
        f.unlink()
        f.symlink_to("/dev/null" if kind == "dev-null" else "/dev/zero")
    elif kind == "dangling":
        f.unlink()
        f.symlink_to(d / "no-such-file")
    else:
        f.write_bytes(raw[:8 + n] + bytes(len(raw) - 8 - n))    # valid header, all-zero data: zero scales
    outcome = _check(d, names)
    if kind not in ("append", "zeros-body") and not (kind in ("truncate", "random") and frac == 1.0):
        assert outcome == "error", kind
    # leave the scratch file regular for the next case
    if f.is_symlink() or f.is_dir():
        _write(d, raw)
