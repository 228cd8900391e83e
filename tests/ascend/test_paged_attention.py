"""sparse_attn_paged on the Ascend code path (stand-ins, each chip).

- the position form (band window, entry indices) with V4's shapes on bf16 pages goes to the shared-KV
  sparse attention (A2/A3: ``npu_sparse_attn_sharedkv``; 950: ``npu_kv_quant_sparse_attn_sharedkv`` over
  the pages packed to 640-byte FP8 entries) and matches the reference;
- slot indices, a requested LSE, model1_fp8 pages, other shapes, and on 950 entries off the FP8 grid run
  the reference on the device tensors, with the reason recorded and listed.
"""
from __future__ import annotations

import pytest
import torch

import v4hal
from tests.numerics import calc_diff
from v4hal import cases
from v4hal.backends import ascend
from v4hal.backends.ascend.attention import pack_kv_fp8, unpack_kv_fp8
from v4hal.ops import OPS
from v4hal.ops.paged import new_paged_cache

from .conftest import paths

TINY = [s for _, s in cases.tiny_cases("sparse_attn_paged")]
H, D, BS, WINDOW = 64, 512, 16, 128
NATIVE = {"A2": "native:_C_ascend.npu_sparse_attn_sharedkv", "A3": "native:_C_ascend.npu_sparse_attn_sharedkv",
          "950": "native:_C_ascend.npu_kv_quant_sparse_attn_sharedkv"}


@pytest.mark.parametrize("shape", [TINY[1], TINY[2], TINY[4]], ids=["bf16", "model1_fp8", "model1_fp8 D=128"])
def test_slot_form_with_lse_falls_back_to_the_reference_with_its_reason(npu, shape):
    args = cases.make_case("sparse_attn_paged", shape, seed=6)
    with v4hal.use_backend("reference"):
        expected = torch.ops.v4hal.sparse_attn_paged(*args)
    with v4hal.use_backend("ascend"):
        got = torch.ops.v4hal.sparse_attn_paged(*args)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    recorded = paths("sparse_attn_paged")
    assert len(recorded) == 1 and recorded[0].startswith("reference: return_lse")
    args[OPS["sparse_attn_paged"].arg_names.index("return_lse")] = False   # no LSE: the slot window is the reason
    with v4hal.use_backend("ascend"):
        torch.ops.v4hal.sparse_attn_paged(*args)
    assert any(p.startswith("reference: window given by slot") for p in paths("sparse_attn_paged"))
    assert not [op for _tier, op in npu.calls if "attn" in op or "attention" in op]     # no CANN op was called


def _on_fp8_grid(x: torch.Tensor) -> torch.Tensor:
    """bf16 entries V4's FP8 round trip could have produced (64-wide tiles, power-of-two scales)."""
    return unpack_kv_fp8(pack_kv_fp8(x)).to(torch.bfloat16)


def band_call(ratio: int, *, seed: int = 0, rows: int = 3, grid: bool = True, heads: int = H) -> tuple[list, dict]:
    """A V4-shaped call in the position form: ``rows`` one-query rows at positions around the window,
    per-row pages of 16 tokens (shuffled), compressed picks as entry indices (ratio 4: some not yet visible
    and some -1; ratio 128: every entry)."""
    g = torch.Generator().manual_seed(seed)
    pages = 12
    nb = rows * pages
    cache = new_paged_cache(nb, BS, "bf16", dim=D)
    xcache = new_paged_cache(rows * 4, BS, "bf16", dim=D)
    vals = torch.randn(nb * BS, D, generator=g).bfloat16()
    xvals = torch.randn(rows * 4 * BS, D, generator=g).bfloat16()
    if grid:
        vals, xvals = _on_fp8_grid(vals), _on_fp8_grid(xvals)
    cache.view(nb * BS, D).copy_(vals)
    xcache.view(rows * 4 * BS, D).copy_(xvals)
    table = torch.randperm(nb, generator=g).to(torch.int32).view(rows, pages)
    xtable = torch.randperm(rows * 4, generator=g).to(torch.int32).view(rows, 4)
    positions = torch.tensor([[5], [130], [190]][:rows], dtype=torch.int32)
    if ratio == 4:
        ent = torch.randint(-1, 48, (rows, 1, 40), generator=g, dtype=torch.int32)
    else:
        ent = torch.arange(2, dtype=torch.int32).view(1, 1, 2).expand(rows, 1, 2).contiguous()
    q = (torch.randn(rows, 1, heads, D, generator=g) / 4).bfloat16()
    sink = torch.randn(heads, generator=g)
    args = [q, cache, None, sink, D ** -0.5]
    kw = dict(extra_kv_cache=xcache, extra_indices=ent, layout="bf16", positions=positions, block_table=table,
              window_size=WINDOW, extra_block_table=xtable, extra_ratio=ratio)
    return args, kw


