"""Data preparation speed: kdlib's tokenization step on local text, extrapolated to WikiText-103."""

from __future__ import annotations

import os
import sysconfig
import tempfile
import time
from pathlib import Path

WIKITEXT103_CHARS = 540e6  # characters of WikiText-103's raw train split, about


def prep_text(megabytes: float) -> str:
    """About ``megabytes`` of local English-and-code text: Python's documentation topics and its
    standard library's sources, cycled if short. Offline; WikiText-103 itself needs the hub."""
    from kdlib.corpus import python_docs

    pieces, size, want = [], 0, int(megabytes * 1e6)
    for doc in python_docs():
        pieces.append(doc)
        size += len(doc)
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size >= want:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        pieces.append(text)
        size += len(text)
    text = "\n\n".join(pieces)
    while len(text) < want:
        text += "\n\n" + text
    return text[:want]


def prep_bench(megabytes: float, tokenizer=None) -> dict:
    """Tokens/s of kdlib's tokenization step (``tokenizer.encode_pieces``, the Rust batch encoder) on local text.

    ``tokenizer``: an object or id; default GPT-2's if it loads (needs the hub or its cache),
    else a byte-level BPE with GPT-2's vocabulary size trained here on the first 2 MB.
    """
    from kdlib.tokenizer import encode_pieces, load_tokenizer, train_bpe

    text = prep_text(megabytes)
    lines = text.split("\n")  # WikiText comes as lines: the encoder's batches are of lines too
    name = "gpt2"
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:  # local files only: a benchmark must not wait on network timeouts
            tokenizer = load_tokenizer(AutoTokenizer.from_pretrained("gpt2", local_files_only=True))
        except (OSError, ValueError):  # not downloaded here: a stand-in of the same vocabulary size
            with tempfile.TemporaryDirectory() as d:
                tokenizer = train_bpe([text[:2_000_000]], 50257, d)
            name = "byte-level BPE, 50,257 tokens, trained here (GPT-2's is not downloaded)"
    else:
        name = getattr(tokenizer, "name_or_path", str(tokenizer))
        tokenizer = load_tokenizer(tokenizer)
    t0 = time.perf_counter()
    n_tokens = sum(ids.size for ids in encode_pieces(tokenizer, lines))
    seconds = time.perf_counter() - t0
    chars_per_s = len(text) / seconds
    return {"tokenizer": name, "chars": len(text), "tokens": n_tokens, "seconds": seconds,
            "tokens_per_s": n_tokens / seconds, "chars_per_s": chars_per_s,
            "wikitext103_minutes": WIKITEXT103_CHARS / chars_per_s / 60, "threads": os.cpu_count()}
