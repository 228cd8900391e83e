"""torch.library.opcheck for every op on the CPU, and a small graph under torch.compile(fullgraph=True)."""
import pytest
import torch

import v4hal
from v4hal import cases

CASES = cases.tiny_cases()
# one case per op is enough for opcheck (schema, fake tensor, aot dispatch): take the first of each
FIRST = list({op: (op, shape) for op, shape in reversed(CASES)}.values())
# in-place variants (OpDef.variant_of), with their arguments taken from their op's case
VARIANTS = [name for name, d in v4hal.OPS.items() if d.variant_of is not None and d.variant_of in cases.CASES]


LOW_PRECISION = (torch.float8_e4m3fn, torch.float8_e8m0fnu)


def _bytes(t):
    return t.contiguous().view(torch.uint8).clone() if t.dtype in LOW_PRECISION else t.clone()


@pytest.mark.parametrize("op,shape", FIRST, ids=[op for op, _ in FIRST])
def test_opcheck(op, shape):
    args = cases.make_case(op, shape, seed=1)
    overload = getattr(torch.ops.v4hal, op).default
    utils = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    low_precision_inputs = any(isinstance(a, torch.Tensor) and a.dtype in LOW_PRECISION for a in args)
    if low_precision_inputs:
        # torch's test_schema compares inputs with allclose, which fp8/e8m0 CPU tensors do not implement;
        # the same property (no input mutated, no output aliasing an input) is checked by hand below.
        utils.remove("test_schema")
        before = [_bytes(a) if isinstance(a, torch.Tensor) else None for a in args]
        with v4hal.use_backend("reference"):
            outs = overload(*args)
        for a, b in zip(args, before):
            if b is not None:
                assert torch.equal(_bytes(a), b), f"{op} mutated an input"
        for out in outs if isinstance(outs, tuple) else (outs,):
            assert all(out.data_ptr() != a.data_ptr() for a in args if isinstance(a, torch.Tensor) and a.numel())
    with v4hal.use_backend("reference"):
        torch.library.opcheck(overload, args, test_utils=utils)


@pytest.mark.parametrize("op", VARIANTS)
def test_opcheck_inplace(op):
    base = v4hal.OPS[op].variant_of
    shape = next(s for o, s in CASES if o == base)
    args = cases.variant_args(op, cases.make_case(base, shape, seed=2))
    for i in cases.written_args(op):
        args[i] = args[i].float()
    torch.library.opcheck(getattr(torch.ops.v4hal, op).default, args)


def test_every_public_op_has_a_case():
    assert set(v4hal.PUBLIC_OPS) <= {op for op, _ in CASES}
    assert {"act_quant_inplace", "fp4_act_quant_inplace"} <= set(VARIANTS)


def test_compiled_graph_matches_eager():
    """rms_norm -> act_quant -> fp8_gemm -> hadamard -> moe gate, traced whole by dynamo."""
    torch.manual_seed(0)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    norm_w = torch.rand(256) + 0.5
    w, w_s = v4hal.quant_weight_fp8(torch.randn(128, 256) * 0.05)
    gate_w = torch.randn(8, 128, dtype=torch.bfloat16) * 0.1

    def block(x):
        h = v4hal.rms_norm(x, norm_w, 1e-6)
        q, s = v4hal.act_quant(h, 128, "ue8m0")
        y = v4hal.fp8_gemm(q, s, w, w_s)
        y = v4hal.hadamard_transform(y)
        weights, ids = v4hal.moe_gate(y, gate_w, topk=2, route_scale=1.5)
        return y, weights, ids

    eager = block(x)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
