"""The DeepSeek-V4 model on v4hal ops: mHC blocks, the mHC head, the MTP block, greedy generation.

Computation of the public ``inference/model.py`` ``Block`` / ``ParallelHead`` / ``MTPBlock`` /
``Transformer``:

* the residual stream is ``hc_mult`` copies ``[b, s, hc, dim]`` (bf16); before each sub-layer
  ``hc_pre`` collapses them (RMS-scaled mixes, Sinkhorn split), after it ``hc_post`` expands
  the output back and mixes the copies;
* sub-layers: ``attn_norm`` + `Attention`, ``ffn_norm`` + `MoE`;
* head: ``hc_head`` collapses the copies with its ``pre`` weights, ``norm``, then the fp32
  vocabulary projection of the last position (``grouped_gemm`` with one group);
* MTP block ``j``: ``e_proj(enorm(embed(next_ids))) + h_proj(hnorm(h))`` through a full block,
  then its own ``hc_head`` and ``norm`` and the shared head.

Glue in plain torch: the embedding lookup (``F.embedding``), the copy of the embedding into
``hc`` residual copies, slicing of the last position, ``argmax`` in `generate`.

DeepSeek-V4.1 (``cfg.is_v41``), the same graph with: lagged mHC (each site's ``pre`` mix collapses the
streams at the next site: attention with the previous FFN's, one-hot on stream 0 before layer 0, the FFN
with attention's, the head with the last FFN's, through ``hc_mix`` / ``hc_collapse``; V4.1 has no
``hc_head``), the Engram memory before the layers of ``cfg.engram_layers`` (`v4hal.model.engram`, its rows
hashed once per step), the V4.1 router, FP8 32x32 / FP4-per-16 weights, and no MTP block (its DSpark draft
stages are not run).

One graph path: every forward is a `Step` over paged caches (`v4hal.model.step`).
`V4Model.forward_batch` runs many requests in one call, each at its own position (a prefill chunk of any
length or a decode token), on the caches of a pool (`v4hal.serve.CachePool`, or any `CacheSource`);
`V4Model.mtp_forward_batch` runs the MTP block on the same step. `V4Model.forward` / `forward_full` /
`mtp_forward` are the same step over the model's own `PrivatePool`: ``input_ids [b, s]`` are ``b``
sequences, each continuing at ``start_pos`` (``0`` starts new sequences; a later call continues at any
position up to the next one, with any number of tokens). A request's logits are the same bits whichever
way its tokens are cut into calls or batched with others (the reference backend's products do not depend
on the batch: see `v4hal.backends.reference._rows`).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

import v4hal
from v4hal.hal.errors import RangeError, ShapeError, V4HalError
from v4hal.ops.gemm import prepare_gemm_weight
from v4hal.ops.moe import prepare_moe_experts

from .attention import Attention
from .attention_v41 import V41Attention
from .batch import ForwardBatch
from .caches import CacheSource, PrivatePool
from .config import ModelConfig
from .engram import Engram, EngramHash
from .layers import FusedLinear, Linear, RMSNorm, float_gemm, precompute_freqs_cis
from .moe import Experts, MoE, SharedExpert
from .spec import is_engram_table, linear_kind
from .step import Step

__all__ = ["Block", "MTPBlock", "V4Model", "ForwardResult", "BatchOutput"]

META = torch.device("meta")
_SCALE_DTYPES = (torch.float32, torch.float8_e8m0fnu)


def _same_kind(leaf: str, want: torch.dtype, got: torch.dtype) -> bool:
    """Buffer dtypes must match, except FP8 block scales, which may be fp32 or e8m0."""
    return want == got or (leaf.endswith("scale") and want in _SCALE_DTYPES and got in _SCALE_DTYPES)


class Block(nn.Module):
    """One transformer block with hyper-connections: ``[b, s, hc, dim]`` -> same."""

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.norm_eps, self.hc_mult = cfg.norm_eps, cfg.hc_mult
        self.hc_iters, self.hc_eps = cfg.hc_sinkhorn_iters, cfg.hc_eps
        self._hc_args = dict(norm_eps=cfg.norm_eps, hc_mult=cfg.hc_mult, sinkhorn_iters=cfg.hc_sinkhorn_iters,
                             hc_eps=cfg.hc_eps)
        self.attn = V41Attention(layer_id, cfg) if cfg.is_v41 else Attention(layer_id, cfg)
        self.ffn = MoE(layer_id, cfg)
        #: V4.1: the Engram memory applied to the streams before this block (None elsewhere)
        self.engram = Engram(layer_id, cfg) if cfg.is_v41 and layer_id in cfg.engram_layers else None
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        mix, hc_dim = (2 + cfg.hc_mult) * cfg.hc_mult, cfg.hc_mult * cfg.dim
        for part in ("attn", "ffn"):
            self.register_buffer(f"hc_{part}_fn", torch.empty(mix, hc_dim, device=META))
            self.register_buffer(f"hc_{part}_base", torch.empty(mix, device=META))
            self.register_buffer(f"hc_{part}_scale", torch.empty(3, device=META))

    def forward(self, h: torch.Tensor, step: Step, input_ids: torch.Tensor) -> torch.Tensor:
        """``h [1, T, hc, dim]`` (bf16) of the step's ``T`` tokens, ``input_ids [1, T]`` -> the same shape."""
        x, post, comb = v4hal.hc_pre(h, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, **self._hc_args)
        x = self.attn(self.attn_norm(x), step)
        h = v4hal.hc_post(x, h, post, comb)
        x, post, comb = v4hal.hc_pre(h, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, **self._hc_args)
        x = self.ffn(self.ffn_norm(x), input_ids)
        return v4hal.hc_post(x, h, post, comb)

    def forward_lagged(self, h: torch.Tensor, pre: torch.Tensor, step: Step, input_ids: torch.Tensor,
                       rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V4.1's block: ``h [1, T, hc, dim]`` (bf16) and the previous site's pre mix ``pre [1, T, hc]``
        (fp32) -> (the new streams, this block's FFN pre mix, which the next site collapses with). ``rows``: the
        step's Engram rows of this layer (`EngramHash.rows`) when it has an Engram memory."""
        if self.engram is not None:
            h = self.engram(h, rows)
        pre_attn, post, comb = v4hal.hc_mix(h, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base,
                                            **self._hc_args)
        x = self.attn(self.attn_norm(v4hal.hc_collapse(h, pre)), step)
        h = v4hal.hc_post(x, h, post, comb)
        pre_ffn, post, comb = v4hal.hc_mix(h, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, **self._hc_args)
        x = self.ffn(self.ffn_norm(v4hal.hc_collapse(h, pre_attn)), input_ids)
        return v4hal.hc_post(x, h, post, comb), pre_ffn


#: what `V4Model.mtp_forward` / `mtp_forward_batch` say for a DeepSeek-V4.1 model
DSPARK_REFUSAL = "DeepSeek-V4.1's DSpark draft stages are not supported"


class _Head(nn.Module):
    """The vocabulary projection: ``weight [vocab, dim]`` fp32 (the public head keeps fp32)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(cfg.vocab_size, cfg.dim, device=META))


class _Embed(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(cfg.vocab_size, cfg.dim, dtype=torch.bfloat16, device=META))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _register_hc_head(m: nn.Module, cfg: ModelConfig) -> None:
    m.register_buffer("hc_head_fn", torch.empty(cfg.hc_mult, cfg.hc_mult * cfg.dim, device=META))
    m.register_buffer("hc_head_base", torch.empty(cfg.hc_mult, device=META))
    m.register_buffer("hc_head_scale", torch.empty(1, device=META))


class MTPBlock(Block):
    """Multi-token-prediction block: predicts token ``t+2`` from the main hidden state at ``t`` and token ``t+1``."""

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__(layer_id, cfg)
        lin = linear_kind(cfg)
        self.e_proj = Linear(cfg.dim, cfg.dim, lin, cfg)
        self.h_proj = Linear(cfg.dim, cfg.dim, lin, cfg)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        _register_hc_head(self, cfg)

    def mix_inputs(self, e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """e ``[b, s, dim]`` token embeddings, h ``[b, s, hc, dim]`` main hidden -> block input ``[b, s, hc, dim]``."""
        return self.e_proj(self.enorm(e)).unsqueeze(2) + self.h_proj(self.hnorm(h))


class ForwardResult:
    """Output of `V4Model.forward_full`: last-position logits, per-layer hidden states, final stream."""

    __slots__ = ("logits", "hidden", "final")

    def __init__(self, logits: torch.Tensor, hidden: list[torch.Tensor], final: torch.Tensor) -> None:
        self.logits, self.hidden, self.final = logits, hidden, final


class BatchOutput:
    """Output of `V4Model.forward_batch`: logits ``[B, vocab]`` (fp32, each request's last new token), the
    final stream ``[1, T, hc, dim]`` and the `Step` (read by `V4Model.mtp_forward_batch`)."""

    __slots__ = ("logits", "final", "step")

    def __init__(self, logits: torch.Tensor, final: torch.Tensor, step: Step) -> None:
        self.logits, self.final, self.step = logits, final, step


class V4Model(nn.Module):
    """DeepSeek-V4 (inference): ``model(input_ids [b, s], start_pos) -> logits [b, vocab]`` (fp32, last position).

    Build with `V4Model.from_pretrained` (a checkpoint directory) or `V4Model.from_tensors`.
    """

    def __init__(self, cfg: ModelConfig, experts_fp8: bool = False, *, engram_on_device: bool = False) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.experts_fp8 = experts_fp8
        #: V4.1: keep the Engram tables on the model's device (default: in host memory, see `v4hal.model.engram`)
        self.engram_on_device = bool(engram_on_device)
        #: V4.1: the Engram hash state (`bind_vocab_map`); None until bound
        self.engram_hash: EngramHash | None = None
        self.embed = _Embed(cfg)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = _Head(cfg)
        if not cfg.is_v41:
            _register_hc_head(self, cfg)
        self.mtp = nn.ModuleList(MTPBlock(cfg.n_layers + j, cfg) for j in range(cfg.n_mtp_layers))
        #: next position of the running sequences of `forward` (None: none yet) and of each MTP block's
        self._next_pos: int | None = None
        self._mtp_next_pos: list[int | None] = [None] * cfg.n_mtp_layers
        self._pool: PrivatePool | None = None       # the caches of `forward`'s sequences
        #: (attention, indexer) page layouts of `forward`'s private pool; None: `private_layouts` of the device
        #: (takes effect when sequences next start)
        self.private_layouts: tuple[str, str] | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], device: torch.device | str | None = None, *,
                        experts_fp8: bool = False, mmap: bool = False, engram_on_device: bool = False,
                        prepare_weights: bool | None = None) -> "V4Model":
        """Load a checkpoint directory (inference or Hugging Face layout; see `v4hal.model.checkpoint`).

        ``experts_fp8``: re-encode FP4 routed experts as FP8 at load when lossless, so the shared
        expert joins them in one ``moe_experts`` call (faster on the reference backend, 2x the
        expert bytes). Results equal the FP4 path up to fp32 summation order.

        ``mmap``: False (default): the model owns its weights; the checkpoint files may change or
        go once this returns. True (CPU only): weights that need no conversion stay in the file's
        memory map (little anonymous memory for huge checkpoints); the files must then not change
        while the model lives: truncating one kills the process (SIGBUS) at the next forward,
        rewriting one changes the weights silently.

        DeepSeek-V4.1 with Engram layers: the folder's ``tokenizer.json`` gives the Engram vocabulary map
        (`v4hal.model.tokenizer`); the Engram tables stay in host memory unless ``engram_on_device``. On an
        accelerator (where weights are read through the memory map) or with ``mmap=True`` a host table stays in
        the file's memory map, with the same hazard: the files must not change while the model lives.
        ``prepare_weights``: run `prepare_weights` once loaded (the reference backend then keeps fp32 copies
        of the quantized GEMM weights, 4x their FP8 bytes, and skips decoding them in every call). Default
        (None): True, except with ``mmap``, whose point is little memory.
        """
        from .checkpoint import read_for_device

        cfg, tensors = read_for_device(path, device, mmap=mmap, engram_device=None if engram_on_device else "cpu")
        vocab_map = None
        if cfg.is_v41 and cfg.engram_layers:
            from .tokenizer import load_vocab_map
            vocab_map = load_vocab_map(path, cfg)
        model = cls.from_tensors(cfg, tensors, device, experts_fp8=experts_fp8, engram_on_device=engram_on_device,
                                 prepare_weights=not mmap if prepare_weights is None else prepare_weights)
        if vocab_map is not None:
            model.bind_vocab_map(vocab_map)
        return model.eval()

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                     device: torch.device | str | None = None, *, experts_fp8: bool = False,
                     engram_on_device: bool = False, prepare_weights: bool = True) -> "V4Model":
        """Build from ``(model name, tensor)`` pairs already in the model's dtypes (see `checkpoint`);
        ``prepare_weights``: run `prepare_weights` once built. A V4.1 model with Engram layers then needs
        `bind_vocab_map` before it runs."""
        if not isinstance(prepare_weights, bool):
            raise RangeError(f"V4Model: prepare_weights must be True or False, got {prepare_weights!r}")
        model = cls(cfg, experts_fp8=experts_fp8, engram_on_device=engram_on_device)
        model.assign(tensors, device)
        model.finalize(device)
        if prepare_weights:
            model.prepare_weights()
        return model

    def _resolve(self, name: str) -> tuple[nn.Module, str, int | None]:
        """Model location of a checkpoint name: (module, buffer name, expert row or None)."""
        parts = name.split(".")
        expert = None
        if "experts" in parts and "shared_experts" not in parts:
            i = parts.index("experts")
            expert = int(parts[i + 1])
            which = parts[i + 2]
            leaf = which if parts[-1] == "weight" else f"{which}_scale"
            parts = parts[:i + 1] + [leaf]
        mod: nn.Module = self
        for p in parts[:-1]:
            mod = getattr(mod, p)
        return mod, parts[-1], expert

    def bind_vocab_map(self, vocab_map: torch.Tensor) -> None:
        """V4.1: the tokenizer's Engram vocabulary map, int64 ``[vocab_size]`` (`v4hal.model.tokenizer`), from
        which the model builds its Engram hash constants."""
        self.engram_hash = EngramHash(self.config, vocab_map)

    def assign(self, tensors: Iterable[tuple[str, torch.Tensor]], device: torch.device | str | None = None) -> None:
        """Place checkpoint tensors (checkpoint names, model dtypes) into the model's buffers (the Engram tables
        stay in host memory unless ``engram_on_device``)."""
        for name, t in tensors:
            mod, leaf, expert = self._resolve(name)
            cur = getattr(mod, leaf)
            if expert is None:
                if tuple(cur.shape) != tuple(t.shape) or not _same_kind(leaf, cur.dtype, t.dtype):
                    raise ShapeError(f"V4Model: {name} must be {cur.dtype} {list(cur.shape)}, got {t.dtype} "
                                     f"{list(t.shape)}")
                host = is_engram_table(name) and not self.engram_on_device
                to = "cpu" if host else device
                mod._buffers[leaf] = t.to(to) if to is not None else t
            else:
                if cur.is_meta:
                    cur = torch.empty(cur.shape, dtype=cur.dtype, device=device or t.device)
                    mod._buffers[leaf] = cur
                if tuple(cur.shape[1:]) != tuple(t.shape) or not _same_kind(leaf, cur.dtype, t.dtype):
                    raise ShapeError(f"V4Model: {name} must be {cur.dtype} {list(cur.shape[1:])}, got {t.dtype} "
                                     f"{list(t.shape)}")
                if cur.dtype != t.dtype:       # scales: keep the dtype the checkpoint gives
                    cur = cur.to(t.dtype)
                    mod._buffers[leaf] = cur
                cur[expert] = t.to(cur.device)

    def finalize(self, device: torch.device | str | None = None) -> None:
        """Compute the rotary tables and check that every weight was filled."""
        missing = [n for n, b in self.named_buffers() if b.is_meta and not n.endswith("freqs_cis")]
        if missing:
            raise ShapeError(f"V4Model: weights never loaded: {', '.join(missing[:8])}"
                             + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
        dev = self.embed.weight.device if device is None else torch.device(device)
        for block in [*self.layers, *self.mtp]:
            block.attn.freqs_cis = precompute_freqs_cis(self.config, bool(block.attn.ratio), dev)
            block.attn.prepare()
            block.ffn.prepare(self.experts_fp8)

    def prepare_weights(self) -> None:
        """Hand the quantized GEMM weights, as the layers pass them, to the backends serving their ops on this
        device, once (``prepare_gemm_weight`` for the FP8 linears, ``prepare_moe_experts`` for the expert
        stacks): the reference backend keeps fp32 copies (4x an FP8 weight's bytes, while the weights live) and
        then skips decoding them in every call; results are unchanged. Linears that never reach ``fp8_gemm``
        are left out: the parts of a fused linear (they run through the fused weight) and the shared expert's
        (``moe_experts`` takes them, as a row of the routed stack or on their own)."""
        skip = {id(p) for m in self.modules() if isinstance(m, FusedLinear) and m.weight is not None
                for p in m._parts}
        skip |= {id(lin) for m in self.modules() if isinstance(m, SharedExpert) for lin in (m.w1, m.w2, m.w3)}
        for m in self.modules():
            if isinstance(m, (Linear, FusedLinear)) and m.kind == "fp8" and m.weight is not None \
                    and id(m) not in skip:
                prepare_gemm_weight(m.weight, m.scale)
            elif isinstance(m, Experts) and m.w1.dtype in (torch.float8_e4m3fn, torch.uint8):
                prepare_moe_experts(m.w1, m.w2, m.w3, w_scales=(m.w1_scale, m.w2_scale, m.w3_scale))

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    # ------------------------------------------------------------------ forward
    def _head_logits(self, h: torch.Tensor, owner: nn.Module, norm: RMSNorm,
                     pre: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits ``[b, vocab]`` of the last position of ``h [b, s, hc, dim]``; V4.1 collapses the streams
        with the last site's pre mix ``pre [b, s, hc]``, V4 with ``owner``'s ``hc_head``."""
        cfg = self.config
        if pre is not None:
            x = v4hal.hc_collapse(h[:, -1], pre[:, -1])
        else:
            x = v4hal.hc_head(h[:, -1], owner.hc_head_fn, owner.hc_head_scale, owner.hc_head_base,
                              norm_eps=cfg.norm_eps, hc_eps=cfg.hc_eps)    # [b, dim] bf16
        return float_gemm(norm(x).float(), self.head.weight)          # [b, vocab] fp32

    def _private_step(self, op: str, input_ids: torch.Tensor, start_pos: int, expected: int | None,
                      main: bool) -> Step:
        """Check ``input_ids [b, s]`` at ``start_pos`` against the running sequences (next position
        ``expected``), size the private pool and build the step. ``main``: a main-layer call, which may start
        new sequences (``start_pos == 0``); an MTP call runs on the main call's sequences."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ShapeError(f"V4Model.{op}: input_ids must be [b, s], got "
                             f"{list(getattr(input_ids, 'shape', [])) or type(input_ids).__name__}")
        bsz, seqlen = input_ids.shape
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            raise RangeError(f"V4Model.{op}: start_pos must be an int >= 0, got {start_pos!r}")
        if bsz < 1 or seqlen < 1:
            raise RangeError(f"V4Model.{op}: input_ids must hold at least one sequence and one position, got "
                             f"{list(input_ids.shape)}")
        if start_pos + seqlen > self.config.max_seq_len:
            raise RangeError(f"V4Model.{op}: positions up to {start_pos + seqlen} exceed "
                             f"max_seq_len={self.config.max_seq_len}")
        pool = self._pool
        fresh = main and start_pos == 0
        if not fresh:
            if pool is None or not pool.running or self._next_pos is None:
                raise RangeError(f"V4Model.{op}: start_pos {start_pos} continues running sequences; start them with "
                                 f"forward(input_ids, start_pos=0) first")
            if expected is None and start_pos != 0:
                raise RangeError(f"V4Model.{op}: the MTP block's sequences start at start_pos=0, got {start_pos}")
            if expected is not None and start_pos > expected:
                raise RangeError(f"V4Model.{op}: start_pos must continue the running sequences at or before "
                                 f"position {expected}, got {start_pos}")
            if bsz != pool.running:
                raise ShapeError(f"V4Model.{op}: input_ids must hold the {pool.running} running sequences, got {bsz}")
        if pool is None or fresh and self.private_layouts not in (None, (pool.attn_layout, pool.indexer_layout)):
            pool = self._pool = PrivatePool(self.config, self.device, layouts=self.private_layouts)
        pool.ensure(bsz, start_pos + seqlen, keep=not fresh)
        if fresh:
            pool.running = bsz
        ids = input_ids.to(device=self.device, dtype=torch.long)
        return Step.build(self.config, pool.batch(ids, start_pos), pool)

    def _run(self, step: Step, keep_hidden: bool = False
             ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """The main layers over ``step``: the final stream ``[1, T, hc, dim]``, with ``keep_hidden`` each layer's
        output stream, and (V4.1) the last site's pre mix ``[1, T, hc]`` fp32 the head collapses with (V4:
        None). The V4.1 pre mix is carried from site to site here, one-hot on stream 0 before layer 0."""
        cfg = self.config
        ids = step.batch.input_ids.unsqueeze(0)                               # [1, T]
        h = self.embed(ids).unsqueeze(2).repeat(1, 1, cfg.hc_mult, 1)
        hidden: list[torch.Tensor] = []
        pre = None
        if cfg.is_v41:
            pre = torch.zeros(h.shape[:-1], dtype=torch.float32, device=h.device)
            pre[..., 0] = 1.0
            rows = self._engram_rows(step)
        for block in self.layers:
            if pre is None:
                h = block(h, step, ids)
            else:
                h, pre = block.forward_lagged(h, pre, step, ids,
                                              rows[block.engram.index] if block.engram is not None else None)
            if keep_hidden:
                hidden.append(h)
        return h, hidden, pre

    def _engram_rows(self, step: Step) -> list[torch.Tensor]:
        """V4.1: every Engram layer's table rows of the step's tokens (hashed once per step)."""
        if not self.config.engram_layers:
            return []
        if self.engram_hash is None:
            raise V4HalError("V4Model: the Engram layers need the tokenizer's vocabulary map: load the model with "
                             "from_pretrained from a folder holding tokenizer.json, or call "
                             "bind_vocab_map(v4hal.model.tokenizer.load_vocab_map(path, cfg))")
        return self.engram_hash.rows(step.batch)

    @torch.inference_mode()
    def forward_full(self, input_ids: torch.Tensor, start_pos: int = 0, keep_hidden: bool = False) -> ForwardResult:
        """Run the main layers on ``input_ids [b, s]`` (``b`` sequences at positions ``start_pos ..``): logits
        ``[b, vocab]`` of the last position, optionally every layer's output stream ``[b, s, hc, dim]``, and the
        final stream ``[b, s, hc, dim]``. ``start_pos == 0`` starts new sequences; a later call continues the
        running ones at any ``start_pos`` up to their next position, with any number of tokens (a position
        computed again replaces what was cached for it)."""
        step = self._private_step("forward_full", input_ids, start_pos, self._next_pos, main=True)
        bsz, seqlen = input_ids.shape
        h, hidden, pre = self._run(step, keep_hidden)
        shape = (bsz, seqlen, *h.shape[2:])
        final = h.view(shape)
        logits = self._head_logits(final, self, self.norm, None if pre is None else pre.view(shape[:-1]))
        self._next_pos = start_pos + seqlen
        if start_pos == 0:
            self._mtp_next_pos = [None] * len(self.mtp)
        return ForwardResult(logits, [x.view(shape) for x in hidden], final)

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """``input_ids [b, s]`` at positions ``start_pos ..`` -> fp32 logits ``[b, vocab]`` of the last position."""
        return self.forward_full(input_ids, start_pos).logits

    @torch.inference_mode()
    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, start_pos: int = 0, j: int = 0) -> torch.Tensor:
        """MTP block ``j``: main final stream ``hidden [b, s, hc, dim]`` at positions ``start_pos ..`` and the
        tokens that follow them ``next_ids [b, s]`` -> fp32 logits ``[b, vocab]`` (drafts of the token after).
        Runs on the sequences of the last `forward_full` start; continues like it."""
        if self.config.is_v41:
            raise V4HalError(f"V4Model.mtp_forward: {DSPARK_REFUSAL}")
        if not 0 <= j < len(self.mtp):
            raise RangeError(f"V4Model.mtp_forward: j must be in [0, {len(self.mtp)}), got {j}")
        step = self._private_step("mtp_forward", next_ids, start_pos, self._mtp_next_pos[j], main=False)
        if tuple(hidden.shape[:2]) != tuple(next_ids.shape):
            raise ShapeError(f"V4Model.mtp_forward: hidden [b, s, hc, dim] must match next_ids {list(next_ids.shape)}, "
                             f"got {list(hidden.shape)}")
        block = self.mtp[j]
        ids = step.batch.input_ids.unsqueeze(0)
        h = block.mix_inputs(self.embed(ids), hidden.reshape(1, -1, *hidden.shape[2:]))
        h = block(h, step, ids)
        self._mtp_next_pos[j] = start_pos + next_ids.shape[1]
        return self._head_logits(h.view(hidden.shape), block, block.norm)

    # ------------------------------------------------------------------ paged, ragged batches
    def _check_step(self, op: str, batch: object, pool: object) -> list:
        if not isinstance(batch, ForwardBatch):
            raise ShapeError(f"V4Model.{op}: batch must be a v4hal.serve.ForwardBatch, got {type(batch).__name__}")
        if not isinstance(pool, CacheSource) or not pool.allocated:
            raise ShapeError(f"V4Model.{op}: pool must be a v4hal.serve.CachePool with allocated caches, "
                             f"got {type(pool).__name__}")
        if pool.cfg != self.config:
            raise ShapeError(f"V4Model.{op}: pool was built for another config than the model's")
        if batch.block_size != pool.block_size:
            raise ShapeError(f"V4Model.{op}: batch block_size {batch.block_size} != pool block_size "
                             f"{pool.block_size}")
        if batch.block_sizes != pool.block_sizes:
            raise ShapeError(f"V4Model.{op}: batch page sizes per kind {batch.block_sizes} != the pool's "
                             f"{pool.block_sizes}")
        if batch.input_ids.device != self.device or pool.device != self.device:
            raise ShapeError(f"V4Model.{op}: batch ({batch.input_ids.device}) and pool ({pool.device}) must be on "
                             f"the model's device {self.device}")
        # the batch's pages are this pool's, as the batch expects; what it writes is recorded once it has run
        return pool.begin_step(batch, f"V4Model.{op}")

    @torch.inference_mode()
    def forward_batch(self, batch: ForwardBatch, pool: CacheSource) -> BatchOutput:
        """One step of many requests on paged caches: ``batch`` (from ``pool.schedule`` / ``build_batch``,
        or a runtime's own tables via ``ForwardBatch.from_block_tables``) holds each request's new tokens at
        its own positions (a prefill chunk of any length or one decode token); ``pool`` owns the caches (a
        `v4hal.serve.CachePool`, or any `CacheSource`).

        Returns `BatchOutput`: fp32 logits ``[B, vocab]`` of each request's last new token, the final
        stream ``[1, T, hc, dim]`` (what `mtp_forward_batch` reads) and the step. The caller advances the pool
        (``pool.advance_batch(batch)``) once the step is done.
        """
        writes = self._check_step("forward_batch", batch, pool)
        step = Step.build(self.config, batch, pool)
        h, _, pre = self._run(step)
        last = batch.last_token_index
        logits = self._head_logits(h[0, last].unsqueeze(1), self, self.norm,
                                   None if pre is None else pre[0, last].unsqueeze(1))
        pool.end_step(writes)
        return BatchOutput(logits, h, step)

    @torch.inference_mode()
    def mtp_forward_batch(self, out: BatchOutput, next_ids: torch.Tensor, j: int = 0) -> torch.Tensor:
        """MTP block ``j`` on the step of ``out`` (a `forward_batch` result): ``next_ids [T]`` int64 is the
        token after each of the step's tokens (for a request's last new token: the token just chosen) ->
        fp32 logits ``[B, vocab]`` at each request's last new token (drafts of the token after ``next_ids``)."""
        if self.config.is_v41:
            raise V4HalError(f"V4Model.mtp_forward_batch: {DSPARK_REFUSAL}")
        if not 0 <= j < len(self.mtp):
            raise RangeError(f"V4Model.mtp_forward_batch: j must be in [0, {len(self.mtp)}), got {j}")
        t = out.final.shape[1]
        if not isinstance(next_ids, torch.Tensor) or next_ids.dtype != torch.int64 or tuple(next_ids.shape) != (t,):
            raise ShapeError(f"V4Model.mtp_forward_batch: next_ids must be int64 [T] = [{t}], got "
                             f"{getattr(next_ids, 'dtype', type(next_ids).__name__)} "
                             f"{list(getattr(next_ids, 'shape', []))}")
        block = self.mtp[j]
        ids = next_ids.to(self.device).unsqueeze(0)
        h = block.mix_inputs(self.embed(ids), out.final)
        h = block(h, out.step, ids)
        return self._head_logits(h[0, out.step.batch.last_token_index].unsqueeze(1), block, block.norm)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                 on_token: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Greedy decoding: prefill ``prompt_ids [b, s]`` then ``max_new_tokens`` one-token steps.

        Returns int64 ``[b, max_new_tokens]``; after a row emits ``eos_id`` it repeats ``eos_id``.
        ``on_token(step, tokens [b])`` is called after every new token (progress reporting).
        """
        if max_new_tokens < 0:
            raise RangeError(f"V4Model.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.device)
        if prompt_ids.dim() != 2:
            raise ShapeError(f"V4Model.generate: prompt_ids must be [b, s], got {list(prompt_ids.shape)}")
        bsz, plen = prompt_ids.shape
        if plen < 1 or plen + max(max_new_tokens - 1, 0) > self.config.max_seq_len:
            raise RangeError(f"V4Model.generate: the prompt ({plen} tokens) and {max_new_tokens} new tokens must fit "
                             f"in max_seq_len={self.config.max_seq_len} (and the prompt hold >= 1 token)")
        out = torch.empty(bsz, max_new_tokens, dtype=torch.long, device=self.device)
        if max_new_tokens == 0:
            return out
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        logits = self.forward(prompt_ids, 0)
        for step in range(max_new_tokens):
            tok = logits.argmax(dim=-1)
            if eos_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_id), tok)
                done |= tok == eos_id
            out[:, step] = tok
            if on_token is not None:
                on_token(step, tok)
            if step + 1 < max_new_tokens:
                logits = self.forward(tok.unsqueeze(1), plen + step)
        return out
