"""DeepSeek-V4 model configuration.

`ModelConfig` holds the keys of the public inference ``config.json`` (the public
``inference/model.py`` ``ModelArgs``), with the same names and the same defaults, so a
directory written for the public code loads unchanged. `ModelConfig.from_dict` also
reads the Hugging Face ``config.json`` keys (``hidden_size``, ``rope_scaling``,
``quantization_config`` ...; the mapping is ``HF_KEY_MAP`` below).

Defaults: a key missing from a ``config.json`` takes the public ``ModelArgs`` default
(that is what ``ModelArgs(**json.load(f))`` does in the public code). Keys we do not
know are ignored and listed in ``ModelConfig.ignored_keys``.

Presets (`ModelConfig.preset`): ``v4-flash`` and ``v4-pro`` (the published shapes), ``v41-flash`` (the released
DeepSeek-V4.1-Flash text backbone), ``v41-mini`` (a tiny V4.1 with every feature) and
``v4-mini`` (a tiny V4-shaped config with every feature: window-only, ratio-4 with
indexer and ratio-128 layers, hash- and score-routed MoE, mHC, one MTP layer).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from v4hal.hal.errors import RangeError, ShapeError

from .hf_config import (
    TORCH_DTYPE_NAMES,
    V41_HF_DEFAULTS,
    V41_KEY_MAP,
    check_v41_layer_types,
    unwrap,
    v4_schedule,
    v41_schedule,
)

__all__ = ["ModelConfig", "PRESETS", "V41_FIELDS", "engram_table_rows", "HF_KEY_MAP", "read_json_file", "regular_file",
           "file_kind"]

# config.json / model.safetensors.index.json larger than this are refused (real ones are < 16 MiB)
MAX_JSON_BYTES = 256 << 20


def read_json_file(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Parse the UTF-8 JSON file ``path`` (``what`` names it in errors, e.g. ``"config.json"``).

    Raises `RangeError` naming the file when it is missing, not a regular file (a FIFO, a device,
    a directory: refused before it is opened, so nothing blocks), larger than 256 MiB, not UTF-8,
    not JSON, or nested too deeply to parse.
    """
    p = os.fspath(path)
    st = regular_file(p, what)
    if st.st_size > MAX_JSON_BYTES:
        raise RangeError(f"{what}: {p} holds {st.st_size} bytes, more than the {MAX_JSON_BYTES >> 20} MiB "
                         f"a JSON file of a checkpoint may take")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise RangeError(f"{what}: cannot read {p} ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RangeError(f"{what}: {p} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RangeError(f"{what}: {p} is not valid JSON ({e})") from e
    except RecursionError as e:
        raise RangeError(f"{what}: {p} is nested too deeply to be a {what}") from e


def regular_file(path: str | os.PathLike[str], what: str, error: type[Exception] = RangeError) -> os.stat_result:
    """``os.stat(path)`` when ``path`` is a regular file (a symlink to one counts), else ``error`` naming it.

    Checked with ``stat`` before anything opens the file: opening a FIFO blocks until a writer comes.
    """
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise error(f"{what}: cannot read {p} ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what}: {p} is not a regular file ({file_kind(st.st_mode)})")
    return st


def file_kind(mode: int) -> str:
    """What a ``stat`` mode that is not a regular file is, for error messages (``"a FIFO"``, ...)."""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"

# Hugging Face config.json key -> inference key (plain renames; nested dicts handled apart).
HF_KEY_MAP: dict[str, str] = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "qk_rope_head_dim": "rope_head_dim",
    "sliding_window": "window_size",
    "num_experts_per_tok": "n_activated_experts",
    "moe_intermediate_size": "moe_inter_dim",
    "num_hash_layers": "n_hash_layers",
    "num_nextn_predict_layers": "n_mtp_layers",
    "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale",
    "rms_norm_eps": "norm_eps",
}

# rope_scaling (HF) sub-key -> inference key
_ROPE_SCALING_MAP: dict[str, str] = {
    "factor": "rope_factor",
    "original_max_position_embeddings": "original_seq_len",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
}

_VALID_RATIOS = (0, 4, 128)
_VALID_RATIOS_V41 = (0, 1, 2)
#: the DeepSeek-V4.1 fields (left out of a V4 config's `ModelConfig.to_dict`)
V41_FIELDS = ("arch", "kv_source_layers", "index_source_layers", "candidate_source_layer", "candidate_topk_blocks",
              "candidate_block_size", "gate_temp", "engram_layers", "engram_vocab_size", "engram_num_embeddings",
              "engram_max_ngram_size", "engram_n_heads", "engram_head_dim", "engram_pad_id",
              "engram_compressed_vocab_size", "weight_block_size", "expert_block_size", "dspark_layers")
_ARCHS = ("v4", "v41")
_SCORE_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")


def _flash_ratios() -> list[int]:
    return [0, 0] + [4, 128] * 20 + [4] + [0]


def _pro_ratios() -> list[int]:
    return [128, 128] + [4, 128] * 29 + [4] + [0]


