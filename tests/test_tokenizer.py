"""kdlib.tokenizer: a corpus is tokenized whole, never truncated, whatever the tokenizer's settings."""

from __future__ import annotations

import random

import numpy as np
from data_helpers import decode, files_config
from data_helpers import smoke_tok  # noqa: F401 (fixtures)

from kdlib.prep import prepare


def test_very_long_lines_are_tokenized_completely(tmp_path, smoke_tok):
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "python", "token", "function", "value", "(x)", "42,"]
    line = " ".join(rng.choice(words) for _ in range(40_000))[:200_000]
    assert len(line) == 200_000 and "\n" not in line
    train = line + "\n" + "a second, short line\n"
    cfg = files_config(tmp_path, {"train": train, "validation": "short validation text\n",
                                  "test": "short test text\n"})
    # A tokenizer set up to truncate (as a model's tokenizer often is) must not cut the corpus.
    smoke_tok.backend_tokenizer.enable_truncation(1024)
    try:
        splits = prepare(cfg, tmp_path / "data", tokenizer=smoke_tok, log=lambda s: None)
    finally:
        smoke_tok.backend_tokenizer.no_truncation()
    whole = smoke_tok(line, add_special_tokens=False)["input_ids"]
    assert len(whole) > 20_000  # far beyond any truncation length
    per_line = sum(len(smoke_tok(p, add_special_tokens=False)["input_ids"]) for p in train.splitlines(True))
    toks = splits["train"].tokens()
    m = splits["train"].manifest
    assert m["chars"] == len(train)
    assert m["tokens"] == per_line
    assert abs(m["tokens"] - len(whole)) < 50  # the long line is nearly all of it
    np.testing.assert_array_equal(toks[:len(whole)], whole)
    assert decode(smoke_tok, toks) == train
