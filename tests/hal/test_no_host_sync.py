"""With value checks off, the accelerator path reads no tensor back to the host.

Covered: every public op on each of its tiny cases, and a v4-mini prefill of two tokens plus two
decode steps (about 40 s under the interpreter), all under ``use_backend("triton")`` (the
default backend on CUDA; here on CPU tensors through the Triton interpreter) with
``V4HAL_CHECK_VALUES=0``: the op layer (bind, structural checks, selection), the Triton wrappers
and the model code. ``Tensor.item``, ``.tolist``, ``__bool__``, ``__int__``, ``__index__`` and
``__float__`` raise when called from a v4hal frame, and so do the torch ops whose output size
depends on the data (``nonzero``, ``unique``, ``masked_select``: the host waits for the device to
size them); calls from torch's or Triton's own frames (the interpreter copies tensors to NumPy) are
allowed.

Not covered: other host syncs inside a torch op (boolean-mask indexing, ``.cpu()``) are invisible
to this patching, and the reference backend, which is the CPU oracle and is not the accelerator
path, may sync.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

import v4hal
from v4hal.cases import describe_shape, make_case, tiny_cases
from v4hal.hal import dispatch, registry

V4HAL_DIR = str(Path(v4hal.__file__).resolve().parent)
REFERENCE_DIR = str(Path(V4HAL_DIR) / "backends" / "reference")
SYNCING = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__")
DATA_SIZED = ("nonzero", "unique", "masked_select")      # torch.<name> and Tensor.<name>


class HostSync(AssertionError):
    """A v4hal frame read a tensor back to the host."""


@pytest.fixture
def no_host_sync(monkeypatch):
    """Checks off, then a context manager: inside it Triton is requested and the host-reading
    Tensor methods raise for v4hal callers (inputs are built outside it)."""
    monkeypatch.setenv("V4HAL_CHECK_VALUES", "0")
    dispatch.refresh()
    if registry.ensure_device_backends("cpu").get("triton") is not None:
        pytest.skip("the Triton backend does not serve CPU tensors here (needs triton and TRITON_INTERPRET=1)")

    allowed: list[str | None] = [None]

    def guarded(owner, name):
        original = getattr(owner, name)

        def method(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(V4HAL_DIR) and not (allowed[0] and caller.startswith(allowed[0])):
                raise HostSync(f"{owner.__name__}.{name} called from {caller}:{sys._getframe(1).f_lineno}")
            return original(*args, **kwargs)
        return method

    @contextlib.contextmanager
    def guard(allow_reference: bool = False):
        """``allow_reference``: frames of the reference backend are not covered (see the module doc)."""
        allowed[0] = REFERENCE_DIR if allow_reference else None
        with pytest.MonkeyPatch.context() as patch, v4hal.use_backend("triton"):
            for name in SYNCING:
                patch.setattr(torch.Tensor, name, guarded(torch.Tensor, name))
            for name in DATA_SIZED:
                patch.setattr(torch, name, guarded(torch, name))
                patch.setattr(torch.Tensor, name, guarded(torch.Tensor, name))
            yield
    return guard


def test_the_guard_catches_v4hal_callers(no_host_sync):
    """The patching itself: a v4hal frame that reads a value is caught, this test's own frame is not."""
    from v4hal.backends.reference.paged import _split
    from v4hal.ops import _checks

    t = torch.tensor([1, 2])
    with no_host_sync():
        assert t.tolist() == [1, 2] and int(t[0]) == 1
        with pytest.raises(HostSync, match="_checks.py"):
            _checks.index_range("op", "t", t, 0, 4)
        with pytest.raises(HostSync, match="nonzero called from .*reference/paged.py"):   # a data-sized op
            _split(torch.zeros(1, 4), torch.tensor([0, -1]))
    _checks.index_range("op", "t", t, 0, 4)


@pytest.mark.parametrize("op,shape", tiny_cases(), ids=lambda v: v if isinstance(v, str) else describe_shape(v))
def test_op_does_not_sync(no_host_sync, op, shape):
    if not any(impl.backend == "triton" for impl in registry.implementations(op, "cpu")):
        pytest.skip(f"the Triton backend has no implementation of {op} (the accelerator path is the reference)")
    args = make_case(op, shape)
    call = getattr(torch.ops.v4hal, op)
    with no_host_sync():
        call(*args)     # first call: checks and selection
        call(*args)     # cached selection


def test_v4_mini_prefill_and_decode_do_not_sync(tmp_path, no_host_sync):
    """``forward`` is the paged step over the model's private pool, with the pages a CUDA device gets
    (``model1_fp8`` + ``indexer_fp4``, which the Triton kernels decode). ``compressor_ragged`` has no Triton
    kernel: the accelerator runs its reference (device tensors take its sync-free forms, checked by
    ``tests/reference/test_ragged_compress.py``), whose CPU-tensor forms read values here; the reference's
    frames are not covered, every other v4hal frame is."""
    from v4hal.model import ModelConfig, V4Model, write_random_checkpoint

    cfg = ModelConfig.preset("v4-mini")
    model = V4Model.from_pretrained(write_random_checkpoint(cfg, tmp_path, seed=0))
    model.private_layouts = ("model1_fp8", "indexer_fp4")
    ids = torch.randint(0, cfg.vocab_size, (1, 2), generator=torch.Generator().manual_seed(0))
    with no_host_sync(allow_reference=True), v4hal.use_backend(compressor_ragged="reference"):
        logits = model.forward(ids, 0)
        for step in range(2):
            logits = model.forward(logits.argmax(-1, keepdim=True), ids.shape[1] + step)
    assert logits.shape == (1, cfg.vocab_size) and torch.isfinite(logits).all()
