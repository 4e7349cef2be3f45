"""Tokenizers: a fast Hugging Face tokenizer by name or folder, a byte-level BPE trained on the corpus,
the hash that identifies a tokenizer in the manifests, and batched encoding without truncation.

The original study tokenized with truncation at 1,024 tokens per batch of 1,000 lines, so training
saw 1.4% of WikiText-103; ``encode_pieces`` never truncates.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .config import ExperimentConfig
from .errors import KdlibError
from .fileio import PathLike

_ENCODE_BATCH = 1000  # text pieces per call into the Rust tokenizer (which parallelises a batch)


def load_tokenizer(spec):
    """A fast Hugging Face tokenizer from an id, a folder, or an existing tokenizer object."""
    if not isinstance(spec, (str, Path)):
        tok = spec
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(spec), use_fast=True)
        except (OSError, ValueError) as e:
            raise KdlibError(f"cannot load tokenizer {str(spec)!r}: {e}. Give a Hugging Face id "
                             "reachable from here or a folder written by save_pretrained") from None
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        raise KdlibError(f"tokenizer {type(tok).__name__} is not a fast (Rust) tokenizer; kdlib needs one "
                         "to tokenize a corpus in reasonable time")
    return tok


def tokenizer_of(cfg: ExperimentConfig, folder: PathLike):
    """The tokenizer ``prepare`` used for ``folder``: its own trained BPE, or the named one."""
    if cfg.data.tokenizer == "bpe":
        if not (Path(folder) / "tokenizer").is_dir():
            raise KdlibError(f"{folder} has no tokenizer/ folder (the BPE prep trained for it); run prep again")
        return load_tokenizer(Path(folder) / "tokenizer")
    return load_tokenizer(cfg.data.tokenizer or cfg.teacher.name)


def tokenizer_hash(tok) -> str:
    """SHA-256 of the tokenizer's definition (vocabulary, merges, normalisation), not of its settings."""
    d = json.loads(tok.backend_tokenizer.to_str())
    d.pop("truncation", None)
    d.pop("padding", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def train_bpe(texts: Sequence[str], vocab_size: int, folder: PathLike):
    """Train a byte-level BPE (GPT-2's kind) of ``vocab_size`` tokens on ``texts``; save it to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fast.save_pretrained(str(folder))
    except OSError:
        raise
    except Exception as e:  # the Rust tokenizers library reports an OS error as a plain Exception
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        n = int(m.group(1))
        raise OSError(n, os.strerror(n), str(folder)) from None
    return fast


def encode_pieces(tok, pieces: Sequence[str]) -> Iterator[np.ndarray]:
    """The token ids of each non-empty piece of ``pieces`` (int64 arrays), encoded in batches by the
    Rust tokenizer, never truncated or padded."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())  # a copy: the caller's keeps its settings
    backend.no_truncation()  # a corpus is never cut: that was the study's 98.6% loss
    backend.no_padding()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    for i in range(0, len(pieces), _ENCODE_BATCH):
        batch = [p for p in pieces[i:i + _ENCODE_BATCH] if p]
        if batch:
            for enc in encode(batch, add_special_tokens=False):
                yield np.asarray(enc.ids, dtype=np.int64)
