"""The V4 model (DeepSeek-V4 and V4.1) under expert parallelism: `shard_model_experts` and the lockstep engine
steps.

`shard_model_experts(model, group)` swaps every MoE layer's routed experts (main layers and MTP) for
`EPExperts`: this rank keeps only experts ``[r*E/W, (r+1)*E/W)`` (the other rows are freed) and
runs them through `ExpertParallelMoE`; the gate and the shared expert stay local on every rank.
When the model has fused the shared expert into the routed stack (``MoE.fused``: it is expert
``E``, weight 1, in one ``moe_experts`` call), `EPExperts` keeps that expert local, takes the
routed sum in fp32 from the EP path and adds the shared output before the single final cast, so the
summation is the fused single-process one (slots in order, shared last).

The experts keep their checkpoint format (V4: FP4 with a scale per 32, FP8 in 128x128 tiles; V4.1: FP4 with a
scale per 16, FP8 in 32x32 tiles) and the gate is the model's own (V4.1's router with ``gate_temp``; V4's hash
layers route by token id on the rank that holds the token), so a rank's tokens get the experts and weights
they get in one process.

The model loader reads every expert before sharding; for ``v4-mini`` that costs nothing. A loader
that reads only the rank's experts can hand its stacks over as they are: `shard_model_experts`
accepts stacks of E or of E/W experts.

Serving (`V4Model.forward_batch` on paged caches): each rank owns its `CachePool` and its requests
(attention is data-parallel: requests never move) while the MoE layers move tokens between the ranks.
Every exchange needs every rank, so the ranks step together: `run_engine_ep` steps one `Engine` per rank
until all are done, and a rank with nothing to run in a step runs `idle_step` (the step's expert
exchanges with zero tokens: it still computes the tokens the other ranks send to its experts);
`step_engine_ep` is one such step, for a driver with its own loop.

``v4hal run --ep N`` (`v4hal.apps.run_ep`) runs the model sharded this way on local ranks.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import v4hal
import v4hal.parallel.comm as comm
from v4hal.hal.errors import RangeError, ShapeError

from .ep import expert_range
from .moe import ExpertParallelMoE

__all__ = ["EPExperts", "shard_model_experts", "moe_layers", "idle_step", "step_engine_ep", "run_engine_ep"]


class EPExperts(nn.Module):
    """Drop-in for the model's routed ``Experts``: ``(x [T, D], weights [T, k'], indices [T, k']) -> [T, D]``.

    ``k' = k`` (routed only) or ``k + 1`` when the shared expert is fused as expert ``E`` (its slot is last).
    """

    def __init__(self, moe: ExpertParallelMoE, num_routed: int, kind: str,
                 shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None] | None,
                 swiglu_limit: float) -> None:
        super().__init__()
        self.ep = moe
        self.num_routed = num_routed
        self.kind = kind
        self.shared = shared
        self.swiglu_limit = swiglu_limit

    @property
    def transport(self) -> str:
        return self.ep.transport

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.shared is None:
            return self.ep(x, weights, indices)
        w1, w2, w3, scales = self.shared
        t = x.shape[0]
        ones = torch.ones(t, 1, dtype=torch.float32, device=x.device)
        zero = torch.zeros(t, 1, dtype=torch.int32, device=x.device)
        shared = v4hal.moe_experts(x, ones, zero, w1, w2, w3, w_scales=scales, swiglu_limit=self.swiglu_limit)
        routed = self.ep(x, weights[:, :-1].contiguous(), indices[:, :-1].contiguous(), out_dtype=torch.float32)
        return (routed + shared.float()).to(x.dtype)


def moe_layers(model: nn.Module) -> list[nn.Module]:
    blocks = [*getattr(model, "layers", []), *getattr(model, "mtp", [])]
    return [b.ffn for b in blocks if hasattr(getattr(b, "ffn", None), "experts")]


def shard_model_experts(model: nn.Module, group: dist.ProcessGroup | None = None, *, fp8_payload: bool = False,
                        scale_fmt: str | None = None, timeout: float | None = None,
                        transport: str | None = None) -> nn.Module:
    """Keep this rank's routed experts and route every MoE layer through `ExpertParallelMoE` (in place).

    The model's expert stacks may hold all E experts (rows ``[r*E/W, (r+1)*E/W)`` are kept) or already
    only this rank's E/W (a loader that read just those); a fused shared expert is the stack's last row
    either way. Collective: every rank of ``group`` calls it on its model. Returns ``model``.
    """
    op = "shard_model_experts"
    grp = comm.resolve_group(group, op)
    world, rank = dist.get_world_size(grp), dist.get_rank(grp)
    for ffn in moe_layers(model):
        ex = ffn.experts
        if isinstance(ex, EPExperts):
            raise RangeError(f"{op}: the model's experts are already sharded")
        e = int(ffn.n_experts)
        lo, hi = expert_range(e, world, rank, op)
        names = ("w1", "w2", "w3")
        w = [getattr(ex, n) for n in names]
        s = [getattr(ex, f"{n}_scale", None) for n in names]
        quant = s[0] is not None
        fused = bool(getattr(ffn, "fused", False))
        routed_rows = w[0].shape[0] - int(fused)          # the fused shared expert is the last row
        if routed_rows == e:                              # every expert loaded: keep this rank's rows
            sl = slice(lo, hi)
        elif routed_rows == hi - lo:                      # a loader already read only this rank's experts
            sl = slice(0, hi - lo)
        else:
            raise ShapeError(f"{op}: routed expert stack must hold E={e} or E/W={hi - lo} experts"
                             f"{' + the fused shared one' if fused else ''}, got {list(w[0].shape)}")
        local = [t[sl].clone() for t in w]
        local_s = tuple(t[sl].clone() for t in s) if quant else None
        shared = None
        if fused:
            shared = (*(t[-1:].clone() for t in w), tuple(t[-1:].clone() for t in s) if quant else None)
        moe = ExpertParallelMoE.from_weights(*local, num_experts=e, group=grp, swiglu_limit=ex.swiglu_limit,
                                             w_scales=local_s, fp8_payload=fp8_payload, scale_fmt=scale_fmt,
                                             transport=transport, timeout=timeout)
        ffn.experts = EPExperts(moe, e, getattr(ex, "kind", str(w[0].dtype)), shared, float(ex.swiglu_limit))
    return model


# --------------------------------------------------------------------------- serving: step-aligned ranks
def idle_step(model: nn.Module, *, mtp: bool = False) -> None:
    """What a rank with no token to run does while the others run `V4Model.forward_batch` (and, with
    ``mtp``, `V4Model.mtp_forward_batch` with MTP block 0): every sharded MoE layer's dispatch and combine
    in layer order with zero tokens of its own, computing the tokens other ranks send to its experts.

    Collective: the other ranks of the group must be in a step of the same kind (``mtp`` alike). Raises
    `RangeError` when the model's experts are not sharded (`shard_model_experts`).
    """
    blocks = [*model.layers, *(list(model.mtp)[:1] if mtp else [])]
    ffns = [b.ffn for b in blocks if hasattr(getattr(b, "ffn", None), "experts")]
    if not ffns or not all(isinstance(f.experts, EPExperts) for f in ffns):
        raise RangeError("idle_step: the model's experts must be sharded first (shard_model_experts)")
    dev, dtype = model.device, model.embed.weight.dtype
    for ffn in ffns:
        k = int(ffn.gate.topk)
        ffn.experts.ep(torch.empty(0, int(ffn.dim), dtype=dtype, device=dev),
                       torch.empty(0, k, dtype=torch.float32, device=dev),
                       torch.empty(0, k, dtype=torch.int32, device=dev))


def step_engine_ep(engine: Any, *, pending: bool = False, group: dist.ProcessGroup | None = None,
                   timeout: float | None = None) -> tuple[bool, Any]:
    """One lockstep step of ``engine`` (a `v4hal.serve.Engine` over a model sharded by `shard_model_experts`)
    with the engines of the other ranks of ``group``. Collective.

    The ranks first exchange whether each has work (requests queued or running, or ``pending``: more will
    be added later) and whether its engine runs MTP (one bounded exchange of two ints). When no rank has
    work, nothing runs: returns ``(False, None)``. Otherwise a rank with requests runs `Engine.step` and a
    rank without runs `idle_step`: returns ``(True, stats)`` (the engine's `StepStats`, None for an idle
    step). Raises `RangeError` on every rank when the engines disagree on MTP (their exchanges would differ).
    """
    op = "step_engine_ep"
    grp = comm.resolve_group(group, op)
    busy = int(not engine.idle or bool(pending))
    rows = comm.gather_ints([busy, int(bool(engine.mtp))], grp, op, timeout,
                            comm.exchange_device(grp, engine.model.device))
    if len({row[1] for row in rows}) > 1:
        on = [r for r, row in enumerate(rows) if row[1]]
        raise RangeError(f"{op}: the ranks' engines disagree on mtp (ranks {on} run the MTP block, the others "
                         "do not): every rank's Engine must be built with the same mtp")
    if not any(row[0] for row in rows):
        return False, None
    stats = engine.step() if not engine.idle else None
    if stats is None:
        idle_step(engine.model, mtp=engine.mtp)
    return True, stats


def run_engine_ep(engine: Any, *, arrivals: Mapping[int, Sequence[tuple[Hashable, Sequence[int], int]]] | None = None,
                  group: dist.ProcessGroup | None = None, timeout: float | None = None,
                  on_step: Callable[[Any], None] | None = None) -> dict[Hashable, Any]:
    """Step ``engine`` with `step_engine_ep` until every rank of ``group`` is done; returns this rank's
    finished requests by id (as `Engine.run`). Collective.

    ``arrivals``: step index -> the ``(req_id, prompt, max_new_tokens)`` this rank receives before that step
    (`Engine.add`); the steps are counted alike on every rank. ``on_step(stats)`` after each step: the
    engine's `StepStats`, or None for an idle step.
    """
    op = "run_engine_ep"
    arrivals = dict(arrivals or {})
    bad = [s for s in arrivals if not isinstance(s, int) or isinstance(s, bool) or s < 0]
    if bad:
        raise RangeError(f"{op}: arrivals must be keyed by step indices (ints >= 0), got {bad[0]!r}")
    last = max(arrivals, default=-1)
    step = 0
    while True:
        for req_id, prompt, new in arrivals.get(step, ()):
            engine.add(req_id, prompt, new)
        ran, stats = step_engine_ep(engine, pending=step < last, group=group, timeout=timeout)
        if not ran:
            return engine.finished
        if on_step is not None:
            on_step(stats)
        step += 1
