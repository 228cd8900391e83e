"""Declaring an op: schema, checks, fake (meta) implementation, and the dispatching kernel.

Each op is defined once in the ``v4hal`` torch.library namespace and gets one Python kernel
for the dispatch key of every registered device (``v4hal.hal.devices``: CPU, CUDA and
PrivateUse1 for Ascend ``npu``, and any device registered later). That kernel fills schema
defaults, runs the structural checks and (where enabled) the value checks, asks
``hal.dispatch.select`` for an implementation, and calls it. The fake kernel runs the same
structural checks and computes output shapes, so ops trace under ``torch.compile``.

The structural checks and the selection depend only on the call signature: the shapes, dtypes
and devices of the tensor arguments, the other arguments' values, and the ``use_backend``
overrides in force. The kernel remembers the implementation chosen for each signature that
passed the checks (``registry.selection_cache``), so a repeated signature costs one dict lookup;
the registry, :func:`v4hal.hal.dispatch.refresh` and new devices empty those caches. Calls that
fail a check are never remembered: they raise the same error every time. Value checks read
tensor data and run on every call where enabled (by default on CPU tensors only).
"""
from __future__ import annotations

import re
import sys
from typing import Any, Callable

import torch

from v4hal.hal import devices, dispatch, registry
from v4hal.hal.optable import OPS, OpDef, public_ops  # noqa: F401  (re-exported by v4hal.ops)

LIB = torch.library.Library("v4hal", "DEF")

#: Cached selections per op at most; a full cache is emptied (shapes that vary call to call,
#: e.g. ragged prefill lengths, must not grow it without bound).
MAX_CACHED_SIGNATURES = 4096


def __getattr__(name: str) -> Any:
    if name == "DISPATCH_KEYS":   # the registered devices' dispatch keys (live)
        return tuple(d.dispatch_key for d in devices.registered_devices().values())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _first_tensor(values: Any) -> torch.Tensor:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError("op called without a tensor argument")


def _tensor_list_key(ts: Any) -> Any:
    if ts is None:
        return None
    return tuple(None if t is None else (type(t), t.shape, t.dtype, t.device, t.requires_grad) for t in ts)


def _signature_fn(name: str, types: list[str]) -> Callable[..., tuple]:
    """``key(overrides, *values)``: the cache key of a call, from metadata and scalars (never data):
    each argument's type, and for tensors their shape, dtype, device and ``requires_grad``."""
    params, parts = [], []
    for i, typ in enumerate(types):
        a = f"a{i}"
        params.append(a)
        if typ == "Tensor":
            parts += [f"type({a})", f"{a}.shape", f"{a}.dtype", f"{a}.device", f"{a}.requires_grad"]
        elif typ == "Optional[Tensor]":
            parts.append(f"None if {a} is None else (type({a}), {a}.shape, {a}.dtype, {a}.device, {a}.requires_grad)")
        elif "Tensor" in typ:           # Tensor[], Tensor?[], Optional[List[Tensor]]
            parts.append(f"_tensor_list_key({a})")
        elif "List" in typ:             # int[], float[], SymInt[] (lists: unhashable)
            parts += [f"type({a})", f"None if {a} is None else tuple({a})"]
        else:                           # int, float, bool, str, ScalarType, their Optional forms
            parts += [f"type({a})", a]
    src = f"def key(ov, {', '.join(params)}):\n    return (ov, {', '.join(parts)}{',' if not parts else ''})\n"
    scope: dict[str, Any] = {"_tensor_list_key": _tensor_list_key}
    # generated once per op: a flat expression is several times faster than a loop over the arguments
    exec(compile(src, f"<v4hal signature of {name}>", "exec"), scope)  # noqa: S102
    return scope["key"]


def _requires_grad(values: Any) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor) and v.requires_grad:
            return True
        if isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.requires_grad for t in v):
            return True
    return False


class _Calls:
    """``call.<op>(*args)``: op ``<op>`` with its schema arguments in order, exactly as
    ``torch.ops.v4hal.<op>(*args)``; the public wrappers call the ops through it.

    In plain eager mode a call whose signature the dispatching kernel has already served (and
    remembered) goes to the chosen implementation without the round trip through torch's
    dispatcher. Every other call goes through ``torch.ops.v4hal.<op>``: under ``torch.compile``
    or ``torch.export``, with a ``TorchDispatchMode`` or ``TorchFunctionMode`` active (fake tensors,
    tracing, profiling modes), under functorch transforms, autocast or ``torch.jit.trace``, with
    tensor subclasses, with keyword arguments, and when grad mode is on and a tensor argument
    requires grad (torch's autograd handling of the op applies).
    """

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"v4hal has no op {name!r} (declared: {', '.join(OPS)})")


call = _Calls()

