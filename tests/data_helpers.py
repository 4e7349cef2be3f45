"""Helpers and fixtures of the data tests (test_corpus, test_tokenizer, test_prep, test_data).

A test module takes a fixture by importing it from here."""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path

import pytest

from kdlib.config import ExperimentConfig, preset
from kdlib.tokenizer import load_tokenizer


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}



def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)



def files_config(tmp_path: Path, texts: dict[str, str], **data_kw) -> ExperimentConfig:
    """The smoke preset reading local files, one per key of ``texts`` (written to tmp_path)."""
    cfg = preset("smoke")
    files = {}
    for split, text in texts.items():
        path = tmp_path / f"{split}.txt"
        path.write_text(text, encoding="utf-8")
        files[split] = str(path)
    cfg.data = dataclasses.replace(cfg.data, dataset=None, text_files=files, **data_kw)
    return cfg



def made_up_documents(n: int, seed: int = 0) -> list[str]:
    """n distinct multi-line documents of made-up words (no blank lines inside)."""
    rng = random.Random(seed)
    words = ["token", "window", "teacher", "student", "loss", "cache", "epoch", "layer", "python", "data",
             "value", "print", "return", "class", "the", "of", "and", "a", "to", "is"]
    docs = []
    for i in range(n):
        lines = [f"Document {i}."]
        for _ in range(rng.randint(1, 4)):
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) + ".")
        docs.append("\n".join(lines))
    return docs



def assert_nothing_written(folder: Path):
    assert not folder.exists() or not any(folder.rglob("*")), sorted(folder.rglob("*"))



@pytest.fixture(scope="module")
def smoke_tok(smoke_data):
    """The BPE trained for the smoke data (512 tokens), loaded from the prepared folder."""
    folder, _ = smoke_data
    return load_tokenizer(folder / "tokenizer")



@pytest.fixture
def prepared_copy(smoke_data, tmp_path):
    """A private copy of the prepared smoke folder (modification times kept)."""
    folder = tmp_path / "data"
    shutil.copytree(smoke_data[0], folder)
    return folder
