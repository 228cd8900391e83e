"""Paged KV caches: cache layouts byte-compatible with the vendor kernels, and writing / reading entries by slot.

A cache is a tensor ``[num_blocks, block_size, 1, W]`` whose pages (one per block) hold ``block_size``
token entries; a *slot* is ``block * block_size + offset`` and ``-1`` means "no entry". Layouts
(``PAGED_LAYOUTS``; bytes exact, see ``docs/ops.md``):

- ``"model1_fp8"``: 512-wide attention entries, uint8 (or e4m3) ``W = 584``. A page holds first
  ``block_size x 576`` bytes, per token 448 e4m3 values then 64 bf16 values (128 bytes), then
  ``block_size x 8`` bytes, per token 7 ue8m0 scales (one per 64 e4m3 values) and a pad byte; the page
  is padded to a multiple of 576 bytes, so ``stride(0)`` is the padded page size.
- ``"bf16"``: 512-wide entries, bf16 ``W = 512``, one row per token.
- ``"indexer_fp4"``: 128-wide indexer keys, uint8 ``W = 68``: a page holds ``block_size x 64`` bytes of
  packed e2m1 (low nibble = even element), then ``block_size x 4`` ue8m0 scales (one per 32 values).
- ``"indexer_fp8"``: 128-wide indexer keys, uint8 (or e4m3) ``W = 132``: a page holds
  ``block_size x 128`` e4m3 bytes, then ``block_size x 4`` bytes of one fp32 scale per token.

``new_paged_cache`` is a plain function, not a torch op (a torch.library op needs a tensor argument,
and allocating a tensor needs none): it allocates the zeroed cache with the layout's strides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _checks as C
from ._checks import FP8, INTS
from ._define import call, define_op


@dataclass(frozen=True)
class PagedLayout:
    """One cache layout: entry width ``dim`` (bf16 values), ``width`` (the cache's last dim, in its
    elements), the cache dtypes accepted, and the page size in bytes for a block size."""

    name: str
    dim: int
    width: int
    dtypes: tuple[torch.dtype, ...]
    token_bytes: int
    page_align: int = 1

    def page_bytes(self, block_size: int) -> int:
        """Bytes of one page of ``block_size`` tokens (padded to ``page_align``)."""
        return C.ceil_div(block_size * self.token_bytes, self.page_align) * self.page_align


#: The cache layouts by name.
PAGED_LAYOUTS: dict[str, PagedLayout] = {
    "model1_fp8": PagedLayout("model1_fp8", 512, 584, (torch.uint8, FP8), 584, page_align=576),
    "bf16": PagedLayout("bf16", 512, 512, (torch.bfloat16,), 1024),
    "indexer_fp4": PagedLayout("indexer_fp4", 128, 68, (torch.uint8,), 68),
    "indexer_fp8": PagedLayout("indexer_fp8", 128, 132, (torch.uint8, FP8), 132),
}

#: Largest ``num_blocks * block_size`` of a cache: slots are int32 values.
MAX_SLOTS = C.INT32_MAX


def _layout(op: str, layout: object) -> PagedLayout:
    if not isinstance(layout, str) or layout not in PAGED_LAYOUTS:
        raise C.RangeError(f"{op}: layout must be one of {list(PAGED_LAYOUTS)}, got {layout!r}")
    return PAGED_LAYOUTS[layout]


def _check_cache(op: str, cache: torch.Tensor, lay: PagedLayout) -> None:
    """``cache`` has the layout's dtype, shape ``[blocks, block size, 1, W]`` and strides."""
    C.dtype(op, "cache", cache, lay.dtypes)
    what = f"[blocks, block size, 1, {lay.width}] for layout {lay.name!r}"
    if cache.dim() != 4 or cache.shape[2] != 1 or cache.shape[3] != lay.width:
        raise C.ShapeError(f"{op}: cache must be {what}, got {C.describe(cache)}")
    nb, bs = cache.shape[0], cache.shape[1]
    if bs < 1:
        raise C.ShapeError(f"{op}: cache must hold at least one token per block, got {C.describe(cache)}")
    if nb * bs > MAX_SLOTS:
        raise C.ShapeError(f"{op}: cache must hold at most {C.show(MAX_SLOTS)} slots, got {C.describe(cache)}")
    page = lay.page_bytes(bs) // cache.element_size()
    expected = (page, lay.width, 1)
    got = (cache.stride(0), cache.stride(1), cache.stride(3))
    if (nb > 1 and got[0] != expected[0]) or (bs > 1 and got[1] != expected[1]) or got[2] != 1:
        raise C.ShapeError(f"{op}: cache strides (dims 0, 1, 3) must be {list(expected)} for layout {lay.name!r} "
                           f"({lay.page_bytes(bs)}-byte pages), got {list(got)} for {C.describe(cache)}")


