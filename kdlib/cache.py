"""The teacher's top-k cache: one offline teacher pass for output-only experiments.

For every training window (the same windows ``data.WindowSampler`` serves)
and every position, the cache keeps the teacher's top-k log-probabilities at
the training temperature (float16), their token ids, and the log of the
remaining tail mass (float32): ``2k + k·id_bytes + 4`` bytes per token
(k = 32, V = 50,257: 132 bytes). Sparse losses (``losses.sparse_divergence``)
then train without the teacher model.

Files in the cache folder, per split: ``{split}.topk_logp.bin``
``[windows, block, k]``, ``{split}.topk_ids.bin`` ``[windows, block, k]``,
``{split}.log_tail.bin`` ``[windows, block]`` and ``{split}.cache.json``, the
manifest: what the cache was built from (teacher, tokenizer hash, data
checksum, block size, k, temperature, dtypes) and how many windows are complete. The
build writes a chunk of windows, flushes, then records it in the manifest, so
an interrupted build continues from its last complete chunk. A cache that
does not match the run is refused with a message naming the mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__, faults
from .config import ExperimentConfig
from .data import TokenSplit, checked_split, n_windows, token_dtype, window_inputs
from .errors import KdlibError
from .fileio import PathLike, atomic_write_json, read_json, refuse_links
from .losses import TopKTargets, teacher_top_k
from .models import load_teacher, teacher_forward

CACHE_FORMAT = "kdlib.topk/1"
LOGP_DTYPE, TAIL_DTYPE = "float16", "float32"
IDENTITY_KEYS = ("teacher", "tokenizer_hash", "data_sha256", "split", "block_size", "k", "temperature",
                 "dtypes", "windows")


def bytes_per_token(k: int, vocab_size: int) -> int:
    return k * np.dtype(LOGP_DTYPE).itemsize + k * np.dtype(token_dtype(vocab_size)).itemsize \
        + np.dtype(TAIL_DTYPE).itemsize


def cache_bytes(cfg: ExperimentConfig, tokens: TokenSplit) -> int:
    """The bytes of ``tokens``' cache for ``cfg``: windows x block x ``bytes_per_token``."""
    return n_windows(tokens.n_tokens, cfg.data.block_size) * cfg.data.block_size \
        * bytes_per_token(cfg.cache.top_k, cfg.model.vocab_size)


