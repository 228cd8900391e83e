"""A paged cache passed with a layout it does not have: the error says which layout the cache looks like
(from its dtype and last dim, and the entry width q or x implies) and names the fix.

One row per mistake: the call, the error type, the hint the message must end with (a regex), or None
where no other layout fits and the message must carry no hint.
"""
from __future__ import annotations

import re
from typing import Callable

import pytest
import torch

import v4hal
from v4hal.hal.errors import DTypeError, RangeError, ShapeError
from v4hal.ops.paged import layout_hint, matching_layouts
from v4hal.ops.paged_attention import sparse_attn_paged
from v4hal.ops.paged_indexer import indexer_logits_paged, indexer_topk_paged

BF16 = torch.bfloat16


def cache(layout: str, dim: int | None = None) -> torch.Tensor:
    return v4hal.new_paged_cache(4, 16, layout, dim=dim)


def attn(kv: torch.Tensor, layout: str | None = None, d: int = 512, extra: torch.Tensor | None = None) -> None:
    q = torch.zeros(1, 1, 2, d, dtype=BF16)
    idx = torch.zeros(1, 1, 4, dtype=torch.int32)
    kw = {} if layout is None else {"layout": layout}
    if extra is not None:
        kw.update(extra_kv_cache=extra, extra_indices=idx)
    sparse_attn_paged(q, kv, idx, torch.zeros(2), 1.0, **kw)


def index(fn: Callable, kv: torch.Tensor, layout: str | None = None, d: int = 128) -> None:
    q = torch.zeros(1, 1, 2, d, dtype=BF16)
    args = (q, kv, torch.zeros(1, 2), torch.ones(1, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32), 4)
    fn(*args, **({} if layout is None else {"layout": layout}))


def write(kv: torch.Tensor, layout: str, d: int) -> None:
    v4hal.paged_cache_write(kv, torch.zeros(2, d, dtype=BF16), torch.tensor([0, 1]), layout)


def read(kv: torch.Tensor, layout: str) -> None:
    v4hal.paged_cache_read(kv, torch.tensor([0, 1]), layout)


