"""`v4hal run --model v4-mini` against the public DeepSeek-V4 ``inference/model.py`` on the CPU.

The public code is not part of this repository: fetch it yourself (DeepSeek's DeepSeek-V4
``inference/model.py``) and pass its path with ``--public``. Its TileLang kernels do not run on
a CPU; this driver gives it plain-PyTorch stand-ins written here (``STANDINS``: act_quant,
fp4_act_quant, fp8_gemm, fp4_gemm, sparse_attn, hc_split_sinkhorn, hadamard_transform), loaded
as the module ``kernel`` that model.py imports, from a temporary folder.

Both run the same checkpoint (the cached random v4-mini of ``v4hal run``; the public model
loads the same ``model0-mp1.safetensors``), the same prompt (``--seed``), greedy decoding of
``--max-new-tokens`` tokens, the same thread count, alternating ``--repeats`` times; the best
run of each is reported. Prefill time covers the first forward pass (which yields the first
token), decode time the remaining one-token steps: the definitions of ``v4hal run``, whose own
``run()`` measures the v4hal side.

    python bench/compare_public_cpu.py --public /tmp/pub/model.py --prompt-len 64 --max-new-tokens 16

With ``--cpu-time`` the v4hal side is ``V4Model.forward`` on a model loaded once (not ``v4hal run``),
and both sides are measured as CPU time (``time.process_time``): best of ``--repeats`` alternated runs,
printed with the v4hal/public speed ratios (> 1: v4hal faster).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

STANDINS = '''
"""Plain-PyTorch stand-ins for the public V4 TileLang kernels (same signatures; CPU comparison)."""
import torch

_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _pow2_ceil(s):
    return torch.exp2(torch.ceil(torch.log2(s)))


def act_quant(x, block_size=128, scale_fmt=None, scale_dtype=torch.float32, inplace=False):
    xb = x.float().unflatten(-1, (-1, block_size))
    s = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448.0
    if scale_fmt is not None:
        s = _pow2_ceil(s)
    y = (xb / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    if inplace:
        x.copy_((y.float() * s).flatten(-2).to(x.dtype))
        return x
    return y.flatten(-2), s.squeeze(-1).to(scale_dtype)


def _e2m1(v):
    d = (v.abs().unsqueeze(-1) - _GRID).abs()
    i = d.argmin(-1)
    j = (i + 1).clamp_max(7)
    tie = (d.gather(-1, j.unsqueeze(-1)) == d.gather(-1, i.unsqueeze(-1))).squeeze(-1) & (j % 2 == 0) & (j != i)
    i = torch.where(tie, j, i)
    return _GRID[i] * torch.sign(v), i + 8 * (v < 0).long()


def fp4_act_quant(x, block_size=32, inplace=False):
    xb = x.float().unflatten(-1, (-1, block_size))
    s = _pow2_ceil(xb.abs().amax(-1, keepdim=True).clamp_min(6 * 2.0 ** -126) / 6.0)
    q, codes = _e2m1((xb / s).clamp(-6.0, 6.0))
    if inplace:
        x.copy_((q * s).flatten(-2).to(x.dtype))
        return x
    codes = codes.flatten(-2)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed.view(torch.float4_e2m1fn_x2), s.squeeze(-1).to(torch.float8_e8m0fnu)


def fp8_gemm(a, a_s, b, b_s, scale_dtype=torch.float32):
    n, k = b.shape
    af = (a.float().unflatten(-1, (-1, 128)) * a_s.float().unsqueeze(-1)).flatten(-2)
    sb = b_s.float().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return (af @ (b.float() * sb).T).to(torch.get_default_dtype())


def fp4_gemm(a, a_s, b, b_s, scale_dtype=torch.float32):
    af = (a.float().unflatten(-1, (-1, 128)) * a_s.float().unsqueeze(-1)).flatten(-2)
    u = b.view(torch.uint8)
    codes = torch.stack([u & 0xF, u >> 4], dim=-1).flatten(-2).long()
    bf = (_E2M1[codes].unflatten(-1, (-1, 32)) * b_s.float().unsqueeze(-1)).flatten(-2)
    return (af @ bf.T).to(torch.get_default_dtype())


def sparse_attn(q, kv, attn_sink, topk_idxs, softmax_scale):
    b, s, h, d = q.shape
    valid = topk_idxs != -1
    rows = kv[torch.arange(b).view(b, 1, 1), topk_idxs.clamp_min(0).long()].float()
    sc = torch.einsum("bshd,bskd->bshk", q.float(), rows) * softmax_scale
    sc = sc.masked_fill(~valid.unsqueeze(2), float("-inf"))
    m = torch.maximum(sc.amax(-1), attn_sink.view(1, 1, h))
    p = torch.exp(sc - m.unsqueeze(-1))
    o = torch.einsum("bshk,bskd->bshd", p, rows) / (p.sum(-1) + torch.exp(attn_sink.view(1, 1, h) - m)).unsqueeze(-1)
    return o.to(q.dtype)


def hc_split_sinkhorn(mixes, hc_scale, hc_base, hc_mult=4, sinkhorn_iters=20, eps=1e-6):
    hc = hc_mult
    pre = torch.sigmoid(mixes[..., :hc] * hc_scale[0] + hc_base[:hc]) + eps
    post = 2 * torch.sigmoid(mixes[..., hc:2 * hc] * hc_scale[1] + hc_base[hc:2 * hc])
    comb = (mixes[..., 2 * hc:].unflatten(-1, (hc, hc)) * hc_scale[2] + hc_base[2 * hc:].view(hc, hc)).softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def hadamard_transform(x, scale=1.0):
    d = x.shape[-1]
    y = x.float().reshape(-1, d)
    h = 1
    while h < d:
        v = y.view(-1, d // (2 * h), 2, h)
        y = torch.stack((v[:, :, 0] + v[:, :, 1], v[:, :, 0] - v[:, :, 1]), dim=2).view(-1, d)
        h *= 2
    return (y * scale).view(x.shape).to(x.dtype)
'''


def load_public(model_py: Path, ckpt: Path):
    """Import the public model.py next to the stand-in ``kernel`` module and load ``ckpt`` into it."""
    from safetensors.torch import load_file

    tmp = Path(tempfile.mkdtemp(prefix="v4pub-"))
    shutil.copy(model_py, tmp / "model.py")
    (tmp / "kernel.py").write_text(STANDINS)
    sys.path.insert(0, str(tmp))
    try:
        spec = importlib.util.spec_from_file_location("v4_public_model", tmp / "model.py")
        pub = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(pub)
    finally:
        sys.path.remove(str(tmp))
    cfg = json.loads((ckpt / "config.json").read_text())
    args = pub.ModelArgs(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()
                            if k in pub.ModelArgs.__dataclass_fields__})
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = pub.Transformer(args)
        state = load_file(str(ckpt / "model0-mp1.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
    finally:
        torch.set_default_dtype(prev)
    # the MTP block shares embed/head with the main model (the public converter drops its copies)
    missing = [m for m in missing if not m.startswith("mtp.") or not m.endswith(("embed.weight", "head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"public model does not take this checkpoint: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    shutil.rmtree(tmp, ignore_errors=True)
    return model.eval()


def run_public(model, prompt: torch.Tensor, n: int) -> dict:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)          # as the public generate.py sets it
    try:
        with torch.inference_mode():
            c0, t0 = time.process_time(), time.perf_counter()
            logits = model(prompt, 0)
            tok = logits.argmax(-1)
            t1, c1 = time.perf_counter(), time.process_time()
            toks = [tok]
            for i in range(1, n):
                tok = model(tok.unsqueeze(1), prompt.shape[1] + i - 1).argmax(-1)
                toks.append(tok)
            t2, c2 = time.perf_counter(), time.process_time()
    finally:
        torch.set_default_dtype(prev)
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "prefill_cpu_s": c1 - c0, "decode_cpu_s": c2 - c1,
            "tokens": torch.stack(toks, 1).tolist()}


def graph_cpu(public, ckpt: Path, prompt: torch.Tensor, n: int, repeats: int, experts_fp8: bool) -> dict:
    """Best-of-``repeats`` CPU seconds ``{"public" | "v4hal": {"prefill_cpu_s", "decode_cpu_s"}}``: the public model
    and ``V4Model.forward`` alternated, prefill = the first forward, decode = the ``n - 1`` one-token steps."""
    from v4hal.model import V4Model

    model = V4Model.from_pretrained(ckpt, experts_fp8=experts_fp8)

    def run_v4hal() -> dict:
        with torch.inference_mode():
            c0 = time.process_time()
            tok = model(prompt, 0).argmax(-1)
            c1 = time.process_time()
            for i in range(1, n):
                tok = model(tok.unsqueeze(1), prompt.shape[1] + i - 1).argmax(-1)
            c2 = time.process_time()
        return {"prefill_cpu_s": c1 - c0, "decode_cpu_s": c2 - c1}

    best = {name: {"prefill_cpu_s": float("inf"), "decode_cpu_s": float("inf")} for name in ("public", "v4hal")}
    for _ in range(repeats):
        for name, fn in (("public", lambda: run_public(public, prompt, n)), ("v4hal", run_v4hal)):
            r = fn()
            for key in ("prefill_cpu_s", "decode_cpu_s"):
                best[name][key] = min(best[name][key], r[key])
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--public", required=True, type=Path, help="path of the public inference/model.py")
    ap.add_argument("--model", default="v4-mini")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--experts", choices=("auto", "checkpoint", "fp8"), default="auto")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu-time", action="store_true",
                    help="v4hal side = V4Model.forward on a model loaded once; CPU time of both sides and their ratios")
    a = ap.parse_args()

    from v4hal.apps.common import experts_fp8, make_prompt, resolve_checkpoint
    from v4hal.apps.run import run as v4hal_run

    torch.set_num_threads(a.threads)
    ckpt = resolve_checkpoint(a.model, None)
    public = load_public(a.public, ckpt)
    prompt = make_prompt(a.batch, a.prompt_len, 512 if a.model == "v4-mini" else 129280, a.seed, "cpu")
    if a.cpu_time:
        best = graph_cpu(public, ckpt, prompt, a.max_new_tokens, a.repeats, experts_fp8(a.experts, "cpu"))
        pub, v4 = best["public"], best["v4hal"]
        print(f"CPU time, best of {a.repeats} ({a.threads} thread(s), batch {a.batch}, prompt {a.prompt_len}, "
              f"{a.max_new_tokens - 1} decode steps):")
        for name, b in best.items():
            print(f"{name:8s} prefill {b['prefill_cpu_s'] * 1e3:8.1f} ms  decode {b['decode_cpu_s'] * 1e3:8.1f} ms")
        total = (pub["prefill_cpu_s"] + pub["decode_cpu_s"]) / (v4["prefill_cpu_s"] + v4["decode_cpu_s"])
        print(f"v4hal/public speed: prefill {pub['prefill_cpu_s'] / v4['prefill_cpu_s']:.3f}x  "
              f"decode {pub['decode_cpu_s'] / v4['decode_cpu_s']:.3f}x  total {total:.3f}x")
        if a.json:
            Path(a.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": best},
                                               indent=1))
        return 0
    run_args = argparse.Namespace(model=a.model, checkpoint=None, backend=None, device="cpu",
                                  prompt_len=a.prompt_len, max_new_tokens=a.max_new_tokens, batch=a.batch,
                                  seed=a.seed, threads=a.threads, experts=a.experts, json=None, no_progress=True)
    best: dict[str, dict] = {}
    for rep in range(a.repeats):
        for name in ("public", "v4hal"):
            if name == "public":
                r = run_public(public, prompt, a.max_new_tokens)
            else:
                c0 = time.process_time()
                r = v4hal_run(run_args)
                r["cpu_s"] = time.process_time() - c0
            b = best.setdefault(name, {"prefill_s": float("inf"), "decode_s": float("inf")})
            b["prefill_s"], b["decode_s"] = min(b["prefill_s"], r["prefill_s"]), min(b["decode_s"], r["decode_s"])
            if "prefill_cpu_s" in r:
                b["prefill_cpu_s"] = min(b.get("prefill_cpu_s", float("inf")), r["prefill_cpu_s"])
                b["decode_cpu_s"] = min(b.get("decode_cpu_s", float("inf")), r["decode_cpu_s"])
            b["tokens"] = r["tokens"]
            print(f"repeat {rep} {name:7s} prefill {r['prefill_s']:.3f} s  decode {r['decode_s']:.3f} s", flush=True)
    steps = a.max_new_tokens - 1
    print(f"\n{'':8s}{'prefill tok/s':>15s}{'decode tok/s':>15s}   (best of {a.repeats}, {a.threads} thread(s), "
          f"batch {a.batch}, prompt {a.prompt_len}, {a.max_new_tokens} new tokens)")
    for name, b in best.items():
        b["prefill_tok_s"] = a.batch * a.prompt_len / b["prefill_s"]
        b["decode_tok_s"] = a.batch * steps / b["decode_s"] if steps else None
        dec = f"{b['decode_tok_s']:15.2f}" if steps else f"{'n/a':>15s}"
        print(f"{name:8s}{b['prefill_tok_s']:15.1f}{dec}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": best},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