def free_bytes(folder: PathLike) -> int:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent)."""
    import shutil

    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


# What a cache build leaves free beyond its own files: the file system's own margin, other writers.
FREE_MARGIN = 256 * 2**20


def size_text(n: int) -> str:
    """Bytes as a person reads them: MiB under a GiB, GiB above."""
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def remaining_bytes(cfg: ExperimentConfig, tokens: TokenSplit, folder: PathLike, split: str = "train") -> int:
    """The bytes a build of ``split``'s cache in ``folder`` still has to fill: all of it for a new cache,
    what is left for an interrupted one (its files are made at full size, sparse, and fill as it runs),
    0 for a complete one."""
    total = cache_bytes(cfg, tokens)
    manifest = _paths(Path(folder), split)["manifest"]
    if not manifest.is_file():
        return total
    try:
        found = read_json(manifest, "cache manifest")
        n, done = int(found["windows"]), int(found.get("complete_windows", 0))
    except (KdlibError, KeyError, TypeError, ValueError):
        return total  # unreadable: build_cache says what is wrong with it
    if found.get("complete"):
        return 0
    return total * max(n - done, 0) // max(n, 1)


def check_space(folder: PathLike, need: int) -> None:
    """Refuse a build that would not fit ``folder``'s disk, before a file is made: a memory-mapped
    write into a full disk kills the process (SIGBUS) rather than raising."""
    free = free_bytes(folder)
    if need + FREE_MARGIN > free:
        raise KdlibError(f"the top-k cache needs {size_text(need)} more in {folder}, and its disk has "
                         f"{size_text(free)} free, less than that plus a {FREE_MARGIN // 2**20} MiB margin; "
                         "nothing was written. Build it on a disk with more room (on Colab the runtime's own "
                         "disk, /content, not Drive), or train with the teacher online")


def coverage(cache: "TopKCache", max_windows: int = 512) -> dict:
    """How much of the teacher's distribution the cache keeps: the top-k mass, 1 - exp(log tail), per
    position, over the first ``max_windows`` windows (spread evenly over the split)."""
    n = cache.arrays["tail"].shape[0]
    idx = np.unique(np.linspace(0, n - 1, num=min(n, max_windows)).astype(np.int64))
    mass = 1.0 - np.exp(np.asarray(cache.arrays["tail"][idx], dtype=np.float64))
    return {"k": cache.k, "windows": int(len(idx)), "positions": int(mass.size), "mean": float(mass.mean()),
            "median": float(np.median(mass)), "p05": float(np.quantile(mass, 0.05)), "min": float(mass.min())}


def cache_identity(cfg: ExperimentConfig, tokens: TokenSplit) -> dict:
    """What a cache must have been built from to serve run ``cfg`` on ``tokens``."""
    teacher = cfg.teacher
    V = cfg.model.vocab_size
    return {
        "teacher": {"name": teacher.name, "revision": teacher.revision, "random_init": teacher.random_init},
        "tokenizer_hash": tokens.manifest["inputs"]["tokenizer"]["hash"],
        "data_sha256": tokens.manifest["sha256"],
        "split": tokens.manifest["split"],
        "block_size": cfg.data.block_size,
        "k": cfg.cache.top_k,
        "temperature": cfg.loss_terms.temperature,
        "dtypes": {"logp": LOGP_DTYPE, "ids": token_dtype(V), "tail": TAIL_DTYPE},
        "windows": n_windows(tokens.n_tokens, cfg.data.block_size),
    }


def _paths(folder: Path, split: str) -> dict[str, Path]:
    return {"logp": folder / f"{split}.topk_logp.bin", "ids": folder / f"{split}.topk_ids.bin",
            "tail": folder / f"{split}.log_tail.bin", "manifest": folder / f"{split}.cache.json"}


def _shapes(ident: dict) -> dict[str, tuple]:
    n, T, k = ident["windows"], ident["block_size"], ident["k"]
    return {"logp": (n, T, k), "ids": (n, T, k), "tail": (n, T)}


def _mismatch(found: dict, expected: dict) -> list[str]:
    return [f"{key}: cache has {found.get(key)!r}, the run needs {expected[key]!r}"
            for key in IDENTITY_KEYS if found.get(key) != expected[key]]


def _rebuild(paths: dict) -> str:
    """What to do about a damaged cache: the same command only finishes or reuses one."""
    names = ", ".join(p.name for p in paths.values())
    return (f"Delete this split's cache files ({names} in {paths['manifest'].parent}), then build it again "
            "(`python -m kdlib cache`)")


def _open_memmaps(paths: dict, ident: dict, mode: str) -> dict[str, np.memmap]:
    out = {}
    for part, shape in _shapes(ident).items():
        dtype = np.dtype(ident["dtypes"][part])
        expected = int(np.prod(shape)) * dtype.itemsize
        if mode != "w+":
            size = paths[part].stat().st_size if paths[part].is_file() else -1
            if size != expected:
                raise KdlibError(f"cache file {paths[part]} has {max(size, 0)} bytes, expected {expected}: "
                                 f"it is truncated or missing. {_rebuild(paths)}")
        out[part] = np.memmap(paths[part], dtype=dtype, mode=mode, shape=shape)
    return out


class TopKCache:
    """A complete cache for one split, validated against the run that reads it."""

    def __init__(self, folder: PathLike, split: str, expect: Optional[dict] = None):
        self.folder = Path(folder)
        self.paths = _paths(self.folder, split)
        refuse_links(self.paths.values(), "cache folder")
        self.manifest = read_json(self.paths["manifest"], "cache manifest")
        if self.manifest.get("format") != CACHE_FORMAT:
            raise KdlibError(f"{self.paths['manifest']} is not a kdlib top-k cache manifest")
        if expect is not None:
            problems = _mismatch(self.manifest, expect)
            if problems:
                raise KdlibError(f"the top-k cache in {self.folder} was built for another run: "
                                 + "; ".join(problems) + ". Build a cache for this run "
                                 "(`python -m kdlib cache`) in another folder, or run with the teacher online")
        if not self.manifest.get("complete"):
            raise KdlibError(f"the top-k cache in {self.folder} is incomplete "
                             f"({self.manifest.get('complete_windows')} of {self.manifest.get('windows')} "
                             "windows): run `python -m kdlib cache` again to finish it")
        try:
            self.arrays = _open_memmaps(self.paths, self.manifest, "r")
        except KdlibError:
            raise  # a truncated or missing file: its own message
        except (KeyError, TypeError, ValueError) as e:
            raise KdlibError(f"cache manifest {self.paths['manifest']} is corrupt ({e}). "
                             f"{_rebuild(self.paths)}") from None

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    def batch(self, windows: Sequence[int], device=None) -> TopKTargets:
        """The cached teacher output of ``windows``: log-probs [B, T, k] float32, ids [B, T, k] int64,
        log tail [B, T] float32."""
        return targets_from_arrays(self.arrays, windows, device)


def topk_arrays(teacher: nn.Module, ids: torch.Tensor, k: int, temperature: float, vocab_size: int) -> dict:
    """What the cache stores for the windows ``ids`` [B, T]: the teacher's top-k log-probs at
    ``temperature`` (``logp`` [B, T, k]), their ids (``ids``) and the log tail mass (``tail`` [B, T]; -inf when
    k = V), as numpy arrays in the cache's dtypes."""
    logits = teacher_forward(teacher, ids).logits  # [B, T, V]
    logp, top, tail = teacher_top_k(logits, k, temperature)
    return {"logp": logp.to(torch.float16).cpu().numpy().astype(LOGP_DTYPE),
            "ids": top.cpu().numpy().astype(token_dtype(vocab_size)),
            "tail": (tail.float().cpu().numpy() if tail is not None
                     else np.full(ids.shape, -np.inf)).astype(TAIL_DTYPE)}


