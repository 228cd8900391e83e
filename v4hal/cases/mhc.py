"""Cases of the mHC ops (Sinkhorn mixing of the hyper-connection streams)."""
from __future__ import annotations

import torch

from ._core import REQUIRED, Gen, OpCase, Shape, register_case, tokens


def _params(g: Gen, rows: int, n_scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hc_scale fp32 ``[n_scale]`` in [0.5, ...), hc_base fp32 ``[rows]``)."""
    return g.randn(n_scale, scale=0.5).abs() + 0.5, g.randn(rows, scale=0.5)


def _hc_split_sinkhorn(g: Gen, s: Shape) -> list:
    hc = s["hc"]
    width = (2 + hc) * hc
    mixes = g.randn(s["t"], width)
    scale, base = _params(g, width, 3)
    return [mixes, scale, base, hc, s["iters"], 1e-6]


def _hc_pre(g: Gen, s: Shape) -> list:
    hc, d = s["hc"], s["d"]
    width = (2 + hc) * hc
    x = g.randn(s["t"], hc, d, dtype="bf16")
    fn = g.randn(width, hc * d, scale=(hc * d) ** -0.5)
    scale, base = _params(g, width, 3)
    return [x, fn, scale, base, 1e-6, hc, s["iters"], 1e-6]


def _hc_post(g: Gen, s: Shape) -> list:
    hc, t, d = s["hc"], s["t"], s["d"]
    return [g.randn(t, d, dtype="bf16"), g.randn(t, hc, d, dtype="bf16"), 2 * torch.sigmoid(g.randn(t, hc)),
            torch.softmax(g.randn(t, hc, hc), -1)]


def _hc_head(g: Gen, s: Shape) -> list:
    hc, d = s["hc"], s["d"]
    x = g.randn(s["t"], hc, d, dtype="bf16")
    fn = g.randn(hc, hc * d, scale=(hc * d) ** -0.5)
    scale, base = _params(g, hc, 1)
    return [x, fn, scale, base, 1e-6, 1e-6]


def _width(s: Shape) -> int:
    return (2 + s["hc"]) * s["hc"]


def _streams(label, iters=False):
    def shapes(c, mode):
        shape = {"t": tokens(mode), "d": c.dim, "hc": c.hc_mult}
        if iters:
            shape["iters"] = c.hc_sinkhorn_iters
        return [(label, shape)]
    return shapes


register_case(OpCase(
    "hc_split_sinkhorn", _hc_split_sinkhorn, {"t": REQUIRED, "hc": 4, "iters": 20}, tiny=[{"t": 7}],
    shapes=lambda c, mode: [("mixes", {"t": tokens(mode), "hc": c.hc_mult, "iters": c.hc_sinkhorn_iters})],
    flops=lambda s: s["t"] * (10 * _width(s) + 4 * s["hc"] ** 2 * s["iters"])))

register_case(OpCase(
    "hc_pre", _hc_pre, {"t": REQUIRED, "d": REQUIRED, "hc": 4, "iters": 20}, tiny=[{"t": 5, "d": 64}],
    shapes=_streams("attn", iters=True),
    flops=lambda s: s["t"] * (2 * _width(s) * s["hc"] * s["d"] + 5 * s["hc"] * s["d"]
                              + 4 * s["hc"] ** 2 * s["iters"])))

register_case(OpCase(
    "hc_post", _hc_post, {"t": REQUIRED, "d": REQUIRED, "hc": 4}, tiny=[{"t": 5, "d": 64}],
    shapes=_streams("attn"), flops=lambda s: s["t"] * s["hc"] * s["d"] * (2 + 2 * s["hc"])))

register_case(OpCase(
    "hc_head", _hc_head, {"t": REQUIRED, "d": REQUIRED, "hc": 4}, tiny=[{"t": 5, "d": 64}],
    shapes=_streams("head"), flops=lambda s: s["t"] * (2 * s["hc"] ** 2 * s["d"] + 5 * s["hc"] * s["d"])))


def _hc_mix(g: Gen, s: Shape) -> list:
    return _hc_pre(g, s)


def _hc_collapse(g: Gen, s: Shape) -> list:
    hc, d = s["hc"], s["d"]
    x = g.randn(s["t"], hc, d, dtype="bf16")
    return [x, torch.sigmoid(g.randn(s["t"], hc)) + 1e-6]


register_case(OpCase(
    "hc_mix", _hc_mix, {"t": REQUIRED, "d": REQUIRED, "hc": 4, "iters": 20}, tiny=[{"t": 5, "d": 64}],
    shapes=_streams("attn", iters=True),
    flops=lambda s: s["t"] * (2 * _width(s) * s["hc"] * s["d"] + 3 * s["hc"] * s["d"]
                              + 4 * s["hc"] ** 2 * s["iters"])))

register_case(OpCase(
    "hc_collapse", _hc_collapse, {"t": REQUIRED, "d": REQUIRED, "hc": 4}, tiny=[{"t": 5, "d": 64}, {"t": 3, "d": 7}],
    shapes=_streams("attn"), flops=lambda s: 2 * s["t"] * s["hc"] * s["d"]))
