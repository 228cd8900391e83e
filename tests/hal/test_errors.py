"""Bad input raises a v4hal error naming the argument, what was expected and what came."""
import pytest
import torch

import v4hal
from v4hal.hal.errors import DeviceError, DTypeError, RangeError, ShapeError

FP8 = torch.float8_e4m3fn


def test_act_quant_block_divisibility():
    with pytest.raises(ShapeError, match=r"act_quant: x.shape\[-1\] \(100\) must be divisible by block_size \(128\)"):
        v4hal.act_quant(torch.randn(2, 100))


def test_dtype_error_is_typeerror_and_names_argument():
    with pytest.raises(TypeError, match=r"sparse_attn: topk_idxs must be int32, got int64 \[1, 2, 3\]"):
        v4hal.sparse_attn(torch.randn(1, 2, 4, 8), torch.randn(1, 5, 8), torch.zeros(4),
                          torch.zeros(1, 2, 3, dtype=torch.int64), 0.3)


def test_sparse_attn_index_out_of_range():
    idx = torch.tensor([[[0, 5, -1]]], dtype=torch.int32)
    with pytest.raises(RangeError, match=r"topk_idxs values must be in \[-1, 5\), got min -1, max 5"):
        v4hal.sparse_attn(torch.randn(1, 1, 2, 8), torch.randn(1, 5, 8), torch.zeros(2), idx, 0.3)
    idx[0, 0, 1] = -2
    with pytest.raises(RangeError, match="min -2"):
        v4hal.sparse_attn(torch.randn(1, 1, 2, 8), torch.randn(1, 5, 8), torch.zeros(2), idx, 0.3)


def test_sparse_attn_shape_mismatch():
    with pytest.raises(ShapeError, match=r"kv must be \[b, n, d\] = \[1, n, 8\]"):
        v4hal.sparse_attn(torch.randn(1, 1, 2, 8), torch.randn(1, 5, 16), torch.zeros(2),
                          torch.zeros(1, 1, 3, dtype=torch.int32), 0.3)


def test_fp8_gemm_scale_shape_and_nonfinite():
    a, a_s = v4hal.act_quant(torch.randn(3, 256))
    b, b_s = v4hal.quant_weight_fp8(torch.randn(128, 256), scale_fmt=None)
    with pytest.raises(ShapeError, match=r"b_s must be \[ceil\(N/128\), K/128\]"):
        v4hal.fp8_gemm(a, a_s, b, b_s[:, :1])
    bad = b_s.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(RangeError, match="b_s must be finite"):
        v4hal.fp8_gemm(a, a_s, b, bad)
    with pytest.raises(DTypeError, match="scale_dtype"):
        v4hal.fp8_gemm(a, a_s, b, b_s, scale_dtype=torch.float8_e8m0fnu)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp8_gemm_partial_k_block_refused_by_every_backend(backend):
    """K = 192 with ceil(K/128) = 2 scales is not a valid fp8_gemm call, whichever backend is asked for."""
    a = torch.randn(3, 192).to(FP8)
    a_s = torch.ones(3, 2)
    b = torch.randn(128, 192).to(FP8)
    b_s = torch.ones(1, 2)
    with v4hal.use_backend(backend):
        with pytest.raises(ShapeError, match=r"fp8_gemm: a.shape\[-1\] \(K\) \(192\) must be divisible by the FP8 "
                                             r"block \(128\)"):
            v4hal.fp8_gemm(a, a_s, b, b_s)


def test_grouped_gemm_offsets_checked():
    x = torch.randn(6, 128)
    with pytest.raises(RangeError, match="group_offsets must start at 0, end at M=6"):
        v4hal.grouped_gemm(x, torch.randn(2, 64, 128), torch.tensor([0, 4, 5]))
    with pytest.raises(RangeError, match="never decrease"):
        v4hal.grouped_gemm(x, torch.randn(3, 64, 128), torch.tensor([0, 5, 4, 6]))
    with pytest.raises(ShapeError, match=r"group_offsets must be \[E\+1\]"):
        v4hal.grouped_gemm(x, torch.randn(3, 64, 128), torch.tensor([0, 6]))


def test_moe_expert_ids_in_range_and_hash_pairing():
    x = torch.randn(3, 16)
    with pytest.raises(RangeError, match=r"indices values must be in \[0, 4\)"):
        v4hal.moe_dispatch(x, torch.tensor([[0, 4]] * 3, dtype=torch.int32), 4)
    with pytest.raises(ShapeError, match="hash routing needs both tid2eid and input_ids"):
        v4hal.moe_gate(x, torch.randn(4, 16), topk=2, tid2eid=torch.zeros(10, 2, dtype=torch.int32))


