"""Rank functions and shared inputs of the EP tests (module level, so `spawn` can start them).

Every input is a pure function of (seed, rank), so the test process rebuilds exactly what each
rank used and computes the single-process oracle (``v4hal.moe_experts`` over all experts) itself.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

import v4hal
from v4hal.parallel import EPTimeoutError, ExpertParallelMoE, ep_combine, ep_dispatch

E, D, INTER, K = 8, 256, 128, 3     # experts, model dim, expert intermediate dim, experts per token
SWIGLU = 10.0

#: tokens per rank: uneven, one rank without tokens
TOKENS = {1: [6], 2: [7, 0], 4: [5, 0, 11, 2]}

#: routing cases: (allowed experts or None for all, k)
ROUTES = {
    "all": (None, K),
    "cold": ([0, 2, 3, 4, 7], K),          # experts 1, 5, 6 get no token
    "one_rank": ("rank0", 2),              # only rank 0's experts: every other rank receives nothing
}

#: weight formats: name -> (kind, swiglu_limit); fp8: fp32 tile scales, fp8e: e8m0 (ue8m0) tile scales
FORMATS = {"bf16": ("bf16", 0.0), "fp8": ("fp8", SWIGLU), "fp8e": ("fp8e", SWIGLU), "fp4": ("fp4", SWIGLU)}

#: FP8 payloads checked: name -> scale_fmt
PAYLOADS = {"fp8": None, "fp8-ue8m0": "ue8m0"}


def make_weights(kind: str, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
    """All E experts: w1/w3 ``[E, INTER, D]``, w2 ``[E, D, INTER]`` (bf16, FP8 with fp32 or e8m0 128x128 scales,
    FP4)."""
    g = torch.Generator().manual_seed(seed)
    wf = [torch.randn(E, *shape, generator=g) * 0.06 for shape in ((INTER, D), (D, INTER), (INTER, D))]
    if kind == "bf16":
        return (*(w.to(torch.bfloat16) for w in wf), None)
    if kind in ("fp8", "fp8e"):
        q = [v4hal.quant_weight_fp8(w, 128, None if kind == "fp8" else "ue8m0") for w in wf]
    else:
        q = [v4hal.quant_weight_fp4(w, 32) for w in wf]
    return q[0][0], q[1][0], q[2][0], (q[0][1], q[1][1], q[2][1])


def local(ws: tuple, rank: int, world: int) -> tuple:
    """This rank's slice ``[r*E/W, (r+1)*E/W)`` of (w1, w2, w3, scales)."""
    per = E // world
    sl = slice(rank * per, (rank + 1) * per)
    w1, w2, w3, s = ws
    return w1[sl], w2[sl], w3[sl], (None if s is None else tuple(t[sl] for t in s))


def make_tokens(rank: int, world: int, route: str, seed: int = 5, tokens: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x bf16 ``[T, D]``, weights fp32 ``[T, k]``, indices int32 ``[T, k]``) of ``rank`` (T from `TOKENS`)."""
    allowed, k = ROUTES[route]
    if allowed == "rank0":
        allowed = list(range(E // world))
    cand = torch.tensor(allowed if allowed is not None else list(range(E)))
    t = TOKENS[world][rank] if tokens is None else tokens
    g = torch.Generator().manual_seed(seed + 101 * rank + 7 * world)
    x = torch.randn(t, D, generator=g).to(torch.bfloat16)
    pick = torch.rand(t, cand.numel(), generator=g).argsort(dim=1)[:, :k]
    idx = cand[pick].to(torch.int32)
    w = (torch.rand(t, k, generator=g) + 0.1).float()
    return x, w, idx


def fp8_roundtrip(x: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    """What an FP8 payload delivers: ``dequant_fp8(act_quant(x))`` in x's dtype."""
    if x.shape[0] == 0:
        return x.clone()
    sdtype = torch.float8_e8m0fnu if scale_fmt == "ue8m0" else torch.float32
    q, s = v4hal.act_quant(x, 128, scale_fmt, sdtype)
    return v4hal.dequant_fp8(q, s, 128, out_dtype=x.dtype)


