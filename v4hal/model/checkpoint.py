"""Reading DeepSeek-V4 checkpoints (`read_checkpoint`; `V4Model.from_pretrained` builds the model from
`read_for_device`).

Layouts read:

* **inference** (what the public ``convert.py`` writes and ``generate.py`` loads): a directory
  with the inference ``config.json`` and ``model{rank}-mp{world}.safetensors``, one file per
  model-parallel rank. Tensors split over ranks are joined back along the dimension the public
  converter split them (``embed``, ``head``, ``wq_b``, ``wo_a``, ``attn_sink``,
  ``weights_proj`` on dim 0, ``wo_b`` on dim 1, each FP8 ``.scale`` with its weight); routed
  experts live in the file of their rank; the rest is replicated (rank 0's copy is used).
* **Hugging Face**: ``config.json`` with HF keys, one ``*.safetensors`` file or shards listed
  in ``model.safetensors.index.json``. Names get the public converter's renames (``model.``
  prefix dropped, ``self_attn`` -> ``attn``, ``mlp`` -> ``ffn``, ``weight_scale_inv`` ->
  ``scale``, ``e_score_correction_bias`` -> ``bias``), the MTP copies of the embedding and head
  are skipped (the model shares the main ones) and an FP8 ``wo_a`` is dequantized to bf16.

* **transformers** (``save_pretrained``): for DeepSeek-V4 what transformers 5.23's ``DeepseekV4ForCausalLM``
  writes (``model.`` prefixes, ``model.embed_tokens``, ``model.hc_head.hc_fn``, the attention's ``kv_norm``
  saved as ``attn.norm``, ``tid2eid`` int64, no MTP layers: such a checkpoint is read as the main model,
  ``n_mtp_layers`` 0), for DeepSeek-V4.1 what ``DeepseekV41ForCausalLM`` writes (``model.`` + the hub names,
  ``lm_head``, ``weight_scale_inv``; Engram tables kept in float, which load as the FP8 tables v4hal serves
  when their values lie on that grid); `transformers_rename` / `to_transformers_name`. Told apart from the
  Hugging Face hub layout by its names (``model.embed_tokens`` / ``model.hc_head``; for V4.1 any ``model.``).
* **DeepSeek-V4.1 hub** (the release): composite ``config.json``, shards with an index, the inference names;
  the DSpark draft stages (``mtp.*``), the vision tower (``vision.*``, ``aligner.*``) and the image delimiters
  are skipped (`v41_hub_rename`). Engram tables (`is_engram_table`) stay in host memory (`read_for_device`).

Weights may be bf16, FP8 e4m3 with e8m0 or fp32 ``.scale`` (128x128 blocks), and routed experts
packed FP4 (``I8``/``U8 [N, K/2]`` or safetensors ``F4`` with the logical shape ``[N, K]``) with
e8m0 scales ``[N, K/32]``.

Every header is checked against `spec.checkpoint_spec` before any tensor data is read: a
missing, extra, misshaped or wrongly typed tensor raises a `CheckpointError` naming it with
what was expected and what was found; an unreadable (e.g. truncated) file, a path that is not a
regular file (a FIFO, a device: refused before it is opened) or a malformed ``config.json`` /
index raises a v4hal error naming the file (and the key). Tensors are then read one at a time
(``safe_open``) into the model, so a file is never held in memory twice; every FP8/FP4 scale
is checked finite as it arrives (`CheckpointRangeError` naming the tensor), and no model is
returned unless every tensor arrived.

Ownership: by default the loaded weights live in memory of their own (a tensor read through
safetensors' memory map is copied out of it), so the files may be changed or deleted once
loading returns. ``mmap=True`` (CPU only) leaves weights that need no conversion inside the
private memory map of the file: far less anonymous memory for huge checkpoints, but the files
must then stay unchanged while the model lives (truncating one kills the process with SIGBUS on
the next access; rewriting one changes the weights).

Seeded random checkpoints in every layout are written by `v4hal.model.random_checkpoint`.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

import v4hal
from v4hal.hal import formats
from v4hal.hal.errors import DTypeError, RangeError, ShapeError, V4HalError

from .config import ModelConfig, file_kind, read_json_file, regular_file
from .layers import act_scale_format
from .spec import FLOAT_DTYPES, FP4_X2, TensorSpec, checkpoint_spec, is_engram_table

__all__ = ["CheckpointError", "CheckpointShapeError", "CheckpointDTypeError", "CheckpointRangeError",
           "read_checkpoint", "read_for_device", "hf_rename", "transformers_rename", "to_transformers_name",
           "v41_hub_rename", "shard_dim", "is_routed_expert", "is_engram_table"]


class CheckpointError(V4HalError, ValueError):
    """A checkpoint does not match its config: missing / extra tensors, unreadable files."""


class CheckpointShapeError(CheckpointError, ShapeError):
    """A checkpoint tensor has the wrong shape."""


class CheckpointDTypeError(CheckpointError, DTypeError):
    """A checkpoint tensor has the wrong dtype."""


class CheckpointRangeError(CheckpointError, RangeError):
    """A checkpoint tensor holds values the model cannot take (a NaN or infinite scale, ints out of range)."""


_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if FP4_X2 is not None:
    _ST_DTYPES["F4"] = FP4_X2

_RANK_FILE = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")
# public convert.py: which dimension a model-parallel rank splits, by the tensor's key
_SHARD_DIMS = {"embed": 0, "wq_b": 0, "wo_a": 0, "wo_b": 1, "head": 0, "attn_sink": 0, "weights_proj": 0}


def _dname(dtype: torch.dtype | None) -> str:
    return "none" if dtype is None else str(dtype).replace("torch.", "")


def shard_dim(name: str) -> int | None:
    """Dimension the public converter splits ``name`` along for model parallelism (None: replicated)."""
    parts = name.split(".")
    unsuffixed = any(k in name for k in ("hc", "attn_sink", "tid2eid", "ape"))
    key = parts[-1] if unsuffixed or len(parts) < 2 else parts[-2]
    return _SHARD_DIMS.get(key)


def is_routed_expert(name: str) -> bool:
    return ".experts." in name and "shared_experts" not in name


def hf_rename(name: str) -> str | None:
    """Inference name of a Hugging Face tensor name; None for the MTP copies of embed/head (shared)."""
    if name.startswith("model."):
        name = name[len("model."):]
    if name.startswith("mtp.") and ("emb" in name or name.endswith("head.weight")):
        return None
    name = name.replace("self_attn", "attn").replace("mlp", "ffn")
    return name.replace("weight_scale_inv", "scale").replace("e_score_correction_bias", "bias")


# DeepSeek-V4.1 tensors v4hal does not run: the vision tower and aligner, image delimiters (and DSpark stages)
_V41_VISION = re.compile(r"^(vision\.|aligner\.|image_(start|end|newline)$)")
_V4_HC_HEAD = re.compile(r"^hc_head\.hc_(fn|base|scale)$")
_V4_ATTN_NORM = re.compile(r"^(layers\.\d+\.attn)\.norm\.weight$")
_V4_KV_NORM = re.compile(r"^(layers\.\d+\.attn)\.kv_norm\.weight$")


def v41_hub_rename(name: str, dspark_layers: int) -> str | None:
    """Inference name of a tensor of the DeepSeek-V4.1 hub checkpoint (the same name); None for what v4hal does
    not run: the DSpark draft stages (``mtp.{j}.*``, ``j < dspark_layers``), ``vision.*``, ``aligner.*``,
    ``image_start/end/newline``. A stage past ``dspark_layers`` keeps its name (and is refused as unexpected)."""
    if _V41_VISION.match(name):
        return None
    parts = name.split(".")
    if parts[0] == "mtp" and len(parts) > 2 and parts[1].isdigit() and int(parts[1]) < dspark_layers:
        return None
    return name


def transformers_rename(name: str, v41: bool, dspark_layers: int = 0) -> str | None:
    """Inference (hub) name of a tensor as transformers' ``save_pretrained`` names it; None when skipped.

    DeepSeek-V4.1 (``DeepseekV41ForCausalLM``; its modules carry the hub names): ``model.`` dropped,
    ``lm_head.weight`` -> ``head.weight``, FP8/FP4 ``weight_scale_inv`` -> ``scale`` (the Engram table's own
    ``embed.scale`` keeps its name), DSpark / vision tensors skipped (`v41_hub_rename`).
    DeepSeek-V4 (transformers 5.23 ``DeepseekV4ForCausalLM``, which writes its conversion mapping back except
    where a pattern is anchored): ``model.`` dropped, ``model.embed_tokens`` -> ``embed``, ``model.hc_head.hc_fn``
    -> ``hc_head_fn`` (base, scale alike), the attention's ``attn.norm`` -> ``attn.kv_norm`` (the compressors'
    ``norm`` keep theirs), ``weight_scale_inv`` -> ``scale``.
    """
    if name == "lm_head.weight":
        return "head.weight"
    if name.startswith("model."):
        name = name[len("model."):]
    name = name.replace("weight_scale_inv", "scale")
    if v41:
        return v41_hub_rename(name, dspark_layers)
    if name == "embed_tokens.weight":
        return "embed.weight"
    m = _V4_HC_HEAD.match(name)
    if m:
        return f"hc_head_{m.group(1)}"
    return _V4_ATTN_NORM.sub(r"\1.kv_norm.weight", name)


def to_transformers_name(name: str, v41: bool) -> str:
    """The name transformers' ``save_pretrained`` gives the inference (hub) tensor ``name`` (inverse of
    `transformers_rename`)."""
    if name == "head.weight":
        return "lm_head.weight" if v41 else "head.weight"
    if name.endswith(".scale") and not is_engram_table(name):
        name = name[:-len("scale")] + "weight_scale_inv"
    if not v41:
        if name == "embed.weight":
            name = "embed_tokens.weight"
        elif name.startswith("hc_head_"):
            name = "hc_head.hc_" + name[len("hc_head_"):]
        else:
            name = _V4_KV_NORM.sub(r"\1.norm.weight", name)
    return "model." + name


def _naming(keys: list[str], cfg: ModelConfig) -> str:
    """Which names a non-inference checkpoint uses: ``"transformers"`` (``save_pretrained``), ``"hub"`` (the
    DeepSeek-V4.1 release) or ``"hf"`` (the V4 Hugging Face hub layout, `hf_rename`)."""
    if cfg.is_v41:
        return "transformers" if any(k.startswith("model.") or k == "lm_head.weight" for k in keys) else "hub"
    if any(k == "model.embed_tokens.weight" or k.startswith("model.hc_head.") for k in keys):
        return "transformers"
    return "hf"


def _rename(layout: str, key: str, cfg: ModelConfig) -> str | None:
    if layout == "inference":
        return v41_hub_rename(key, cfg.dspark_layers) if cfg.is_v41 else key
    if layout == "transformers":
        return transformers_rename(key, cfg.is_v41, cfg.dspark_layers)
    if layout == "hub":
        return v41_hub_rename(key, cfg.dspark_layers)
    return hf_rename(key)


# ---------------------------------------------------------------------------- discovery
@dataclass
class _Entry:
    """One tensor of the checkpoint as the headers describe it (possibly split over rank files)."""

    name: str
    dtype: torch.dtype | None
    shape: tuple[int, ...]
    parts: list[tuple[int, str]] = field(default_factory=list)   # (file index, key in file)
    dim: int | None = None                                          # concat dim of the parts


@dataclass
class _Catalog:
    layout: str
    config: ModelConfig
    files: list[Path]
    entries: dict[str, _Entry]
    config_path: Path


def _regular(path: Path) -> Path:
    """``path`` when it is a regular file (a symlink to one counts); else a `CheckpointError` naming it."""
    regular_file(path, "checkpoint", CheckpointError)
    return path


def _foreign(e: BaseException) -> bool:
    """An error of the safetensors extension: its own exception types, or a Rust panic (which PyO3
    raises as ``PanicException``, a `BaseException`)."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def _open(path: Path) -> Any:
    _regular(path)
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except BaseException as e:  # safetensors raises its own error types; name the file
        if not _foreign(e):
            raise
        raise CheckpointError(f"checkpoint: cannot read {path} ({type(e).__name__}: {e}); "
                              f"the file is truncated or not a safetensors file") from e