def test_device_mismatch_named():
    meta = torch.randn(4, device="meta")
    with pytest.raises(DeviceError, match="all tensors must be on one device, got x on cpu, weight on meta"):
        v4hal.rms_norm(torch.randn(2, 4), meta)


def test_hadamard_needs_power_of_two():
    with pytest.raises(ShapeError, match=r"x.shape\[-1\] \(12\) must be a power of two"):
        v4hal.hadamard_transform(torch.randn(2, 12))


def test_value_checks_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("V4HAL_CHECK_VALUES", "0")
    v4hal.hal.dispatch.refresh()
    x = torch.randn(3, 16)
    # with value checks off the range error is not raised by v4hal (the kernel may still fail)
    out = v4hal.moe_gate(x, torch.randn(4, 16), topk=2)
    assert out[1].shape == (3, 2)


@pytest.mark.parametrize("call, match", [
    (lambda: v4hal.quant_weight_fp8(torch.randn(4, 128), block=2**31),
     r"quant_weight_fp8: block must be in \[1, 2\*\*10\]"),
    (lambda: v4hal.moe_dispatch(torch.randn(3, 16), torch.zeros(3, 2, dtype=torch.int32), 2**62),
     r"moe_dispatch: num_experts must be in \[1, 2\*\*16\]"),
    (lambda: v4hal.moe_dispatch(torch.randn(3, 16), torch.zeros(3, 2, dtype=torch.int32), 2**31),
     r"num_experts must be in \[1, 2\*\*16\], got 2147483648"),
    (lambda: v4hal.indexer_topk(torch.randn(1, 2, 4, 64), torch.randn(1, 9, 64), torch.randn(1, 2, 4), 4,
                                start_pos=2**63 - 1), r"indexer_topk: start_pos must be in \[0, 2147483645\]"),
    (lambda: v4hal.hc_split_sinkhorn(torch.randn(3, 24), torch.ones(3), torch.zeros(24), sinkhorn_iters=2**31),
     r"hc_split_sinkhorn: sinkhorn_iters must be in \[1, 1000\]"),
    (lambda: v4hal.rms_norm(torch.randn(2, 8), torch.ones(8), eps=float("inf")), r"rms_norm: eps must be in \(0, 1\)"),
    (lambda: v4hal.sparse_attn(torch.randn(1, 1, 2, 8), torch.randn(1, 5, 8), torch.zeros(2),
                               torch.zeros(1, 1, 3, dtype=torch.int32), float("nan")),
     r"sparse_attn: softmax_scale must be in \[-1e\+06, 1e\+06\], got nan"),
])
def test_scalar_out_of_range_is_a_range_error_naming_it(call, match):
    """Huge or non-finite scalars are refused before any kernel runs (no RuntimeError, no minutes-long loop)."""
    with pytest.raises(RangeError, match=match):
        call()


def test_moe_experts_swiglu_limit_bounded():
    x = torch.randn(3, 16)
    w1, w2 = torch.randn(2, 8, 16), torch.randn(2, 16, 8)
    idx, wts = torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, 1)
    for bad in (1e300, float("inf"), float("nan"), -1.0):
        with pytest.raises(RangeError, match=r"moe_experts: swiglu_limit must be in \[0, 1e\+06\] \(0 = no clamp\)"):
            v4hal.moe_experts(x, wts, idx, w1, w2, w1, swiglu_limit=bad)


def test_float64_expert_weights_are_a_dtype_error_naming_the_argument():
    x = torch.randn(4, 128)
    with pytest.raises(DTypeError, match=r"grouped_gemm: w must be float32 or bfloat16 or float16 or float8_e4m3fn "
                                         r"or uint8, got float64"):
        v4hal.grouped_gemm(x, torch.randn(2, 8, 128, dtype=torch.float64), torch.tensor([0, 2, 4]))
    w = torch.randn(2, 8, 128, dtype=torch.float64)
    with pytest.raises(DTypeError, match="moe_experts: w1 must be float32 or bfloat16 .* got float64"):
        v4hal.moe_experts(x, torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.int32), w,
                          torch.randn(2, 128, 8, dtype=torch.float64), w)


def test_grouped_gemm_names_x_scale():
    x = torch.randn(6, 128).to(FP8)
    w, w_s = v4hal.quant_weight_fp8(torch.randn(2, 128, 128))
    with pytest.raises(ShapeError, match=r"grouped_gemm: x_scale must be \[\.\.\., K/128\]"):
        v4hal.grouped_gemm(x, w, torch.tensor([0, 3, 6]), x_scale=torch.ones(6, 2), w_scale=w_s)
