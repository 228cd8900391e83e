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
