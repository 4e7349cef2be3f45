"""Data: text -> tokenizer -> flat token memmaps with a manifest; training windows.

The original study stripped its text to a few characters and tokenized with
truncation at 1,024 tokens per batch of 1,000 lines, so training saw 1.4% of
WikiText-103. Here the text is kept as it is, everything is tokenized, and
each split's token count is printed next to its character count; a split with
implausibly few tokens per character is refused.

A prepared data folder holds, per split, ``{split}.bin`` (the token ids as a
flat ``uint16`` array when the vocabulary fits, else ``uint32``) and
``{split}.json`` (the manifest: source, tokenizer and its vocabulary hash,
dtype, counts, SHA-256 of the token bytes, and a fingerprint of the inputs so
that re-running with the same inputs reuses the files).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from . import __version__
from .config import DataConfig, ExperimentConfig
from .errors import KdlibError, choices
from .fileio import PathLike, atomic_write_json, read_json

SPLITS = ("train", "validation", "test")
TOKENS_FORMAT = "kdlib.tokens/1"
PYTHON_DOCS = "python-docs"
_ENCODE_BATCH = 1000  # text pieces per call into the Rust tokenizer (which parallelises a batch)


# --------------------------------------------------------------------------
# text sources


def _python_docs() -> list[str]:
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
            total += sum(ids.size for ids in _encode(tok, docs[i]))
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
        source = {"kind": PYTHON_DOCS, "python_docs_sha256": _sha256_texts(_python_docs())}
        return _split_documents(_python_docs(), data), source
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


def _sha256_texts(pieces: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in pieces:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


# --------------------------------------------------------------------------
# tokenizer


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


def sample_text(cfg: ExperimentConfig, folder: PathLike, split: str = "train", n_tokens: int = 80,
                at: float = 0.5) -> tuple[str, int]:
    """(text, tokens): up to ``n_tokens`` of a prepared split decoded back to text, starting ``at`` (a
    fraction) into it: what the model will read, tokenizer round trip included."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise KdlibError(f"n_tokens must be a positive number of tokens, got {n_tokens!r}")
    tokens = load_split(folder, split).tokens()
    start = int(max(0.0, min(at, 1.0)) * max(len(tokens) - n_tokens, 0))
    piece = np.asarray(tokens[start:start + n_tokens]).tolist()
    return tokenizer_of(cfg, folder).decode(piece), len(piece)


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


def _encode(tok, pieces: Sequence[str]) -> Iterator[np.ndarray]:
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


# --------------------------------------------------------------------------
# token files


@dataclass
class TokenSplit:
    """A prepared split: its flat token array (read-only memmap) and manifest."""

    path: Path
    manifest: dict

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["tokens"])

    def tokens(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.manifest["dtype"], mode="r", shape=(self.n_tokens,))


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _int(manifest: dict, key: str) -> int:
    value = manifest[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"{key} is {value!r}, not a count")
    return value


def _check_manifest(manifest: dict, split: str) -> None:
    """Every key something downstream reads, with its type (KeyError / TypeError / ValueError).

    The dtype must be the one prep stores its tokenizer's ids in: a manifest that says ``uint32``
    over a file of ``uint16`` ids (with the count halved, so the size still fits) would otherwise
    train on pairs of ids read as one.
    """
    if not isinstance(manifest["inputs"], dict):
        raise TypeError(f"inputs is {manifest['inputs']!r}, not an object")
    tokenizer = manifest["inputs"]["tokenizer"]  # what training and the cache check first
    vocab = tokenizer["vocab_size"]
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise TypeError(f"inputs.tokenizer.vocab_size is {vocab!r}, not a number of tokens")
    if not isinstance(tokenizer["hash"], str):
        raise TypeError(f"inputs.tokenizer.hash is {tokenizer['hash']!r}, not a hash")
    for key in ("tokens", "texts", "chars"):
        _int(manifest, key)
    dtype = manifest["dtype"]
    if dtype != token_dtype(vocab):
        raise ValueError(f"dtype is {dtype!r}, but prep stores the ids of a {vocab}-token tokenizer as "
                         f"{token_dtype(vocab)}")
    sha = manifest["sha256"]
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ValueError(f"sha256 is {sha!r}, not a SHA-256")
    if manifest["split"] != split:
        raise ValueError(f"it describes split {manifest['split']!r}, not {split!r}")


