"""What the Ascend backend needs from the machine: the NPU probes and torch_npu's dtype codes.

The probes themselves (importing torch_npu lazily, the SoC version, the chip family A2 / A3 / 950,
the reason the NPU is unusable) live in :mod:`v4hal.hal.devices` next to the CUDA probes; this
module re-exports them under the names the backend uses and adds :func:`reset`, which also forgets
the CANN ops :mod:`.binding` resolved (tests that install or remove the torch_npu stand-ins call it).
"""
from __future__ import annotations

from v4hal.hal.devices import (
    NPU_CHIPS,
    NPU_SOC_RANGES,
    npu_chip,
    npu_chip_family,
    npu_reason,
    npu_soc_version,
    reset_npu_probes,
    torch_npu_module,
)

from .binding import reset as _forget_bound_ops

CHIPS: tuple[str, ...] = NPU_CHIPS
SOC_RANGES: dict[str, tuple[int, int]] = NPU_SOC_RANGES

#: torch_npu dtype codes (torch_npu 2.14 meta registrations); passed where torch has no dtype.
DTYPE_CODES: dict[str, int] = {
    "int4": 285, "hifloat8": 290, "float8_e5m2": 291, "float8_e4m3fn": 292, "float8_e8m0fnu": 293,
    "float4_e2m1fn_x2": 296, "float4_e1m2fn_x2": 297,
}

chip = npu_chip
chip_family = npu_chip_family
soc_version = npu_soc_version
probe_reason = npu_reason

__all__ = ["CHIPS", "SOC_RANGES", "DTYPE_CODES", "chip", "chip_family", "soc_version", "probe_reason",
           "torch_npu_module", "reset", "dtype_code"]


def reset() -> None:
    """Forget every cached NPU probe and every resolved CANN op."""
    reset_npu_probes()
    _forget_bound_ops()


def dtype_code(name: str) -> object:
    """torch_npu's value for a dtype torch lacks (e.g. ``torch_npu.float4_e2m1fn_x2``): the module's
    own attribute when it defines one (what vllm-ascend passes), else the documented int code."""
    mod = torch_npu_module()
    value = getattr(mod, name, None) if mod is not None else None
    return value if value is not None else DTYPE_CODES[name]
