"""`timed_decode`: the one timed greedy loop of ``v4hal run``, its EP ranks and the serving baseline."""
from __future__ import annotations

import pytest
import torch

from v4hal.bench.decode import timed_decode
from v4hal.hal.errors import DTypeError, RangeError, ShapeError

VOCAB = 11


class Counting:
    """A stand-in model: logits peak at ``(last token + position + 1) % VOCAB``; records its calls."""

    def __init__(self, log: list) -> None:
        self.log = log

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        self.log.append(("call", ids.shape[1], start))
        nxt = (ids[:, -1] + start + ids.shape[1]) % VOCAB
        return torch.nn.functional.one_hot(nxt, VOCAB).float()


def test_greedy_tokens_phases_and_hooks() -> None:
    log: list = []
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = timed_decode(Counting(log), prompt, 4, start=lambda: log.append("start"),
                       after_prefill=lambda: log.append("prefilled"), on_step=lambda i: log.append(("step", i)))
    assert log == ["start", ("call", 3, 0), "prefilled", ("call", 1, 3), ("step", 1), ("call", 1, 4), ("step", 2),
                   ("call", 1, 5), ("step", 3)]
    want = []
    for row in prompt.tolist():
        toks = [(row[-1] + 0 + 3) % VOCAB]
        for i in range(1, 4):
            toks.append((toks[-1] + 3 + i - 1 + 1) % VOCAB)
        want.append(toks)
    assert out.tokens.tolist() == want and out.tokens.dtype == torch.long and out.decode_steps == 3
    fig = out.figures(3)
    assert fig["prefill_tok_s"] == 2 * 3 / out.prefill_s and fig["decode_tok_s"] == 2 * 3 / out.decode_s


def test_one_new_token_has_no_decode_rate() -> None:
    out = timed_decode(Counting([]), torch.tensor([[1]]), 1)
    assert out.tokens.shape == (1, 1) and out.figures(1)["decode_tok_s"] is None


@pytest.mark.parametrize("prompt, new, error", [
    (torch.tensor([[1, 2]]), 0, RangeError),
    (torch.tensor([1, 2]), 2, ShapeError),
    (torch.tensor([[1.0, 2.0]]), 2, DTypeError),
])
def test_bad_input_is_refused_before_the_model_runs(prompt: torch.Tensor, new: int, error: type) -> None:
    log: list = []
    with pytest.raises(error, match="timed_decode"):
        timed_decode(Counting(log), prompt, new)
    assert log == []
