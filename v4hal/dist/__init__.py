"""Expert parallelism for V4's routed experts on torch.distributed.

- `ep_dispatch` / `ep_combine` (``ep.py``): tokens to the ranks of their experts and back (counts, then one
  uneven all-to-all each way; optional FP8 payload), `EPHandle`.
- `ExpertParallelMoE` (``moe.py``): the routed experts sharded over the group, same meaning as `v4hal.moe_experts`.
- ``transport.py``: all-to-all (gloo / NCCL / HCCL), DeepEP (CUDA) and Ascend MC2 adapters, chosen explicitly.
- ``launch.py``: `spawn` local ranks on 127.0.0.1; ``model.py``: `shard_model_experts`, `run_ep` (``v4hal run --ep``).
- ``bench.py``: `measure_ep` and ``python -m v4hal.dist.bench`` (bytes per token, dispatch/combine time).
- Errors: `EPTimeoutError` (a peer died or never joined), `EPGroupError`, `EPRankError`.
"""
from __future__ import annotations

from .errors import EPGroupError, EPRankError, EPTimeoutError
from .ep import EPHandle, ep_combine, ep_dispatch, expert_range
from .launch import free_port, spawn
from .moe import ExpertParallelMoE
from .transport import TRANSPORTS, select_transport, transport_reasons

__all__ = ["ep_dispatch", "ep_combine", "EPHandle", "expert_range", "ExpertParallelMoE", "spawn", "free_port",
           "TRANSPORTS", "select_transport", "transport_reasons", "EPTimeoutError", "EPGroupError", "EPRankError",
           "measure_ep", "shard_model_experts", "run_ep"]


def __getattr__(name: str):
    """Lazy: the bench and the model glue import more (the model package) than the EP core needs."""
    if name == "measure_ep":
        from .bench import measure_ep

        return measure_ep
    if name in ("shard_model_experts", "run_ep"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'v4hal.dist' has no attribute {name!r}")
