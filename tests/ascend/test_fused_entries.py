"""The Ascend-only fused entries: window + compressed shared-KV attention (A2/A3 bf16, 950 FP8-packed KV)
and V4's quantized indexer, against their reference decompositions."""
from __future__ import annotations

import pytest
import torch

from tests.numerics import assert_close, calc_diff
from v4hal.backends.ascend import attention, limits
from v4hal.backends.reference import quant as ref_quant
from v4hal.hal import formats as F

BF16 = torch.bfloat16


def _kv_roundtrip(kv: torch.Tensor) -> torch.Tensor:
    """V4's KV round trip: FP8 (tiles of 64, power-of-two scales) on the 448 no-rope dims."""
    nope = kv[..., :448].contiguous()
    ref_quant.act_quant_inplace(nope, 64, "ue8m0")
    return torch.cat([nope, kv[..., 448:]], dim=-1)


def _inputs(m=3, start_pos=300, h=64, ratio=4, k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, d = 1, 512
    n = start_pos + m
    q = (torch.randn(b, m, h, d, generator=g) * 0.5).to(BF16)
    kv = _kv_roundtrip(torch.randn(b, n, d, generator=g).to(BF16))
    nc = n // ratio
    cmp_kv = _kv_roundtrip(torch.randn(b, nc, d, generator=g).to(BF16))
    sink = torch.randn(h, generator=g)
    idx = None
    if ratio == 4:
        idx = torch.full((b, m, k), -1, dtype=torch.int32)
        picks = torch.stack([torch.randperm(nc, generator=g)[:40] for _ in range(m)]).to(torch.int32)
        idx[0, :, :40] = picks
        idx[0, :, 40:] = torch.where(torch.rand(m, k - 40, generator=g) < 0.05,
                                     torch.randint(0, nc, (m, k - 40), generator=g, dtype=torch.int32), -1)
    return q, kv, sink, cmp_kv, idx


def _last_path(op: str) -> str:
    return [p for (name, _c, p), _n in limits.stats().items() if name == op][-1]


@pytest.mark.parametrize("ratio", [4, 128, 0])
def test_shared_kv_attention(npu, ratio):
    q, kv, sink, cmp_kv, idx = _inputs(ratio=ratio if ratio else 4)
    kw = dict(start_pos=300, window=128)
    if ratio:
        kw.update(cmp_kv=cmp_kv, cmp_ratio=ratio, cmp_idxs=idx)
    got = attention.shared_kv_attention(q, kv, sink, 512 ** -0.5, **kw)
    want = attention.shared_kv_reference(q, kv, sink, 512 ** -0.5, **kw)
    name = "npu_kv_quant_sparse_attn_sharedkv" if npu.chip == "950" else "npu_sparse_attn_sharedkv"
    assert npu.called(name) == ["_C_ascend"], _last_path("shared_kv_attention")
    assert_close(got, want, BF16)
    assert calc_diff(got, want) < 1e-5


def test_shared_kv_custom_tier_and_limits(npu_a2):
    from tests.ascend.fake_npu import install, uninstall

    handle = install("A3", tiers=("torch_npu", "custom"))
    try:
        q, kv, sink, cmp_kv, idx = _inputs(seed=1)
        got = attention.shared_kv_attention(q, kv, sink, 0.05, start_pos=300, window=128, cmp_kv=cmp_kv,
                                            cmp_ratio=4, cmp_idxs=idx)
        assert handle.called("npu_sparse_attn_sharedkv") == ["custom"]
        assert_close(got, attention.shared_kv_reference(q, kv, sink, 0.05, start_pos=300, window=128, cmp_kv=cmp_kv,
                                                        cmp_ratio=4, cmp_idxs=idx), BF16)
        handle.calls.clear()
        got = attention.shared_kv_attention(q, kv, sink, 0.05, start_pos=300, window=64)
        assert not handle.calls and _last_path("shared_kv_attention").startswith("reference: window != 128")
        assert torch.equal(got, attention.shared_kv_reference(q, kv, sink, 0.05, start_pos=300, window=64))
    finally:
        uninstall(handle)


def test_pack_kv_fp8_layout():
    kv = _kv_roundtrip(torch.randn(2, 5, 512).to(BF16))
    packed = attention.pack_kv_fp8(kv)
    assert packed.dtype == F.FP8_DTYPE and packed.shape == (2, 5, 640)
    raw = packed.view(torch.uint8)
    assert torch.equal(raw[..., :128].contiguous().view(BF16), kv[..., 448:])         # rope first, bf16
    assert torch.equal(raw[..., 583:], torch.zeros_like(raw[..., 583:]))               # pad
    from tests.ascend.fake_npu.attention_ops import unpack_fp8_bytes

    assert torch.equal(unpack_fp8_bytes(packed).to(BF16), kv)                          # lossless after V4's round trip


def _quant_inputs(chip: str, s=4, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, d = 1, 64, 128
    qdt, sdt = (F.FP8_DTYPE, torch.float32) if chip == "950" else (torch.int8, torch.float16)
    if qdt == torch.int8:
        q = torch.randint(-127, 128, (b, s, h, d), generator=g, dtype=torch.int8)
        k = torch.randint(-127, 128, (b, t, d), generator=g, dtype=torch.int8)
    else:
        q = (torch.randn(b, s, h, d, generator=g) * 50).to(qdt)
        k = (torch.randn(b, t, d, generator=g) * 50).to(qdt)
    qs = (torch.rand(b, s, h, generator=g) * 0.01 + 0.001).to(sdt)
    ks = (torch.rand(b, t, generator=g) * 0.01 + 0.001).to(sdt)
    w = torch.randn(b, s, h, generator=g).to(sdt)
    return q, qs, k, ks, w


def test_quant_indexer(npu):
    q, qs, k, ks, w = _quant_inputs(npu.chip)
    got = attention.quant_indexer_topk(q, qs, k, ks, w, 512, start_pos=60, ratio=4, offset=128)
    want = attention.quant_indexer_reference(q, qs, k, ks, w, 512, start_pos=60, ratio=4, offset=128)
    assert npu.called("npu_vllm_quant_lightning_indexer") == ["_C_ascend"]
    assert got.shape == want.shape == (1, 4, 16)
    assert torch.equal(torch.sort(got, -1).values, torch.sort(want, -1).values)
    assert (got == -1).sum() > 0                       # the staircase masks the newest entry for early queries


def test_quant_indexer_limits_fall_back(npu_950):
    q, qs, k, ks, w = _quant_inputs("950")
    got = attention.quant_indexer_topk(q, qs, k, ks, w, 256, start_pos=60, ratio=4)
    assert not npu_950.calls and "sparse_count (topk) not 512 on 950" in _last_path("quant_indexer_topk")
    assert torch.equal(got, attention.quant_indexer_reference(q, qs, k, ks, w, 256, start_pos=60, ratio=4))


def test_shared_kv_attention_checks_its_inputs(npu_a2):
    """The Ascend-only entry validates with the op layer's checks: errors name the argument."""
    from v4hal.hal.errors import DTypeError, RangeError, ShapeError

    q, kv, sink, cmp_kv, idx = _inputs()
    with pytest.raises(RangeError, match="window must be > 0"):
        attention.shared_kv_attention(q, kv, sink, 0.05, start_pos=300, window=0)
    with pytest.raises(RangeError, match="start_pos and start_pos \\+ m"):
        attention.shared_kv_attention(q, kv, sink, 0.05, start_pos=301, window=128)
    with pytest.raises(DTypeError, match="cmp_kv \\(required with cmp_idxs\\)"):
        attention.shared_kv_attention(q, kv, sink, 0.05, start_pos=300, window=128, cmp_idxs=idx)
    with pytest.raises(ShapeError, match="attn_sink"):
        attention.shared_kv_attention(q, kv, sink[:3], 0.05, start_pos=300, window=128)
    bad = idx.clone()
    bad[0, 0, 0] = cmp_kv.shape[1]
    with pytest.raises(RangeError, match="cmp_idxs values must be in"):
        attention.shared_kv_attention(q, kv, sink, 0.05, start_pos=300, window=128, cmp_kv=cmp_kv, cmp_ratio=4,
                                      cmp_idxs=bad)
    assert not npu_a2.calls
