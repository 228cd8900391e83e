"""Paged KV caches on Ascend: the cache write and read run the reference on the NPU tensors.

The byte layouts are the GPU kernels' (FlashMLA MODEL1 FP8, DeepGEMM FP4 indexer, and V4.1's FlashMLA
528-byte window / 288-byte compressed formats); no CANN op writes or reads them (the CANN cache-scatter
ops store the values as given or quantize with a per-tensor / per-channel scale, not in these
block-scaled records), so both ops are listed in ``v4hal info`` as reference fallbacks on every chip.
"""
from __future__ import annotations

import torch

from v4hal.backends.reference import paged as ref
from v4hal.hal.registry import implements

from . import limits
from ._route import always_reference
from .limits import always

limits.plan("paged_cache_write", {})
limits.plan("paged_cache_read", {})
NO_PAGED_OP = (always("no CANN op writes or reads these paged cache layouts"),)


@implements("paged_cache_write", "ascend", requires=NO_PAGED_OP)
def paged_cache_write(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, layout: str) -> None:
    """Quantize bf16 ``x [T, D]`` into ``cache`` at ``slots`` (reference on the NPU tensors)."""
    always_reference("paged_cache_write", ref.paged_cache_write, cache, x, slots, layout)


@implements("paged_cache_read", "ascend", requires=NO_PAGED_OP)
def paged_cache_read(cache: torch.Tensor, slots: torch.Tensor, layout: str) -> torch.Tensor:
    """bf16 ``[T, D]`` entries at ``slots`` (reference on the NPU tensors)."""
    return always_reference("paged_cache_read", ref.paged_cache_read, cache, slots, layout)
