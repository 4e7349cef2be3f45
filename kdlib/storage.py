"""The storage budget of a results folder, and what a run will write into it.

- ``StorageBudget``: checked before every write into the results folder; a
  write that would exceed it is refused with the usage per run, and nothing is
  written or deleted. ``delete_weights`` frees a run's weights.
- ``estimate_run_bytes``: a run's files before it starts (the fp16 student, the
  float32 resume state, config, metrics and summary), from parameter counts of
  the student and the feature projectors built on the ``meta`` device (exact,
  nothing allocated). ``kdlib.plan`` sums it over a sweep; a run checks it
  against the budget before it trains.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .config import ExperimentConfig, TinyGPTConfig
from .errors import KdlibError
from .fileio import PathLike, atomic_write_bytes, check_run_folder, read_json
from .models import TinyGPT
from .objective import DistillationLoss

MiB = 2**20


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class StorageBudget:
    """A byte limit on a results folder (default 100 MiB: what a free Drive leaves for results).

    ``check(path, n_bytes)`` raises before a write that would take the folder
    over the limit; replacing a file only counts the growth. Usage is reported
    per run folder: top-level entries, and the runs inside a preset's folder
    (``RESULTS/PRESET/RUN``, the default layout) as ``PRESET/RUN``.
    """

    def __init__(self, root: PathLike, limit_bytes: int = 100 * MiB):
        if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes <= 0:
            raise KdlibError(f"storage limit must be a positive number of bytes, got {limit_bytes!r}")
        self.root = Path(root)
        self.limit_bytes = limit_bytes

    def usage(self) -> dict[str, int]:
        """Bytes per run folder (or other top-level entry) of the results folder, largest first."""
        if not self.root.is_dir():
            return {}
        sizes = {}
        for p in self.root.iterdir():
            if _preset_folder(p):
                for child in p.iterdir():
                    sizes[f"{p.name}/{child.name}"] = _size(child)
            else:
                sizes[p.name] = _size(p)
        return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))

    def used(self) -> int:
        return sum(self.usage().values())

    def _inside(self, path: Path) -> Path:
        root, target = self.root.resolve(), path.resolve()
        if target != root and root not in target.parents:
            raise KdlibError(f"refusing to write {path}: it is outside the results folder {self.root}")
        return target

    def check(self, path: PathLike, n_bytes: int) -> None:
        """Raise ``KdlibError`` if writing ``n_bytes`` to ``path`` would exceed the limit."""
        path = self._inside(Path(path))
        growth = n_bytes - (path.stat().st_size if path.is_file() else 0)
        used = self.used()
        if used + growth > self.limit_bytes:
            raise KdlibError(
                f"writing {path.name} ({n_bytes / MiB:.1f} MiB) would take {self.root} to "
                f"{(used + growth) / MiB:.1f} MiB, over its budget of {self.limit_bytes / MiB:.1f} MiB; "
                f"nothing was written or deleted.\n{self.report()}\n"
                "Free space (`python -m kdlib storage DIR --delete-weights RUN`), move runs elsewhere, "
                "or raise the budget.")

    def write_bytes(self, path: PathLike, data: bytes) -> None:
        """Check the budget, then write ``data`` to ``path`` atomically."""
        self.check(path, len(data))
        atomic_write_bytes(path, data)

    def report(self) -> str:
        usage = self.usage()
        width = max([len(n) for n in usage] + [10])
        lines = [f"{name:<{width}}  {size / MiB:8.2f} MiB" for name, size in usage.items()]
        used = sum(usage.values())
        lines.append(f"{'total':<{width}}  {used / MiB:8.2f} MiB of {self.limit_bytes / MiB:.2f} MiB "
                     f"({100 * used / self.limit_bytes:.0f}%)")
        return "\n".join(lines)


def _preset_folder(p: Path) -> bool:
    """A preset's folder of the default layout (RESULTS/PRESET/RUN): named like a preset, not a run."""
    from .config import PRESETS

    return p.name in PRESETS and p.is_dir() and not p.is_symlink() and not (p / "config.json").is_file()


def delete_weights(budget: StorageBudget, runs: Union[str, Sequence[str]]) -> int:
    """Delete the ``.safetensors`` files of run folders ``runs`` (``RUN`` or ``PRESET/RUN`` in the
    budget's root).

    Config, metrics and summary stay. Every name is checked before anything is
    deleted; a run folder that leads outside the results folder (a symlink) is
    refused. Returns the bytes freed.
    """
    runs = [runs] if isinstance(runs, str) else list(runs)
    folders = []
    for run in runs:
        parts = run.split("/") if isinstance(run, str) else []
        if not run or len(parts) > 2 or any(not p or p in (".", "..") or "\\" in p for p in parts) \
                or (len(parts) == 2 and not _preset_folder(budget.root / parts[0])):
            raise KdlibError(f"run name {run!r} must be a run folder inside {budget.root} (RUN, or PRESET/RUN "
                             "in a preset's folder), without '..'; nothing was deleted")
        folder = budget.root / run
        if not folder.is_dir():
            names = ", ".join(budget.usage()) if budget.root.is_dir() else ""
            raise KdlibError(f"no run folder {folder} (there: {names or 'none'}); nothing was deleted")
        check_run_folder(folder, budget.root)  # no link on the way: it would lead outside the results folder
        if not (folder / "config.json").is_file():  # a preset's folder, or one of the user's own
            raise KdlibError(f"{folder} is not a run folder (it has no config.json): give a run's own folder "
                             "(RUN or PRESET/RUN, as `python -m kdlib storage` lists them); nothing was deleted")
        folders.append(folder)
    freed = 0
    for folder in folders:
        # The run's weights, its subfolders' too, but never through a link (a linked folder or file).
        for top, dirs, names in os.walk(folder, followlinks=False):
            for name in sorted(n for n in names if n.endswith(".safetensors")):
                f = Path(top) / name
                if f.is_symlink() or not f.is_file():
                    continue
                freed += f.stat().st_size
                f.unlink()
    return freed