_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_autocast = torch._C._is_any_autocast_enabled
_jit_tracing = torch._C._get_tracing_state
_functorch_level = torch._C._functorch.maybe_current_level
_grad_enabled = torch._C.is_grad_enabled


def define_op(name: str, schema: str, *, check: Callable[..., None], fake: Callable[..., Any],
              value_check: Callable[..., None] | None = None, doc: str = "", variant_of: str | None = None,
              module: str | None = None) -> OpDef:
    """Define ``torch.ops.v4hal.<name>`` with ``schema`` (the part after the name), and ``call.<name>``.

    ``variant_of``: the public op this one serves (an in-place form); ``module``: where the public
    wrapper of the same name lives (default: the calling module)."""
    LIB.define(name + schema)
    opdef = OpDef(name, schema, check, fake, value_check, doc, variant_of,
                  module or sys._getframe(1).f_globals.get("__name__", ""))
    packet = getattr(torch.ops.v4hal, name)
    parsed = packet.default._schema
    opdef.arg_names = tuple(a.name for a in parsed.arguments)
    opdef.defaults = {a.name: a.default_value for a in parsed.arguments if a.has_default_value()}
    # torch reports ScalarType defaults as integer codes: take the dtype named in the schema instead
    for arg, dtype_name in re.findall(r"ScalarType\??\s+(\w+)=(\w+)", schema):
        opdef.defaults[arg] = getattr(torch, dtype_name)

    arg_names = opdef.arg_names
    n_args = len(arg_names)
    n_returns = len(parsed.returns)
    signature = _signature_fn(name, [str(a.type) for a in parsed.arguments])
    cache = opdef.selections = registry.selection_cache()
    overrides = dispatch._OVERRIDES
    value_checks_on = dispatch.value_checks_on

    def first_call(values: Any, key: tuple | None) -> Any:
        """A signature not seen since the caches were last emptied: check, select, remember."""
        check(*values)
        device = _first_tensor(values).device.type
        generation = registry.generation()
        run_value_check = value_check is not None and value_checks_on(device)
        if run_value_check:
            value_check(*values)
        impl = dispatch.select(name, device, dict(zip(arg_names, values)))
        if key is not None and registry.generation() == generation:   # nothing changed meanwhile
            if len(cache) >= MAX_CACHED_SIGNATURES:
                cache.clear()
            cache[key] = (impl.fn, run_value_check, _requires_grad(values))
        return impl.fn(*values)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        # torch drops trailing arguments equal to their defaults: fill them in
        values = args if len(args) == n_args and not kwargs else opdef.bind(args, kwargs)
        try:
            key: tuple | None = signature(overrides.get()[0], *values)
            entry = cache.get(key)
        except TypeError:   # an unhashable argument: this call is not remembered
            key = entry = None
        if entry is None:
            return first_call(values, key)
        fn, run_value_check, _ = entry
        if run_value_check:
            value_check(*values)
        return fn(*values)

    def eager(*args: Any, **kwargs: Any) -> Any:
        if (kwargs or len(args) != n_args or _is_compiling() or _dispatch_modes() or _function_modes()
                or _autocast() or _jit_tracing() is not None or _functorch_level() is not None):
            return packet(*args, **kwargs)
        try:
            entry = cache.get(signature(overrides.get()[0], *args))
        except (AttributeError, TypeError):   # not a tensor where the schema has one, unhashable
            entry = None
        if entry is None or (entry[2] and _grad_enabled()):
            return packet(*args)
        fn, run_value_check, _ = entry
        if run_value_check:
            value_check(*args)
        out = fn(*args)
        if n_returns == 1:
            return out
        # as torch returns them: None for no outputs, a tuple for several
        return None if n_returns == 0 else (out if type(out) is tuple else tuple(out))

    opdef.kernel = kernel
    opdef.call = eager
    setattr(call, name, eager)
    OPS[name] = opdef
    for key in _REGISTERED_KEYS:
        LIB.impl(name, kernel, key)
    torch.library.register_fake(f"v4hal::{name}", fake_kernel_for(opdef), lib=LIB)
    return opdef


def fake_kernel_for(opdef: OpDef) -> Callable[..., Any]:
    """The fake (meta) kernel: structural checks, then the declared output shapes."""
    def fake_kernel(*args: Any, **kwargs: Any) -> Any:
        values = opdef.bind(args, kwargs)
        opdef.check(*values)
        return opdef.fake(*values)
    return fake_kernel


_REGISTERED_KEYS: list[str] = []


def _on_device(device: devices.Device) -> None:
    """A device was registered: give every declared op a kernel for its dispatch key."""
    if device.dispatch_key in _REGISTERED_KEYS:
        return
    _REGISTERED_KEYS.append(device.dispatch_key)
    for opdef in OPS.values():
        LIB.impl(opdef.name, opdef.kernel, device.dispatch_key)
    registry.invalidate()


devices.on_device_registered(_on_device)
