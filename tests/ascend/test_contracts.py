"""The stand-ins reject calls the documented ops reject, so an adapter bug cannot pass silently."""
from __future__ import annotations

import pytest
import torch

import v4hal
from tests.ascend.fake_npu import ContractViolation
from v4hal.backends.ascend import attention, gemm, moe

BF16 = torch.bfloat16


def _sfa_args(n1=4, blk=128, t=2, k=8):
    q = torch.randn(t, n1, 512).to(BF16)
    kv = torch.randn(2, blk, 1, 512).to(BF16)
    idx = torch.arange(k, dtype=torch.int32).view(1, 1, k).repeat(t, 1, 1)
    kw = dict(block_table=torch.tensor([[0], [1]], dtype=torch.int32),
              actual_seq_lengths_query=torch.tensor([1, t], dtype=torch.int32),
              actual_seq_lengths_kv=torch.tensor([blk, blk], dtype=torch.int32),
              query_rope=torch.zeros(t, n1, 64, dtype=BF16), key_rope=torch.zeros(2, blk, 1, 64, dtype=BF16),
              layout_query="TND", layout_kv="PA_BSND", sparse_mode=0, attention_mode=2)
    return q, kv, idx, kw


def test_sfa_accepts_a_well_formed_call(npu_a2):
    import torch_npu  # the stand-in module

    q, kv, idx, kw = _sfa_args()
    out, _, _ = torch_npu.npu_sparse_flash_attention(q, kv, kv, idx, 0.1, **kw)
    assert out.shape == q.shape and not torch.isnan(out).any()


@pytest.mark.parametrize("bad,match", [
    ("interleaved_minus_one", "valid entries first"),
    ("attention_mode_default", "attention_mode supports only 2"),
    ("sinks_on_a2", "sinks are not supported on A2"),
    ("block_24", "multiple of 16"),
    ("heads_3", "power of 2 <= 128"),
    ("index_past_length", "past actual_seq_lengths_kv"),
    ("bsnd_kv_with_tnd_q", "paged"),
    ("int64_indices", "sparse_indices dtype"),
    ("short_block_table", "needs >= 2 columns"),
])
def test_sfa_rejects(npu_a2, bad, match):
    import torch_npu

    q, kv, idx, kw = _sfa_args(n1=3 if bad == "heads_3" else 4, blk=24 if bad == "block_24" else 128)
    if bad == "interleaved_minus_one":
        idx[0, 0, 2] = -1
    elif bad == "attention_mode_default":
        kw.pop("attention_mode")
    elif bad == "sinks_on_a2":
        kw["sinks"] = torch.zeros(4)
    elif bad == "index_past_length":
        kw["actual_seq_lengths_kv"] = torch.tensor([4, 4], dtype=torch.int32)
    elif bad == "bsnd_kv_with_tnd_q":
        kw["layout_kv"] = "BSND"
    elif bad == "int64_indices":
        idx = idx.long()
    elif bad == "short_block_table":
        kw["actual_seq_lengths_kv"] = torch.tensor([200, 200], dtype=torch.int32)
    if bad == "block_24":
        kw["key_rope"] = torch.zeros(2, 24, 1, 64, dtype=BF16)
        kw["actual_seq_lengths_kv"] = torch.tensor([24, 24], dtype=torch.int32)
    with pytest.raises(ContractViolation, match=match):
        torch_npu.npu_sparse_flash_attention(q, kv, kv, idx, 0.1, **kw)


def test_wrong_argument_names_are_type_errors(npu_a2):
    import torch_npu

    with pytest.raises(TypeError):
        torch_npu.npu_rms_norm(torch.ones(2, 4), gamma=torch.ones(4), eps=1e-6)      # the op spells it epsilon
    with pytest.raises(TypeError):
        torch.ops._C_ascend.npu_sparse_flash_attention(*_sfa_args()[:3], 0.1, sinks=None)   # no sinks in _C_ascend