def _check_slots(op: str, slots: torch.Tensor, t: int | None) -> None:
    C.dtype(op, "slots", slots, INTS)
    if slots.dim() != 1 or (t is not None and slots.shape[0] != t):
        raise C.ShapeError(f"{op}: slots must be [T]" + ("" if t is None else f" = [{t}]") +
                           f", got {C.describe(slots)}")


def _slot_values(op: str, cache: torch.Tensor, slots: torch.Tensor, unique: bool) -> None:
    """Every slot in ``[-1, blocks * block size)``; with ``unique``, no slot other than -1 twice."""
    n = cache.shape[0] * cache.shape[1]
    C.index_range(op, "slots", slots, -1, n)
    if unique and slots.numel() > 1:
        s = slots[slots >= 0]
        if s.numel() != torch.unique(s).numel():
            raise C.RangeError(f"{op}: slots must not repeat a slot (other than -1), got a repeated value "
                               f"in {C.describe(slots)}")


# ---------------------------------------------------------------- paged_cache_write
def _check_write(cache, x, slots, layout):
    op = "paged_cache_write"
    lay = _layout(op, layout)
    _check_cache(op, cache, lay)
    C.dtype(op, "x", x, (torch.bfloat16,))
    if x.dim() != 2 or x.shape[1] != lay.dim:
        raise C.ShapeError(f"{op}: x must be [T, {lay.dim}] for layout {lay.name!r}, got {C.describe(x)}")
    _check_slots(op, slots, x.shape[0])
    C.same_device(op, cache=cache, x=x, slots=slots)


def _value_check_write(cache, x, slots, layout):
    op = "paged_cache_write"
    _slot_values(op, cache, slots, unique=True)
    if layout != "bf16":   # the quantized layouts
        C.finite(op, "x", x)


define_op("paged_cache_write", "(Tensor(a!) cache, Tensor x, Tensor slots, str layout) -> ()",
          check=_check_write, fake=lambda *a: None, value_check=_value_check_write,
          doc="Checked values: `slots` in `[-1, blocks * block size)`, no slot other than -1 twice; "
              "`x` finite for the quantized layouts.")


def paged_cache_write(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, layout: str) -> None:
    """Quantize bf16 rows ``x [T, D]`` by ``layout`` into ``cache`` at ``slots`` (int ``[T]``, ``-1`` skipped),
    in place. D is 512 (``model1_fp8``, ``bf16``) or 128 (``indexer_fp4``, ``indexer_fp8``)."""
    call.paged_cache_write(cache, x, slots, layout)


# ---------------------------------------------------------------- paged_cache_read
def _check_read(cache, slots, layout):
    op = "paged_cache_read"
    lay = _layout(op, layout)
    _check_cache(op, cache, lay)
    _check_slots(op, slots, None)
    C.same_device(op, cache=cache, slots=slots)


def _fake_read(cache, slots, layout):
    return cache.new_empty((slots.shape[0], PAGED_LAYOUTS[layout].dim), dtype=torch.bfloat16)


define_op("paged_cache_read", "(Tensor cache, Tensor slots, str layout) -> Tensor",
          check=_check_read, fake=_fake_read,
          value_check=lambda cache, slots, layout: _slot_values("paged_cache_read", cache, slots, unique=False),
          doc="Checked values: `slots` in `[-1, blocks * block size)`.")


def paged_cache_read(cache: torch.Tensor, slots: torch.Tensor, layout: str) -> torch.Tensor:
    """The entries at ``slots`` (int ``[T]``) of ``cache``, dequantized by ``layout``: bf16 ``[T, D]``;
    a ``-1`` slot reads zeros."""
    return call.paged_cache_read(cache, slots, layout)


# ---------------------------------------------------------------- new_paged_cache (not an op)
def new_paged_cache(num_blocks: int, block_size: int, layout: str,
                    device: str | torch.device | None = None) -> torch.Tensor:
    """A zeroed cache of ``layout``: ``[num_blocks, block_size, 1, W]`` (uint8, or bf16 for ``"bf16"``)
    viewing one flat buffer of ``num_blocks`` pages of the layout's (padded) page size."""
    op = "new_paged_cache"
    lay = _layout(op, layout)
    for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise C.RangeError(f"{op}: {name} must be an int, got {value!r}")
    C.in_range(op, "num_blocks", num_blocks, 1, MAX_SLOTS)
    C.in_range(op, "block_size", block_size, 1, MAX_SLOTS)
    if num_blocks * block_size > MAX_SLOTS:
        raise C.RangeError(f"{op}: num_blocks * block_size must be at most {C.show(MAX_SLOTS)}, "
                           f"got {num_blocks} * {block_size}")
    dtype = lay.dtypes[0]
    page = lay.page_bytes(block_size) // dtype.itemsize
    flat = torch.zeros(num_blocks * page, dtype=dtype, device=device)
    return flat.as_strided((num_blocks, block_size, 1, lay.width), (page, lay.width, lay.width, 1))