def load_split(folder: PathLike, split: str, verify: bool = False) -> TokenSplit:
    """Open a prepared split, checking its manifest and file size (and checksum with ``verify``)."""
    folder = Path(folder)
    manifest = read_json(folder / f"{split}.json", "token manifest")
    path = folder / f"{split}.bin"
    if manifest.get("format") != TOKENS_FORMAT:
        raise KdlibError(f"{folder / f'{split}.json'} is not a kdlib token manifest (format "
                         f"{TOKENS_FORMAT}); run prep again")
    try:
        _check_manifest(manifest, split)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"{e} is missing" if isinstance(e, KeyError) else str(e)
        raise KdlibError(f"token manifest {folder / f'{split}.json'} is corrupt or from an older kdlib "
                         f"({type(e).__name__}: {what}); run prep again") from None
    expected = manifest["tokens"] * np.dtype(manifest["dtype"]).itemsize
    if not path.is_file():
        raise KdlibError(f"{path} is missing; run `python -m kdlib prep` again")
    if path.stat().st_size != expected:
        raise KdlibError(f"{path} has {path.stat().st_size} bytes but its manifest says "
                         f"{manifest['tokens']} tokens ({expected} bytes): the file is truncated or "
                         "was replaced; run `python -m kdlib prep` again")
    split_obj = TokenSplit(path, manifest)
    if verify and _scan(path, manifest["dtype"])[0] != manifest["sha256"]:
        raise KdlibError(f"{path} does not match the checksum in its manifest: the file is corrupt; "
                         "run `python -m kdlib prep` again")
    return split_obj


# (device, inode, size, mtime_ns, ctime_ns) of a token file -> (SHA-256, largest id). Hashing is
# what costs (~1 s for the study's 240 MB train split): a sweep in one process verifies each file
# once. Any change to the file (rewritten, replaced, touched) changes the key.
_SCANNED: dict[tuple, tuple[str, int]] = {}


def _scan(path: Path, dtype: str) -> tuple[str, int]:
    """(SHA-256 of the file, its largest token id or -1 when empty), read once per process."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, dtype)
    if key not in _SCANNED:
        h, top = hashlib.sha256(), -1
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):  # 16 MiB: a whole number of ids
                h.update(block)
                if block:
                    top = max(top, int(np.frombuffer(block, dtype=dtype).max()))
        _SCANNED[key] = (h.hexdigest(), top)
    return _SCANNED[key]


def verify_split(split: TokenSplit, vocab_size: int) -> TokenSplit:
    """Refuse a split whose bytes are not the ones its manifest describes, or that holds an id the
    model has no embedding for (an IndexError on the CPU, a device-side assert on a GPU, mid-run).

    Train and eval call this once per split; the scan is cached per process (``_scan``).
    """
    sha, top = _scan(split.path, split.manifest["dtype"])
    if sha != split.manifest["sha256"]:
        raise KdlibError(f"{split.path} does not match the checksum (SHA-256) in its manifest "
                         f"{split.path.with_suffix('.json').name}: the file is corrupt or was changed "
                         "after prep; run `python -m kdlib prep` again (it rebuilds the file)")
    if top >= vocab_size:
        raise KdlibError(f"{split.path} holds token id {top}, but the model's vocabulary has {vocab_size} "
                         f"tokens (ids 0..{vocab_size - 1}): the data was made with another tokenizer or "
                         "its manifest is wrong; run `python -m kdlib prep` for this preset into its own folder")
    return split


def checked_split(folder: PathLike, split: str, vocab_size: int) -> TokenSplit:
    """``load_split`` plus ``verify_split``: a split safe to feed a model of ``vocab_size`` tokens."""
    return verify_split(load_split(folder, split), vocab_size)


def _check_ratio(split: str, n_tokens: int, n_chars: int, min_tokens_per_char: float) -> None:
    ratio = n_tokens / n_chars
    if ratio < min_tokens_per_char:
        raise KdlibError(
            f"split {split!r}: {n_tokens:,} tokens for {n_chars:,} characters ({ratio:.4f} tokens per "
            f"character, expected at least {min_tokens_per_char}): the text was lost on the way "
            "(truncation?) or the tokenizer is wrong. Nothing was written.")


def _tokenize_split(path: Path, split: str, tok, pieces: Sequence[str], inputs: dict,
                    min_tokens_per_char: float, tokenizer_name: str) -> dict:
    """Write ``split``'s tokens to ``path`` (a staging file, fsynced); return its manifest."""
    dtype = token_dtype(len(tok))
    n_chars = sum(len(p) for p in pieces)
    if n_chars == 0:
        raise KdlibError(f"split {split!r} has no text; check the source (an empty file or dataset split)")
    h, n_tokens = hashlib.sha256(), 0
    limit = 2 ** (8 * np.dtype(dtype).itemsize)
    with open(path, "wb") as f:
        for ids in _encode(tok, pieces):
            if ids.size and ids.max() >= limit:
                raise KdlibError(f"token id {ids.max()} does not fit {dtype}")
            data = ids.astype(dtype).tobytes()
            f.write(data)
            h.update(data)
            n_tokens += ids.size
        f.flush()
        os.fsync(f.fileno())
    _check_ratio(split, n_tokens, n_chars, min_tokens_per_char)
    return {"format": TOKENS_FORMAT, "split": split, "tokenizer": tokenizer_name, "dtype": dtype,
            "tokens": n_tokens, "texts": len(pieces), "chars": n_chars, "sha256": h.hexdigest(),
            "inputs": inputs, "kdlib_version": __version__}