def test_chip_only_ops(npu_a2):
    import torch_npu

    with pytest.raises(ContractViolation, match="not supported on A2"):
        torch_npu.npu_dynamic_mx_quant(torch.ones(2, 32, dtype=BF16), dst_type=296)
    x8 = torch.zeros(2, 64, dtype=torch.float8_e4m3fn)
    with pytest.raises(ContractViolation, match="FP8/MX"):
        torch_npu.npu_quant_matmul(x8, torch.zeros(64, 2, dtype=torch.float8_e4m3fn),
                                   torch.ones(1, 2, 2, dtype=torch.uint8),
                                   pertoken_scale=torch.ones(2, 1, 2, dtype=torch.uint8), scale_dtype=293,
                                   pertoken_scale_dtype=293, output_dtype=BF16, group_sizes=[1, 1, 32])
    with pytest.raises(ContractViolation, match="hc of x support only 4|d of x supports only"):
        torch.ops._C_ascend.npu_hc_pre_v2(torch.ones(2, 4, 1024, dtype=BF16), torch.ones(24, 4096), torch.ones(3),
                                          torch.ones(24), 4, 20, 1e-6, 1e-6)
    with pytest.raises(ContractViolation, match="norm_type 2 .* requires group_count == 1"):
        torch.ops._C_ascend.moe_gating_top_k_hash(torch.randn(3, 16), 2, k_group=1, group_count=2, norm_type=2)


def test_950_rejects(npu_950):
    import torch_npu

    q = torch.randn(2, 12, 128).to(BF16)
    k = torch.randn(1, 16, 1, 128).to(BF16)
    kw = dict(actual_seq_lengths_query=torch.tensor([2], dtype=torch.int32),
              actual_seq_lengths_key=torch.tensor([16], dtype=torch.int32),
              block_table=torch.zeros(1, 1, dtype=torch.int32), layout_query="TND", layout_key="PA_BSND",
              sparse_count=4, sparse_mode=0)
    with pytest.raises(ContractViolation, match="8, 16, 24, 32 or 64"):
        torch_npu.npu_lightning_indexer(q, k, torch.randn(2, 12).to(BF16), **kw)
    with pytest.raises(ContractViolation, match="cannot be float32"):
        torch_npu.npu_lightning_indexer(q[:, :8].contiguous(), k, torch.randn(2, 8), **kw)
    with pytest.raises(ContractViolation, match="not supported on 950"):
        torch.ops._C_ascend.npu_sparse_attn_sharedkv(torch.randn(2, 64, 512).to(BF16))


def test_adapter_bug_is_caught(npu_a2, monkeypatch):
    """Had the SFA adapter forgotten to move -1 entries to the end, the stand-in would refuse."""
    monkeypatch.setattr(attention, "_valid_first", lambda idx: idx)
    q = torch.randn(1, 2, 4, 512).to(BF16)
    kv = torch.randn(1, 30, 512).to(BF16)
    idx = torch.tensor([[[3, -1, 5, 7], [1, 2, -1, 4]]], dtype=torch.int32)
    with v4hal.use_backend("ascend"), pytest.raises(ContractViolation, match="valid entries first"):
        v4hal.sparse_attn(q, kv, torch.zeros(4), idx, 0.1)


def test_adapter_layout_bug_is_caught(npu_a2, monkeypatch):
    """Had the grouped GEMM adapter passed [E, N, K] instead of the transposed [E, K, N] view..."""
    real = gemm.binding.lookup

    def lookup(cands):
        bound = real(cands)
        if bound is None or cands != gemm.GROUPED_MATMUL:
            return bound

        def wrong(x, weight, **kw):
            return bound.fn(x, [weight[0].transpose(1, 2)], **kw)     # undo the transpose: wrong layout
        return type(bound)(bound.tier, bound.name, wrong)

    monkeypatch.setattr(gemm.binding, "lookup", lookup)
    x = torch.randn(6, 64).to(BF16)
    w = torch.randn(2, 32, 64).to(BF16)
    with v4hal.use_backend("ascend"), pytest.raises(ContractViolation, match=r"weight must be \[E, K=64, N\]"):
        v4hal.grouped_gemm(x, w, torch.tensor([0, 4, 6]))


def test_unpermute_index_direction_is_checked(npu_a2, monkeypatch):
    """moe_combine must hand token_unpermute the flat->sorted map; the forward map gives wrong sums."""
    monkeypatch.setattr(moe, "_inverse", lambda perm: perm)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g).to(BF16)
    idx = torch.randint(0, 3, (5, 2), generator=g, dtype=torch.int32)
    with v4hal.use_backend("reference"):
        xs, _, handle = v4hal.moe_dispatch(x, idx, 3)
        want = v4hal.moe_combine(xs, torch.ones(5, 2), handle)
    with v4hal.use_backend("ascend"):
        got = v4hal.moe_combine(xs, torch.ones(5, 2), handle)
    assert not torch.allclose(got.float(), want.float())
