"""Paged KV caches: cache layouts byte-compatible with the vendor kernels, and writing / reading entries by slot.

A cache is a tensor ``[num_blocks, block_size, 1, W]`` whose pages (one per block) hold ``block_size``
token entries of ``D`` values; a *slot* is ``block * block_size + offset`` and ``-1`` means "no entry".
Each layout (``PAGED_LAYOUTS``; bytes exact, see ``docs/ops.md``) is a family over the entry width
``D``: ``W`` is a strictly increasing function of ``D``, so the cache's last dim tells ``D``
(:meth:`PagedLayout.dim_of_width`). At V4's widths (512 for attention, 128 for the indexer) the bytes
are the vendor kernels':

- ``"model1_fp8"``: ``D = nope + 64``, ``nope`` a positive multiple of 64; uint8 (or e4m3). A page holds
  first ``block_size x (nope + 128)`` bytes, per token ``nope`` e4m3 values then 64 bf16 values (128
  bytes), then ``block_size x 8 * ceil(nope / 512)`` bytes, per token ``nope / 64`` ue8m0 scales (one per
  64 e4m3 values) zero padded to a multiple of 8 bytes; the page is padded to a multiple of ``nope + 128``
  bytes, so ``stride(0)`` is the padded page size. ``W = nope + 128 + 8 * ceil(nope / 512)``; D = 512:
  448 + 128 + 8 = 584, pages padded to 576.
- ``"bf16"``: any ``D >= 1``, bf16 ``W = D``, one row per token.
- ``"indexer_fp4"``: ``D`` a positive multiple of 32, uint8 ``W = D / 2 + 4 * ceil(D / 128)``: a page
  holds ``block_size x D / 2`` bytes of packed e2m1 (low nibble = even element), then per token ``D / 32``
  ue8m0 scales (one per 32 values) zero padded to a multiple of 4 bytes (one 32-bit word per 128
  values); D = 128: 64 + 4 = 68.
- ``"indexer_fp8"``: any ``D >= 1``, uint8 (or e4m3) ``W = D + 4``: a page holds ``block_size x D`` e4m3
  bytes, then per token one fp32 scale (4 bytes) over all ``D`` values; D = 128: 132.
- ``"v41_window_fp8"`` (V4.1's window cache, FlashMLA's 528-byte format): ``D`` a positive multiple of
  32, uint8 (or e4m3) ``W = D + D / 32``: a page holds ``block_size x D`` e4m3 bytes (every value, NoPE
  and RoPE dims alike, in dim order), then per token ``D / 32`` ue8m0 scales (one per 32 values,
  ``2**ceil(log2(max(amax / 448, 1e-4)))``); the page is padded to a multiple of ``D`` bytes; D = 512:
  512 + 16 = 528.
- ``"v41_compressed_fp4"`` (V4.1's compressed cache, FlashMLA's 288-byte format): ``D`` a positive
  multiple of 16, uint8 ``W = D / 2 + D / 16``: a page holds ``block_size x D / 2`` bytes of packed
  e2m1 (element ``i`` in byte ``i // 2``, even elements in the low nibble, sign in bit 3), then per
  token ``D / 16`` e4m3 scales (one per 16 values, ``e4m3(clamp(amax / 6, 2**-9, 448))``); the page is
  padded to a multiple of ``D / 2`` bytes; D = 512: 256 + 32 = 288.

``new_paged_cache`` is a plain function, not a torch op (a torch.library op needs a tensor argument,
and allocating a tensor needs none): it allocates the zeroed cache with the layout's strides.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch

from . import _checks as C
from ._checks import FP8, INTS
from ._define import call, define_op

ROPE = 64           # model1_fp8: trailing bf16 values per entry
NOPE_BLOCK = 64     # model1_fp8: e4m3 values per ue8m0 scale
FP4_BLOCK = 32      # indexer_fp4: values per ue8m0 scale
V41_FP8_BLOCK = 32  # v41_window_fp8: e4m3 values per ue8m0 scale
V41_FP4_BLOCK = 16  # v41_compressed_fp4: e2m1 values per e4m3 scale


@dataclass(frozen=True)
class PagedLayout(ABC):
    """One cache layout family over the entry width ``D``: ``dim`` (V4's width), the cache dtypes
    accepted (the first is the one allocated), ``rule`` (the widths allowed, in words) and
    ``formula`` (``W`` in terms of ``D``). Widths are counted in the cache dtype's elements (bytes,
    or bf16 values for ``"bf16"``).

    The ``k``-th allowed width ``D_k`` (``k = 1, 2, ...``) is :meth:`dim_at`; :meth:`width` is
    strictly increasing in ``k`` and at least ``k``."""

    name: str
    dim: int
    dtypes: tuple[torch.dtype, ...]
    rule: str
    formula: str
    step: int = 1        # allowed D: multiples of ``step``, at least ``first``
    first: int = 1

    def dim_at(self, k: int) -> int:
        """The ``k``-th allowed entry width (``k >= 1``)."""
        return self.first + (k - 1) * self.step

    def dim_problem(self, dim: object) -> str | None:
        """None when ``dim`` is an entry width of this layout, else what is wrong with it."""
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < self.first or dim % self.step:
            return f"layout {self.name!r} takes entry widths D = {self.rule}, got {dim!r}"
        return None

    def _dim(self, dim: int | None) -> int:
        d = self.dim if dim is None else dim
        why = self.dim_problem(d)
        if why is not None:
            raise C.ShapeError(f"{self.name}: {why}")
        return d

    @abstractmethod
    def _width(self, d: int) -> int:
        """``W`` for a valid entry width ``d`` (each layout's formula)."""

    def _page_align(self, d: int) -> int:
        return 1

    def width(self, dim: int | None = None) -> int:
        """``W``, the cache's last dim, for ``dim``-wide entries (None: V4's ``dim``)."""
        return self._width(self._dim(dim))

    def token_bytes(self, dim: int | None = None) -> int:
        """Bytes of one token's entry (its values and scales), ``W`` times the element size."""
        return self.width(dim) * self.dtypes[0].itemsize

    def page_bytes(self, dim: int | None, block_size: int) -> int:
        """Bytes of one page of ``block_size`` tokens of ``dim``-wide entries (None: V4's ``dim``), padded
        to the layout's page alignment."""
        d = self._dim(dim)
        align = self._page_align(d)
        return C.ceil_div(block_size * self.token_bytes(d), align) * align

    def dim_of_width(self, width: int) -> int:
        """The entry width ``D`` whose ``W`` is ``width``; ``ShapeError`` when no ``D`` gives it."""
        d = _dim_of_width(self, width)
        if d is None:
            raise C.ShapeError(f"{self.name}: no entry width gives W = {width!r} ({self.formula}, "
                               f"D = {self.rule}; D = {self.dim} gives W = {self.width()})")
        return d


@dataclass(frozen=True)
class Model1Layout(PagedLayout):
    """``model1_fp8``: ``nope = D - 64`` e4m3 values and 64 bf16 values per token, then the scales."""

    def nope(self, dim: int | None = None) -> int:
        """e4m3 values per entry: ``D - 64``."""
        return self._dim(dim) - ROPE

    def data_bytes(self, dim: int | None = None) -> int:
        """Bytes of a token's record in the data region: ``nope + 128``."""
        return self.nope(dim) + 2 * ROPE

    def scale_bytes(self, dim: int | None = None) -> int:
        """Bytes of a token's scales: ``nope / 64`` ue8m0 bytes zero padded to a multiple of 8."""
        return 8 * C.ceil_div(self.nope(dim) // NOPE_BLOCK, 8)

    def _width(self, d: int) -> int:
        return self.data_bytes(d) + self.scale_bytes(d)

    def _page_align(self, d: int) -> int:
        return self.data_bytes(d)


@dataclass(frozen=True)
class Fp4Layout(PagedLayout):
    """``indexer_fp4``: ``D / 2`` packed bytes, then ``D / 32`` ue8m0 scales padded to 4 bytes."""

    def scale_bytes(self, dim: int | None = None) -> int:
        """Bytes of a token's scales: ``D / 32`` ue8m0 bytes zero padded to a multiple of 4."""
        return 4 * C.ceil_div(self._dim(dim) // FP4_BLOCK, 4)

    def _width(self, d: int) -> int:
        return d // 2 + self.scale_bytes(d)


@dataclass(frozen=True)
class Fp8Layout(PagedLayout):
    """``indexer_fp8``: ``D`` e4m3 bytes, then one fp32 scale."""

    def _width(self, d: int) -> int:
        return d + 4


@dataclass(frozen=True)
class ScaledRecordLayout(PagedLayout):
    """The V4.1 layouts: per token ``D * bits / 8`` bytes of codes (``bits`` 8 for e4m3, 4 for e2m1),
    then one 1-byte scale per ``block`` values; pages padded to a multiple of the codes' bytes."""

    bits: int = 8
    block: int = 32

    def data_bytes(self, dim: int | None = None) -> int:
        """Bytes of a token's codes: ``D * bits / 8``."""
        return self._dim(dim) * self.bits // 8

    def scale_bytes(self, dim: int | None = None) -> int:
        """Bytes of a token's scales: ``D / block``, one byte each, no padding."""
        return self._dim(dim) // self.block

    def _width(self, d: int) -> int:
        return d * self.bits // 8 + d // self.block

    def _page_align(self, d: int) -> int:
        return d * self.bits // 8


@dataclass(frozen=True)
class Bf16Layout(PagedLayout):
    """``bf16``: the ``D`` bf16 values."""

    def _width(self, d: int) -> int:
        return d


def _dim_of_width(lay: PagedLayout, width: object) -> int | None:
    """The ``D`` whose width is ``width`` (an int, or a symbolic size: specialized), None when none."""
    if isinstance(width, torch.SymInt):
        width = int(width)
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        return None
    return _search_dim(lay, width)


@functools.lru_cache(maxsize=256)
def _search_dim(lay: PagedLayout, width: int) -> int | None:
    """Binary search over ``k`` (the width of ``D_k`` is strictly increasing and at least ``k``)."""
    lo, hi = 1, width
    while lo < hi:
        mid = (lo + hi) // 2
        if lay._width(lay.dim_at(mid)) < width:
            lo = mid + 1
        else:
            hi = mid
    d = lay.dim_at(lo)
    return d if lay._width(d) == width else None


#: The cache layouts by name.
PAGED_LAYOUTS: dict[str, PagedLayout] = {
    "model1_fp8": Model1Layout("model1_fp8", 512, (torch.uint8, FP8), "nope + 64 with nope a positive multiple of 64",
                               "W = nope + 128 + 8 * ceil(nope / 512)", step=64, first=128),
    "bf16": Bf16Layout("bf16", 512, (torch.bfloat16,), "any D >= 1", "W = D"),
    "indexer_fp4": Fp4Layout("indexer_fp4", 128, (torch.uint8,), "a positive multiple of 32",
                             "W = D / 2 + 4 * ceil(D / 128)", step=32, first=32),
    "indexer_fp8": Fp8Layout("indexer_fp8", 128, (torch.uint8, FP8), "any D >= 1", "W = D + 4"),
    "v41_window_fp8": ScaledRecordLayout("v41_window_fp8", 512, (torch.uint8, FP8), "a positive multiple of 32",
                                         "W = D + D / 32", step=V41_FP8_BLOCK, first=V41_FP8_BLOCK,
                                         bits=8, block=V41_FP8_BLOCK),
    "v41_compressed_fp4": ScaledRecordLayout("v41_compressed_fp4", 512, (torch.uint8,), "a positive multiple of 16",
                                             "W = D / 2 + D / 16", step=V41_FP4_BLOCK, first=V41_FP4_BLOCK,
                                             bits=4, block=V41_FP4_BLOCK),
}

#: Largest ``num_blocks * block_size`` of a cache: slots are int32 values.
MAX_SLOTS = C.INT32_MAX


def _layout(op: str, layout: object, name: str = "layout") -> PagedLayout:
    """The `PagedLayout` named by argument ``name``; RangeError naming it for an unknown name."""
    if not isinstance(layout, str) or layout not in PAGED_LAYOUTS:
        raise C.RangeError(f"{op}: {name} must be one of {list(PAGED_LAYOUTS)}, got {layout!r}")
    return PAGED_LAYOUTS[layout]


def matching_layouts(cache: torch.Tensor) -> list[tuple[str, int]]:
    """``(layout, D)`` of every layout that takes ``cache``'s dtype and gives its last dim ``W`` for some
    entry width ``D`` (strides and the other dims not looked at), in `PAGED_LAYOUTS` order."""
    if not isinstance(cache, torch.Tensor) or cache.dim() < 1:
        return []
    found = []
    for name, lay in PAGED_LAYOUTS.items():
        dim = _dim_of_width(lay, cache.shape[-1]) if cache.dtype in lay.dtypes else None
        if dim is not None:
            found.append((name, dim))
    return found


def layout_hint(op: str, cache: torch.Tensor, layout: str, allowed: Sequence[str] | None = None,
                dim: int | None = None, dim_of: str = "q", strict: bool = False) -> str:
    """The end of an error message about a ``cache`` that does not fit ``layout``: which other layouts it
    looks like from its dtype and last dim, ``""`` when none, e.g. ``"; it looks like a cache of layout
    'bf16' (D = 512): pass layout='bf16'"``. ``allowed``: the layouts ``op`` takes (None: all); the fix named
    is the first of those holding ``dim``-wide entries (the width argument ``dim_of`` implies; None: any).
    When none holds them, the looks are still told (``strict``: ``""`` instead)."""
    allowed = list(PAGED_LAYOUTS) if allowed is None else list(allowed)
    found = [(n, d) for n, d in matching_layouts(cache) if n != layout]
    fit = [(n, d) for n, d in found if dim is None or d == dim]
    if not fit:
        if strict or not found:
            return ""
        looks = " or ".join(f"{n!r} (D = {d})" for n, d in found)
        if not any(n in allowed for n, _ in found):
            return f"; it looks like a cache of layout {looks}, which {op} does not take (layouts: {allowed})"
        return f"; it looks like a cache of layout {looks}, not of {dim}-wide entries like {dim_of}"
    # layouts op takes first, then those at the layout's V4 width (584 bytes: model1_fp8 before indexer_fp8)
    fit.sort(key=lambda nd: (nd[0] not in allowed, nd[1] != PAGED_LAYOUTS[nd[0]].dim))
    looks = " or ".join(f"{n!r} (D = {d})" for n, d in fit)
    if fit[0][0] in allowed:
        return f"; it looks like a cache of layout {looks}: pass layout={fit[0][0]!r}"
    return f"; it looks like a cache of layout {looks}, which {op} does not take (layouts: {allowed})"


def cache_dim(cache: torch.Tensor, layout: str) -> int:
    """The entry width ``D`` of a (valid) cache of ``layout``, from its last dim."""
    return PAGED_LAYOUTS[layout].dim_of_width(cache.shape[-1])


def _check_cache(op: str, cache: torch.Tensor, lay: PagedLayout, allowed: Sequence[str] | None = None,
                 dim: int | None = None, dim_of: str = "q") -> int:
    """``cache`` has the layout's dtype, shape ``[blocks, block size, 1, W]`` with ``W`` a width the
    layout gives, and the layout's strides; returns its entry width ``D``. A cache of the wrong dtype or
    width gets `layout_hint` (``allowed``: the layouts ``op`` takes; ``dim``: the entry width argument
    ``dim_of`` implies, None when none does)."""
    if isinstance(cache, torch.Tensor) and cache.dtype not in lay.dtypes:
        raise C.DTypeError(f"{op}: cache must be {C.dtype_names(lay.dtypes)} for layout {lay.name!r}, "
                           f"got {C.describe(cache)}{layout_hint(op, cache, lay.name, allowed, dim, dim_of)}")
    C.dtype(op, "cache", cache, lay.dtypes)
    if cache.dim() != 4 or cache.shape[2] != 1:
        raise C.ShapeError(f"{op}: cache must be [blocks, block size, 1, W] for layout {lay.name!r}, "
                           f"got {C.describe(cache)}")
    entry = _dim_of_width(lay, cache.shape[3])
    if entry is None:
        raise C.ShapeError(f"{op}: cache must be [blocks, block size, 1, W] with W a width of layout {lay.name!r} "
                           f"({lay.formula}, D = {lay.rule}: {lay.width()} for D = {lay.dim}), "
                           f"got {C.describe(cache)}, a W no D gives"
                           f"{layout_hint(op, cache, lay.name, allowed, dim, dim_of)}")
    nb, bs = cache.shape[0], cache.shape[1]
    if bs < 1:
        raise C.ShapeError(f"{op}: cache must hold at least one token per block, got {C.describe(cache)}")
    if nb * bs > MAX_SLOTS:
        raise C.ShapeError(f"{op}: cache must hold at most {C.show(MAX_SLOTS)} slots, got {C.describe(cache)}")
    width = cache.shape[3]
    page = lay.page_bytes(entry, bs) // cache.element_size()
    expected = (page, width, 1)
    got = (cache.stride(0), cache.stride(1), cache.stride(3))
    if (nb > 1 and got[0] != expected[0]) or (bs > 1 and got[1] != expected[1]) or got[2] != 1:
        raise C.ShapeError(f"{op}: cache strides (dims 0, 1, 3) must be {list(expected)} for layout {lay.name!r} "
                           f"({lay.page_bytes(entry, bs)}-byte pages of {entry}-wide entries), got {list(got)} "
                           f"for {C.describe(cache)}")
    return entry


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
    rows = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 2 else None
    dim = _check_cache(op, cache, lay, dim=rows, dim_of="x")
    C.dtype(op, "x", x, (torch.bfloat16,))
    if x.dim() != 2 or x.shape[1] != dim:
        fix = layout_hint(op, cache, lay.name, dim=rows, strict=True) if rows is not None else ""
        hint = ""
        if rows is not None and lay.dim_problem(rows) is None:
            hint = f"; {rows}-wide rows need a cache of last dim {lay.width(rows)}"
        raise C.ShapeError(f"{op}: x must be [T, {dim}], the entry width D of cache {C.describe(cache)} "
                           f"(layout {lay.name!r}, {lay.formula}){hint}, got {C.describe(x)}{fix}")
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
    """Quantize bf16 rows ``x [T, D]`` by ``layout`` into ``cache`` at ``slots`` (int ``[T]``, ``-1`` skipped,
    and with the value checks off every slot outside the cache too), in place. ``D`` is the cache's entry
    width (its last dim ``W`` tells it: 512 for V4's ``model1_fp8`` / ``bf16`` caches and V4.1's
    ``v41_window_fp8`` / ``v41_compressed_fp4`` caches, 128 for the ``indexer_fp4`` / ``indexer_fp8``
    caches)."""
    call.paged_cache_write(cache, x, slots, layout)


# ---------------------------------------------------------------- paged_cache_read
def _check_read(cache, slots, layout):
    op = "paged_cache_read"
    lay = _layout(op, layout)
    _check_cache(op, cache, lay)
    _check_slots(op, slots, None)
    C.same_device(op, cache=cache, slots=slots)


def _fake_read(cache, slots, layout):
    return cache.new_empty((slots.shape[0], cache_dim(cache, layout)), dtype=torch.bfloat16)


define_op("paged_cache_read", "(Tensor cache, Tensor slots, str layout) -> Tensor",
          check=_check_read, fake=_fake_read,
          value_check=lambda cache, slots, layout: _slot_values("paged_cache_read", cache, slots, unique=False),
          doc="Checked values: `slots` in `[-1, blocks * block size)`.")


def paged_cache_read(cache: torch.Tensor, slots: torch.Tensor, layout: str) -> torch.Tensor:
    """The entries at ``slots`` (int ``[T]``) of ``cache``, dequantized by ``layout``: bf16 ``[T, D]`` with
    ``D`` the cache's entry width; a ``-1`` slot (with the value checks off, any slot outside the cache)
    reads zeros."""
    return call.paged_cache_read(cache, slots, layout)


# ---------------------------------------------------------------- new_paged_cache (not an op)
def new_paged_cache(num_blocks: int, block_size: int, layout: str,
                    device: str | torch.device | None = None, *, dim: int | None = None) -> torch.Tensor:
    """A zeroed cache of ``layout`` for ``dim``-wide entries (None: V4's width, 512 or 128):
    ``[num_blocks, block_size, 1, W]`` (uint8, or bf16 for ``"bf16"``) viewing one flat buffer of
    ``num_blocks`` pages of the layout's (padded) page size."""
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
    if dim is not None and lay.dim_problem(dim) is not None:
        raise C.ShapeError(f"{op}: dim must be an entry width of layout {layout!r} (D = {lay.rule}), got {dim!r}")
    dtype = lay.dtypes[0]
    width = lay.width(dim)
    page = lay.page_bytes(dim, block_size) // dtype.itemsize
    flat = torch.zeros(num_blocks * page, dtype=dtype, device=device)
    return flat.as_strided((num_blocks, block_size, 1, width), (page, width, width, 1))