@dataclass
class ModelConfig:
    """Every key of the public inference ``config.json`` (names and defaults of ``ModelArgs``).

    ``compress_ratios`` has one entry per layer then one per MTP layer:
    0 = sliding window only, 4 = window + indexer-selected compressed entries (CSA),
    128 = window + every compressed entry (HCA).
    """

    max_batch_size: int = 4
    max_seq_len: int = 4096
    dtype: str = "bf16"                  # "bf16" | "fp8": non-expert Linear weights
    scale_fmt: str | None = None          # None | "ue8m0": power-of-two activation scales
    expert_dtype: str | None = None       # None (same as dtype) | "fp4" | "fp8": routed experts
    scale_dtype: str = "fp32"             # "fp32" | "fp8" (e8m0): storage of the scales
    vocab_size: int = 129280
    dim: int = 4096
    moe_inter_dim: int = 4096
    n_layers: int = 7
    n_hash_layers: int = 0
    n_mtp_layers: int = 1
    n_heads: int = 64
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.0
    swiglu_limit: float = 0.0
    q_lora_rank: int = 1024
    head_dim: int = 512
    rope_head_dim: int = 64
    norm_eps: float = 1e-6
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: list[int] = field(default_factory=lambda: [0, 0, 4, 128, 4, 128, 4, 0])
    compress_rope_theta: float = 40000.0
    original_seq_len: int = 0
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # ---- DeepSeek-V4.1 (``arch = "v41"``); V4 leaves these empty / at their defaults ----
    arch: str = "v4"                       # "v4" | "v41": which graph the layers follow
    kv_source_layers: list[int] = field(default_factory=list)      # layers owning a CSA2 compressor
    index_source_layers: list[int] = field(default_factory=list)   # layers running an indexer
    candidate_source_layer: int = -1       # index source publishing candidate blocks (-1: none)
    candidate_topk_blocks: int = 2048      # candidate blocks it keeps
    candidate_block_size: int = 8          # compressed positions per candidate block
    gate_temp: float = 1.0                 # router logits are divided by this before the score
    engram_layers: list[int] = field(default_factory=list)         # layers with an Engram memory before them
    engram_vocab_size: int = 16000000      # where each (n-gram size, head)'s prime search starts
    engram_num_embeddings: list[int] = field(default_factory=list)  # table rows per Engram layer
    engram_max_ngram_size: int = 4         # n-grams of 2..this size are hashed
    engram_n_heads: int = 8                # hash heads per n-gram size
    engram_head_dim: int = 256             # table row width
    engram_pad_id: int = 2                 # id standing in for history before the start / dead tokens
    engram_compressed_vocab_size: int = 99092  # size of the tokenizer-normalised vocabulary
    weight_block_size: int = 128           # FP8 weight tile (128 in V4, 32 in V4.1)
    expert_block_size: int = 32            # FP4 expert scale block along K (32 in V4, 16 in V4.1)
    dspark_layers: int = 0                 # V4.1 DSpark draft stages in the checkpoint (not run by v4hal)
    # Keys of the source dict that are not configuration keys (recorded, not used).
    ignored_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

    PRESET_NAMES: ClassVar[tuple[str, ...]] = ("v4-flash", "v4-pro", "v4-mini", "v41-flash", "v41-mini")
    #: fields that hold a list of ints
    INT_LISTS: ClassVar[tuple[str, ...]] = ("compress_ratios", "kv_source_layers", "index_source_layers",
                                           "engram_layers", "engram_num_embeddings")

    def __post_init__(self) -> None:
        for name in self.INT_LISTS:
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)):
                raise RangeError(f"ModelConfig: {name} must be a list of ints, "
                                 f"got {type(values).__name__} {values!r:.80}")
            bad = [r for r in values if isinstance(r, bool) or not (
                isinstance(r, int) or (isinstance(r, float) and r.is_integer()))]
            if bad:
                raise RangeError(f"ModelConfig: {name} entries must be ints, got {bad[:4]!r:.80}")
            setattr(self, name, [int(r) for r in values])
        self.ignored_keys = tuple(self.ignored_keys)

    # ------------------------------------------------------------------ derived
    @property
    def nope_head_dim(self) -> int:
        """Head dims without rotary embedding (448 in the published models)."""
        return self.head_dim - self.rope_head_dim

    @property
    def n_total_layers(self) -> int:
        """Main layers plus MTP layers (= len(compress_ratios))."""
        return self.n_layers + self.n_mtp_layers

    @property
    def softmax_scale(self) -> float:
        return self.head_dim ** -0.5

    @property
    def is_v41(self) -> bool:
        """Whether the layers follow DeepSeek-V4.1 (CSA2, candidate indexer, Engram, lagged mHC)."""
        return self.arch == "v41"

    def kv_source_of(self, layer_id: int) -> int | None:
        """V4.1: the KV-source layer whose compressed cache layer ``layer_id`` reads (the closest source at or
        before it; None for a window-only layer or a V4 config)."""
        if not self.is_v41 or self.compress_ratios[layer_id] == 0:
            return None
        return max(s for s in self.kv_source_layers if s <= layer_id)

    def index_source_of(self, layer_id: int) -> int | None:
        """V4.1: the index-source layer whose top-k layer ``layer_id`` uses (the closest at or before it)."""
        if not self.is_v41 or self.compress_ratios[layer_id] == 0:
            return None
        return max(s for s in self.index_source_layers if s <= layer_id)

    @property
    def is_hash_layer(self) -> list[bool]:
        """Per main layer: True when its MoE gate is hash-routed (the first n_hash_layers)."""
        return [i < self.n_hash_layers for i in range(self.n_layers)]

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The configuration keys (inference names), without bookkeeping fields."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "ignored_keys")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """A fresh config for one of `PRESET_NAMES` (``"v4-flash"``, ``"v4-pro"``, ``"v4-mini"``, ``"v41-flash"``,
        ``"v41-mini"``)."""
        key = name.lower().replace("_", "-")
        if key not in PRESETS:
            raise RangeError(f"ModelConfig.preset: name must be one of {list(PRESETS)}, got {name!r}")
        cfg = cls(**PRESETS[key]())
        cfg.validate()
        return cfg

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from an inference or Hugging Face ``config.json`` dict (or a mix of both).

        Inference keys and HF keys may both appear; when both name the same field with
        different values a `RangeError` names the two keys. Missing keys take the public
        ``ModelArgs`` defaults (for a DeepSeek-V4.1 config: Hugging Face's ``DeepseekV41TextConfig``
        defaults, its schedule derived from ``compress_ratios`` as that class derives it); unknown
        keys are listed in ``ignored_keys``. DeepSeek-V4.1's composite config (``text_config``) and
        transformers' ``DeepseekV4Config`` (``layer_types`` / ``compress_rates`` / ``mlp_layer_types``)
        are read too (see `v4hal.model.hf_config`). The result is validated.
        """
        if not isinstance(d, Mapping):
            raise RangeError(f"ModelConfig.from_dict: d must be a mapping, got {type(d).__name__}")
        d, hf_v41, ignored = unwrap(d)
        v41 = hf_v41 or d.get("arch") == "v41"
        names = set(cls.field_names())
        values: dict[str, Any] = {}
        origin: dict[str, str] = {}
        deferred: dict[str, Any] = {}

        def put(target: str, value: Any, source: str) -> None:
            if target in values and values[target] != value:
                raise RangeError(
                    f"ModelConfig.from_dict: {source}={value!r} disagrees with "
                    f"{origin[target]}={values[target]!r} (both set {target})"
                )
            values[target] = value
            origin[target] = source

        def rope_yarn(part: Mapping[str, Any], where: str) -> None:
            kind = part.get("type", part.get("rope_type", "yarn" if where == "rope_scaling" else "default"))
            if kind in ("default", None) and where != "rope_scaling":
                put("rope_factor", 1.0, f"{where}.rope_type")
                put("original_seq_len", 0, f"{where}.rope_type")
                return
            if kind not in ("yarn", "default", None):
                raise RangeError(f"ModelConfig.from_dict: {where}.type must be 'yarn', got {kind!r}")
            for sub, target in _ROPE_SCALING_MAP.items():
                if sub in part:
                    put(target, part[sub], f"{where}.{sub}")
            factor = part.get("attention_factor", 1.0)
            if factor != 1.0:
                raise RangeError(f"ModelConfig.from_dict: {where}.attention_factor must be 1.0 (the V4 graph applies "
                                 f"no YaRN attention scaling), got {factor!r}")
            ignored.extend(f"{where}.{k}" for k in part if k not in _ROPE_SCALING_MAP and k not in (
                "type", "rope_type", "attention_factor", "rope_theta", "partial_rotary_factor"))

        for key, value in d.items():
            if key == "ignored_keys":
                ignored.append(key)
            elif key == "dtype" and isinstance(value, str) and value in TORCH_DTYPE_NAMES:
                ignored.append(key)       # transformers: the torch dtype of the saved tensors, not the weight format
            elif key in ("compress_ratios", "layer_types", "compress_rates", "mlp_layer_types",
                         "partial_rotary_factor", "candidate_source_layer_id"):
                deferred[key] = value
            elif key in names:
                put(key, value, key)
            elif key == "num_nextn_predict_layers":
                put("dspark_layers" if v41 else "n_mtp_layers", value, key)
            elif key in HF_KEY_MAP:
                put(HF_KEY_MAP[key], value, key)
            elif key in V41_KEY_MAP:
                put(V41_KEY_MAP[key], value, key)
            elif key == "rope_scaling":
                if value is None:
                    put("rope_factor", 1.0, "rope_scaling")
                    put("original_seq_len", 0, "rope_scaling")
                    continue
                if not isinstance(value, Mapping):
                    raise RangeError(f"ModelConfig.from_dict: rope_scaling must be a dict or null, got {value!r}")
                rope_yarn(value, "rope_scaling")
            elif key == "rope_parameters" and isinstance(value, Mapping):
                if "main" not in value and "compress" not in value:
                    rope_yarn(value, "rope_parameters")        # a flat dict: the compress rope's YaRN
                    continue
                main, comp = value.get("main", {}) or {}, value.get("compress", {}) or {}
                for sub, part in (("main", main), ("compress", comp)):
                    if not isinstance(part, Mapping):
                        raise RangeError(f"ModelConfig.from_dict: rope_parameters.{sub} must be a dict, "
                                         f"got {part!r:.80}")
                    if "partial_rotary_factor" in part:
                        deferred.setdefault("partial_rotary_factor", part["partial_rotary_factor"])
                main_kind = main.get("rope_type", main.get("type", "default"))
                if main_kind not in ("default", None):
                    raise RangeError(f"ModelConfig.from_dict: rope_parameters.main.rope_type must be 'default' "
                                     f"(YaRN applies to the compress rope only), got {main_kind!r}")
                if "rope_theta" in main:
                    put("rope_theta", main["rope_theta"], "rope_parameters.main.rope_theta")
                if "rope_theta" in comp:
                    put("compress_rope_theta", comp["rope_theta"], "rope_parameters.compress.rope_theta")
                if comp:
                    rope_yarn(comp, "rope_parameters.compress")
            elif key == "quantization_config":
                if value is None:
                    continue
                if not isinstance(value, Mapping):
                    raise RangeError(f"ModelConfig.from_dict: quantization_config must be a dict, got {value!r}")
                fmt = value.get("fmt", value.get("quant_method"))
                if fmt is not None:
                    if str(fmt).lower() not in ("e4m3", "fp8", "float8_e4m3fn"):
                        raise RangeError(
                            f"ModelConfig.from_dict: quantization_config.fmt must be e4m3/fp8, got {fmt!r}")
                    put("dtype", "fp8", "quantization_config.fmt")
                for sub in ("scale_fmt", "expert_dtype", "scale_dtype", "expert_block_size"):
                    if sub in value:
                        put(sub, value[sub], f"quantization_config.{sub}")
                block = value.get("weight_block_size")
                if block is not None:
                    if not isinstance(block, (list, tuple)) or list(block) not in ([128, 128], [32, 32]):
                        raise ShapeError(
                            "ModelConfig.from_dict: quantization_config.weight_block_size must be [128, 128] (V4) "
                            f"or [32, 32] (V4.1), got {block!r}")
                    put("weight_block_size", int(block[0]), "quantization_config.weight_block_size")
                ignored.extend(f"quantization_config.{k}" for k in value if k not in (
                    "fmt", "quant_method", "scale_fmt", "expert_dtype", "scale_dtype", "weight_block_size",
                    "expert_block_size"))
            elif key == "num_key_value_heads":
                if value != 1:
                    raise ShapeError(
                        f"ModelConfig.from_dict: num_key_value_heads must be 1 (one shared KV head), got {value!r}")
            elif key == "attention_bias" and value:
                raise ShapeError("ModelConfig.from_dict: attention_bias must be false (the projections have no "
                                 "bias), got true")
            elif key == "norm_topk_prob" and value is False:
                raise RangeError("ModelConfig.from_dict: norm_topk_prob must be true (the V4 router normalises the "
                                 "top-k weights), got false")
            else:
                ignored.append(key)
        cls._schedule(values, deferred, v41, put)
        if origin.get("scale_fmt") == "quantization_config.scale_fmt" and values["scale_fmt"] == "ue8m0":
            values.setdefault("scale_dtype", "fp8")      # power-of-two scales are stored as e8m0 bytes
        cfg = cls(**values, ignored_keys=tuple(ignored))
        cfg._coerce()
        cfg.validate()
        return cfg

    @classmethod
    def _schedule(cls, values: dict[str, Any], deferred: dict[str, Any], v41: bool, put: Any) -> None:
        """Fill the per-layer schedule of a Hugging Face config into ``values`` (inference keys): V4.1 defaults,
        sources and DSpark trimming (`hf_config.v41_schedule`), or V4's ``layer_types`` / ``mlp_layer_types``."""
        if v41:
            put("arch", "v41", "model_type")
            for name, default in V41_HF_DEFAULTS.items():
                values.setdefault(name, default)
            if "compress_ratios" in deferred:
                values["compress_ratios"] = deferred["compress_ratios"]
            if "candidate_source_layer_id" in deferred:
                put("candidate_source_layer", deferred["candidate_source_layer_id"], "candidate_source_layer_id")
            elif "candidate_source_layer" not in values:
                values["candidate_source_layer"] = None
            v41_schedule(values, "compress_ratios")
            cls._engram_rows(values)
            if deferred.get("layer_types") is not None:
                check_v41_layer_types(deferred["layer_types"], values["n_layers"], values["kv_source_layers"])
            if deferred.get("mlp_layer_types") is not None and set(deferred["mlp_layer_types"]) != {"moe"}:
                raise RangeError(f"ModelConfig.from_dict: mlp_layer_types must be all 'moe' for DeepSeek-V4.1 (no "
                                 f"hash-routed layers), got {deferred['mlp_layer_types']!r:.80}")
        else:
            n = values.get("n_layers", cls.n_layers)
            ratios, n_hash = v4_schedule(deferred.get("layer_types"), deferred.get("compress_rates"),
                                                   deferred.get("mlp_layer_types"), n)
            if ratios is not None:
                put("compress_ratios", ratios + [0] * values.get("n_mtp_layers", cls.n_mtp_layers), "layer_types")
            if "compress_ratios" in deferred:
                put("compress_ratios", deferred["compress_ratios"], "compress_ratios")
            if n_hash is not None:
                put("n_hash_layers", n_hash, "mlp_layer_types")
            if "candidate_source_layer_id" in deferred:
                put("candidate_source_layer", deferred["candidate_source_layer_id"], "candidate_source_layer_id")
        prf = deferred.get("partial_rotary_factor")
        if prf is not None:
            head_dim = values.get("head_dim", cls.head_dim)
            rope = prf * head_dim if isinstance(prf, (int, float)) and not isinstance(prf, bool) else None
            if rope is None or not float(rope).is_integer():
                raise RangeError(f"ModelConfig.from_dict: partial_rotary_factor ({prf!r}) times head_dim ({head_dim}) "
                                 f"must be a whole number of rotary dims")
            put("rope_head_dim", int(rope), "partial_rotary_factor")

    @staticmethod
    def _engram_rows(values: dict[str, Any]) -> None:
        """V4.1: ``engram_num_embeddings`` is the sum of each Engram layer's primes (the hash offsets index a table
        of exactly that many rows): derived when missing, checked when given."""
        layers = values.get("engram_layers")
        keys = ("engram_max_ngram_size", "engram_n_heads", "engram_vocab_size")
        args = [values.get(k) for k in keys]
        if not layers or not all(isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in args) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers) or args[0] < 2:
            return                                  # validate() names what is wrong
        rows = engram_table_rows(list(layers), *args)
        given = values.get("engram_num_embeddings")
        if given is None:
            values["engram_num_embeddings"] = rows
        elif isinstance(given, (list, tuple)) and len(given) == len(rows) and list(given) != rows:
            raise RangeError(f"ModelConfig.from_dict: engram_num_embeddings {list(given)} must be the sums of the "
                             f"Engram layers' primes, {rows} (engram_layer_ids {list(layers)}, engram_vocab_size "
                             f"{args[2]}, engram_max_ngram_size {args[0]}, engram_n_heads {args[1]})")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> "ModelConfig":
        """Read a ``config.json`` file, or ``<dir>/config.json`` when given a directory.

        Every error is a `RangeError` / `ShapeError` whose message starts with the file and names
        the key (see `read_json_file` for what is refused before parsing).
        """
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "config.json")
        d = read_json_file(p, "config.json")
        try:
            return cls.from_dict(d)
        except (RangeError, ShapeError) as e:
            raise type(e)(f"{p}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """The inference ``config.json`` dict (every key, ``ignored_keys`` left out)."""
        out = {name: getattr(self, name) for name in self.field_names()}
        for name in self.INT_LISTS:
            out[name] = list(out[name])
        if not self.is_v41:     # a V4 config.json keeps exactly the public ModelArgs keys
            for name in V41_FIELDS:
                del out[name]
        return out

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the inference ``config.json``."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with some fields changed."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    # ------------------------------------------------------------------ checks
    def _coerce(self) -> None:
        """Cast JSON numbers to the field types (ints written as 1e6 or 16.0 are accepted)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and isinstance(v, float) and v.is_integer():
                setattr(self, f.name, int(v))
            elif f.type == "float" and isinstance(v, int) and not isinstance(v, bool):
                setattr(self, f.name, float(v))

    def validate(self) -> None:
        """Raise `ShapeError` / `RangeError` naming the first field the V4 graph cannot take."""
        def need(ok: bool, exc: type[Exception], msg: str) -> None:
            if not ok:
                raise exc(f"ModelConfig: {msg}")

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                need(isinstance(v, int) and not isinstance(v, bool), RangeError,
                     f"{f.name} must be an int, got {v!r}")
            elif f.type == "float":
                need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), RangeError,
                     f"{f.name} must be a finite number, got {v!r}")
        for name in ("max_batch_size", "max_seq_len", "vocab_size", "dim", "moe_inter_dim", "n_layers",
                     "n_heads", "n_routed_experts", "n_activated_experts", "q_lora_rank", "head_dim",
                     "rope_head_dim", "o_groups", "o_lora_rank", "window_size", "index_n_heads",
                     "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters"):
            need(getattr(self, name) > 0, RangeError, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("n_hash_layers", "n_mtp_layers", "n_shared_experts", "original_seq_len", "swiglu_limit"):
            need(getattr(self, name) >= 0, RangeError, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("norm_eps", "hc_eps", "rope_theta", "compress_rope_theta", "rope_factor", "route_scale"):
            need(getattr(self, name) > 0, RangeError, f"{name} must be > 0, got {getattr(self, name)}")

        need(self.dtype in ("bf16", "fp8"), RangeError, f"dtype must be 'bf16' or 'fp8', got {self.dtype!r}")
        need(self.expert_dtype in (None, "fp4", "fp8"), RangeError,
             f"expert_dtype must be null, 'fp4' or 'fp8', got {self.expert_dtype!r}")
        need(self.scale_fmt in (None, "ue8m0"), RangeError,
             f"scale_fmt must be null or 'ue8m0', got {self.scale_fmt!r}")
        need(self.scale_dtype in ("fp32", "fp8"), RangeError,
             f"scale_dtype must be 'fp32' or 'fp8', got {self.scale_dtype!r}")
        need(self.score_func in _SCORE_FUNCS, RangeError,
             f"score_func must be one of {list(_SCORE_FUNCS)}, got {self.score_func!r}")

        need(not (self.arch == "v41" and self.n_mtp_layers), RangeError,
             f"n_mtp_layers must be 0 for arch 'v41' (V4.1's draft stages are DSpark, counted in dspark_layers and "
             f"not run by v4hal), got {self.n_mtp_layers}")
        need(isinstance(self.compress_ratios, list) and len(self.compress_ratios) == self.n_total_layers,
             ShapeError, f"compress_ratios must have n_layers + n_mtp_layers = {self.n_total_layers} entries, "
                         f"got {len(self.compress_ratios)}")
        need(self.arch in _ARCHS, RangeError, f"arch must be one of {list(_ARCHS)}, got {self.arch!r}")
        valid = _VALID_RATIOS_V41 if self.is_v41 else _VALID_RATIOS
        bad = [r for r in self.compress_ratios if r not in valid]
        need(not bad, RangeError, f"compress_ratios entries must be in {list(valid)} for arch {self.arch!r}, "
                                  f"got {bad}")
        need(self.weight_block_size in (128, 32), RangeError,
             f"weight_block_size must be 128 or 32 (FP8 weight tiles), got {self.weight_block_size}")
        need(self.expert_block_size in (32, 16), RangeError,
             f"expert_block_size must be 32 or 16 (FP4 expert scale blocks), got {self.expert_block_size}")
        need(self.dspark_layers >= 0, RangeError, f"dspark_layers must be >= 0, got {self.dspark_layers}")
        if self.is_v41:
            self._validate_v41(need)
        else:
            for name in ("kv_source_layers", "index_source_layers", "engram_layers", "engram_num_embeddings"):
                need(not getattr(self, name), RangeError,
                     f"{name} is a DeepSeek-V4.1 field: it must be empty unless arch is 'v41', "
                     f"got {getattr(self, name)}")
            need(self.candidate_source_layer < 0 and self.dspark_layers == 0, RangeError,
                 "candidate_source_layer / dspark_layers are DeepSeek-V4.1 fields: set arch='v41' to use them")

        need(self.head_dim > self.rope_head_dim, ShapeError,
             f"head_dim ({self.head_dim}) must be > rope_head_dim ({self.rope_head_dim})")
        need(self.rope_head_dim % 2 == 0, ShapeError, f"rope_head_dim must be even, got {self.rope_head_dim}")
        need(self.n_heads % self.o_groups == 0, ShapeError,
             f"n_heads ({self.n_heads}) must be divisible by o_groups ({self.o_groups})")
        need(self.n_activated_experts <= self.n_routed_experts, RangeError,
             f"n_activated_experts ({self.n_activated_experts}) must be <= n_routed_experts "
             f"({self.n_routed_experts})")
        need(self.n_hash_layers <= self.n_layers, RangeError,
             f"n_hash_layers ({self.n_hash_layers}) must be <= n_layers ({self.n_layers})")
        need(self.n_shared_experts <= 1, RangeError,
             f"n_shared_experts must be 0 or 1 (the V4 graph has one shared expert), got {self.n_shared_experts}")
        if 4 in self.compress_ratios or self.index_source_layers:
            need(self.index_head_dim >= self.rope_head_dim, ShapeError,
                 f"index_head_dim ({self.index_head_dim}) must be >= rope_head_dim ({self.rope_head_dim})")
            need(self.index_head_dim & (self.index_head_dim - 1) == 0, ShapeError,
                 f"index_head_dim must be a power of two (Hadamard rotation), got {self.index_head_dim}")
            need(self.index_head_dim % 32 == 0, ShapeError,
                 f"index_head_dim must be divisible by 32 (FP4 blocks of the indexer), got {self.index_head_dim}")
        if self.dtype == "fp8":
            # FP8 GEMMs take activations in blocks of 128 along K.
            for name, k in (("dim", self.dim), ("q_lora_rank", self.q_lora_rank),
                            ("o_groups * o_lora_rank", self.o_groups * self.o_lora_rank),
                            ("moe_inter_dim", self.moe_inter_dim)):
                need(k % 128 == 0, ShapeError,
                     f"{name} must be divisible by 128 when dtype is 'fp8' (activation scale blocks), got {k}")
            # the KV cache stores its no-rope dims as FP8 in blocks of 64
            need(self.nope_head_dim % 64 == 0, ShapeError,
                 f"head_dim - rope_head_dim must be divisible by 64 when dtype is 'fp8' (FP8 KV blocks), "
                 f"got {self.nope_head_dim}")
        if self.expert_dtype == "fp4":
            for name, k in (("dim", self.dim), ("moe_inter_dim", self.moe_inter_dim)):
                need(k % 128 == 0, ShapeError,
                     f"{name} must be divisible by 128 when expert_dtype is 'fp4' (FP8 activation blocks), got {k}")

    def _validate_v41(self, need: Any) -> None:
        """The V4.1 layer schedule: sources, consumers, candidates, Engram."""
        n, ratios = self.n_layers, self.compress_ratios
        need(self.n_hash_layers == 0, RangeError,
             f"n_hash_layers must be 0 for arch 'v41' (V4.1 has no hash-routed layers), got {self.n_hash_layers}")
        need(self.gate_temp > 0, RangeError, f"gate_temp must be > 0, got {self.gate_temp}")
        for name in ("kv_source_layers", "index_source_layers", "engram_layers"):
            ids = getattr(self, name)
            need(ids == sorted(set(ids)), RangeError, f"{name} must be increasing without repeats, got {ids}")
            need(all(0 <= i < n for i in ids), RangeError, f"{name} entries must be in [0, n_layers={n}), got {ids}")
        for i in self.kv_source_layers + self.index_source_layers:
            need(ratios[i] > 0, RangeError, f"layer {i} is a KV or index source, so compress_ratios[{i}] must be "
                                            f"1 or 2, got 0")
        for i in range(n):
            if ratios[i] == 0:
                continue
            kv = [s for s in self.kv_source_layers if s <= i]
            need(bool(kv), RangeError, f"layer {i} has compress ratio {ratios[i]} but no KV source at or before it "
                                       f"(kv_source_layers {self.kv_source_layers})")
            need(ratios[kv[-1]] == ratios[i], RangeError,
                 f"layer {i} (ratio {ratios[i]}) reads the compressed cache of KV source {kv[-1]} "
                 f"(ratio {ratios[kv[-1]]}): the ratios must match")
            ix = [s for s in self.index_source_layers if s <= i]
            need(bool(ix) and ix[-1] >= kv[-1], RangeError,
                 f"layer {i} needs an index source between its KV source {kv[-1]} and itself "
                 f"(index_source_layers {self.index_source_layers})")
        c = self.candidate_source_layer
        if c >= 0:
            need(c in self.index_source_layers, RangeError,
                 f"candidate_source_layer ({c}) must be one of index_source_layers {self.index_source_layers}")
            need(self.candidate_topk_blocks > 0 and self.candidate_block_size > 0, RangeError,
                 f"candidate_topk_blocks and candidate_block_size must be > 0, got {self.candidate_topk_blocks}, "
                 f"{self.candidate_block_size}")
        if self.engram_layers:
            need(len(self.engram_num_embeddings) == len(self.engram_layers), ShapeError,
                 f"engram_num_embeddings must have one entry per Engram layer ({len(self.engram_layers)}), "
                 f"got {self.engram_num_embeddings}")
            need(self.engram_max_ngram_size >= 2, RangeError,
                 f"engram_max_ngram_size must be >= 2, got {self.engram_max_ngram_size}")
            for name in ("engram_vocab_size", "engram_n_heads", "engram_head_dim", "engram_compressed_vocab_size"):
                need(getattr(self, name) > 0, RangeError, f"{name} must be > 0, got {getattr(self, name)}")
            need(0 <= self.engram_pad_id < self.engram_compressed_vocab_size, RangeError,
                 f"engram_pad_id must be in [0, engram_compressed_vocab_size), got {self.engram_pad_id}")


def engram_table_rows(layer_ids: list[int], max_ngram: int, n_heads: int, vocab_size: int) -> list[int]:
    """Rows of each Engram layer's table: the sum of its (n-gram size, head) primes."""
    from v4hal.ops.engram import prime_table  # pure Python; kept local so the config imports no ops
    return [sum(sum(heads) for heads in per_n) for per_n in prime_table(layer_ids, max_ngram, n_heads, vocab_size)]


def _published_common() -> dict[str, Any]:
    return dict(
        dtype="fp8", expert_dtype="fp4", scale_fmt="ue8m0", scale_dtype="fp8",
        vocab_size=129280, head_dim=512, rope_head_dim=64, window_size=128,
        index_n_heads=64, index_head_dim=128, n_shared_experts=1, n_activated_experts=6,
        n_hash_layers=3, n_mtp_layers=1, score_func="sqrtsoftplus", swiglu_limit=10.0,
        hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6,
        rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=16.0,
        original_seq_len=65536, beta_fast=32, beta_slow=1,
    )


def _v4_flash() -> dict[str, Any]:
    return dict(_published_common(), dim=4096, n_layers=43, n_heads=64, q_lora_rank=1024, o_groups=8,
                o_lora_rank=1024, compress_ratios=_flash_ratios(), index_topk=512, n_routed_experts=256,
                moe_inter_dim=2048, route_scale=1.5)


def _v4_pro() -> dict[str, Any]:
    return dict(_published_common(), dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16,
                o_lora_rank=1024, compress_ratios=_pro_ratios(), index_topk=1024, n_routed_experts=384,
                moe_inter_dim=3072, route_scale=2.5)


def _v4_mini() -> dict[str, Any]:
    return dict(
        dtype="fp8", expert_dtype="fp4", scale_fmt="ue8m0", scale_dtype="fp8",
        dim=256, n_layers=4, n_heads=4, head_dim=128, rope_head_dim=64, q_lora_rank=128,
        o_groups=2, o_lora_rank=64, window_size=16, compress_ratios=[0, 4, 128, 4, 0],
        index_n_heads=4, index_head_dim=64, index_topk=8, n_routed_experts=8, n_activated_experts=2,
        n_shared_experts=1, n_hash_layers=1, moe_inter_dim=128, score_func="sqrtsoftplus",
        route_scale=1.5, swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
        vocab_size=512, n_mtp_layers=1, norm_eps=1e-6,
        rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=16.0,
        original_seq_len=65536, beta_fast=32, beta_slow=1,
    )


def _v41_flash() -> dict[str, Any]:
    """The released DeepSeek-V4.1-Flash text backbone (its DSpark draft stages are counted, not run)."""
    return dict(
        arch="v41", dtype="fp8", expert_dtype="fp4", scale_fmt="ue8m0", scale_dtype="fp8",
        weight_block_size=32, expert_block_size=16,
        vocab_size=129280, dim=5120, n_layers=40, n_heads=64, head_dim=512, rope_head_dim=64,
        q_lora_rank=1280, o_groups=8, o_lora_rank=1024, window_size=128,
        compress_ratios=[0, 0] + [2] * 18 + [1] * 20,
        kv_source_layers=[2, 8, 14, 20], index_source_layers=[2, 8, 14, 20, 24, 28, 32, 36],
        candidate_source_layer=20, candidate_topk_blocks=2048, candidate_block_size=8,
        index_n_heads=32, index_head_dim=128, index_topk=512,
        n_routed_experts=384, n_activated_experts=6, n_shared_experts=1, n_hash_layers=0, n_mtp_layers=0,
        moe_inter_dim=2304, score_func="sqrtsoftplus", gate_temp=1.0, route_scale=1.5, swiglu_limit=10.0,
        hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-20,
        rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=16.0, original_seq_len=65536,
        beta_fast=32, beta_slow=1,
        engram_layers=[1, 14], engram_vocab_size=16000000, engram_num_embeddings=[384006168, 384016682],
        engram_max_ngram_size=4, engram_n_heads=8, engram_head_dim=256, engram_pad_id=2,
        engram_compressed_vocab_size=99092, dspark_layers=3,
    )


def _v41_mini() -> dict[str, Any]:
    """A tiny V4.1 with every feature: window-only layers, a ratio-2 source and consumer, a ratio-1 source that
    publishes candidates, its consumer, a re-index layer inside the candidates and its consumer, Engram before
    a window-only layer and before a source, lagged mHC."""
    engram = dict(engram_layers=[1, 4], engram_vocab_size=1000, engram_max_ngram_size=3, engram_n_heads=2,
                  engram_head_dim=64, engram_pad_id=2, engram_compressed_vocab_size=400)
    return dict(
        arch="v41", dtype="fp8", expert_dtype="fp4", scale_fmt="ue8m0", scale_dtype="fp8",
        weight_block_size=32, expert_block_size=16,
        vocab_size=512, dim=256, n_layers=8, n_heads=4, head_dim=128, rope_head_dim=64,
        q_lora_rank=128, o_groups=2, o_lora_rank=64, window_size=16,
        compress_ratios=[0, 0, 2, 2, 1, 1, 1, 1],
        kv_source_layers=[2, 4], index_source_layers=[2, 4, 6],
        candidate_source_layer=4, candidate_topk_blocks=4, candidate_block_size=4,
        index_n_heads=4, index_head_dim=64, index_topk=8,
        n_routed_experts=8, n_activated_experts=2, n_shared_experts=1, n_hash_layers=0, n_mtp_layers=0,
        moe_inter_dim=128, score_func="sqrtsoftplus", gate_temp=1.0, route_scale=1.5, swiglu_limit=10.0,
        hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-20,
        rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=16.0, original_seq_len=65536,
        beta_fast=32, beta_slow=1,
        engram_num_embeddings=engram_table_rows([1, 4], 3, 2, 1000), **engram,
    )


PRESETS: dict[str, Any] = {"v4-flash": _v4_flash, "v4-pro": _v4_pro, "v4-mini": _v4_mini,
                           "v41-flash": _v41_flash, "v41-mini": _v41_mini}