@pytest.mark.parametrize("ratio", [4, 128])
def test_band_form_goes_to_the_shared_kv_attention(npu, ratio):
    args, kw = band_call(ratio)
    with v4hal.use_backend("reference"):
        want = v4hal.sparse_attn_paged(*args, **kw)
    with v4hal.use_backend("ascend"):
        got = v4hal.sparse_attn_paged(*args, **kw)
    assert paths("sparse_attn_paged") == [NATIVE[npu.chip]]
    assert got.shape == want.shape and calc_diff(got, want) < 1e-5
    assert (got.float() - want.float()).abs().max() <= 2 ** -6


def test_v4_pro_heads_are_native_on_950_only(npu):
    """V4-Pro's 128 attention heads: 950's op takes 64 or 128 heads, A2/A3's 64 only."""
    args, kw = band_call(4, heads=128)
    with v4hal.use_backend("reference"):
        want = v4hal.sparse_attn_paged(*args, **kw)
    with v4hal.use_backend("ascend"):
        got = v4hal.sparse_attn_paged(*args, **kw)
    if npu.chip == "950":
        assert paths("sparse_attn_paged") == [NATIVE["950"]]
        assert calc_diff(got, want) < 1e-5
    else:
        assert paths("sparse_attn_paged") == ["reference: heads != 64"]
        assert torch.equal(got, want)


def test_window_only_layers_go_native_too(npu):
    args, kw = band_call(4)
    for k in ("extra_kv_cache", "extra_indices", "extra_block_table", "extra_ratio"):
        kw.pop(k)
    with v4hal.use_backend("reference"):
        want = v4hal.sparse_attn_paged(*args, **kw)
    with v4hal.use_backend("ascend"):
        got = v4hal.sparse_attn_paged(*args, **kw)
    assert paths("sparse_attn_paged") == [NATIVE[npu.chip]]
    assert calc_diff(got, want) < 1e-5


@pytest.mark.parametrize("change,reason", [
    (dict(return_lse=True), "return_lse"),
    (dict(window_size=64), "window_size != 128"),
    (dict(extra_indices=torch.zeros(3, 1, 1025, dtype=torch.int32)), "compressed picks"),
    (dict(extra_ratio=8), "extra_ratio not 4 or 128"),
])
def test_band_form_outside_the_op_limits_falls_back(npu, change, reason):
    args, kw = band_call(4)
    kw.update(change)
    with v4hal.use_backend("reference"):
        want = v4hal.sparse_attn_paged(*args, **kw)
    with v4hal.use_backend("ascend"):
        got = v4hal.sparse_attn_paged(*args, **kw)
    recorded = paths("sparse_attn_paged")
    assert len(recorded) == 1 and recorded[0].startswith("reference: ") and reason in recorded[0], recorded
    assert all(torch.equal(a, b) for a, b in zip(got if isinstance(got, tuple) else [got],
                                                 want if isinstance(want, tuple) else [want]))


def test_sink_of_minus_inf_and_few_heads_fall_back(npu):
    args, kw = band_call(4)
    args[3] = torch.full((H,), float("-inf"))
    with v4hal.use_backend("ascend"):
        v4hal.sparse_attn_paged(*args, **kw)
    args, kw = band_call(4)
    args[0], args[3] = args[0][:, :, :32].contiguous(), args[3][:32]
    with v4hal.use_backend("ascend"):
        v4hal.sparse_attn_paged(*args, **kw)
    recorded = paths("sparse_attn_paged")
    assert any("attn_sink not finite" in p for p in recorded)
    assert any("heads" in p for p in recorded)


