"""`ExpertParallelMoE`: V4's routed experts sharded over an EP group, with the meaning of `moe_experts`."""
from __future__ import annotations

import torch
import torch.distributed as dist

import v4hal
import v4hal.parallel.comm as comm
from v4hal.hal.errors import DTypeError, ShapeError

from .ep import EPHandle, ep_combine, ep_dispatch, expert_range
from .transport import select_transport

__all__ = ["ExpertParallelMoE"]

_WEIGHT_CODES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3, torch.float8_e4m3fn: 4, torch.uint8: 5}


class ExpertParallelMoE:
    """Rank ``r`` of ``W`` holds experts ``[r*E/W, (r+1)*E/W)``; ``moe(x, weights, indices)`` equals
    ``v4hal.moe_experts(x, weights, indices, W1, W2, W3)`` over the whole expert set.

    Per call: `ep_dispatch` (tokens to the ranks of their experts), ``v4hal.moe_experts`` on the local
    experts with local ids and the received gate weights (k = 1 per dispatched copy: the same expert
    math, the gate weight applied before w2, the same act_quant of x and h for FP8/FP4 weights), then
    `ep_combine` (one row per copy back home, fp32 sum over the k slots in slot order, one cast). With
    the all-to-all transport and a bf16 payload the result is that of the single-process op up to the
    grouped GEMM's dependence on its batch layout (tests: equal to bf16 rounding, mostly bitwise).

    Build with `from_weights`. Attributes: ``transport`` (``"all_to_all"``, ``"deepep"`` or
    ``"ascend"``), ``last_handle`` (the `EPHandle` of the latest call: byte counts in ``stats``).
    """

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, *, num_experts: int,
                 group: dist.ProcessGroup | None, swiglu_limit: float, w_scales: tuple[torch.Tensor, ...] | None,
                 fp8_payload: bool, scale_fmt: str | None, transport: str, timeout: float | None,
                 partial_sums: bool = False) -> None:
        self.w1, self.w2, self.w3 = w1, w2, w3
        self.w_scales = w_scales
        self.num_experts = num_experts
        self.group = group
        self.swiglu_limit = float(swiglu_limit)
        self.fp8_payload = fp8_payload
        self.scale_fmt = scale_fmt
        self.transport = transport
        self.timeout = timeout
        self.partial_sums = partial_sums
        self.num_local_experts = w1.shape[0]
        self.dim = w2.shape[1]
        self.last_handle: EPHandle | None = None

    @classmethod
    def from_weights(cls, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, *, num_experts: int,
                     group: dist.ProcessGroup | None = None, swiglu_limit: float = 0.0,
                     w_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     fp8_payload: bool = False, scale_fmt: str | None = None, transport: str | None = None,
                     timeout: float | None = None, partial_sums: bool = False) -> "ExpertParallelMoE":
        """From this rank's local experts (every rank of ``group`` calls it, collectively).

        Args:
            w1, w3: ``[E/W, I, D]``; w2 ``[E/W, D, I]`` (bf16/fp16/fp32, fp8 with 128x128 (V4) or 32x32 (V4.1)
                block scales, or packed FP4 uint8 ``[E/W, N, K/2]`` with e8m0 ``[E/W, N, K/32]`` (V4) or
                ``[E/W, N, K/16]`` (V4.1) scales; `v4hal.moe_experts` reads the block from the scales' shape) of
                experts ``[r*E/W, (r+1)*E/W)``.
            num_experts: E over the whole group (divisible by its size W).
            group: the EP group (None: WORLD). swiglu_limit, w_scales: as `v4hal.moe_experts`.
            fp8_payload / scale_fmt: FP8 dispatch payload (see `ep_dispatch`).
            transport: None (automatic) or a name among `TRANSPORTS` (see `v4hal.parallel.transport`).
            partial_sums: combine one partial sum per (token, rank) instead of one row per copy (see `ep_combine`).
            timeout: seconds any exchange may take (None: the group's timeout).

        The ranks exchange their expert shapes and formats once (bounded by ``timeout``): a rank that never
        joins raises `EPTimeoutError`, a rank with other shapes raises `ShapeError`.
        """
        op = "ExpertParallelMoE.from_weights"
        grp = comm.resolve_group(group, op)
        world, rank = dist.get_world_size(grp), dist.get_rank(grp)
        expert_range(num_experts, world, rank, op)
        per = num_experts // world
        for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
            if not isinstance(w, torch.Tensor) or w.dim() != 3:
                raise ShapeError(f"{op}: {name} must be a 3-D [E/W, N, K] tensor, got "
                                 f"{type(w).__name__ if not isinstance(w, torch.Tensor) else list(w.shape)}")
            if w.dtype not in _WEIGHT_CODES:
                raise DTypeError(f"{op}: {name} must be bf16/fp16/fp32, float8_e4m3fn or uint8 (FP4), got {w.dtype}")
            if w.shape[0] != per:
                raise ShapeError(f"{op}: {name} must hold this rank's E/W = {num_experts}/{world} = {per} experts "
                                 f"(rank {rank} owns [{rank * per}, {(rank + 1) * per})), got {list(w.shape)}")
        if w_scales is not None and len(w_scales) != 3:
            raise ShapeError(f"{op}: w_scales must be (w1_scale, w2_scale, w3_scale), got {len(w_scales)} items")
        name = select_transport(transport, w1.device, grp, op)
        comm.device_fits_group(op, grp, w1.device)
        # every rank must hold the same expert format: exchange (shapes, dtype code, swiglu_limit)
        mine = torch.tensor([*w1.shape, *w2.shape, _WEIGHT_CODES[w1.dtype], int(fp8_payload), int(partial_sums),
                             int(round(float(swiglu_limit) * 1e6))], dtype=torch.int64, device=w1.device)
        every = comm.all_gather_tensor(mine, grp, op, timeout)
        bad = torch.nonzero((every != mine).any(dim=1)).squeeze(1).tolist()
        if bad:
            raise ShapeError(f"{op}: rank {bad[0]} holds experts as {every[bad[0]].tolist()} (w1 shape, w2 shape, "
                             f"dtype code, fp8 payload, partial sums, swiglu_limit*1e6), rank {rank} as "
                             f"{mine.tolist()}: all ranks must shard one expert set the same way")
        return cls(w1, w2, w3, num_experts=num_experts, group=grp, swiglu_limit=swiglu_limit, w_scales=w_scales,
                   fp8_payload=fp8_payload, scale_fmt=scale_fmt, transport=name, timeout=timeout,
                   partial_sums=partial_sums)

    def local_experts(self, x_local: torch.Tensor, w_local: torch.Tensor | None, handle: EPHandle) -> torch.Tensor:
        """``moe_experts`` over the dispatched rows (k = 1, local ids) -> ``[N, D]`` in x's dtype."""
        n = x_local.shape[0]
        if n == 0:
            return x_local.new_empty(0, self.dim)
        ids = handle.local_expert_ids().unsqueeze(1)
        w = (w_local.unsqueeze(1) if w_local is not None else
             torch.ones(n, 1, dtype=torch.float32, device=x_local.device))
        return v4hal.moe_experts(x_local, w, ids, self.w1, self.w2, self.w3, w_scales=self.w_scales,
                                 swiglu_limit=self.swiglu_limit)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, *,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x ``[T, D]``, weights fp32 ``[T, k]``, indices ``[T, k]`` global expert ids -> ``[T, D]``.

        Collective: every rank of the group calls it the same number of times (T may differ, may be 0).
        ``out_dtype=torch.float32`` returns the fp32 sum before the final cast (to add a shared expert
        with a single rounding, as the fused single-process path does).
        """
        x_local, w_local, handle = ep_dispatch(x, weights, indices, self.group, num_experts=self.num_experts,
                                               fp8=self.fp8_payload, scale_fmt=self.scale_fmt, timeout=self.timeout,
                                               transport=self.transport)
        y = self.local_experts(x_local, w_local, handle)
        self.last_handle = handle
        return ep_combine(y, handle, out_dtype=out_dtype or x.dtype, partial_sums=self.partial_sums)