def targets_from_arrays(arrays: dict, windows: Sequence[int], device=None) -> TopKTargets:
    """Rows ``windows`` of the cache's arrays (``logp``, ``ids``, ``tail``) as ``TopKTargets`` on ``device``.
    Stored dtypes travel to the device; conversion happens there."""
    idx = np.asarray(windows, dtype=np.int64)
    ids = np.ascontiguousarray(arrays["ids"][idx])
    ids = ids.astype(np.int32) if ids.dtype == np.uint16 else ids.astype(np.int64)  # torch has no uint16 ops
    cuda = device is not None and torch.device(device).type == "cuda"

    def move(a: np.ndarray) -> torch.Tensor:
        # Pinned and asynchronous on a GPU: a copy from pageable memory would wait for the GPU.
        host = torch.from_numpy(np.ascontiguousarray(a))
        return host.pin_memory().to(device, non_blocking=True) if cuda else host.to(device)

    return TopKTargets(move(arrays["logp"][idx]).float(), move(ids).long(), move(arrays["tail"][idx]).float())


def build_cache(cfg: ExperimentConfig, data_folder: PathLike, cache_folder: PathLike, split: str = "train", *,
                teacher: Optional[nn.Module] = None, device=None, log: Callable[[str], None] = print,
                progress: bool = True) -> TopKCache:
    """Build (or finish) the top-k cache of ``split``; return it opened for reading.

    ``teacher``: the loaded teacher (default: ``cfg.teacher``, loaded on ``device``).
    """
    from tqdm.auto import tqdm

    # The teacher reads these ids: the file must be what its manifest says, each id in the vocabulary.
    tokens = checked_split(data_folder, split, cfg.model.vocab_size)
    ident = cache_identity(cfg, tokens)
    folder = Path(cache_folder)
    paths = _paths(folder, split)
    n, T, k = ident["windows"], ident["block_size"], ident["k"]
    if n < 1:
        raise KdlibError(f"split {split!r} has {tokens.n_tokens} tokens: not one window of {T}")
    existing = paths["manifest"].is_file()
    start = _resume_point(paths, ident) if existing else 0
    if start is None:
        cache = TopKCache(folder, split, ident)  # checks its files first: "reused" only when it can be
        log(f"cache for {split} is complete in {folder}: reused")
        return cache
    _clear_for_writing(folder, paths)
    per_token = bytes_per_token(k, cfg.model.vocab_size)
    total = n * T * per_token
    check_space(folder, total if not existing else total * (n - start) // n)  # sparse files fill as built
    # The teacher first: a teacher that fails to load must leave no files behind.
    if teacher is None:
        teacher = load_teacher(cfg.teacher, device=device, student_vocab_size=cfg.model.vocab_size)
    build = _Build(paths, ident, _open_for_writing(paths, ident, existing))
    if existing:
        log(f"resuming the {split} cache at window {start:,} of {n:,}")
    log(f"top-k cache ({split}): {n:,} windows x {T} tokens x {per_token} bytes/token "
        f"= {total / 2**20:,.1f} MiB in {folder}")
    bar = tqdm(total=n, initial=start, unit="window", desc=f"cache {split}", disable=not progress)
    _fill(cfg, teacher, tokens, build, start, bar)
    bar.close()
    return TopKCache(folder, split, ident)


def _resume_point(paths: dict, ident: dict) -> Optional[int]:
    """The first window an interrupted build left to do, or None for a complete cache; an existing
    cache of another run, or a corrupt manifest, is refused."""
    folder, split = paths["manifest"].parent, ident["split"]
    found = read_json(paths["manifest"], "cache manifest")
    problems = _mismatch(found, ident)
    if problems:
        raise KdlibError(f"{folder} already holds a {split} cache built for another run ("
                         + "; ".join(problems) + "). Nothing was changed: build into another folder, "
                         "or delete that cache first")
    if found.get("complete"):
        return None
    start = found.get("complete_windows", 0)
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < ident["windows"]:
        raise KdlibError(f"cache manifest {paths['manifest']} says {start!r} windows are complete, of "
                         f"{ident['windows']}: it is corrupt. {_rebuild(paths)}")
    return start


def _clear_for_writing(folder: Path, paths: dict) -> None:
    """Refuse links among the cache's files and a file in place of its folder; remove a manifest
    write that a killed build never finished (one builder per cache folder)."""
    # Written through memory maps: a link among them would overwrite its target, anywhere.
    refuse_links(paths.values(), "cache folder")
    for stale in folder.glob(f".{paths['manifest'].name}.*.tmp"):
        stale.unlink(missing_ok=True)
    if folder.exists() and not folder.is_dir():
        raise KdlibError(f"{folder} is a file, not a folder; give the cache a folder")


def _open_for_writing(paths: dict, ident: dict, existing: bool) -> dict[str, np.memmap]:
    """The cache's memory maps, to finish (``existing``) or new, at full size, with a first manifest."""
    if existing:
        return _open_memmaps(paths, ident, "r+")
    paths["manifest"].parent.mkdir(parents=True, exist_ok=True)
    arrays = _open_memmaps(paths, ident, "w+")
    atomic_write_json(paths["manifest"], {"format": CACHE_FORMAT, **ident, "complete_windows": 0,
                                          "complete": False, "kdlib_version": __version__})
    return arrays


@dataclass
class _Build:
    """One split's cache build: its files, the identity they are built for, their memory maps."""

    paths: dict
    ident: dict
    arrays: dict


def _fill(cfg: ExperimentConfig, teacher: nn.Module, tokens: TokenSplit, build: _Build, start: int, bar) -> None:
    """Run the teacher over windows ``start ..`` into the memory maps, a chunk at a time: each chunk
    flushed, then recorded in the manifest, so that a killed build continues from its last chunk."""
    n, T, k = build.ident["windows"], build.ident["block_size"], build.ident["k"]
    dev = next(teacher.parameters()).device
    flat = tokens.tokens()
    for chunk_start in range(start, n, cfg.cache.chunk_windows):
        chunk_end = min(chunk_start + cfg.cache.chunk_windows, n)
        for b in range(chunk_start, chunk_end, cfg.cache.batch_size):
            e = min(b + cfg.cache.batch_size, chunk_end)
            toks = window_inputs(flat, b, e, T)  # [e - b, T]: the windows' inputs, as the sampler cuts them
            for name, values in topk_arrays(teacher, torch.from_numpy(toks).to(dev), k, build.ident["temperature"],
                                            cfg.model.vocab_size).items():
                build.arrays[name][b:e] = values
            bar.update(e - b)
        for a in build.arrays.values():
            a.flush()
        faults.point("cache")
        manifest = read_json(build.paths["manifest"], "cache manifest")
        manifest.update(complete_windows=chunk_end, complete=chunk_end == n)
        atomic_write_json(build.paths["manifest"], manifest)