def test_950_entries_off_the_fp8_grid_run_the_reference(npu_950):
    args, kw = band_call(4, grid=False)
    with v4hal.use_backend("reference"):
        want = v4hal.sparse_attn_paged(*args, **kw)
    with v4hal.use_backend("ascend"):
        got = v4hal.sparse_attn_paged(*args, **kw)
    assert paths("sparse_attn_paged") == ["reference: bf16 entries off V4's FP8 grid (950's op reads 640-byte FP8 "
                                          "entries; packing would round them)"]
    assert torch.equal(got, want)
    assert not npu_950.called("npu_kv_quant_sparse_attn_sharedkv")


def test_paged_attention_reasons_are_listed_for_every_chip():
    rows = [r for r in ascend.fallback_table() if r.get("op") == "sparse_attn_paged"]
    text = " ".join(str(r) for r in rows)
    assert {r["chip"] for r in rows} == {"A2", "A3", "950"}
    assert "log-sum-exp" in text and "model1_fp8" in text and "window given by slot" in text


def test_info_lists_the_native_paths_of_the_paged_step():
    notes = [r["note"] for r in ascend.info_notes() if r["op"] in ("sparse_attn_paged", "indexer_topk_paged",
                                                                 "compressor_ragged")]
    assert "native: npu_sparse_attn_sharedkv (TND q, bf16 PA_ND pages, band window, cmp_sparse_indices) (A2/A3)" \
        in notes
    assert any(n.startswith("native: npu_kv_quant_sparse_attn_sharedkv") and n.endswith("(950)") for n in notes)
    assert any(n.startswith("native: npu_lightning_indexer") and n.endswith("(A2/A3/950)") for n in notes)
    assert any(n.startswith("native: _C_ascend.compressor") and n.endswith("(A3/950)") for n in notes)


def test_950_packs_only_the_pages_the_call_reads():
    """The window's band and the visible compressed entries, not the whole pool: rows at positions 5, 130
    and 190 with a window of 128 in pages of 16 read 1 + 9 + 9 of the pool's 36 window pages."""
    from v4hal.backends.ascend.paged_attention import _packed_pages

    args, kw = band_call(4)
    pos = kw["positions"]
    first = (pos[:, 0].long() - WINDOW + 1).clamp_min(0)
    packed, table = _packed_pages(args[1], kw["block_table"], first, pos[:, -1].long() + 1)
    assert packed.shape == (19, BS, 1, 640) and packed.dtype == torch.float8_e4m3fn
    for row, (lo, hi) in enumerate([(0, 1), (0, 9), (3, 12)]):
        for c in range(lo, hi):
            page = args[1][int(kw["block_table"][row, c])].float()
            assert torch.equal(unpack_kv_fp8(packed[int(table[row, c])]), page)


def _v41_caches(window: torch.Tensor, extra: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The band call's bf16 caches rewritten as V4.1 caches (window v41_window_fp8, extra v41_compressed_fp4)
    holding random entries."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for cache, layout in ((window, "v41_window_fp8"), (extra, "v41_compressed_fp4")):
        nb, bs = cache.shape[0], cache.shape[1]
        new = new_paged_cache(nb, bs, layout, dim=D)
        v4hal.paged_cache_write(new, torch.randn(nb * bs, D, generator=g).bfloat16(),
                                torch.arange(nb * bs, dtype=torch.int32), layout)
        out.append(new)
    return out[0], out[1]


@pytest.mark.parametrize("extra_only", [False, True], ids=["window+compressed", "compressed only"])
def test_v41_pages_fall_back_to_the_reference_with_their_reason(npu, extra_only):
    """An otherwise native band call over V4.1 caches (no CANN op reads 528- or 288-byte entries)."""
    args, kw = band_call(4)
    window, extra = _v41_caches(args[1], kw["extra_kv_cache"], seed=3)
    kw.update(extra_kv_cache=extra, extra_layout="v41_compressed_fp4")
    if not extra_only:
        args[1] = window
        kw["layout"] = "v41_window_fp8"
    with v4hal.use_backend("reference"):
        want = v4hal.sparse_attn_paged(*args, **kw)
    with v4hal.use_backend("ascend"):
        got = v4hal.sparse_attn_paged(*args, **kw)
    recorded = paths("sparse_attn_paged")
    assert len(recorded) == 1 and recorded[0].startswith("reference: V4.1 pages"), recorded
    assert torch.equal(got, want)
    assert not [op for _tier, op in npu.calls if "attn" in op or "attention" in op]
