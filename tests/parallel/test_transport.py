"""The transports share one interface and one lookup; the dispatch handle is built by keyword only."""
from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

from v4hal.hal.errors import BackendUnavailableError
from v4hal.parallel import TRANSPORTS, EPHandle, Transport, get_transport, select_transport, transport_reasons
from v4hal.parallel.transport import DEFAULT_TRANSPORT


def _params(fn) -> list[tuple[str, inspect._ParameterKind]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def test_every_transport_behind_one_interface() -> None:
    assert TRANSPORTS == ("all_to_all", "deepep", "ascend") and DEFAULT_TRANSPORT == TRANSPORTS[0]
    for name in TRANSPORTS:
        impl = get_transport(name)
        assert isinstance(impl, Transport) and impl.name == name, name
        for method in ("unavailable", "dispatch", "combine"):
            assert _params(getattr(impl, method)) == _params(getattr(Transport, method)), (name, method)
    with pytest.raises(BackendUnavailableError, match="one of all_to_all, deepep, ascend"):
        get_transport("nvshmem")


@pytest.mark.skipif(importlib.util.find_spec("deep_ep") is not None, reason="needs a machine without deep_ep")
def test_automatic_choice_needs_a_transport_that_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA tensors pick DeepEP only when it can serve; without deep_ep the default stays (an explicit
    request for it is refused with the reason)."""
    monkeypatch.delenv("V4HAL_EP_TRANSPORT", raising=False)
    reason = transport_reasons("cuda")["deepep"]
    assert reason is not None and "deep_ep" in reason
    assert select_transport(None, "cuda") == "all_to_all"
    with pytest.raises(BackendUnavailableError, match="deep_ep"):
        select_transport("deepep", "cuda")


def test_handle_is_built_by_keyword() -> None:
    fields = dict(transport="all_to_all", group=None, world_size=2, rank=1, num_tokens=3, topk=2, num_experts=4,
                  num_local_experts=2, dim=8, dtype=torch.bfloat16,
                  group_offsets=torch.tensor([0, 1, 4], dtype=torch.int64), timeout=None)
    h = EPHandle(**fields)
    assert h.local_expert_ids().tolist() == [0, 1, 1, 1]
    assert not h.weights_at_combine and h.stats == {} and h.state is None
    with pytest.raises(TypeError):
        EPHandle(*fields.values())
