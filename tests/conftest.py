"""Suite-wide setup: the Triton interpreter is switched on before any Triton kernel is imported,
so the Triton backend serves CPU tensors when a test asks for it. v4hal reads its environment
(V4HAL_BACKEND, V4HAL_OP_BACKENDS, V4HAL_CHECK_VALUES) once: a test that sets one calls
``v4hal.hal.dispatch.refresh()``, and every test ends with the environment read again."""
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _v4hal_environment():
    """Re-read the V4HAL_* environment after each test (after monkeypatch restored it)."""
    yield
    from v4hal.hal import dispatch

    dispatch.refresh()