def _header(f: Any, key: str, path: Path) -> tuple[torch.dtype | None, tuple[int, ...]]:
    try:
        sl = f.get_slice(key)
        dt = _ST_DTYPES.get(sl.get_dtype())
        shape = tuple(int(x) for x in sl.get_shape())
    except BaseException as e:  # safetensors raises its own error types; name the file and the tensor
        if not _foreign(e):
            raise
        raise CheckpointError(f"checkpoint: cannot read the header of tensor {key} in {path} "
                              f"({type(e).__name__}: {e})") from e
    if dt is not None and dt == FP4_X2 and shape:
        if shape[-1] % 2:                            # F4 headers give the logical [N, K]; torch holds [N, K/2]
            raise CheckpointShapeError(f"checkpoint: F4 tensor {key} in {path} has an odd last dim "
                                       f"{list(shape)} (two FP4 values per byte)")
        shape = shape[:-1] + (shape[-1] // 2,)
    return dt, shape


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json``: tensor name -> shard file name."""
    data = read_json_file(index, "model.safetensors.index.json")
    if not isinstance(data, dict) or "weight_map" not in data:
        raise CheckpointError(f"checkpoint: {index} is not a safetensors index (no 'weight_map' object)")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"checkpoint: {index}: 'weight_map' must be an object of tensor name -> "
                              f"file name, got {type(weight_map).__name__}")
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise CheckpointError(f"checkpoint: {index}: weight_map[{key!r}] must be a file name (string), "
                                  f"got {type(name).__name__} {name!r:.40}")
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise CheckpointError(f"checkpoint: {index}: weight_map[{key!r}] must name a file inside "
                                  f"{index.parent}, got {name!r:.80}")
    return weight_map


def _discover(path: Path) -> tuple[str, list[Path], list[int] | None, dict[str, str] | None]:
    """(layout, files, ranks, index weight map): ranks[i] is the rank of files[i] for per-rank files, else
    None; the weight map is that of ``model.safetensors.index.json`` when the files come from one."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CheckpointError(f"checkpoint: cannot read {path} ({e.strerror or e})") from e
    if stat.S_ISREG(mode):
        return "hf", [path], None, None
    if not stat.S_ISDIR(mode):
        raise CheckpointError(f"checkpoint: {path} is {file_kind(mode)}, neither a directory nor a "
                              f".safetensors file")
    rank_files = {}
    worlds = set()
    for p in sorted(path.glob("*.safetensors")):
        m = _RANK_FILE.match(p.name)
        if m:
            rank_files[int(m.group(1))] = p
            worlds.add(int(m.group(2)))
    if rank_files:
        if len(worlds) != 1:
            raise CheckpointError(f"checkpoint: {path} mixes model-parallel sizes {sorted(worlds)} "
                                  f"(model{{rank}}-mp{{world}}.safetensors)")
        world = worlds.pop()
        missing = [f"model{r}-mp{world}.safetensors" for r in range(world) if r not in rank_files]
        extra = [rank_files[r].name for r in rank_files if r >= world]
        if missing or extra:
            raise CheckpointError(f"checkpoint: {path} must hold model0-mp{world} .. model{world - 1}-mp{world}."
                                  f"safetensors; missing {missing}, unexpected {extra}")
        return "inference", [rank_files[r] for r in range(world)], list(range(world)), None
    index = path / "model.safetensors.index.json"
    if os.path.lexists(index):
        weight_map = _weight_map(index)
        names = sorted(set(weight_map.values()))
        absent = [n for n in names if not os.path.lexists(path / n)]
        if absent:
            raise CheckpointError(f"checkpoint: {index} lists shard files that are missing: {absent}")
        if not names:
            raise CheckpointError(f"checkpoint: {index} lists no tensor ('weight_map' is empty)")
        return "hf", [path / n for n in names], None, weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint: no .safetensors file in {path}")
    return "hf", files, None, None


def _catalog(path: str | os.PathLike[str], handles: list[Any], stack: contextlib.ExitStack) -> _Catalog:
    root = Path(path)
    layout, files, ranks, index_map = _discover(root)
    cfg_dir = root if root.is_dir() else root.parent
    if not os.path.lexists(cfg_dir / "config.json"):
        raise CheckpointError(f"checkpoint: {cfg_dir / 'config.json'} is missing")
    cfg = ModelConfig.from_json(cfg_dir / "config.json")
    entries: dict[str, _Entry] = {}
    keys_of: list[list[str]] = []
    for fpath in files:
        f = stack.enter_context(_open(fpath))
        handles.append(f)
        keys_of.append(list(f.keys()))
    if layout == "hf":
        layout = _naming([k for keys in keys_of for k in keys], cfg)
    for fi, fpath in enumerate(files):
        f = handles[fi]
        for key in keys_of[fi]:
            if index_map is not None and (key not in index_map
                                          or Path(index_map[key]) != fpath.relative_to(root)):
                raise CheckpointError(f"checkpoint: tensor {key} is in {fpath.name} but the index "
                                      f"lists {index_map.get(key, 'no file')} for it")
            name = _rename(layout, key, cfg)
            if name is None:
                continue
            dt, shape = _header(f, key, fpath)
            if ranks is None:
                if name in entries:
                    raise CheckpointError(f"checkpoint: tensor {name} appears twice "
                                          f"({files[entries[name].parts[0][0]].name} and {fpath.name})")
                entries[name] = _Entry(name, dt, shape, [(fi, key)])
                continue
            e = entries.get(name)
            if e is None:
                entries[name] = _Entry(name, dt, shape, [(fi, key)],
                                       None if is_routed_expert(name) else shard_dim(name))
                continue
            if is_routed_expert(name):
                raise CheckpointError(f"checkpoint: routed expert tensor {name} appears in two rank files "
                                      f"({files[e.parts[0][0]].name} and {fpath.name})")
            if dt != e.dtype:
                raise CheckpointDTypeError(f"checkpoint: {name} is {_dname(e.dtype)} in "
                                           f"{files[e.parts[0][0]].name} but {_dname(dt)} in {fpath.name}")
            e.parts.append((fi, key))
            if e.dim is None:
                if shape != e.shape:
                    raise CheckpointShapeError(f"checkpoint: replicated tensor {name} is {list(e.shape)} in "
                                               f"{files[e.parts[0][0]].name} but {list(shape)} in {fpath.name}")
            else:
                if len(shape) != len(e.shape) or any(a != b for i, (a, b) in enumerate(zip(shape, e.shape))
                                                     if i != e.dim):
                    raise CheckpointShapeError(f"checkpoint: rank shards of {name} disagree: {list(e.shape)} "
                                               f"(so far) vs {list(shape)} in {fpath.name}")
                e.shape = tuple(s + shape[i] if i == e.dim else s for i, s in enumerate(e.shape))
    if ranks is not None:
        world = len(files)
        for e in entries.values():
            if not is_routed_expert(e.name) and len(e.parts) != world:
                have = sorted(files[fi].name for fi, _ in e.parts)
                raise CheckpointError(f"checkpoint: {e.name} must be in every rank file ({world}), found in {have}")
            if e.dim is None and len(e.parts) > 1:
                e.parts = e.parts[:1]      # replicated: rank 0's copy
    if layout == "transformers" and not cfg.is_v41 and cfg.n_mtp_layers and not any(
            n.startswith("mtp.") for n in entries):
        # transformers builds no MTP layers, so save_pretrained writes none: the checkpoint is the main model
        cfg = cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[:cfg.n_layers])
    return _Catalog(layout, cfg, files, entries, cfg_dir / "config.json")


