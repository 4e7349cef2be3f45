"""Text sources: the corpus a preset reads, split into train, validation and test as whole documents.

Three kinds of source: Python's own documentation (``python-docs``, offline,
~0.5 MB of English), local text files (one per split, or one ``all`` file split
by ratio), and a Hugging Face dataset. Each comes as a list of text pieces per
split, with a JSON description of the source for the manifests.

The original study stripped its text to a few characters; here the text is kept
as it is (``kdlib.prep`` tokenizes all of it).
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path
from typing import Iterable, Sequence

from .config import DataConfig
from .data import PYTHON_DOCS, SPLITS
from .errors import KdlibError, choices
from .tokenizer import encode_pieces


def python_docs() -> list[str]:
    """The documentation topics shipped with Python (``pydoc_data``): ~0.5 MB of real English text."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - every CPython ships it
        raise KdlibError("this Python has no pydoc_data module; use local text_files instead") from None
    return [topics[k] + "\n\n" for k in sorted(topics)]


def _split_documents(docs: Sequence[str], data: DataConfig) -> dict[str, list[str]]:
    """Seeded shuffle of whole documents, then validation and test filled to their share of the
    characters (at least one document each), the rest train. Whole documents keep a topic from
    leaking between training and evaluation."""
    order = list(range(len(docs)))
    random.Random(data.split_seed).shuffle(order)
    if data.max_chars is not None:
        kept, total = [], 0
        for i in order:
            if total >= data.max_chars:
                break
            kept.append(i)
            total += len(docs[i])
        order = kept
    if len(order) < 3:
        raise KdlibError(f"{len(order)} document(s) cannot be split into train, validation and test; "
                         "give more text (documents are separated by blank lines) or one file per split")
    total = sum(len(docs[i]) for i in order)
    out = {s: [] for s in SPLITS}
    pending = iter(order)
    for split, ratio in (("validation", data.split_ratios[1]), ("test", data.split_ratios[2])):
        chars = 0
        while not out[split] or chars < ratio * total:
            i = next(pending, None)
            if i is None:
                raise KdlibError(f"{len(order)} documents are not enough to give validation and test their "
                                 f"shares {data.split_ratios[1:]} and leave text for train; give more text")
            out[split].append(docs[i])
            chars += len(docs[i])
    out["train"] = [docs[i] for i in pending]
    if not out["train"]:
        raise KdlibError("no text is left for the train split after validation and test; give more text")
    return out


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")  # " = Title = ": a WikiText article starts


def documents(pieces: Sequence[str]) -> list[list[str]]:
    """``pieces`` (a split's text pieces, in order) grouped into whole documents.

    WikiText (one piece per line) starts an article at each top-level title line;
    text given as lines is cut at blank lines; any other piece (a Python
    documentation topic, a paragraph of a ratio-split file) is one document.
    """
    if any(_WIKITEXT_TITLE.match(p) for p in pieces[:10_000]):
        starts = (i for i, p in enumerate(pieces) if _WIKITEXT_TITLE.match(p))
    elif sum(p.endswith("\n") and "\n" not in p[:-1] for p in pieces[:1000]) > 0.9 * min(len(pieces), 1000):
        starts = (i for i, p in enumerate(pieces) if p.strip() and (i == 0 or not pieces[i - 1].strip()))
    else:
        starts = range(len(pieces))
    bounds = sorted(set([0, *starts])) + [len(pieces)]
    return [list(pieces[a:b]) for a, b in zip(bounds, bounds[1:]) if any(p.strip() for p in pieces[a:b])]


def train_subset(tok, pieces: Sequence[str], n_tokens: int, seed: int) -> tuple[list[str], dict]:
    """A seeded subset of whole documents of ``pieces`` holding at least ``n_tokens`` tokens (the
    last document taken whole), in corpus order; and a description of it for the manifest."""
    docs = documents(pieces)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for start in range(0, len(order), 64):
        batch = order[start:start + 64]
        for i in batch:
            if total >= n_tokens:
                break
            total += sum(ids.size for ids in encode_pieces(tok, docs[i]))
            chosen.append(i)
        if total >= n_tokens:
            break
    if total < n_tokens:
        raise KdlibError(f"data.train_tokens is {n_tokens:,} but the whole train split has {total:,} tokens; "
                         "lower it, or set it to None to train on the whole split")
    chosen.sort()
    subset = [p for i in chosen for p in docs[i]]
    return subset, {"tokens": n_tokens, "seed": seed, "documents": len(chosen), "of_documents": len(docs)}


def _read_file(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise KdlibError(f"text file {p} does not exist; fix data.text_files")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KdlibError(f"cannot read text file {p} as UTF-8: {e}") from None


def load_texts(data: DataConfig) -> tuple[dict[str, list[str]], dict]:
    """The text of each split as a list of pieces, plus a JSON description of the source."""
    if data.dataset == PYTHON_DOCS:
        source = {"kind": PYTHON_DOCS, "python_docs_sha256": sha256_texts(python_docs())}
        return _split_documents(python_docs(), data), source
    if data.dataset is None:
        files = dict(data.text_files)
        source = {"kind": "files", "files": {k: str(Path(v).expanduser().resolve()) for k, v in files.items()}}
        if "all" in files:
            text = _read_file(files["all"])
            return _split_documents([p + "\n\n" for p in text.split("\n\n") if p.strip()], data), source
        return {split: _read_file(path).splitlines(keepends=True) for split, path in files.items()}, source
    return _load_hf(data)


def _load_hf(data: DataConfig) -> tuple[dict[str, list[str]], dict]:
    try:
        import datasets
    except ImportError:
        raise KdlibError("reading a Hugging Face dataset needs the 'datasets' package: "
                         "pip install datasets") from None
    try:
        ds = datasets.load_dataset(data.dataset, data.dataset_config, revision=data.revision)
    except Exception as e:  # the hub, the network and the builders raise many types
        raise KdlibError(f"cannot load dataset {data.dataset!r} ({data.dataset_config}): "
                         f"{type(e).__name__}: {e}. Check the id and the network, or use "
                         "data.text_files with local text") from None
    texts = {}
    for split in ds:
        if data.text_column not in ds[split].column_names:
            raise KdlibError(f"dataset {data.dataset!r} split {split!r} has no column "
                             f"{data.text_column!r}; its columns: {choices(ds[split].column_names)}")
        texts[split] = ds[split][data.text_column]
    source = {"kind": "hf", "dataset": data.dataset, "config": data.dataset_config,
              "revision": data.revision,
              "fingerprints": {s: getattr(ds[s], "_fingerprint", None) for s in ds}}
    return texts, source


def sha256_texts(pieces: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in pieces:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()
