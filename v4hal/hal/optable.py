"""The op table: one :class:`OpDef` per declared op, by name, in declaration order.

``v4hal.ops``' ``define_op`` fills it (and re-exports it as ``v4hal.OPS``); the dispatch layer
(``use_backend``, ``V4HAL_OP_BACKENDS``), the registry and ``v4hal info`` read it. It lives here,
below the op declarations, so that the dispatch layer never imports them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class OpDef:
    """One declared op: its schema, checks and fake implementation."""

    name: str
    schema: str
    check: Callable[..., None]
    fake: Callable[..., Any]
    value_check: Callable[..., None] | None = None
    doc: str = ""
    variant_of: str | None = None  # e.g. act_quant_inplace is a variant of act_quant: no wrapper of its own
    module: str = ""               # the module that declared the op and holds its public wrapper
    arg_names: tuple[str, ...] = field(default=(), init=False)
    defaults: dict[str, Any] = field(default_factory=dict, init=False)
    #: the dispatching kernel registered for every device's dispatch key (schema-ordered arguments)
    kernel: Callable[..., Any] = field(default=None, init=False, repr=False)  # type: ignore[assignment]
    #: ``call.<name>``: the op called as ``torch.ops.v4hal.<name>``, direct in plain eager mode
    call: Callable[..., Any] = field(default=None, init=False, repr=False)  # type: ignore[assignment]
    #: call signature -> (implementation function, run the value check, a tensor requires grad)
    selections: dict[Any, Any] = field(default_factory=dict, init=False, repr=False)

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

    @property
    def wrapper(self) -> Callable[..., Any] | None:
        """The public function ``v4hal.<name>`` (None for variants, which are reached through their op)."""
        if self.variant_of is not None:
            return None
        return getattr(sys.modules.get(self.module), self.name, None)


#: op name -> its declaration, in declaration order
OPS: dict[str, OpDef] = {}


def public_ops() -> list[str]:
    """Names of the public ops (every declared op except variants), in declaration order."""
    return [name for name, d in OPS.items() if d.variant_of is None]