# ---------------------------------------------------------------------------- validation
def _validate(cat: _Catalog, spec: dict[str, TensorSpec]) -> None:
    problems: list[str] = []
    kinds: dict[type, int] = {CheckpointShapeError: 0, CheckpointDTypeError: 0, CheckpointError: 0}
    where = cat.files[0].parent if cat.files else ""
    for name, s in spec.items():
        e = cat.entries.get(name)
        if e is None:
            problems.append(f"missing tensor {name} (expected {s.kind} {list(s.shape)})")
            kinds[CheckpointError] += 1
            continue
        if s.kind == "table" and e.dtype in FLOAT_DTYPES and e.shape == s.shape:
            continue      # a float Engram table (what transformers saves): encoded as FP8 at load, checked there
        if cat.layout != "inference" and s.kind == "bf16" and e.dtype == torch.float8_e4m3fn \
                and name.endswith(".weight"):
            scale = name[:-len("weight")] + "scale"
            if scale in cat.entries:
                continue          # FP8 wo_a of the HF / hub / transformers layouts: dequantized at load, checked there
        if e.dtype not in s.accepted:
            problems.append(f"{name} must be {' or '.join(_dname(d) for d in s.accepted)} ({s.kind}), "
                            f"found {_dname(e.dtype)} {list(e.shape)}")
            kinds[CheckpointDTypeError] += 1
        elif e.shape != s.shape:
            problems.append(f"{name} must be {list(s.shape)}, found {list(e.shape)} ({_dname(e.dtype)})")
            kinds[CheckpointShapeError] += 1
    for name, e in cat.entries.items():
        if name in spec:
            continue
        if cat.layout != "inference" and name.endswith(".scale"):
            w = name[:-len("scale")] + "weight"
            if w in spec and spec[w].kind == "bf16" and cat.entries.get(w) is not None \
                    and cat.entries[w].dtype == torch.float8_e4m3fn:
                continue
        problems.append(f"unexpected tensor {name} ({_dname(e.dtype)} {list(e.shape)}) not in the V4 graph "
                        f"of this config")
        kinds[CheckpointError] += 1
    if problems:
        head = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        err = CheckpointError
        if kinds[CheckpointError] == 0:
            err = CheckpointShapeError if kinds[CheckpointDTypeError] == 0 else (
                CheckpointDTypeError if kinds[CheckpointShapeError] == 0 else CheckpointError)
        raise err(f"checkpoint {where} does not match its config.json: {head}")