def _reusable(folder: Path, split: str, inputs: dict) -> Optional[TokenSplit]:
    if not (folder / f"{split}.json").is_file():
        return None
    try:
        existing = load_split(folder, split, verify=True)
    except KdlibError:
        return None
    return existing if existing.manifest.get("inputs") == inputs else None


DATA_MARKER = ".kdlib-data.json"  # written by prep into every data folder it manages
STAGING_OWNER = "owner.json"  # in a .prep-* staging folder: which process made it
DATA_FORMAT = "kdlib.data/1"
_STALE_ELSEWHERE_S = 24 * 3600  # a staging folder of another machine this long untouched is left over
_PREP_NAMES = ("tokenizer", "tokenizer.inputs.json", DATA_MARKER,
               *(f"{s}.{e}" for s in SPLITS for e in ("bin", "json")))


def prepare(cfg: ExperimentConfig, folder: PathLike, tokenizer=None,
            log: Callable[[str], None] = print) -> dict[str, TokenSplit]:
    """Tokenize every split of ``cfg.data`` into ``folder``; reuse files whose inputs did not change.

    ``tokenizer`` (an object) overrides ``cfg.data.tokenizer``. Prints one summary line per split.
    All new files (a trained tokenizer, token files) are staged first and moved into place only
    when every split succeeded: a refused split leaves the folder as it was. A folder that holds
    files but is not a kdlib data folder is refused before anything is written (prep replaces
    ``tokenizer/`` and the token files: they must be its own). Staging folders of earlier preps
    that were killed are removed first, and said so.
    """
    cfg.validate()
    data = cfg.data
    folder = Path(folder)
    check_data_folder(folder)
    texts, source = load_texts(data)
    missing = [s for s in SPLITS if not texts.get(s)]
    if missing:
        raise KdlibError(f"the source has no text for split(s) {', '.join(missing)}; it has: "
                         f"{choices(s for s in texts if texts[s]) or 'nothing'}. Give every split "
                         "(train, validation, test), or one text to split by ratio")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(folder, log)
    staging = Path(tempfile.mkdtemp(prefix=".prep-", dir=folder))
    marked = False
    try:
        _write_owner(staging)
        if not (folder / DATA_MARKER).is_file():
            # First, so that a prep killed at any later point leaves a folder the next prep knows as its own.
            atomic_write_json(folder / DATA_MARKER, {"format": DATA_FORMAT, "kdlib_version": __version__,
                                                     "note": "a kdlib data folder: `python -m kdlib prep` "
                                                             "manages tokenizer/ and the {split}.bin/.json here"})
            marked = True
        out = _prepare_staged(cfg, folder, staging, texts, source, tokenizer, log)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if marked:  # a refused prep leaves the folder as it was
            (folder / DATA_MARKER).unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return out


