"""Preparation: a corpus -> a tokenizer -> token files and manifests in a kdlib data folder.

``prepare`` reads the preset's text (``kdlib.corpus``), trains or loads its
tokenizer (``kdlib.tokenizer``), tokenizes everything, and writes each split's
``{split}.bin`` and ``{split}.json`` (the layout ``kdlib.data`` reads). Each
split's token count is printed next to its character count; a split with
implausibly few tokens per character is refused. Files whose inputs did not
change are reused.

Prep writes only into its own data folders (marked by ``.kdlib-data.json``), stages
every new file in a ``.prep-*`` folder until all splits succeeded, and removes the
staging folders of earlier preps that were killed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from . import __version__
from .config import ExperimentConfig
from .corpus import load_texts, sha256_texts, train_subset
from .data import SPLITS, TOKENS_FORMAT, TokenSplit, load_split, token_dtype
from .errors import KdlibError, choices
from .fileio import PathLike, atomic_write_json, read_json
from .tokenizer import encode_pieces, load_tokenizer, tokenizer_hash, train_bpe

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
        out = _commit(folder, staging, _stage(cfg, folder, staging, texts, source, tokenizer), log)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if marked:  # a refused prep leaves the folder as it was
            (folder / DATA_MARKER).unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return out


@dataclass
class _Staged:
    """What a prep made in its staging folder, moved into the data folder once every split succeeded."""

    manifests: dict  # split -> its manifest, new or reused
    reused: set  # the splits whose files in the data folder stay as they are
    new_tokenizer: Optional[Path]  # the staged folder of a tokenizer trained by this prep
    subset: Optional[dict]  # the train subset's description (data.train_tokens), for the log


def _stage(cfg: ExperimentConfig, folder: Path, staging: Path, texts: dict, source: dict, tokenizer) -> _Staged:
    """Tokenize into ``staging`` every split whose files in ``folder`` cannot be reused; refuse a
    split with too few tokens per character, before anything in ``folder`` changes."""
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
        inputs = {"source": source, "text_sha256": sha256_texts(texts[split]), "tokenizer": tok_info}
        if split == "train" and subset is not None:
            inputs["subset"] = {"tokens": subset["tokens"], "seed": subset["seed"]}
        existing = _reusable(folder, split, inputs)
        if existing is not None:
            m = existing.manifest
            reused.add(split)
        else:
            m = _tokenize_split(staging / f"{split}.bin", split, tok, texts[split], inputs, tok_name)
        _check_ratio(split, m["tokens"], m["chars"], data.min_tokens_per_char)  # a reused split too
        manifests[split] = m
    return _Staged(manifests, reused, new_tokenizer, subset)


def _commit(folder: Path, staging: Path, staged: _Staged, log: Callable[[str], None]) -> dict[str, TokenSplit]:
    """Every split succeeded: move the staged files into ``folder``, one summary line per split."""
    manifests, reused, subset = staged.manifests, staged.reused, staged.subset
    if staged.new_tokenizer is not None:
        _replace_folder(staged.new_tokenizer, folder / "tokenizer")
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
    stamp = {"vocab_size": cfg.model.vocab_size, "text_sha256": sha256_texts(train_texts), "source": source}
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


def _check_ratio(split: str, n_tokens: int, n_chars: int, min_tokens_per_char: float) -> None:
    ratio = n_tokens / n_chars
    if ratio < min_tokens_per_char:
        raise KdlibError(
            f"split {split!r}: {n_tokens:,} tokens for {n_chars:,} characters ({ratio:.4f} tokens per "
            f"character, expected at least {min_tokens_per_char}): the text was lost on the way "
            "(truncation?) or the tokenizer is wrong. Nothing was written.")


def _tokenize_split(path: Path, split: str, tok, pieces: Sequence[str], inputs: dict, tokenizer_name: str) -> dict:
    """Write ``split``'s tokens to ``path`` (a staging file, fsynced); return its manifest (the caller
    checks its tokens per character before it is kept)."""
    dtype = token_dtype(len(tok))
    n_chars = sum(len(p) for p in pieces)
    if n_chars == 0:
        raise KdlibError(f"split {split!r} has no text; check the source (an empty file or dataset split)")
    h, n_tokens = hashlib.sha256(), 0
    limit = 2 ** (8 * np.dtype(dtype).itemsize)
    with open(path, "wb") as f:
        for ids in encode_pieces(tok, pieces):
            if ids.size and ids.max() >= limit:
                raise KdlibError(f"token id {ids.max()} does not fit {dtype}")
            data = ids.astype(dtype).tobytes()
            f.write(data)
            h.update(data)
            n_tokens += ids.size
        f.flush()
        os.fsync(f.fileno())
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
