"""compressor_ragged through the Ascend backend: ``_C_ascend.compressor`` (stand-in checking the schema and
computing the documented result) on A3 and 950 for the three CANN modes, against the reference; the
state cache passes through unchanged; the calls outside the op's limits run the reference."""
from __future__ import annotations

import pytest
import torch

import v4hal
from tests.numerics import assert_close
from v4hal.backends import ascend
from v4hal.ops.ragged_compress import coff_of

from .conftest import fell_back, native, paths

BF16 = torch.bfloat16
EPS = 1e-6


def _freqs(n: int, rd: int = 64) -> torch.Tensor:
    inv = 1.0 / (10000.0 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    return torch.polar(torch.ones(n, rd // 2), torch.outer(torch.arange(n, dtype=torch.float32), inv))


def _problem(ratio: int, d: int, h: int, wdtype: torch.dtype = BF16, blk: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cd = coff_of(ratio) * d
    return dict(ratio=ratio, d=d, blk=blk,
                wkv=(torch.randn(cd, h, generator=g) * h ** -0.5).to(wdtype),
                wgate=(torch.randn(cd, h, generator=g) * h ** -0.5).to(wdtype),
                ape=torch.randn(ratio, cd, generator=g), norm=(torch.rand(d, generator=g) + 0.5).to(wdtype),
                xs=[torch.randn(n, h, generator=g).to(BF16) for n in ((2 * ratio + 3, ratio + 1, 5)
                                                                      if ratio == 4 else (130, 129, 3))])


def _calls(p: dict, backend: str) -> tuple[list, torch.Tensor]:
    """Two calls over three requests: a first chunk each, then the rest of requests 1 and 2 (whose entries
    read the state rows the first call wrote)."""
    ratio, blk, cd = p["ratio"], p["blk"], coff_of(p["ratio"]) * p["d"]
    lens = [x.shape[0] for x in p["xs"]]
    cols = max(-(-n // blk) for n in lens)
    table = torch.arange(1, 3 * cols + 1, dtype=torch.int32).view(3, cols)
    store = torch.zeros(3 * cols + 1, blk + 1, 2 * cd)
    state = store[:, :blk]                                         # padded pages: stride(0) > blk * width
    firsts = [n - 2 for n in lens]
    outs = []
    for chunk in ([(i, 0, firsts[i]) for i in range(3)], [(1, firsts[1], lens[1]), (2, firsts[2], lens[2])]):
        x = torch.cat([p["xs"][i][lo:hi] for i, lo, hi in chunk])
        cu = torch.tensor([0] + [sum(hi - lo for _, lo, hi in chunk[:k + 1]) for k in range(len(chunk))],
                          dtype=torch.int32)
        sp = torch.tensor([lo for _, lo, _ in chunk], dtype=torch.int32)
        rows = table[torch.tensor([i for i, _, _ in chunk])]
        with v4hal.use_backend(backend):
            outs.append(v4hal.compressor_ragged(x, p["wkv"], p["wgate"], p["ape"], p["norm"], _freqs(512), state,
                                                rows, cu, sp, ratio, EPS))
    return outs, state


@pytest.mark.parametrize("ratio,d", [(4, 512), (4, 128), (128, 512)], ids=["C4A", "C4Li", "C128A"])
def test_modes_match_the_reference(npu, ratio, d):
    p = _problem(ratio, d, 1024)
    if npu.chip == "950":
        p["norm"] = p["norm"].float()          # the model's fp32 norm weight: 950 takes it (widened) ...
    got, got_state = _calls(p, "ascend")
    want, want_state = _calls(p, "reference")
    if npu.chip == "A2":
        assert not native("compressor_ragged") and fell_back("compressor_ragged", "does not support A2")
        assert not npu.called("compressor")
    else:
        assert native("compressor_ragged") and npu.called("compressor") == ["_C_ascend", "_C_ascend"]
    for (e1, r1, p1), (e2, r2, p2) in zip(got, want):
        assert torch.equal(r1, r2) and torch.equal(p1, p2)
        used = int((r2 >= 0).sum())
        assert used > 0 and not e1[used:].any()                   # the op's padding rows are masked
        assert_close(e1, e2, BF16)
    torch.testing.assert_close(got_state, want_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [4096, 7168], ids=["V4-Flash", "V4-Pro"])
def test_v4_hidden_sizes_with_bf16_weights_are_native_on_a3_and_950(npu, hidden):
    """V4-Flash (4096) and V4-Pro (7168) hidden sizes, ratio 4 with the bf16 weights the model prepares at
    load."""
    p = _problem(4, 512, hidden)
    got, _ = _calls(p, "ascend")
    want, _ = _calls(p, "reference")
    assert native("compressor_ragged") == (npu.chip != "A2")
    for (e1, _r1, _p1), (e2, _r2, _p2) in zip(got, want):
        assert_close(e1, e2, BF16)


def test_a3_takes_the_norm_weight_in_x_dtype(npu):
    if npu.chip != "A3":
        pytest.skip("A3 only")
    p = _problem(4, 128, 1024)
    p["norm"] = p["norm"].float()
    _calls(p, "ascend")
    assert not native("compressor_ragged") and fell_back("compressor_ragged", "norm_weight not in x's dtype")


@pytest.mark.parametrize("change,reason", [
    (dict(wdtype=torch.float32), "wkv/wgate not in x's dtype"),
    (dict(h=64), "hidden size H outside 1024..10240"),
    (dict(d=256), "not one of the modes"),
    (dict(blk=8), "state block size"),
])
def test_outside_the_limits_runs_the_reference(npu_950, change, reason):
    kw = dict(ratio=4, d=128, h=1024)
    kw.update(change)
    p = _problem(**kw)
    p["norm"] = p["norm"].float()
    got, _ = _calls(p, "ascend")
    want, _ = _calls(p, "reference")
    assert not npu_950.called("compressor") and any(reason in x for x in paths("compressor_ragged"))
    for a, b in zip(got, want):
        for u, v in zip(a, b):
            assert torch.equal(u.view(torch.int16) if u.dtype == BF16 else u, v.view(torch.int16)
                               if v.dtype == BF16 else v)


def test_rope_other_than_64_dims_runs_the_reference(npu_950):
    p = _problem(4, 128, 1024)
    x = p["xs"][0]
    args = (x, p["wkv"], p["wgate"], p["ape"], p["norm"].float(), _freqs(64, rd=32), torch.zeros(3, 16, 512),
            torch.tensor([[1, 2]], dtype=torch.int32), torch.tensor([0, x.shape[0]], dtype=torch.int32),
            torch.tensor([0], dtype=torch.int32), 4, EPS)
    with v4hal.use_backend("ascend"):
        v4hal.compressor_ragged(*args)
    assert any("rope_head_dim != 64" in x for x in paths("compressor_ragged"))


def test_plan_and_fallbacks_are_listed():
    rows = [r for r in ascend.fallback_table() if r["op"] == "compressor_ragged"]
    assert any(r["chip"] == "A2" and r["condition"].startswith("always") for r in rows)
    assert {r["chip"] for r in ascend.native_table() if r["op"] == "compressor_ragged"} == {"A3", "950"}