# --------------------------------------------------------------------------
# whose folder: prep writes only into its own data folders


def _is_manifest(path: Path) -> bool:
    try:
        return read_json(path).get("format") == TOKENS_FORMAT
    except KdlibError:
        return False


def _is_tokenizer_stamp(path: Path) -> bool:
    try:
        return {"vocab_size", "text_sha256", "source"} <= set(read_json(path))
    except KdlibError:
        return False


def _own_leftover(path: Path) -> bool:
    """A leftover of a killed prep: its staging folder (with its owner file), or the temporary file of
    an atomic write of one of prep's own files (``.train.json.x1y2.tmp``)."""
    if path.name.startswith(".prep-"):
        return path.is_dir() and (path / STAGING_OWNER).is_file()
    return (path.name.endswith(".tmp") and path.is_file()
            and any(path.name.startswith(f".{name}.") for name in _PREP_NAMES))


def is_data_folder(folder: PathLike) -> bool:
    """A kdlib data folder: it carries prep's marker ``.kdlib-data.json``, or (one prepared before the
    marker existed) a token manifest of format kdlib.tokens/1 or the stamp of a tokenizer prep trained."""
    folder = Path(folder)
    return ((folder / DATA_MARKER).is_file() or any(_is_manifest(folder / f"{s}.json") for s in SPLITS)
            or _is_tokenizer_stamp(folder / "tokenizer.inputs.json"))


def _not_kdlibs(folder: Path) -> list[str]:
    """The entries of ``folder`` that are not kdlib's, each with why (empty: prep may write here)."""
    entries = sorted(p for p in folder.iterdir() if not _own_leftover(p))
    if not entries:
        return []
    if not is_data_folder(folder):
        return [p.name + ("/" if p.is_dir() else "") for p in entries]
    if (folder / DATA_MARKER).is_file():
        return []  # marked by prep: what is at its names is its own (a killed prep can leave any of them)
    # Prepared by an older kdlib (no marker): the tokenizer and manifests prep would replace must be its own.
    out = []
    if (folder / "tokenizer").exists() and not _is_tokenizer_stamp(folder / "tokenizer.inputs.json"):
        out.append("tokenizer/ (no tokenizer.inputs.json: not a tokenizer prep trained)")
    out += [f"{s}.json (not a kdlib token manifest)" for s in SPLITS
            if (folder / f"{s}.json").exists() and not _is_manifest(folder / f"{s}.json")]
    return out


