"""The Engram vocabulary map of DeepSeek-V4.1 from a checkpoint's ``tokenizer.json``.

Every token id is decoded on its own by the tokenizer (the ``tokenizers`` library, extra ``v41``) and keyed by
its normalised text (`v4hal.ops.engram.engram_normalize`; a partial UTF-8 byte token by its raw token
string); `v4hal.ops.engram.engram_vocab_map` numbers the distinct keys in id order. The number of distinct keys must be
the config's ``engram_compressed_vocab_size``: every hash multiplier derives from it, so another count means
another tokenizer, whose hashes would address the wrong table rows.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from v4hal.extras import require
from v4hal.hal.errors import RangeError
from v4hal.ops.engram import engram_vocab_map

from .config import ModelConfig, regular_file

__all__ = ["TOKENIZER_FILE", "load_tokenizer", "vocab_map_of", "load_vocab_map", "write_tokenizer"]

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: str | os.PathLike[str]):
    """The ``tokenizers.Tokenizer`` of ``path`` (a ``tokenizer.json`` file or a checkpoint folder holding one)."""
    tokenizers = require("tokenizers", "DeepSeek-V4.1's Engram vocabulary map (tokenizer.json)")
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    regular_file(p, TOKENIZER_FILE)
    try:
        return tokenizers.Tokenizer.from_file(str(p))
    except Exception as e:       # the library raises its own exception type for a malformed file
        raise RangeError(f"{TOKENIZER_FILE}: {p} is not a tokenizer the tokenizers library reads ({e})") from e


def vocab_map_of(tokenizer, cfg: ModelConfig) -> torch.Tensor:
    """int64 ``[cfg.vocab_size]``: each token id's compressed Engram id. Token ids past the tokenizer's vocabulary
    (the embedding may be padded) get their own compressed ids after the tokenizer's, as empty strings
    would. Raises `RangeError` when the tokenizer has more ids than ``cfg.vocab_size`` or when the compressed
    size is not ``cfg.engram_compressed_vocab_size``."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > cfg.vocab_size:
        raise RangeError(f"tokenizer: it holds {n} token ids, more than the config's vocab_size {cfg.vocab_size}")
    texts = [tokenizer.decode([i], skip_special_tokens=False) for i in range(n)]
    raw = [tokenizer.id_to_token(i) or "" for i in range(n)]
    texts += [""] * (cfg.vocab_size - n)
    raw += [""] * (cfg.vocab_size - n)
    vmap, size = engram_vocab_map(texts, raw)
    if size != cfg.engram_compressed_vocab_size:
        raise RangeError(f"tokenizer: its normalised vocabulary has {size} distinct ids, the config's "
                         f"engram_compressed_vocab_size is {cfg.engram_compressed_vocab_size}; the Engram hashes "
                         f"derive from that size, so this tokenizer does not belong to the checkpoint")
    return vmap


def load_vocab_map(path: str | os.PathLike[str], cfg: ModelConfig) -> torch.Tensor:
    """`vocab_map_of` the ``tokenizer.json`` of ``path`` (a file or a checkpoint folder)."""
    return vocab_map_of(load_tokenizer(path), cfg)


def write_tokenizer(cfg: ModelConfig, path: str | os.PathLike[str]) -> Path:
    """Write a tiny ``tokenizer.json`` (a WordLevel model over ``cfg.vocab_size`` token strings) into the folder
    ``path`` whose strings normalise onto exactly ``cfg.engram_compressed_vocab_size`` distinct keys: ids below
    that size are distinct words, every later id is an upper-case or accented spelling of one of them (so it
    shares its compressed id). Returns the file."""
    tokenizers = require("tokenizers", "write_random_checkpoint for a DeepSeek-V4.1 config (tokenizer.json)")
    size, vocab = cfg.engram_compressed_vocab_size, cfg.vocab_size
    if size > vocab:
        raise RangeError(f"write_tokenizer: engram_compressed_vocab_size ({size}) must be <= vocab_size ({vocab})")
    base = [f"w{i}x" for i in range(size)]
    words = list(base)
    for i in range(size, vocab):
        w = base[(i - size) % size]
        k = (i - size) // size
        # the key of each variant: NFKC/NFD, accents dropped, lowercase: all fold onto w
        words.append(w.upper() + "\u0301" * k if k % 2 == 0 else w + "\u0300" * (k + 1))
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    out = Path(path) / TOKENIZER_FILE
    tok.save(str(out))
    return out
