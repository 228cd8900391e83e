"""Declaring an op: schema, checks, fake (meta) implementation, and the dispatching kernel.

Each op is defined once in the ``v4hal`` torch.library namespace and gets one Python kernel
for the CPU, CUDA and PrivateUse1 (Ascend ``npu``) dispatch keys. That kernel fills schema
defaults, runs the structural checks and (unless disabled) the value checks, asks
``hal.dispatch.select`` for an implementation, and calls it. The fake kernel runs the same
structural checks and computes output shapes, so ops trace under ``torch.compile``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from v4hal.hal import dispatch
from . import _checks

LIB = torch.library.Library("v4hal", "DEF")
DISPATCH_KEYS = ("CPU", "CUDA", "PrivateUse1")


@dataclass
class OpDef:
    """One declared op: its schema, checks and fake implementation."""

    name: str
    schema: str
    check: Callable[..., None]
    fake: Callable[..., Any]
    value_check: Callable[..., None] | None = None
    doc: str = ""
    arg_names: tuple[str, ...] = field(default=(), init=False)
    defaults: dict[str, Any] = field(default_factory=dict, init=False)

    def bind(self, args: tuple, kwargs: dict) -> list[Any]:
        """Arguments in schema order with defaults filled in."""
        values = list(args)
        for name in self.arg_names[len(values):]:
            if name in kwargs:
                values.append(kwargs[name])
            elif name in self.defaults:
                values.append(self.defaults[name])
            else:
                raise TypeError(f"{self.name}: missing argument {name!r}")
        return values


OPS: dict[str, OpDef] = {}


def _first_tensor(values: list[Any]) -> torch.Tensor:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError("op called without a tensor argument")


def define_op(name: str, schema: str, *, check: Callable[..., None], fake: Callable[..., Any],
              value_check: Callable[..., None] | None = None, doc: str = "") -> OpDef:
    """Define ``torch.ops.v4hal.<name>`` with ``schema`` (the part after the name)."""
    LIB.define(name + schema)
    opdef = OpDef(name, schema, check, fake, value_check, doc)
    parsed = getattr(torch.ops.v4hal, name).default._schema
    opdef.arg_names = tuple(a.name for a in parsed.arguments)
    opdef.defaults = {a.name: a.default_value for a in parsed.arguments if a.has_default_value()}
    # torch reports ScalarType defaults as integer codes: take the dtype named in the schema instead
    for arg, dtype_name in re.findall(r"ScalarType\??\s+(\w+)=(\w+)", schema):
        opdef.defaults[arg] = getattr(torch, dtype_name)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        values = opdef.bind(args, kwargs)
        check(*values)
        if value_check is not None and _checks.value_checks_enabled():
            value_check(*values)
        device = _first_tensor(values).device.type
        impl = dispatch.select(name, device, dict(zip(opdef.arg_names, values)))
        return impl.fn(*values)

    def fake_kernel(*args: Any, **kwargs: Any) -> Any:
        values = opdef.bind(args, kwargs)
        check(*values)
        return fake(*values)

    for key in DISPATCH_KEYS:
        LIB.impl(name, kernel, key)
    torch.library.register_fake(f"v4hal::{name}", fake_kernel, lib=LIB)
    OPS[name] = opdef
    return opdef