# ---------------------------------------------------------------------------- reading
def _read(cat: _Catalog, handles: list[Any], e: _Entry) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(tensor, the tensors safetensors returned: on the CPU they lie in the memory map of their file)."""
    try:
        parts = [handles[fi].get_tensor(key) for fi, key in e.parts]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=e.dim)
    except BaseException as err:
        if not _foreign(err):
            raise
        names = ", ".join(cat.files[fi].name for fi, _ in e.parts)
        raise CheckpointError(f"checkpoint: cannot read tensor {e.name} from {names} "
                              f"({type(err).__name__}: {err})") from err
    return t, parts


def _check_scale(cat: _Catalog, e: _Entry, t: torch.Tensor) -> None:
    """A `CheckpointRangeError` naming the tensor and its file when a block scale holds a NaN or an inf
    (e8m0: the NaN byte 0xFF); a weight with such a scale would only fail (or give NaN) at its first GEMM."""
    if t.numel() == 0:
        return
    if t.dtype == torch.float8_e8m0fnu:
        bad = t.view(torch.uint8) == 255
    else:
        bad = ~torch.isfinite(t.float())
    n = int(bad.sum())
    if n:
        first = [int(i) for i in bad.nonzero()[0]]
        names = ", ".join(cat.files[fi].name for fi, _ in e.parts)
        raise CheckpointRangeError(f"checkpoint: scale tensor {e.name} ({names}) holds {n} NaN or infinite "
                                   f"value(s), the first at index {first}; block scales must be finite")


def _shares(t: torch.Tensor, parts: list[torch.Tensor]) -> bool:
    """Whether ``t`` lies in the storage of one of the tensors read from the files."""
    ptr = t.untyped_storage().data_ptr()
    return any(ptr == p.untyped_storage().data_ptr() for p in parts)


def _to_scale(name: str, s: torch.Tensor, want: torch.dtype) -> torch.Tensor:
    if s.dtype == want:
        return s
    if want == torch.float32:
        return s.float()
    exact = torch.exp2(torch.round(torch.log2(s.float())))
    if not torch.equal(exact, s.float()):
        return s.float()        # not representable in e8m0: fp8_gemm takes fp32 weight scales as well
    return s.float().to(torch.float8_e8m0fnu)


_TABLE_ROWS_PER_PASS = 1 << 16


def _encode_table(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float Engram table ``[R, W]`` (transformers keeps the table in float and ignores its ``scale`` then) as
    the FP8 table v4hal serves: e4m3 with one ue8m0 scale per 32 values (``formats.fp8_cache_block_quant``),
    only when that encoding gives back every value exactly; else `CheckpointDTypeError` naming the row."""
    codes, scales = [], []
    for r0 in range(0, t.shape[0], _TABLE_ROWS_PER_PASS):
        x = t[r0:r0 + _TABLE_ROWS_PER_PASS].float()
        y, sc = formats.fp8_cache_block_quant(x)
        bad = (formats.fp8_block_dequant(y, sc) != x).any(dim=1).nonzero()
        if bad.numel():
            raise CheckpointDTypeError(
                f"checkpoint: {name} is a {_dname(t.dtype)} Engram table whose row {r0 + int(bad[0])} is not on the "
                f"FP8 grid v4hal serves it on (e4m3 with one power-of-two scale per 32 values): loading it would "
                f"change its values; store the table as float8_e4m3fn with its .scale")
        codes.append(y)
        scales.append(sc)
    return torch.cat(codes), torch.cat(scales)