def check_data_folder(folder: PathLike) -> None:
    """Refuse, before anything is written, a folder prep must not write into: a file, or a folder that
    holds files that are not kdlib's (prep would replace a ``tokenizer/`` or ``train.json`` there)."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise KdlibError(f"data folder {folder} is a file; give --data-dir a new or empty folder")
    foreign = _not_kdlibs(folder)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise KdlibError(f"{folder} is not a kdlib data folder: {shown} {'is' if len(foreign) == 1 else 'are'} "
                         "not kdlib's. prep writes tokenizer/, tokenizer.inputs.json and {train,validation,test}"
                         ".bin/.json and would replace these; nothing was changed. Give prep a new or empty "
                         "folder (--data-dir), or move these files away")


# --------------------------------------------------------------------------
# staging folders left by killed preps


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None  # not Linux: a restart is told by the process being gone


def _write_owner(staging: Path) -> None:
    """Say in ``staging`` which process on which machine (and boot) made it, for ``remove_stale_staging``.
    A plain write into the folder mkdtemp just made: a torn one is a folder no one removes automatically."""
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "boot": _boot_id(), "started": time.time(),
             "kdlib_version": __version__}
    with open(staging / STAGING_OWNER, "w", encoding="utf-8") as f:
        f.write(json.dumps(owner))
        f.flush()
        os.fsync(f.fileno())


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's): not ours to call dead
    return True


def _staging_status(staging: Path) -> tuple[bool, str]:
    """(stale, why): stale when its process is provably gone; anything unsure is kept."""
    try:
        owner = json.loads((staging / STAGING_OWNER).read_text(encoding="utf-8"))
        pid, host, boot = int(owner["pid"]), str(owner["host"]), owner.get("boot")
        if pid < 1:  # os.kill(0 or -1, 0) would ask about a process group, not a process
            raise ValueError(pid)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False, ("it has no readable owner file (made by an older kdlib, or not by kdlib); delete it "
                       "by hand when no prep runs on this folder")
    if host == socket.gethostname():
        if boot is not None and _boot_id() is not None and boot != _boot_id():
            return True, f"its machine has restarted since (process {pid})"
        if _alive(pid):
            return False, f"it is in use by process {pid} (another prep of this folder?)"
        return True, f"its process {pid} is gone"
    newest = max((p.stat().st_mtime for p in [staging, *staging.rglob("*")]), default=0.0)
    hours = (time.time() - newest) / 3600
    if hours * 3600 > _STALE_ELSEWHERE_S:
        return True, f"made on machine {host}, untouched for {hours:.0f} hours"
    return False, (f"it was made on machine {host} (another Colab session?) {hours * 60:.0f} minutes ago and "
                   "may still be in use; it is removed once a day old, or delete it when no prep runs there")


def _size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def remove_stale_staging(folder: PathLike, log: Callable[[str], None] = print) -> None:
    """Remove the ``.prep-*`` staging folders of earlier preps that were killed (at study scale hundreds
    of MB each), and, when no other prep is at work here, the temporary files of prep's own atomic writes;
    say what was removed and what was left and why. Only what kdlib made and no live process uses."""
    folder = Path(folder)
    busy = False
    for staging in sorted(folder.glob(".prep-*")):
        if not staging.is_dir():
            continue
        stale, why = _staging_status(staging)
        if stale:
            size = _size_mib(staging)
            shutil.rmtree(staging, ignore_errors=True)
            log(f"removed {staging.name} ({size:.1f} MiB), the staging folder of a killed prep: {why}")
        else:
            busy = True
            log(f"left {staging.name} in {folder}: {why}")
    if not busy:
        for tmp in sorted(folder.glob(".*.tmp")):
            if _own_leftover(tmp):
                tmp.unlink(missing_ok=True)
        # the old tokenizer of a prep killed while it swapped in a new one (see _replace_folder)
        shutil.rmtree(folder / ".tokenizer.old", ignore_errors=True)


def _prepare_staged(cfg, folder: Path, staging: Path, texts, source, tokenizer, log) -> dict[str, TokenSplit]:
    data = cfg.data
    tok, new_tokenizer = _tokenizer_for(cfg, folder, staging, texts["train"], source, tokenizer)
    if len(tok) > cfg.model.vocab_size:
        raise KdlibError(f"the tokenizer has {len(tok)} tokens but the model's vocabulary has "
                         f"{cfg.model.vocab_size}: token ids would fall outside it. Use the teacher's "
                         f"tokenizer and model.vocab_size = the teacher's vocabulary")
    # The hash identifies the tokenizer; its name is for people (a path can differ between runs).
    tok_info = {"vocab_size": len(tok), "hash": tokenizer_hash(tok)}
    tok_name = getattr(tokenizer, "name_or_path", None) or data.tokenizer or cfg.teacher.name
    manifests, reused = {}, set()
    subset = None
    if data.train_tokens is not None:
        texts = dict(texts)
        texts["train"], subset = train_subset(tok, texts["train"], data.train_tokens, data.subset_seed)
    for split in SPLITS:
        inputs = {"source": source, "text_sha256": _sha256_texts(texts[split]), "tokenizer": tok_info}
        if split == "train" and subset is not None:
            inputs["subset"] = {"tokens": subset["tokens"], "seed": subset["seed"]}
        existing = _reusable(folder, split, inputs)
        if existing is not None:
            m = existing.manifest
            _check_ratio(split, m["tokens"], m["chars"], data.min_tokens_per_char)
            reused.add(split)
        else:
            m = _tokenize_split(staging / f"{split}.bin", split, tok, texts[split], inputs,
                                data.min_tokens_per_char, tok_name)
        manifests[split] = m
    # Every split succeeded: move the new files into place.
    if new_tokenizer is not None:
        _replace_folder(new_tokenizer, folder / "tokenizer")
        atomic_write_json(folder / "tokenizer.inputs.json", json.loads((staging / "stamp.json").read_text()))
    log(f"{'split':<11}{'texts':>10}{'characters':>15}{'tokens':>14}{'tokens/char':>13}")
    out = {}
    for split in SPLITS:
        m = manifests[split]
        if split not in reused:
            os.replace(staging / f"{split}.bin", folder / f"{split}.bin")
            atomic_write_json(folder / f"{split}.json", m)
        log(f"{split:<11}{m['texts']:>10,}{m['chars']:>15,}{m['tokens']:>14,}"
            f"{m['tokens'] / m['chars']:>13.3f}" + ("  (reused)" if split in reused else ""))
        if split == "train" and subset is not None:
            log(f"{'':<11}train is a seeded subset (data.train_tokens {subset['tokens']:,}, subset_seed "
                f"{subset['seed']}): {subset['documents']:,} whole documents of {subset['of_documents']:,}")
        out[split] = TokenSplit(folder / f"{split}.bin", m)
    return out


def _fsync_files(folder: Path) -> None:
    """Flush every file under ``folder`` to the disk, so that once it is renamed into place no power
    loss leaves it holding empty files (what ``fileio.atomic_path`` does for a single file)."""
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())


def _replace_folder(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _tokenizer_for(cfg: ExperimentConfig, folder: Path, staging: Path, train_texts: Sequence[str],
                   source: dict, given):
    """(tokenizer, staged folder of a newly trained tokenizer or None)."""
    if given is not None:
        return load_tokenizer(given), None
    spec = cfg.data.tokenizer
    if spec != "bpe":
        return load_tokenizer(spec or cfg.teacher.name), None
    # A BPE trained here is part of the prepared data: retrained only when its inputs change.
    tok_dir, stamp_path = folder / "tokenizer", folder / "tokenizer.inputs.json"
    stamp = {"vocab_size": cfg.model.vocab_size, "text_sha256": _sha256_texts(train_texts), "source": source}
    if stamp_path.is_file() and tok_dir.is_dir():
        try:
            if read_json(stamp_path) == stamp:
                return load_tokenizer(tok_dir), None
        except KdlibError:
            pass
    staged = staging / "tokenizer"
    tok = train_bpe(train_texts, cfg.model.vocab_size, staged)
    _fsync_files(staged)  # save_pretrained does not: the folder is renamed into place whole
    (staging / "stamp.json").write_text(json.dumps(stamp))
    return tok, staged


def check_vocab(split: TokenSplit, vocab_size: int) -> None:
    """Refuse token data made with a tokenizer larger than the model's vocabulary."""
    n = split.manifest["inputs"]["tokenizer"]["vocab_size"]
    if n > vocab_size:
        raise KdlibError(f"{split.path} was tokenized with a {n}-token tokenizer but the model's vocabulary "
                         f"has {vocab_size}; prepare the data with the teacher's tokenizer")