def budget_for(path: Path, budget: Optional[StorageBudget]) -> Optional[StorageBudget]:
    """``budget`` if ``path`` lies inside its folder (a file elsewhere is not the budget's)."""
    if budget is None or not path.resolve().is_relative_to(budget.root.resolve()):
        return None
    return budget


# --------------------------------------------------------------------------
# what a run writes


# A resume state's file beyond its tensors: a header entry per tensor (~4 per parameter tensor),
# the RNG states and counters in its metadata: ~34 KiB for smoke's student, ~55 KiB for the study's.
RESUME_EXTRA_BYTES = 128 * 1024
SUMMARY_BYTES = 6 * 1024  # summary.json with its test_metrics (~5 KiB), rounded up


def teacher_shape_hint(cfg: ExperimentConfig) -> tuple[int, int]:
    """(blocks, width) of the configured teacher without loading it: a random teacher's config, a
    local folder's config.json, else GPT-2 small's (12, 768), the default teacher."""
    r = cfg.teacher.random_init
    if r is not None:
        return r["n_layer"], r["n_embd"]
    config = Path(cfg.teacher.name) / "config.json"
    if config.is_file():
        d = read_json(config, "teacher config")
        return d.get("n_layer", d.get("num_hidden_layers", 12)), d.get("n_embd", d.get("hidden_size", 768))
    return 12, 768


def student_parameters(cfg: ExperimentConfig) -> int:
    """The student's parameter count (tied embeddings counted once), from the model built on the
    meta device: shapes without storage."""
    return _meta_parameters(json.dumps(dataclasses.asdict(cfg.model), sort_keys=True), None, None)


def projector_parameters(cfg: ExperimentConfig, teacher_shape: Optional[tuple[int, int]] = None) -> int:
    """Parameters of the hidden-state feature loss's projectors (0 without them), from the loss
    built on the meta device for the teacher's (blocks, width)."""
    if not cfg.spec.needs_hidden_states:
        return 0
    return _meta_parameters(json.dumps(dataclasses.asdict(cfg.model), sort_keys=True), cfg.loss_terms,
                            tuple(teacher_shape or teacher_shape_hint(cfg)))


@functools.lru_cache(maxsize=256)
def _meta_parameters(model_json: str, terms, teacher_shape) -> int:
    """Parameters of the student (``terms`` None) or of its feature projectors, counted on the meta
    device. Cached: a plan asks for the same few shapes for every run of a sweep, and building a
    model on the meta device still runs its whole initialisation (milliseconds a tensor)."""
    model = TinyGPTConfig(**json.loads(model_json))
    with torch.device("meta"):
        if terms is None:
            return TinyGPT(model).num_parameters()
        return sum(p.numel() for p in DistillationLoss(terms, model, teacher_shape).parameters())


def estimate_run_bytes(cfg: ExperimentConfig, with_resume: bool,
                       teacher_shape: Optional[tuple[int, int]] = None, with_student: bool = True,
                       small_bytes: int = MiB) -> int:
    """What a run will write: the fp16 student (``with_student``), and (optionally) the float32 resume
    state (weights and both AdamW moments of the student and the feature projectors), plus
    ``small_bytes`` for config, metrics and summary (``small_files_bytes`` counts them from the
    run's schedule; 1 MiB without one)."""
    student = student_parameters(cfg)
    resume = 12 * (student + projector_parameters(cfg, teacher_shape)) + RESUME_EXTRA_BYTES if with_resume else 0
    return (2 * student if with_student else 0) + resume + small_bytes


def small_files_bytes(cfg: ExperimentConfig, sched) -> int:
    """What a run writes into its folder besides weights: config.json, metrics.jsonl, summary.json
    (``sched``: the run's ``kdlib.optim.Schedule``)."""
    return len(cfg.to_json()) + 1 + _metrics_bytes(cfg, sched) + SUMMARY_BYTES


def _metrics_bytes(cfg: ExperimentConfig, sched) -> int:
    """metrics.jsonl's size: its log and evaluation lines, each as long as a real one can be."""
    parts = ["ce", "div", "cos", "feat"]
    long = 0.12345678901234567
    log_row = {"step": sched.steps, "epoch": 12.3456, "tokens": sched.tokens, "lr": long, "loss": long,
               **{f"loss_{p}": long for p in parts}, "tokens_per_s": 123456.78901234567,
               "peak_mem_mib": 12345.678901234567, "mfu": long, "val_ppl": 123.45678901234567}
    rows = sched.steps // cfg.train.log_every + 1 + sched.evals
    return rows * (len(json.dumps(log_row)) + 1)
