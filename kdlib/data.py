"""Prepared token data: the splits on disk, their checks, and the training windows.

A prepared data folder (``kdlib.prep`` writes it) holds, per split, ``{split}.bin``
(the token ids as a flat ``uint16`` array when the vocabulary fits, else
``uint32``) and ``{split}.json`` (the manifest: source, tokenizer and its
vocabulary hash, dtype, counts, SHA-256 of the token bytes, and a fingerprint of
the inputs so that re-running with the same inputs reuses the files).
``load_split`` opens a split as a read-only memmap after checking its manifest;
``checked_split`` also checks its bytes and ids; ``WindowSampler`` serves the
training windows.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ExperimentConfig
from .errors import KdlibError
from .fileio import PathLike, read_json
from .tokenizer import load_tokenizer, tokenizer_hash, tokenizer_of

SPLITS = ("train", "validation", "test")
TOKENS_FORMAT = "kdlib.tokens/1"
PYTHON_DOCS = "python-docs"  # the offline corpus: its data.dataset name, and its source kind in a manifest


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


def check_tokenizer_fits(split: TokenSplit, vocab_size: int) -> None:
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
