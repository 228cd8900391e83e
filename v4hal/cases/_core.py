"""The case catalogue's machinery: `OpCase`, the registry of cases, seeded builders, shape sets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from v4hal import compare
from v4hal.hal.dispatch import use_backend
from v4hal.hal.errors import RangeError

if TYPE_CHECKING:
    from v4hal.bench.peers import Peer
    from v4hal.model.config import ModelConfig

Shape = dict[str, Any]

#: marks a parameter of `OpCase.params` that a shape must give
REQUIRED = object()

#: shape sets: ``tiny`` (CPU-sized: tests, parity, opcheck), ``quick`` (v4-mini dims: ``v4hal bench
#: --quick``), and ``<preset>/<mode>`` (the ops of one V4 layer: bench and the GPU script)
PRESETS = ("v4-flash", "v4-pro")
MODES = ("decode", "prefill")
SHAPE_SETS = ("tiny", "quick", *(f"{p}/{m}" for p in PRESETS for m in MODES))

# the work of one layer in each mode
QUICK_TOKENS = 16          # v4-mini-sized batch of tokens
DECODE_TOKENS = 128        # a decode batch: 128 tokens for the token-wise ops ...
DECODE_SEQS = 64           # ... and 64 sequences of one query for the per-sequence ops
DECODE_CONTEXT = 65536     # at a 64K-token context
PREFILL_TOKENS = 4096      # a prefill chunk of one sequence
PREFILL_INDEX_QUERIES = 2048
EXPERT_PARALLEL = 8        # routed experts per rank: an EP-8 shard

DTYPES: dict[str, torch.dtype] = {
    "fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn, "e8m0": torch.float8_e8m0fnu, "uint8": torch.uint8,
    "int32": torch.int32, "int64": torch.int64,
}
_SHORT = {v: k for k, v in DTYPES.items()}


def dtype_of(value: str | torch.dtype) -> torch.dtype:
    """A dtype given as a torch dtype or a short name (bf16, fp32, e8m0, ...)."""
    if isinstance(value, torch.dtype):
        return value
    if value in DTYPES:
        return DTYPES[value]
    raise RangeError(f"dtype must be a torch dtype or one of {sorted(DTYPES)}, got {value!r}")


def short_dtype(dtype: torch.dtype) -> str:
    """``bf16`` for torch.bfloat16 (tables and labels)."""
    return _SHORT.get(dtype, str(dtype).replace("torch.", ""))


def _label(dtype: torch.dtype) -> str:
    """Short dtype name in case labels, with uint8 read as packed FP4 (the library's use of it)."""
    return "fp4" if dtype == torch.uint8 else short_dtype(dtype)


def tokens(mode: str) -> int:
    """Tokens of a token-wise op in ``mode`` ("quick", "decode" or "prefill")."""
    return {"quick": QUICK_TOKENS, "decode": DECODE_TOKENS, "prefill": PREFILL_TOKENS}[mode]


class Gen:
    """Seeded random tensors on one device (drawn there on CPU and CUDA, else drawn on the CPU and moved)."""

    def __init__(self, seed: int, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.draw_device = self.device if self.device.type in ("cpu", "cuda") else torch.device("cpu")
        self.generator = torch.Generator(device=self.draw_device).manual_seed(seed)

    def _out(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return t.to(device=self.device, dtype=dtype if dtype is not None else t.dtype)

    def randn(self, *shape: int, dtype: str | torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        """Normal values times ``scale``, rounded to ``dtype``."""
        t = torch.randn(shape, generator=self.generator, device=self.draw_device)
        return self._out(t * scale if scale != 1.0 else t, dtype_of(dtype))

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform fp32 values in [0, 1)."""
        return self._out(torch.rand(shape, generator=self.generator, device=self.draw_device))

    def randint(self, high: int, shape: tuple[int, ...], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Integers in [0, high)."""
        return self._out(torch.randint(0, high, shape, generator=self.generator, device=self.draw_device), dtype)

    def distinct(self, rows: int, pool: int, k: int) -> torch.Tensor:
        """int32 ``[rows, k]``: k distinct values in [0, pool) per row."""
        return self.rand(rows, pool).topk(k, dim=-1).indices.to(torch.int32)


def reference(op: str, *args: Any) -> Any:
    """``torch.ops.v4hal.<op>(*args)`` on the reference backend (quantized operands for other cases)."""
    with use_backend("reference"):
        return getattr(torch.ops.v4hal, op)(*args)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


@dataclass
class OpCase:
    """Everything the tools need to exercise one op.

    ``build(gen, shape) -> list``: the op's schema arguments for a complete ``shape`` (every key of
    ``params``, defaults filled in); ``params``: accepted shape keys and their defaults (`REQUIRED`
    for none); ``tiny``: CPU-sized shapes (odd sizes, -1 indices, empty experts); ``shapes(config,
    mode)``: ``[(label, shape)]`` for mode "quick" (v4-mini dims), "decode" or "prefill" of a V4
    preset (None: ``quick`` is the first tiny shape, no preset shapes); ``flops(shape)``: 2 per
    multiply-add plus the elementwise counts; ``bytes(shape)``: the least traffic (None: every tensor
    argument read once and every output written once); ``bound``: "matmul" (compute may bind, at
    the rate of ``compute_dtype``) or "memory"; ``peers``: factories of other implementations of the
    same function (bench). The pass rule is the numerics table's (`rule`).
    """

    op: str
    build: Callable[[Gen, Shape], list[Any]]
    params: dict[str, Any]
    tiny: list[Shape]
    shapes: Callable[["ModelConfig", str], list[tuple[str, Shape]]] | None = None
    flops: Callable[[Shape], float] | None = None
    bytes: Callable[[Shape], float] | None = None
    bound: str = "memory"
    compute_dtype: Callable[[Shape], str] | str | None = None
    peers: tuple[Callable[[], "Peer"], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.bound not in ("matmul", "memory"):
            raise RangeError(f"OpCase({self.op}): bound must be 'matmul' or 'memory', got {self.bound!r}")
        if not self.tiny:
            raise RangeError(f"OpCase({self.op}): tiny must hold at least one shape")

    def complete(self, shape: Shape) -> Shape:
        """``shape`` with defaults filled in; unknown or missing keys raise `RangeError`."""
        unknown = sorted(set(shape) - set(self.params))
        if unknown:
            raise RangeError(f"{self.op} case: unknown parameters {unknown}; {self.op} takes {list(self.params)}")
        missing = [k for k, v in self.params.items() if v is REQUIRED and k not in shape]
        if missing:
            raise RangeError(f"{self.op} case: missing parameters {missing}; {self.op} takes {list(self.params)}")
        return {**{k: v for k, v in self.params.items() if v is not REQUIRED}, **shape}

    def make(self, shape: Shape, seed: int = 0, device: str | torch.device = "cpu") -> list[Any]:
        """Schema-ordered arguments for ``shape``; the same seed gives the same tensors on a device."""
        return self.build(Gen(seed, device), self.complete(shape))

    def fake(self, shape: Shape) -> tuple[list[Any], Any]:
        """(arguments, outputs) as fake tensors: builds nothing, runs the op's structural checks.

        Raises the op's own `ShapeError` / `DTypeError` / `RangeError` for a shape the op rejects."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            args = self.make(shape, 0, "cpu")
            out = getattr(torch.ops.v4hal, self.op)(*args)
        return args, out

    def work(self, shape: Shape) -> tuple[float, float, str]:
        """(flops, bytes, dtype label such as ``bf16->fp8``) of one call, from fake tensors."""
        full = self.complete(shape)
        args, out = self.fake(shape)
        flops = float(self.flops(full)) if self.flops is not None else 0.0
        if self.bytes is not None:
            nbytes = float(self.bytes(full))
        else:
            nbytes = float(sum(t.numel() * t.element_size() for t in _tensors(args) + _tensors(out)))
        ins, outs = _tensors(args), _tensors(out)
        src = _label(ins[0].dtype) if ins else "-"
        dst = _label(outs[0].dtype) if outs else src
        return flops, nbytes, src if src == dst else f"{src}->{dst}"

    def matmul_dtype(self, shape: Shape) -> str | None:
        """The dtype whose matmul ceiling may bind (None for memory-bound ops)."""
        if self.bound != "matmul":
            return None
        cd = self.compute_dtype
        return cd(self.complete(shape)) if callable(cd) else (cd or "fp32")

    def shape_set(self, name: str) -> list[tuple[str, Shape]]:
        """``[(label, shape)]`` of shape set ``name`` (see `SHAPE_SETS`)."""
        if name == "tiny":
            return [(describe_shape(s), dict(s)) for s in self.tiny]
        if name == "quick":
            if self.shapes is None:
                return [("tiny", dict(self.tiny[0]))]
            from v4hal.model.config import ModelConfig

            return self.shapes(ModelConfig.preset("v4-mini"), "quick")
        preset, _, mode = name.partition("/")
        if preset not in PRESETS or mode not in MODES:
            raise RangeError(f"shape set must be one of {SHAPE_SETS}, got {name!r}")
        if self.shapes is None:
            return []
        from v4hal.model.config import ModelConfig

        return self.shapes(ModelConfig.preset(preset), mode)

    def rule(self, dtype: torch.dtype) -> compare.Rule:
        """The pass rule of an output of ``dtype`` (the numerics table's)."""
        return compare.rule_for(self.op, dtype)


CASES: dict[str, OpCase] = {}


def register_case(case: OpCase) -> OpCase:
    """Add ``case`` to the catalogue (replacing the op's earlier case). The op must be declared."""
    from v4hal.ops import OPS

    if case.op not in OPS:
        raise RangeError(f"register_case: op must be a declared v4hal op, got {case.op!r}")
    CASES[case.op] = case
    return case


def unregister_case(op: str) -> None:
    """Drop ``op``'s case (tests that register one clean up with this)."""
    CASES.pop(op, None)


def get_case(op: str) -> OpCase:
    """The case of ``op``; `RangeError` naming the ops that have one otherwise."""
    case = CASES.get(op)
    if case is None:
        raise RangeError(f"no case for op {op!r}; ops with a case: {sorted(CASES)}")
    return case


def case_ops() -> list[str]:
    """Public ops (declaration order) that have a case."""
    from v4hal.ops import public_ops

    return [op for op in public_ops() if op in CASES]


def make_case(op: str, shape: Shape, seed: int = 0, device: str | torch.device = "cpu") -> list[Any]:
    """Schema-ordered arguments of ``op`` for ``shape``; the same seed gives the same tensors."""
    return get_case(op).make(shape, seed, device)


def tiny_cases(op: str | None = None) -> list[tuple[str, Shape]]:
    """``[(op, shape)]``: the CPU-sized cases of ``op`` (default: every public op with a case)."""
    ops = [op] if op is not None else case_ops()
    return [(name, dict(s)) for name in ops for s in get_case(name).tiny]


def describe_shape(shape: Shape) -> str:
    """``m=3 k=256 dtype=bf16`` for tables."""
    def fmt(v: Any) -> str:
        return short_dtype(v) if isinstance(v, torch.dtype) else str(v)
    return " ".join(f"{k}={fmt(v)}" for k, v in shape.items())


def variant_args(variant: str, base_args: list[Any]) -> list[Any]:
    """Arguments of ``variant`` (e.g. ``act_quant_inplace``) taken by name from its op's arguments
    (tensors cloned, since a variant writes into them); defaults for the rest."""
    from v4hal.ops import OPS

    vdef = OPS[variant]
    bdef = OPS[vdef.variant_of]
    by_name = dict(zip(bdef.arg_names, base_args))
    out = []
    for name in vdef.arg_names:
        value = by_name[name] if name in by_name else vdef.defaults[name]
        out.append(value.clone() if isinstance(value, torch.Tensor) else value)
    return out


def written_args(op: str) -> list[int]:
    """Positions of the arguments ``op`` writes into (``Tensor(a!)`` in its schema)."""
    schema = getattr(torch.ops.v4hal, op).default._schema
    return [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def variants(op: str) -> list[str]:
    """Declared variants of ``op`` (in-place forms)."""
    from v4hal.ops import OPS

    return [name for name, d in OPS.items() if d.variant_of == op]