def _source_name(source: dict) -> str:
    kind = source.get("kind") if isinstance(source, dict) else None
    if kind == "hf":
        return f"{source.get('dataset')} ({source.get('config')})"
    return {PYTHON_DOCS: "Python's documentation", "files": "local text files"}.get(
        kind, "an unknown source (its manifest names none)" if kind is None else repr(kind))


def check_prepared_for(cfg: ExperimentConfig, split: TokenSplit) -> None:
    """Refuse token data prepared from another corpus, or with another trained BPE size, than ``cfg``
    reads: a data folder of one preset must not train a run of another without a word."""
    d = cfg.data
    found = split.manifest.get("inputs", {})
    source = found.get("source") if isinstance(found, dict) else None
    if d.dataset == PYTHON_DOCS:
        expected = {"kind": PYTHON_DOCS}
    elif d.dataset is None:
        expected = {"kind": "files"}
    else:
        expected = {"kind": "hf", "dataset": d.dataset, "config": d.dataset_config}
    problems = []
    if not isinstance(source, dict) or any(source.get(k) != v for k, v in expected.items()):
        problems.append(f"text from {_source_name(source)}, and preset {cfg.preset!r} reads {_source_name(expected)}")
    tok = found.get("tokenizer") if isinstance(found, dict) else None
    if d.tokenizer == "bpe" and isinstance(tok, dict) and tok.get("vocab_size") != cfg.model.vocab_size:
        problems.append(f"a {tok.get('vocab_size')}-token BPE, and preset {cfg.preset!r} trains a "
                        f"{cfg.model.vocab_size}-token one")
    if problems:
        raise KdlibError(f"{split.path.parent} holds " + "; ".join(problems) + ". Prepare this preset's data "
                         f"in its own folder (`python -m kdlib prep --preset {cfg.preset} --data-dir "
                         f"data/{cfg.preset}`, or 01_data_prep) and train from there")


