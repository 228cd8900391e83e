"""What the command-line runners share: the checkpoint to run (a preset's random one, cached), the random
prompt, the backend and thread setup, and the numeric bounds of their common flags."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["cache_dir", "checkpoint_bytes", "resolve_checkpoint", "make_prompt", "prepare_backend", "set_threads",
           "experts_fp8", "backend_gaps", "backend_scope", "kernel_private_pages", "MAX_POSITIONS", "MAX_BATCH"]

DEFAULT_WEIGHT_SEED = 0
MAX_RANDOM_BYTES = 4 << 30

#: upper bounds of the flags several runners take
MAX_POSITIONS = 1 << 24          # --prompt-len, --max-new-tokens, --shared-prefix
MAX_BATCH = 1024                 # --batch

_KIND_BYTES = {"f32": 4, "bf16": 2, "fp8": 1, "fp8_scale": 1, "fp4": 1, "fp4_scale": 1, "i32": 4, "table": 1,
               "table_scale": 1}

def checkpoint_bytes(cfg) -> int:
    """Bytes of the checkpoint of ``cfg`` as `write_random_checkpoint` stores it."""
    from v4hal.model.spec import checkpoint_spec

    total = 0
    for s in checkpoint_spec(cfg).values():
        n = 1
        for d in s.shape:
            n *= d
        total += n * _KIND_BYTES[s.kind]
    return total


def cache_dir() -> Path:
    """Folder of generated checkpoints: ``$V4HAL_CACHE_DIR`` or ``~/.cache/v4hal``."""
    return Path(os.environ.get("V4HAL_CACHE_DIR") or Path.home() / ".cache" / "v4hal")


def resolve_checkpoint(model: str | None, checkpoint: str | None, quiet: bool = False) -> Path:
    """The checkpoint directory to load: ``checkpoint`` if given, else the cached random one of preset
    ``model`` (written on first use, atomically, and rewritten if its config.json is stale)."""
    from v4hal.hal.errors import RangeError
    from v4hal.model.config import ModelConfig
    from v4hal.model.random_checkpoint import write_random_checkpoint

    if checkpoint:
        path = Path(checkpoint)
        if not path.exists():
            raise RangeError(f"--checkpoint: {path} does not exist")
        return path
    if not model:
        raise RangeError("give --model PRESET (e.g. v4-mini) or --checkpoint DIR")
    cfg = ModelConfig.preset(model)
    target = cache_dir() / model
    cfg_file = target / "config.json"
    if cfg_file.exists():
        try:
            if json.loads(cfg_file.read_text()) == cfg.to_dict() and any(target.glob("*.safetensors")):
                return target
        except json.JSONDecodeError:
            pass
    size = checkpoint_bytes(cfg)
    if size > MAX_RANDOM_BYTES:
        raise RangeError(f"--model {model}: a random checkpoint of this preset would take {size / 2**30:.0f} GiB; "
                         f"give --checkpoint DIR with real weights (random ones are written up to "
                         f"{MAX_RANDOM_BYTES / 2**30:.0f} GiB)")
    if not quiet:
        print(f"writing a random {model} checkpoint (seed {DEFAULT_WEIGHT_SEED}) to {target}", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model}-", dir=target.parent))
    try:
        write_random_checkpoint(cfg, tmp, seed=DEFAULT_WEIGHT_SEED)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def make_prompt(batch: int, prompt_len: int, vocab: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """``[batch, prompt_len]`` random token ids (int64) from ``seed``."""
    from v4hal.hal.errors import RangeError

    if batch < 1 or prompt_len < 1:
        raise RangeError(f"--batch and --prompt-len must be >= 1, got {batch}, {prompt_len}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)


def prepare_backend(backend: str | None, device: str) -> None:
    """Triton on the CPU runs only under its interpreter: switch it on before Triton is imported."""
    if backend == "triton" and device.startswith("cpu") and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            return
        os.environ["TRITON_INTERPRET"] = "1"
        print("note: --backend triton on the CPU runs the Triton interpreter (TRITON_INTERPRET=1); "
              "its timings say nothing about GPU speed", file=sys.stderr)


def backend_gaps(backend: str | None, note: bool = True) -> list[str]:
    """The ops ``backend`` (``--backend``) has no implementation of at all (Triton: V4's
    ``compressor_ragged``), which `backend_scope` runs on the reference backend; ``note``: say so on stderr. Empty for
    None, the reference, or a backend that cannot load here (its strict override then says why at the first
    op)."""
    if not backend or backend == "reference":
        return []
    from v4hal.hal import registry

    if backend not in registry.BACKENDS or registry.ensure_loaded(backend) is not None:
        return []
    gaps = sorted(set(registry.OPS) - set(registry.declarations(backend)))
    if gaps and note:
        print(f"note: --backend {backend} has no implementation of {', '.join(gaps)}: "
              f"{'that op runs' if len(gaps) == 1 else 'those ops run'} on the reference backend", file=sys.stderr)
    return gaps


def backend_scope(backend: str | None, gaps: Sequence[str] = ()) -> contextlib.AbstractContextManager:
    """``--backend NAME``: every op on that backend (`v4hal.use_backend`, strict: a call it cannot serve raises),
    except ``gaps`` (`backend_gaps`), which run on the reference; no override for None."""
    if not backend:
        return contextlib.nullcontext()
    import v4hal

    return v4hal.use_backend(backend, **dict.fromkeys(gaps, "reference"))


def kernel_private_pages(model: torch.nn.Module, backend: str | None) -> None:
    """With a forced kernel backend on the CPU (Triton under its interpreter), give ``model``'s private pool
    (`V4Model.forward`) the device's serving layouts (`v4hal.serve.cache_layouts`: quantized pages, which the
    paged kernels decode) in place of the CPU's bf16 pages, which only the reference reads (the Triton indexer
    takes FP4 or FP8 keys). Both store the model's values exactly, so the logits do not change. Left as it is
    elsewhere, and where those layouts do not hold the config's entries."""
    if backend in (None, "reference") or model.device.type != "cpu":
        return
    from v4hal.model.caches import cache_layouts, compressed_layout
    from v4hal.ops.paged import PAGED_LAYOUTS
    from v4hal.serve.pool import layout_problem

    cfg = model.config
    attn, idx = cache_layouts(model.device, cfg)
    widths = ((attn, cfg.head_dim), (compressed_layout(cfg, attn), cfg.head_dim), (idx, cfg.index_head_dim))
    if any(PAGED_LAYOUTS[lay].dim_problem(d) for lay, d in widths) or layout_problem(cfg, attn, idx) \
            or (attn == "model1_fp8" and cfg.rope_head_dim != 64):
        return
    model.private_layouts = (attn, idx)


def set_threads(threads: int | None, checkpoint: Path, device: str) -> None:
    """``torch.set_num_threads``: the given count, else 1 for small models on the CPU."""
    if threads:
        torch.set_num_threads(threads)
        return
    if not device.startswith("cpu"):
        return
    try:
        from v4hal.model.config import ModelConfig

        if ModelConfig.from_json(checkpoint).dim <= 1024:
            torch.set_num_threads(1)
    except Exception:          # unreadable config: loading reports it properly
        pass


def experts_fp8(choice: str, device: str) -> bool:
    """``--experts``: FP8 routed experts when asked, or by default (``auto``) on the CPU."""
    return choice == "fp8" or (choice == "auto" and device.startswith("cpu"))


