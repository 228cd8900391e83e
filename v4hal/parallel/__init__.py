"""Expert parallelism for the routed experts of DeepSeek-V4 and V4.1 on torch.distributed.

- `ep_dispatch` / `ep_combine` (``ep.py``): tokens to the ranks of their experts and back, `EPHandle`
  (``layout.py``: the expert layout and the handle, built by keyword).
- `Transport` (``transport.py``): the one interface of the transports, peers behind one lookup
  (`get_transport`): all-to-all on torch.distributed (gloo / NCCL / HCCL, the default;
  ``all_to_all.py``), DeepEP (CUDA; ``deepep.py``), Ascend MC2 (NPU; ``ascend_mc2.py``).
- `ExpertParallelMoE` (``moe.py``): the routed experts sharded over the group, same meaning as `v4hal.moe_experts`.
- ``launch.py``: `spawn` local ranks on 127.0.0.1; ``model.py``: `shard_model_experts` (``v4hal run --ep``),
  `run_engine_ep` / `step_engine_ep` / `idle_step` (ranks serving their own requests on paged caches, in lockstep).
- ``bench.py``: `measure_ep` (``python -m v4hal.apps.ep_bench``) (bytes per token, dispatch/combine time).
- Errors: `EPTimeoutError` (a peer died or never joined), `EPGroupError`, `EPRankError`.
"""
from __future__ import annotations

from .ep import EPHandle, ep_combine, ep_dispatch, expert_range
from .errors import EPGroupError, EPRankError, EPTimeoutError
from .launch import free_port, spawn
from .moe import ExpertParallelMoE
from .transport import TRANSPORTS, Transport, get_transport, select_transport, transport_reasons

__all__ = ["ep_dispatch", "ep_combine", "EPHandle", "expert_range", "ExpertParallelMoE", "spawn", "free_port",
           "Transport", "TRANSPORTS", "get_transport", "select_transport", "transport_reasons", "EPTimeoutError",
           "EPGroupError", "EPRankError", "measure_ep", "shard_model_experts", "run_engine_ep",
           "step_engine_ep", "idle_step"]


def __getattr__(name: str):
    """Lazy: the bench and the model glue import more (the model package) than the EP core needs."""
    if name == "measure_ep":
        from .bench import measure_ep

        return measure_ep
    if name in ("shard_model_experts", "run_engine_ep", "step_engine_ep", "idle_step"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'v4hal.parallel' has no attribute {name!r}")