PASS = r": pass layout='{}'$"
CASES = [
    # a bf16 cache without layout="bf16" (the defaults are model1_fp8 and indexer_fp4)
    ("attn bf16 default", lambda: attn(cache("bf16")), DTypeError,
     r"kv_cache must be uint8 or float8_e4m3fn for layout 'model1_fp8', got bfloat16 .*'bf16' \(D = 512\)"
     + PASS.format("bf16")),
    # the extra cache has its own layout argument: the fix names it
    ("attn bf16 extra", lambda: attn(cache("bf16"), "bf16", extra=cache("model1_fp8")), DTypeError,
     r"extra_kv_cache must be bfloat16 for layout 'bf16', got uint8 .*'model1_fp8' \(D = 512\)"
     r": pass extra_layout='model1_fp8'$"),
    ("logits bf16 default", lambda: index(indexer_logits_paged, cache("bf16", 128)), DTypeError,
     r"kv_cache must be uint8 for layout 'indexer_fp4', got bfloat16 .*'bf16' \(D = 128\)" + PASS.format("bf16")),
    ("topk bf16 default", lambda: index(indexer_topk_paged, cache("bf16", 128)), DTypeError,
     r"'bf16' \(D = 128\)" + PASS.format("bf16")),
    ("write bf16 as model1", lambda: write(cache("bf16"), "model1_fp8", 512), DTypeError,
     r"paged_cache_write: cache must be uint8 or float8_e4m3fn for layout 'model1_fp8'.*" + PASS.format("bf16")),
    # a quantized cache called bf16: 584 bytes could be model1_fp8 (D = 512) or indexer_fp8 (D = 580)
    ("attn model1 as bf16", lambda: attn(cache("model1_fp8"), "bf16"), DTypeError,
     r"looks like a cache of layout 'model1_fp8' \(D = 512\)" + PASS.format("model1_fp8")),
    ("read model1 as bf16", lambda: read(cache("model1_fp8"), "bf16"), DTypeError,
     r"'model1_fp8' \(D = 512\) or 'indexer_fp8' \(D = 580\)" + PASS.format("model1_fp8")),
    # the dtype fits, the last dim tells another layout
    # (132 bytes are also a v41_window_fp8 entry of D = 128: told, but the fix named is the layout the op takes)
    ("topk fp8 as fp4", lambda: index(indexer_topk_paged, cache("indexer_fp8")), ShapeError,
     r"a W no D gives; it looks like a cache of layout 'indexer_fp8' \(D = 128\) or 'v41_window_fp8' \(D = 128\)"
     + PASS.format("indexer_fp8")),
    ("write model1 as fp4", lambda: write(cache("model1_fp8"), "indexer_fp4", 512), ShapeError,
     r"a W no D gives; .*'model1_fp8' \(D = 512\)" + PASS.format("model1_fp8")),
    ("write model1 as fp4, x 580", lambda: write(cache("model1_fp8"), "indexer_fp4", 580), ShapeError,
     r"'indexer_fp8' \(D = 580\)" + PASS.format("indexer_fp8")),
    # the layout fits the cache too, but at a width q or x does not have: the layout holding q's width
    ("logits fp4 as fp8", lambda: index(indexer_logits_paged, cache("indexer_fp4"), "indexer_fp8"), ShapeError,
     r"q must be \[b, N, H, 64\].*'indexer_fp4' \(D = 128\)" + PASS.format("indexer_fp4")),
    ("write fp4 as fp8", lambda: write(cache("indexer_fp4"), "indexer_fp8", 128), ShapeError,
     r"x must be \[T, 64\].*'indexer_fp4' \(D = 128\)" + PASS.format("indexer_fp4")),
    # a cache of another op's layouts: named, with what the op takes
    ("attn fp4 cache", lambda: attn(cache("indexer_fp4")), ShapeError,
     r"'indexer_fp4' \(D = 128\) or 'indexer_fp8' \(D = 64\), which sparse_attn_paged does not take "
     r"\(layouts: \['model1_fp8', 'bf16', 'v41_window_fp8', 'v41_compressed_fp4'\]\)$"),
    ("attn layout fp4", lambda: attn(cache("model1_fp8"), "indexer_fp4"), RangeError,
     r"layout must be one of \['model1_fp8', 'bf16', .*\].*got 'indexer_fp4'; .*'model1_fp8' \(D = 512\)"
     + PASS.format("model1_fp8")),
    # no layout holds q's width: the looks are told, no fix is named
    ("topk layout model1", lambda: index(indexer_topk_paged, cache("model1_fp8"), "model1_fp8"), RangeError,
     r"'indexer_fp8' \(D = 580\), not of 128-wide entries like q$"),
    # nothing else fits: no hint
    ("attn odd width", lambda: attn(torch.zeros(4, 16, 1, 3, dtype=torch.uint8)), ShapeError, None),
    ("write x width", lambda: write(cache("model1_fp8"), "model1_fp8", 256), ShapeError, None),
]


@pytest.mark.parametrize("name,call,error,hint", CASES, ids=[c[0] for c in CASES])
def test_layout_mistake_names_the_fix(name: str, call: Callable[[], None], error: type, hint: str | None) -> None:
    with pytest.raises(error) as info:
        call()
    msg = str(info.value)
    if hint is None:
        assert "looks like" not in msg, msg
    else:
        assert re.search(hint, msg), msg


def test_matching_layouts_reads_dtype_and_last_dim() -> None:
    assert matching_layouts(cache("bf16")) == [("bf16", 512)]
    assert matching_layouts(cache("model1_fp8")) == [("model1_fp8", 512), ("indexer_fp8", 580)]
    assert matching_layouts(cache("indexer_fp4")) == [("indexer_fp4", 128), ("indexer_fp8", 64)]
    assert matching_layouts(torch.zeros(2, 3)) == []                    # fp32: no layout
    assert matching_layouts("not a tensor") == []                      # type: ignore[arg-type]
    assert layout_hint("op", cache("bf16"), "bf16") == ""              # the layout itself is never suggested


def test_valid_calls_still_pass() -> None:
    attn(cache("bf16"), "bf16")
    attn(cache("model1_fp8"), extra=cache("model1_fp8"))
    index(indexer_logits_paged, cache("bf16", 128), "bf16")
    index(indexer_topk_paged, cache("indexer_fp8"), "indexer_fp8")
    write(cache("indexer_fp4"), "indexer_fp4", 128)
    read(cache("model1_fp8"), "model1_fp8")