def _convert(name: str, s: TensorSpec, t: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    if s.kind == "f32":
        return t.to(torch.float32)
    if s.kind == "bf16":
        return t.to(torch.bfloat16)
    if s.kind == "fp8":
        return t
    if s.kind == "fp8_scale":
        return _to_scale(name, t, scale_dtype)
    if s.kind == "fp4":
        return t.view(torch.uint8)
    if s.kind in ("fp4_scale", "table", "table_scale"):
        return t
    if s.kind == "i32":
        if t.dtype != torch.int32:
            if t.numel() and (int(t.min()) < -2**31 or int(t.max()) >= 2**31):
                raise CheckpointRangeError(f"checkpoint: {name} holds values outside int32")
            t = t.to(torch.int32)
        return t
    raise CheckpointError(f"checkpoint: unknown tensor kind {s.kind} for {name}")


def _check_size(cat: _Catalog) -> None:
    """Refuse a config whose tensor count the files cannot possibly hold before building its spec (a
    corrupt ``n_layers`` / ``n_routed_experts`` would otherwise enumerate billions of names)."""
    cfg = cat.config
    at_least = cfg.n_total_layers * cfg.n_routed_experts * 3          # w1, w2, w3 of every routed expert
    if at_least > len(cat.entries):
        raise CheckpointError(f"checkpoint: {cat.config_path} needs at least {at_least} tensors "
                              f"(n_layers + n_mtp_layers = {cfg.n_total_layers}, n_routed_experts = "
                              f"{cfg.n_routed_experts}), the files hold {len(cat.entries)}")


def read_checkpoint(path: str | os.PathLike[str], *,
                    mmap: bool = False) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """Validate a checkpoint and return (config, iterator of (inference name, tensor in the model's dtype)).

    The iterator holds the files open until it is exhausted; tensors come one at a time (CPU).
    Raises `CheckpointError` (or its shape/dtype subclasses) before yielding anything when a
    header does not match the config, and `CheckpointRangeError` naming a scale tensor that holds
    a NaN or an inf when that tensor comes.

    ``mmap=False`` (default): every tensor yielded owns its memory. ``mmap=True``: a tensor that
    needs no conversion is yielded as a view of the file's memory map (no copy); the file must then
    not change while the tensor lives (truncation: SIGBUS on access; rewriting: other values).
    """
    stack = contextlib.ExitStack()
    handles: list[Any] = []
    try:
        cat = _catalog(path, handles, stack)
        _check_size(cat)
        spec = checkpoint_spec(cat.config)
        _validate(cat, spec)
    except BaseException:
        stack.close()
        raise
    scale_dtype = act_scale_format(cat.config)[1]

    def gen() -> Iterator[tuple[str, torch.Tensor]]:
        encoded: dict[str, torch.Tensor] = {}       # scales of float Engram tables encoded at load, by name
        with stack:
            for name, s in spec.items():
                if name in encoded:                     # the table's own scale (ignored by transformers)
                    yield name, encoded.pop(name)
                    continue
                e = cat.entries[name]
                t, raw = _read(cat, handles, e)
                if s.kind == "table" and t.dtype != torch.float8_e4m3fn:
                    t, encoded[name[:-len("weight")] + "scale"] = _encode_table(name, t)
                if s.kind in ("fp8_scale", "fp4_scale", "table_scale"):
                    _check_scale(cat, e, t)
                if s.kind == "bf16" and t.dtype == torch.float8_e4m3fn:
                    sname = name[:-len("weight")] + "scale"
                    sc, _ = _read(cat, handles, cat.entries[sname])
                    tile = cat.config.weight_block_size
                    want = (math.ceil(s.shape[0] / tile), math.ceil(s.shape[1] / tile))
                    if tuple(t.shape) != s.shape or tuple(sc.shape) != want:
                        raise CheckpointShapeError(f"checkpoint: FP8 {name} must be {list(s.shape)} with scale "
                                                   f"{list(want)}, found {list(t.shape)} / {list(sc.shape)}")
                    _check_scale(cat, cat.entries[sname], sc)
                    t = v4hal.dequant_fp8(t, sc, tile, out_dtype=torch.bfloat16)
                out = _convert(name, s, t, scale_dtype)
                if not mmap and _shares(out, raw):
                    out = out.clone()
                yield name, out

    return cat.config, gen()


def read_for_device(path: str | os.PathLike[str], device: torch.device | str | None = None, *,
                    mmap: bool = False, engram_device: torch.device | str | None = "cpu"
                    ) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """`read_checkpoint` for a model that will live on ``device`` (default CPU): checks ``mmap``, ``device`` and
    ``engram_device`` (`RangeError`), and off the CPU reads through the memory map (every tensor is copied to the
    device by `V4Model.assign`, so no CPU copy is needed). `V4Model.from_pretrained` builds the model from it.

    ``mmap``: by default (False) the model owns its weights once it is built: nothing of it refers to the
    files, which may then be changed or deleted. ``mmap=True`` (CPU only) keeps the weights that need no
    conversion (FP8 / bf16 Linear weights, the embedding, the head) in the private memory map of the file
    instead of copying them: far less anonymous memory for a huge checkpoint (routed experts are still copied,
    into their stacked ``[E, ...]`` buffers). Hazard: the files must then not change while the model lives;
    truncating one kills the process with SIGBUS at the next forward, rewriting one changes the weights
    silently.

    ``engram_device``: where the DeepSeek-V4.1 Engram tables (`is_engram_table`) are yielded: host memory
    (``"cpu"``, the default, even when ``device`` is a GPU: they are gathered by row, about 98 GB each in the
    release) with memory of their own unless ``mmap``; None puts them on ``device`` like every other tensor.
    The model must keep such a tensor where it arrives."""
    if not isinstance(mmap, bool):
        raise RangeError(f"load_checkpoint: mmap must be True or False, got {mmap!r}")
    try:
        on_cpu = device is None or torch.device(device).type == "cpu"
    except (RuntimeError, TypeError) as e:
        raise RangeError(f"load_checkpoint: device must be a torch device (cpu, cuda, npu ...), got {device!r}") from e
    if mmap and not on_cpu:
        raise RangeError(f"load_checkpoint: mmap=True keeps weights in the file's memory map, which only the CPU "
                         f"can use; got device={str(device)!r} (leave mmap off: weights are copied to the device)")
    try:
        host = None if engram_device is None else torch.device(engram_device)
    except (RuntimeError, TypeError) as e:
        raise RangeError(f"load_checkpoint: engram_device must be a torch device or None, got {engram_device!r}") from e
    cfg, tensors = read_checkpoint(path, mmap=mmap or not on_cpu)
    if host is None or not cfg.engram_layers:
        return cfg, tensors

    def gen() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in tensors:
            if is_engram_table(name):
                if not mmap and not on_cpu:
                    t = t.clone()              # read through the map for the device: give the host copy its memory
                if t.device != host:
                    t = t.to(host)
            yield name, t

    return cfg, gen()