def check_tokenizer(split: TokenSplit, tokenizer) -> None:
    """Refuse token data made with another tokenizer than ``tokenizer`` (e.g. the teacher's):
    the same ids would stand for other strings, and distillation would compare nonsense."""
    found, expected = split.manifest["inputs"]["tokenizer"]["hash"], tokenizer_hash(load_tokenizer(tokenizer))
    if found != expected:
        raise KdlibError(f"{split.path} was tokenized with another tokenizer ({split.manifest.get('tokenizer')!r}, "
                         f"hash {found[:12]}) than this run's ({expected[:12]}); run `python -m kdlib prep` "
                         "for this preset into its own folder")


# --------------------------------------------------------------------------
# training windows


def n_windows(n_tokens: int, block_size: int) -> int:
    """Training windows in a split: window i covers tokens ``i·block_size .. i·block_size + block_size``
    (the sampler and the teacher cache both count them this way)."""
    return max(n_tokens - 1, 0) // block_size


def window_inputs(tokens: np.ndarray, first: int, last: int, block_size: int) -> np.ndarray:
    """The model inputs of windows ``first .. last - 1``: [last - first, block_size] int64."""
    return np.asarray(tokens[first * block_size:last * block_size], dtype=np.int64).reshape(-1, block_size)


class WindowSampler:
    """Batches of ``[B, block_size + 1]`` windows: a seeded shuffle of non-overlapping windows per epoch.

    Window i covers tokens ``i·block_size .. i·block_size + block_size``: inputs are
    its first ``block_size`` tokens, targets its last ``block_size``, so every
    token after the first is predicted exactly once per epoch. The order depends
    only on the seed and the epoch, so every experiment of a sweep sees the same
    batches. ``state_dict()`` / ``load_state_dict()`` resume mid-epoch.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self.n_windows = n_windows(len(tokens), block_size)
        if self.n_windows < batch_size:
            raise KdlibError(f"{len(tokens):,} tokens make {self.n_windows} windows of {block_size} tokens, "
                             f"fewer than one batch of {batch_size}; use more data or a smaller batch")
        self.epoch, self.index = 0, 0
        self._order = self.order(0)

    @property
    def batches_per_epoch(self) -> int:
        return self.n_windows // self.batch_size  # the last partial batch is dropped: static shapes

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def window(self, i: int) -> np.ndarray:
        start = i * self.block_size
        return np.asarray(self.tokens[start:start + self.block_size + 1], dtype=np.int64)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(window indices [B], token windows [B, block_size + 1] as int64)."""
        if self.index + self.batch_size > self.batches_per_epoch * self.batch_size:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self.order(self.epoch)
        idx = self._order[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return idx, np.stack([self.window(i) for i in idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_windows": self.n_windows,
                "block_size": self.block_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "n_windows", "block_size", "batch_size"):
            if state.get(key) != getattr(self, key):
                raise KdlibError(f"the saved data position was made with {key}={state.get(key)!r}, this run "
                                 f"has {getattr(self, key)!r}: it cannot resume this run")
        epoch, index = state.get("epoch"), state.get("index")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, index)) \
                or index % self.batch_size or index > self.batches_per_epoch * self.batch_size:
            raise KdlibError(f"the saved data position (epoch {epoch!r}, index {index!r}) is corrupt")
        self.epoch, self.index = epoch, index
        self._order = self.order(self.epoch)