# --------------------------------------------------------------------------- rank functions
def rank_moe_cases(rank: int, world: int) -> dict[str, Any]:
    """Every correctness case of one world size; returns this rank's outputs by case name."""
    out: dict[str, Any] = {}
    for fmt, (kind, limit) in FORMATS.items():
        w1, w2, w3, s = local(make_weights(kind), rank, world)
        moe = ExpertParallelMoE.from_weights(w1, w2, w3, num_experts=E, swiglu_limit=limit, w_scales=s, timeout=30)
        for route in ROUTES:
            x, w, idx = make_tokens(rank, world, route)
            out[f"{fmt}/{route}"] = moe(x, w, idx)
            out[f"{fmt}/{route}/stats"] = dict(moe.last_handle.stats)
        out[f"{fmt}/transport"] = moe.transport
    # FP8 payload (bf16 and FP8 weights)
    for fmt in ("bf16", "fp8", "fp8e"):
        kind, limit = FORMATS[fmt]
        w1, w2, w3, s = local(make_weights(kind), rank, world)
        for name, sfmt in PAYLOADS.items():
            moe = ExpertParallelMoE.from_weights(w1, w2, w3, num_experts=E, swiglu_limit=limit, w_scales=s,
                                                 fp8_payload=True, scale_fmt=sfmt, timeout=30)
            x, w, idx = make_tokens(rank, world, "all")
            out[f"{fmt}/payload-{name}"] = moe(x, w, idx)
            out[f"{fmt}/payload-{name}/stats"] = dict(moe.last_handle.stats)
    # partial sums in the combine (DeepEP-style), bf16 weights
    w1, w2, w3, s = local(make_weights("bf16"), rank, world)
    moe = ExpertParallelMoE.from_weights(w1, w2, w3, num_experts=E, partial_sums=True, timeout=30)
    x, w, idx = make_tokens(rank, world, "all")
    out["bf16/partial"] = moe(x, w, idx)
    out["bf16/partial/stats"] = dict(moe.last_handle.stats)
    # raw dispatch / combine: identity experts, weights 1 -> k*x; expert e scales by (e+1) -> grouping check
    for route in ROUTES:
        x, w, idx = make_tokens(rank, world, route)
        xl, wl, h = ep_dispatch(x, torch.ones_like(w), idx, num_experts=E, timeout=30)
        out[f"identity/{route}"] = ep_combine(xl, h)
        out[f"identity/{route}/weights_one"] = bool((wl == 1).all())
        xl, wl, h = ep_dispatch(x, w, idx, num_experts=E, timeout=30)
        gid = (h.local_expert_ids().to(torch.float32) + rank * (E // world) + 1).unsqueeze(1)
        out[f"scaled/{route}"] = ep_combine((xl.float() * gid).to(torch.bfloat16), h)
        out[f"weighted/{route}"] = ep_combine((xl.float() * wl.unsqueeze(1)).to(torch.bfloat16), h)
        out[f"offsets/{route}"] = h.group_offsets.clone()
    return out


def rank_errors(rank: int, world: int) -> dict[str, str]:
    """Bad calls on a live group: each must raise a v4hal error; returns 'Type: message' per case."""
    res: dict[str, str] = {}

    def grab(name: str, fn) -> None:
        try:
            fn()
            res[name] = "no error"
        except Exception as exc:            # the test checks the type and the message
            res[name] = f"{type(exc).__name__}: {exc}"

    w1, w2, w3, _ = local(make_weights("bf16"), rank, world)
    x, w, idx = make_tokens(rank, world, "all", tokens=4)     # every rank must fail alike: no empty rank here
    grab("indivisible", lambda: ExpertParallelMoE.from_weights(w1, w2, w3, num_experts=E + 1))
    grab("wrong_local", lambda: ExpertParallelMoE.from_weights(w1[:1], w2[:1], w3[:1], num_experts=E))
    grab("index_range", lambda: ep_dispatch(x, w, idx + E, num_experts=E))
    grab("weights_dtype", lambda: ep_dispatch(x, w.double(), idx, num_experts=E))
    grab("fp8_dim", lambda: ep_dispatch(x[:, :100], w, idx, num_experts=E, fp8=True))
    grab("transport", lambda: ep_dispatch(x, w, idx, num_experts=E, transport="deepep"))
    # ranks disagree on the token width: caught by the counts exchange on every rank
    xd = x if rank == 0 else torch.zeros(x.shape[0], 2 * D, dtype=x.dtype)
    grab("mismatch", lambda: ep_dispatch(xd, w, idx, num_experts=E, timeout=20))
    # ranks disagree on their expert shapes: caught by from_weights on every rank
    wi = w1 if rank == 0 else w1[:, :64]
    grab("shape_mismatch", lambda: ExpertParallelMoE.from_weights(wi, w2, w3, num_experts=E, timeout=20))
    return res


#: ranks that disagree on one argument of a call: case -> (rank 0's overrides, rank 1's overrides)
DISAGREE = {
    "dtype": ({}, {"dtype": torch.float16}),
    "dtype_same_bytes": ({}, {"dtype": torch.float32, "d": D // 2}),     # bf16 D=256 and fp32 D=128: 512 B rows
    "dim": ({}, {"d": 2 * D}),
    "topk": ({}, {"k": 2}),
    "num_experts": ({}, {"e": 2 * E}),
    "fp8": ({}, {"fp8": True}),
    "scale_fmt": ({"fp8": True}, {"fp8": True, "scale_fmt": "ue8m0"}),
    "transport": ({"transport": "recorder"}, {"transport": "all_to_all"}),
    "combine_dtype": ({}, {"y_dtype": torch.float16}),
    "combine_partial_sums": ({}, {"partial_sums": True}),
    "call_order": ({}, {"dispatch_twice": True}),
    "refused": ({}, {"bad_indices": True}),
}


class Recorder:
    """A transport that records its calls and moves nothing (stands for DeepEP / Ascend MC2, which cannot run
    here): shows that the agreement runs before any transport, and what `ep_dispatch` hands it."""

    name = "recorder"
    device_type = None

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def unavailable(self, device: torch.device, group: Any) -> str | None:
        return None

    def dispatch(self, x, weights, indices, group, *, num_experts, fp8, scale_fmt, timeout, max_tokens=None):
        self.calls.append({"op": "dispatch", "max_tokens": max_tokens})
        raise RuntimeError("recorder: moves nothing")

    def combine(self, y, handle, *, out_dtype, partial_sums):
        self.calls.append({"op": "combine"})
        raise RuntimeError("recorder: moves nothing")


def rank_disagree(rank: int, world: int) -> dict[str, Any]:
    """Every `DISAGREE` case in turn on one live group, then agreeing calls on the same group; returns per case
    'Type: message', the seconds it took and whether any transport was called."""
    from v4hal.parallel import transport as tr

    rec = Recorder()
    tr._REGISTRY[rec.name] = rec                          # this forked rank only
    tr.TRANSPORTS = (*tr.TRANSPORTS, rec.name)
    res: dict[str, Any] = {}
    for case, per_rank in DISAGREE.items():
        o = per_rank[rank]
        d, k, e = o.get("d", D), o.get("k", K), o.get("e", E)
        g = torch.Generator().manual_seed(17 + rank)
        x = torch.randn(4 + rank, d, generator=g).to(o.get("dtype", torch.bfloat16))
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(x.shape[0])]).to(torch.int32)
        w = torch.rand(x.shape[0], k, generator=g) + 0.1
        if o.get("bad_indices"):
            idx = idx + e
        t0 = time.monotonic()
        try:
            xl, _, h = ep_dispatch(x, w, idx, num_experts=e, fp8=o.get("fp8", False), scale_fmt=o.get("scale_fmt"),
                                   transport=o.get("transport"), timeout=20)
            if o.get("dispatch_twice"):
                ep_dispatch(x, w, idx, num_experts=e, timeout=20)
            else:
                ep_combine(xl.to(o.get("y_dtype", xl.dtype)), h, partial_sums=o.get("partial_sums", False))
            res[case] = "no error"
        except Exception as exc:            # the test checks the type and the message
            res[case] = f"{type(exc).__name__}: {exc}"
        res[f"{case}/seconds"] = time.monotonic() - t0
        res[f"{case}/transport_calls"] = len(rec.calls)
    # the group still works; agreeing ranks: the recorder gets the largest T, all_to_all round trips
    x, w, idx = make_tokens(rank, world, "all")
    try:
        ep_dispatch(x, w, idx, num_experts=E, transport="recorder", timeout=20)
    except RuntimeError as exc:
        res["recorder"] = str(exc)
    res["recorder/calls"] = list(rec.calls)
    xl, _, h = ep_dispatch(x, torch.ones_like(w), idx, num_experts=E, timeout=20)
    res["identity"] = ep_combine(xl, h, out_dtype=torch.float32 if rank else None)   # out_dtype: per rank
    return res


def rank_dies(rank: int, world: int, timeout: float) -> dict[str, Any]:
    """Rank ``world-1`` exits (os._exit) before the exchange; the others time their failure."""
    w1, w2, w3, _ = local(make_weights("bf16"), rank, world)
    moe = ExpertParallelMoE.from_weights(w1, w2, w3, num_experts=E, timeout=timeout)
    if rank == world - 1:
        os._exit(3)
    return _timed_moe_call(moe, rank, world)


def _timed_moe_call(moe: ExpertParallelMoE, rank: int, world: int) -> dict[str, Any]:
    """One EP MoE call on this rank's tokens: its time, and the EPTimeoutError it ended with (if any)."""
    x, w, idx = make_tokens(rank, world, "all")
    t0 = time.monotonic()
    try:
        moe(x, w, idx)
        return {"error": None, "elapsed": time.monotonic() - t0}
    except EPTimeoutError as exc:
        return {"error": type(exc).__name__, "elapsed": time.monotonic() - t0, "message": str(exc),
                "is_timeout_error": isinstance(exc, TimeoutError)}


def rank_never_joins(rank: int, world: int, timeout: float, sleep: float) -> dict[str, Any]:
    """Rank ``world-1`` sleeps past the others' timeout instead of joining the exchange."""
    w1, w2, w3, _ = local(make_weights("bf16"), rank, world)
    moe = ExpertParallelMoE.from_weights(w1, w2, w3, num_experts=E, timeout=timeout)
    if rank == world - 1:
        time.sleep(sleep)
        return {"error": None, "slept": sleep}
    return _timed_moe_call(moe, rank, world)


def rank_raises(rank: int, world: int) -> int:
    """Rank 1 raises ValueError; the others wait in a collective and fail with EPTimeoutError."""
    if rank == 1:
        raise ValueError("rank 1 gave up")
    from v4hal.parallel import comm

    comm.wait(dist.barrier(async_op=True), "barrier", dist.group.WORLD, 20)
    return rank


def rank_identity(rank: int, world: int) -> tuple[int, int, str]:
    """(rank, world size, backend) as the launched rank sees them."""
    return dist.get_rank(), dist.get_world_size(), str(dist.get_backend())


# --------------------------------------------------------------------------- model
def rank_model(rank: int, world: int, path: str, ids: torch.Tensor, experts_fp8: bool,
               preslice: bool = False) -> dict[str, Any]:
    """v4-mini (or a V4.1 checkpoint) with sharded experts: prefill this rank's rows, then two decode steps.

    ``preslice``: first cut the expert stacks down to this rank's rows (+ the fused shared row), as a
    loader that reads only the local experts would leave them.
    """
    from v4hal.model import V4Model
    from v4hal.parallel.model import shard_model_experts

    model = V4Model.from_pretrained(path, experts_fp8=experts_fp8)
    if preslice:
        for block in [*model.layers, *model.mtp]:
            ffn = block.ffn
            per = ffn.n_experts // world
            keep = list(range(rank * per, (rank + 1) * per)) + ([ffn.n_experts] if ffn.fused else [])
            for name in ("w1", "w2", "w3", "w1_scale", "w2_scale", "w3_scale"):
                buf = ffn.experts._buffers.get(name)
                if buf is not None:
                    ffn.experts._buffers[name] = buf[keep].clone()
    shard_model_experts(model, timeout=60)
    rows = torch.tensor_split(torch.arange(ids.shape[0]), world)[rank]
    logits = [model(ids[rows], 0)]
    for step in range(2):
        nxt = logits[-1].argmax(dim=-1, keepdim=True)
        logits.append(model(nxt, ids.shape[1] + step))
    ffn = model.layers[1].ffn
    ep = ffn.experts.ep
    shared = ffn.experts.shared[3][0][0] if ffn.fused else ffn.shared_experts.w1.scale
    return {"rows": rows, "logits": logits, "transport": ffn.experts.transport, "fused": bool(ffn.fused),
            "local_experts": int(ep.w1.shape[0]), "routed": (ep.w1.dtype, list(ep.w_scales[0].shape)),
            "shared_scale": list(shared.shape), "gate_temp": ffn.gate.gate_temp,
            "hash_gates": sum(b.ffn.gate.hash for b in model.layers)}


# --------------------------------------------------------------------------- transport adapters (stand-ins)
def rank_adapters(rank: int, world: int) -> dict[str, Any]:
    """The DeepEP and Ascend MC2 adapters driven end to end against the one-rank stand-ins."""
    import sys

    from v4hal.hal import devices
    from v4hal.parallel import ascend_mc2, get_transport

    from . import stand_ins

    assert world == 1
    sys.modules["deep_ep"] = stand_ins.deep_ep_module()
    ascend_mc2.hccl_comm_name = lambda group, r: "hccl_ep_stand_in"
    w1, w2, w3, s = make_weights("bf16")
    moe = ExpertParallelMoE.from_weights(w1, w2, w3, num_experts=E, timeout=10)
    x, w, idx = make_tokens(0, 2, "all", tokens=9)
    out: dict[str, Any] = {"reference": v4hal.moe_experts(x, w, idx, w1, w2, w3)}

    def run(name: str, fp8: bool = False) -> torch.Tensor:
        xl, wl, h = get_transport(name).dispatch(x, w, idx, dist.group.WORLD, num_experts=E, fp8=fp8,
                                                 scale_fmt=None, timeout=10)
        out[f"{name}/weights_at_combine"] = h.weights_at_combine
        out[f"{name}/weights_returned"] = wl is not None
        return ep_combine(moe.local_experts(xl, wl, h), h)

    out["deepep"] = run("deepep")
    out["deepep/fp8"] = run("deepep", fp8=True)
    out["deepep/calls"] = list(stand_ins.Buffer.calls)
    out["fp8_reference"] = v4hal.moe_experts(fp8_roundtrip(x, None), w, idx, w1, w2, w3)
    for chip in ("A2", "A3"):
        mc2 = stand_ins.MC2(chip)
        devices.torch_npu_module = lambda: mc2
        devices.npu_chip = lambda: chip
        out[f"ascend/{chip}"] = run("ascend")
        out[f"ascend/{chip}/calls"] = [c["op"] for c in mc2.calls]
        out[f"ascend/{chip}/global_bs"] = mc2.calls[0]["global_bs"]
        try:
            run("ascend", fp8=True)
            out[f"ascend/{chip}/fp8"] = "no error"
        except Exception as exc:
            out[f"ascend/{chip}/fp8"] = type(exc).__name__
    return out


def rank_sleeps(rank: int, world: int, seconds: float) -> int:
    """A rank that hangs outside any collective (only ``join_timeout_s`` can end it)."""
    time.sleep(seconds)
    return rank


# --------------------------------------------------------------------------- serving (forward_batch on paged caches)
def serve_requests(model: Any, plan: dict[int, list[tuple[int, list[int], int]]], chunk: int, mtp: bool,
                   step_fn: Any = None) -> dict[int, Any]:
    """One rank's requests through an `Engine` on its own `CachePool` (block size 16): ``plan`` maps a step
    index to the ``(req_id, prompt, max_new_tokens)`` arriving before it. ``step_fn(engine, plan)`` runs the
    steps (default: one process, no peers). Returns the finished requests by id, each with its logits rows
    (``keep_logits``) and, with ``mtp``, its MTP logits."""
    from v4hal.serve import CachePool
    from v4hal.serve.engine import Engine

    pool = CachePool(model.config, block_size=16)
    engine = Engine(model, pool, chunk=chunk, keep_logits=True, mtp=mtp, reuse_prefixes=False)
    if step_fn is not None:
        return step_fn(engine, plan)
    step, last = 0, max(plan, default=-1)
    while step <= last or not engine.idle:
        for req in plan.get(step, ()):
            engine.add(*req)
        engine.step()
        step += 1
    return engine.finished


def rank_forward_batch(rank: int, world: int, path: str, plans: list[dict], chunk: int, experts_fp8: bool,
                       mtp: list[bool]) -> dict[str, Any]:
    """v4-mini with sharded experts serving ``plans[rank]`` (its own pool and requests; MTP when ``mtp[rank]``)
    in lockstep with the other ranks (`run_engine_ep`). Returns per request its output tokens, logits rows
    and MTP logits; per step the tokens this rank ran (0: an idle step) and the rows its experts computed
    in the last main layer (its own tokens' copies and the ones other ranks sent)."""
    from v4hal.model import V4Model
    from v4hal.parallel.model import run_engine_ep, shard_model_experts

    model = V4Model.from_pretrained(path, experts_fp8=experts_fp8)
    shard_model_experts(model, timeout=60)
    steps: list[int] = []
    received: list[int] = []
    last = model.layers[-1].ffn.experts

    def on_step(stats: Any) -> None:
        steps.append(0 if stats is None else stats.prefill_tokens + stats.decode_tokens)
        received.append(int(last.ep.last_handle.group_offsets[-1]))

    fin = serve_requests(model, plans[rank], chunk, mtp[rank], lambda eng, plan: run_engine_ep(
        eng, arrivals=plan, timeout=60, on_step=on_step))
    return {"requests": {rid: {"output": r.output, "logits": r.logits, "drafts": r.draft_logits}
                         for rid, r in fin.items()},
            "steps": steps, "received": received, "fused": bool(model.layers[1].ffn.fused)}
