"""The training loop: a plain loop, with ``accelerate`` for devices, mixed precision and DDP.

One run = one experiment, one seed, one run folder::

    RUN/config.json        the full ExperimentConfig (refuses a folder of another experiment)
    RUN/metrics.jsonl      one JSON object per log step and per evaluation
    RUN/student.safetensors  the best student so far (fp16), on validation perplexity
    RUN/resume.safetensors   everything to continue exactly (or in train.resume_dir)
    RUN/summary.json       written at the end: best/final validation ppl, test ppl, teacher ppl, cost

Started again on the same folder, a run continues from its resume state; on
the CPU the continued run is bit-for-bit the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import nullcontext
import os
import platform
import random
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from . import __version__, faults
from .cache import TopKCache, cache_identity
from .checkpoint import (MiB, StorageBudget, load_resume, model_parameters, save_resume, save_student)
from .config import TEACHER_SOURCES, ExperimentConfig
from .data import SPLITS, WindowSampler, check_prepared_for, check_tokenizer_fits, load_split, n_windows
from .errors import KdlibError
from .evaluate import perplexity
from .fileio import atomic_write_json, atomic_write_text, check_run_folder, read_json, read_jsonl, refuse_links
from .models import TinyGPT, load_teacher, resolve_teacher_dtype, teacher_forward, teacher_shape
from .objective import DistillationLoss
from .perf import flop_params, flops_per_token, mfu, peak_tflops
from .prep import prepare


class Trainee(nn.Module):
    """The student and the loss's trainable parts (projectors) as one module, for DDP and the optimizer."""

    def __init__(self, student: TinyGPT, objective: DistillationLoss):
        super().__init__()
        self.student, self.objective = student, objective

    def forward(self, ids, labels, teacher_out):
        out = self.student(ids, output_hidden_states=self.objective.spec.needs_hidden_states,
                           output_attentions=self.objective.spec.needs_attentions)
        return self.objective(out, teacher_out, labels)


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``floor`` × lr at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """A run's budget in steps and tokens, from its config and the size of its training split."""

    tokens_per_step: int  # batch_size · grad_accum · block_size
    steps_per_epoch: int  # whole batches of non-overlapping windows in the training split
    steps: int  # optimizer steps of the run (the schedule is laid over them)
    warmup: int
    eval_every: int  # steps between evaluations
    evals: int  # evaluations in a run that is not stopped early

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch


def schedule(cfg: ExperimentConfig, train_tokens: int) -> Schedule:
    """Steps, warmup and evaluation cadence of ``cfg`` on a training split of ``train_tokens`` tokens.

    The budget is ``train.max_tokens`` (rounded down to whole steps), else ``train.epochs`` passes;
    ``train.max_steps`` cuts it. Evaluations every ``eval_every`` steps, else every
    ``eval_every_tokens`` tokens, else once per epoch, and at the last step.
    """
    t = cfg.train
    per_step = t.batch_size * t.grad_accum * cfg.data.block_size
    per_epoch = n_windows(train_tokens, cfg.data.block_size) // (t.batch_size * t.grad_accum)
    if per_epoch < 1:
        raise KdlibError(f"{train_tokens:,} tokens make {n_windows(train_tokens, cfg.data.block_size)} windows of "
                         f"{cfg.data.block_size} tokens, fewer than one batch of {t.batch_size * t.grad_accum}; "
                         "use more data or a smaller batch")
    if t.max_tokens is not None:
        if t.max_tokens < per_step:
            raise KdlibError(f"train.max_tokens ({t.max_tokens:,}) is less than one step of {per_step:,} tokens "
                             "(batch_size x grad_accum x block_size)")
        total = t.max_tokens // per_step
    else:
        total = per_epoch * t.epochs
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    if t.eval_every is not None:
        every = t.eval_every
    elif t.eval_every_tokens is not None:
        every = max(1, round(t.eval_every_tokens / per_step))
    else:
        every = per_epoch
    evals = total // every + (1 if total % every else 0)
    return Schedule(per_step, per_epoch, total, max(1, int(t.warmup_frac * total)), every, evals)


def param_groups(module: nn.Module, weight_decay: float, decay_all: bool) -> list[dict]:
    """AdamW groups: decay on matrices only (embeddings and Linear weights), unless ``decay_all``."""
    params = [p for p in module.parameters() if p.requires_grad]
    if decay_all:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def mixed_precision(precision: str) -> str:
    """accelerate's mixed_precision for a config's precision on this machine."""
    if precision == "auto":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if bf16_native() else "fp16"
    if precision in ("bf16", "fp16") and not torch.cuda.is_available():
        return "no"  # CPU autocast of the whole step is slower than fp32 and not what the preset means
    return {"fp32": "no"}.get(precision, precision)


def bf16_native(device=None) -> bool:
    """bf16 in hardware (Ampere and newer). ``torch.cuda.is_bf16_supported()`` also says yes on a T4,
    where bf16 is emulated and slow: there fp16 with loss scaling is the right choice."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


@dataclass
class RunPaths:
    root: Path
    resume_dir: Optional[Path] = None
    weights_dir: Optional[Path] = None  # train.weights = "best": the students live here

    @classmethod
    def of(cls, cfg: ExperimentConfig, run_dir, results_dir=None) -> "RunPaths":
        """The files of the run of ``cfg`` in ``run_dir``, checked before anything touches them: the
        one place where train, sweep, eval and the panel get a run folder. Refused (``KdlibError``,
        nothing created or deleted): a run folder that is a symbolic link, or has one between it and
        ``results_dir`` (default: the folder it is in), that is a file or lies outside
        ``results_dir`` (``fileio.check_run_folder``); and any of the run's own files that is a link
        (kdlib writes, appends to and deletes them: through a link, that would be the link's target)."""
        t = cfg.train
        paths = cls(check_run_folder(run_dir, results_dir), Path(t.resume_dir) if t.resume_dir else None,
                    Path(t.weights_dir) if t.weights == "best" else None)
        refuse_links([paths.id_file])  # read by paths.student and paths.resume
        files = [paths.config, paths.metrics, paths.summary, paths.kept_student, paths.previous_student,
                 paths.lock, paths.root / "resume.safetensors", paths.student, paths.resume]
        refuse_links(files)
        # A folder in a file's place would make a finished run look unfinished (and be trained again).
        odd = [f for f in files if f.exists() and not f.is_file()]
        if odd:
            raise KdlibError(f"{odd[0]} is not a file (a folder or a device where kdlib keeps a file of the run); "
                             "move it away, or restore the file; nothing was changed")
        return paths

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def student(self) -> Path:
        """Where the run writes its best student: the run folder, or weights_dir under a name that
        is unique to this run folder (two results folders may hold runs of the same name)."""
        if self.weights_dir is not None:
            return self.weights_dir / f"{self.root.name}-{self._tag}.safetensors"
        return self.kept_student

    @property
    def id_file(self) -> Path:
        return self.root / ".run-id"

    @property
    def _tag(self) -> str:
        """Unique to this run folder: a shared resume_dir or weights_dir holds runs of one name from
        several results folders and presets (RESULTS/PRESET/kl-seed0). A random id kept in the run
        folder (``ensure_id``), so a results folder that is moved or renamed finds its files again;
        before there is one, a hash of the folder's path."""
        import hashlib

        return self.run_id or hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:10]

    @property
    def run_id(self) -> Optional[str]:
        """The run folder's id (``.run-id``), or None before it has one."""
        import re

        try:
            text = self.id_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text if re.fullmatch(r"[0-9a-f]{10}", text) else None

    def ensure_id(self) -> None:
        """Give the run folder its id, where its files live outside it (resume_dir, weights_dir)."""
        import secrets

        if (self.resume_dir is not None or self.weights_dir is not None) and not self.id_file.is_file():
            atomic_write_text(self.id_file, secrets.token_hex(5) + "\n")

    @property
    def kept_student(self) -> Path:
        """The student's place in the run folder (with weights = "best", a copy of the best run's)."""
        return self.root / "student.safetensors"

    @property
    def previous_student(self) -> Path:
        """Where a run that starts again from step 0 keeps the best student of its earlier attempt."""
        return self.student.with_name(self.student.name.replace(".safetensors", ".previous.safetensors"))

    @property
    def resume(self) -> Path:
        if self.resume_dir is not None:
            return self.resume_dir / f"{self.root.name}-{self._tag}.resume.safetensors"
        return self.root / "resume.safetensors"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"


def run_name(cfg: ExperimentConfig) -> str:
    """The run folder's name: experiment and seed, the feature kind when it is attention maps, and
    ``-topK`` when the teacher's outputs come from the top-k cache (``kl-top32-seed0``)."""
    spec = cfg.spec
    cached = f"-top{cfg.cache.top_k}" if teacher_source_of(cfg) == "cache" else ""
    return f"{spec.name}{'-attn' if spec.needs_attentions else ''}{cached}-seed{cfg.seed}"


def run_dir(results_dir, cfg: ExperimentConfig) -> Path:
    """A run's folder in a results folder: ``RESULTS/PRESET/RUN_NAME``, so presets never collide."""
    return Path(results_dir) / cfg.preset / run_name(cfg)


def teacher_source_of(cfg: ExperimentConfig) -> str:
    """Where this run's teacher outputs come from: "none" (no KD term), "online" or "cache"."""
    if not cfg.spec.needs_teacher:
        return "none"
    return cfg.train.teacher_source


def source_label(cfg: ExperimentConfig) -> str:
    """How reports name the teacher source next to the experiment: "" online, "top-32 cache"."""
    return f"top-{cfg.cache.top_k} cache" if teacher_source_of(cfg) == "cache" else ""


class RunLock:
    """One process per run folder, across the machines that share it (Colab VMs on one Drive).

    The lock file records who holds it: ``{"pid", "host", "boot_id", "started"}`` (JSON). It is
    stale, and taken over with a log line, when its process cannot be running: the lock names
    another host or another boot of this one (a Colab runtime restarted: the old PID may now be
    any live process, even this kernel), or its PID is gone, or it is this process's PID but this
    process does not hold it (``_HELD``: a lock left by an earlier life of this PID). Plain-PID
    lock files of older versions and unreadable ones are read the same way (a PID alone; garbage
    is stale). The refusal names the lock file, which can be deleted by hand when no process on
    any machine is training the run. A lock of another host cannot be checked from here: it is
    taken over, so two machines must not train one run folder at the same time.
    """

    def __init__(self, path: Path, log: Callable[[str], None] = print):
        self.path, self.log, self.mine = Path(path), log, None

    def __enter__(self):
        # The folders this lock makes (the run's, and RESULTS/PRESET when new): a run refused before it
        # wrote anything leaves none of them behind.
        self.created = []
        folder = self.path.parent
        while not folder.exists():
            self.created.append(folder)
            folder = folder.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = _read_lock(self.path)
                why = _stale_because(holder, self.path)
                if why is None:
                    raise KdlibError(
                        f"run folder {self.path.parent} is in use by process {holder['pid']} "
                        f"({_describe(holder)}; lock file {self.path}); wait for it to finish, or stop it first. "
                        f"If no process on any machine is training this run (e.g. after a runtime restart), "
                        f"delete {self.path} and run again") from None
                self.log(f"taking over the lock {self.path}: {why}")
                self.path.unlink(missing_ok=True)
                continue
            self.mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            with os.fdopen(fd, "w") as f:
                f.write(self.mine + "\n")
            _HELD.add(_lock_key(self.path))
            return self
        raise KdlibError(f"cannot take the lock {self.path}; another process took it at the same moment: "
                         "run again")

    def __exit__(self, *exc):
        _HELD.discard(_lock_key(self.path))
        try:  # only our own lock: one taken over from us (wrongly judged stale) stays its holder's
            if self.path.read_text().strip() == self.mine:
                self.path.unlink()
        except OSError:
            pass
        for folder in getattr(self, "created", []):  # innermost first; a run refused early leaves none
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the run's files


_HELD: set = set()  # the locks this process holds (RunLock), by real path


def _lock_key(path: Path) -> str:
    return os.path.realpath(path)


def _boot_id() -> Optional[str]:
    """This boot of this machine (Linux), or None where it cannot be read."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _read_lock(path: Path) -> Optional[dict]:
    """A lock file's holder: a dict with an int ``pid`` (and host, boot_id, started when recorded),
    from a JSON lock or an older plain-PID one; None when unreadable or not a lock."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if isinstance(obj, int) and not isinstance(obj, bool):
        obj = {"pid": obj}  # older kdlib: the PID alone
    if not isinstance(obj, dict) or isinstance(obj.get("pid"), bool) or not isinstance(obj.get("pid"), int) \
            or obj["pid"] <= 0:
        return None
    return {k: obj.get(k) for k in ("pid", "host", "boot_id", "started")}


def _stale_because(holder: Optional[dict], path: Path) -> Optional[str]:
    """Why a lock's holder cannot be running (the log line's reason), or None if it may be."""
    if holder is None:
        return "it is not a readable lock"
    pid, host, boot = holder["pid"], holder["host"], holder["boot_id"]
    if host is not None and host != socket.gethostname():
        return f"it was taken by process {pid} on another machine ({_describe(holder)})"
    if boot is not None and _boot_id() is not None and boot != _boot_id():
        return f"it was taken by process {pid} before this machine restarted ({_describe(holder)})"
    if pid == os.getpid():
        if _lock_key(path) in _HELD:
            return None
        return f"it holds this process's PID {pid}, from an earlier process (this one does not hold it)"
    if not _alive(pid):
        return f"its process {pid} is gone"
    return None


def _describe(holder: dict) -> str:
    if holder.get("host") is None:
        return "a lock of an older kdlib, without its machine"
    return f"host {holder['host']}, started {holder.get('started')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


def _load_data(cfg: ExperimentConfig, data_dir: Path, log) -> dict:
    """The three splits, checked before anything is trained: their manifests against this run (cheap),
    then each file against its manifest's checksum and every id against the model's vocabulary (once
    per file and process: a corrupt or foreign file would otherwise train silently or crash mid-run)."""
    from .data import verify_split

    if not all((data_dir / f"{s}.json").is_file() for s in SPLITS):
        log(f"preparing the data in {data_dir}")
        prepare(cfg, data_dir, log=log)
    splits = {s: load_split(data_dir, s) for s in SPLITS}
    for split in splits.values():
        check_tokenizer_fits(split, cfg.model.vocab_size)
        check_prepared_for(cfg, split)
    check_subset(cfg, splits["train"])
    for split in splits.values():
        verify_split(split, cfg.model.vocab_size)
    return splits


def check_subset(cfg: ExperimentConfig, train_split) -> None:
    """Refuse a training split prepared with another ``data.train_tokens`` subset (or with one, for
    a config that trains on the whole split): the budget's epochs would mean other data."""
    found = train_split.manifest["inputs"].get("subset")  # load_split checked that inputs is a dict
    d = cfg.data
    expected = {"tokens": d.train_tokens, "seed": d.subset_seed} if d.train_tokens is not None else None
    if found != expected:
        def say(x):
            if x is None:
                return "the whole train split"
            if not isinstance(x, dict) or not isinstance(x.get("tokens"), int):
                return f"a subset it does not describe ({x!r})"
            return f"a subset of {x['tokens']:,} tokens (seed {x.get('seed')})"
        raise KdlibError(f"{train_split.path} holds {say(found)}, but this run (preset {cfg.preset!r}) trains on "
                         f"{say(expected)}; prepare its data in its own folder (`python -m kdlib prep --preset "
                         f"{cfg.preset} --data-dir data/{cfg.preset}`) and point --data-dir there")


def _open_cache(cfg: ExperimentConfig, cache_dir: Optional[Path], tokens) -> TopKCache:
    """The run's top-k cache, refused with a message naming the mismatch (never a silent fallback)."""
    if cache_dir is None or not (cache_dir / "train.cache.json").is_file():
        raise KdlibError(f"train.teacher_source is 'cache' but there is no top-k cache in {cache_dir}; build it "
                         "with `python -m kdlib cache`, or train with the teacher online (--teacher-source online)")
    return TopKCache(cache_dir, "train", cache_identity(cfg, tokens))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _check_config(paths: RunPaths, cfg: ExperimentConfig) -> None:
    if paths.config.is_file():
        try:
            saved = ExperimentConfig.load(paths.config)
        except KdlibError as e:
            raise KdlibError(f"{e}\nThe run folder {paths.root} has an unreadable config; use another folder") from None
        # Speed-only settings may change between a run and its continuation.
        saved.train.compile = cfg.train.compile
        saved.train.save_every_s = cfg.train.save_every_s
        if saved != cfg:
            diff = []
            for k in ("preset", "exp", "seed", "model", "teacher", "loss", "data", "cache", "train"):
                a, b = getattr(saved, k), getattr(cfg, k)
                if a == b:
                    continue
                if dataclasses.is_dataclass(a):  # name the fields: train.weights_dir, not train
                    diff += [f"{k}.{f.name} ({getattr(a, f.name)!r} there, {getattr(b, f.name)!r} now)"
                             for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
                else:
                    diff.append(k)
            raise KdlibError(f"run folder {paths.root} holds a run of another configuration (differs in: "
                             f"{', '.join(diff)}; it is {saved.exp!r} seed {saved.seed} of preset "
                             f"{saved.preset!r}); use another folder, nothing was changed")


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


# A resume state's file beyond its tensors: a header entry per tensor (~4 per parameter tensor),
# the RNG states and counters in its metadata: ~34 KiB for smoke's student, ~55 KiB for the study's.
RESUME_EXTRA_BYTES = 128 * 1024


def student_parameters(cfg: ExperimentConfig) -> int:
    """The student's parameter count, from its config (tied embeddings counted once)."""
    return model_parameters(cfg.model)


def projector_parameters(cfg: ExperimentConfig, teacher_shape: Optional[tuple[int, int]] = None) -> int:
    """Parameters of the hidden-state feature loss's projectors (0 without them)."""
    from .losses import layer_pairs

    if not cfg.spec.needs_hidden_states:
        return 0
    n_teacher, d_teacher = teacher_shape or teacher_shape_hint(cfg)
    pairs = layer_pairs(cfg.loss_terms.layer_map_name, cfg.model.n_layer, n_teacher)
    return len(pairs) * (cfg.model.n_embd * d_teacher + d_teacher)


def estimate_run_bytes(cfg: ExperimentConfig, with_resume: bool,
                       teacher_shape: Optional[tuple[int, int]] = None, with_student: bool = True,
                       small_bytes: int = MiB) -> int:
    """What a run will write: the fp16 student (``with_student``), and (optionally) the float32 resume
    state (weights and both AdamW moments of the student and the feature projectors), plus
    ``small_bytes`` for config, metrics and summary (``kdlib.plan.small_files_bytes`` counts them
    from the run's schedule; 1 MiB without one)."""
    student = student_parameters(cfg)
    resume = 12 * (student + projector_parameters(cfg, teacher_shape)) + RESUME_EXTRA_BYTES if with_resume else 0
    return (2 * student if with_student else 0) + resume + small_bytes


def check_budget(cfg: ExperimentConfig, run_dir, budget: Optional[StorageBudget],
                 teacher_shape: Optional[tuple[int, int]] = None, sched: Optional["Schedule"] = None) -> None:
    """Refuse before training, not after hours, if the run's files will not fit the budget."""
    if budget is None:
        return
    paths = RunPaths.of(cfg, run_dir)
    inside = paths.resume.resolve().is_relative_to(budget.root.resolve())
    student_inside = paths.student.resolve().is_relative_to(budget.root.resolve())
    # Config, metrics and summary counted as the plan counts them: a flat allowance would refuse
    # runs of a sweep the plan said fits (the last ones of a colab sweep whose results folder holds
    # the kept best student, 97 MiB of 100, and 41 runs' metrics).
    from .plan import small_files_bytes

    need = estimate_run_bytes(cfg, inside, teacher_shape, with_student=student_inside,
                              small_bytes=small_files_bytes(cfg, sched) if sched is not None else MiB)
    # What the run will replace; not the student a run that starts again from step 0 keeps aside.
    kept = {paths.previous_student} | (set() if paths.resume.is_file() else {paths.student})
    have = sum(f.stat().st_size for f in paths.root.rglob("*") if f.is_file() and f not in kept) \
        if paths.root.is_dir() else 0
    if budget.used() - have + need > budget.limit_bytes:
        raise KdlibError(
            f"run {paths.root.name} will need about {need / MiB:.1f} MiB "
            f"({'with' if inside else 'without'} its resume state), and {budget.root} has "
            f"{(budget.limit_bytes - budget.used() + have) / MiB:.1f} MiB left of its "
            f"{budget.limit_bytes / MiB:.3g} MiB budget; nothing was started.\n{budget.report()}\n"
            "Free space (`python -m kdlib storage DIR --delete-weights RUN`), put the resume state "
            "elsewhere (train.resume_dir), keep the students outside the results folder (train.weights = "
            "'best' with train.weights_dir), or raise the budget.")


class FiniteGuard:
    """Remembers, on the device, the first step whose loss was not finite, and which parts were not.

    ``update`` costs a few tiny kernels and no host sync; ``check`` (one sync)
    runs where the loop synchronises anyway: before a log line, an evaluation
    or a save. A bad step is therefore reported at the next such point, and
    nothing after it (weights, metrics) is ever written.
    """

    def __init__(self, source: str = "online"):
        self.source = source  # where the teacher's outputs come from: names the likely cause
        self.step: Optional[torch.Tensor] = None  # 0 = every step so far was finite
        self.bad: Optional[torch.Tensor] = None  # [1 + parts] the first bad step's non-finite terms
        self.names: list[str] = []

    def update(self, step: int, out) -> None:
        values = torch.stack([out.total.detach().float(), *[v.float() for v in out.parts.values()]])
        bad = ~torch.isfinite(values)
        if self.step is None:
            self.names = ["total", *out.parts]
            self.step, self.bad = torch.zeros((), dtype=torch.long, device=bad.device), torch.zeros_like(bad)
        first = bad.any() & (self.step == 0)
        self.step = torch.where(first, step, self.step)
        self.bad = torch.where(first, bad, self.bad)

    def check(self, student_path, resume_path, accelerator=None) -> None:
        """Raise if a step so far was not finite. With ``accelerator`` (several processes), every
        process raises when any one saw it, so none is left waiting in a collective."""
        mine = self.step is not None and int(self.step) > 0
        if accelerator is not None and accelerator.num_processes > 1:
            flag = torch.tensor(float(mine), device=accelerator.device)
            if float(accelerator.reduce(flag, "sum")) == 0:
                return
            if not mine:
                raise KdlibError("another process saw a non-finite loss; the run stopped (its message "
                                 "names the step and the component)")
        elif not mine:
            return
        bad = [n for n, b in zip(self.names, self.bad.tolist()) if b and n != "total"] or ["total"]
        hint = ("the top-k cache may hold non-finite values (a damaged file): delete this split's cache files "
                "and build it again (`python -m kdlib cache`), or train with the teacher online; if the cache "
                "is sound, lower the learning rate or use fp32") if self.source == "cache" else \
            "lower the learning rate or use fp32"
        raise KdlibError(f"step {int(self.step)}: the loss is not finite (component: {', '.join(bad)}); the "
                         f"run stopped. The last good student is {student_path} and the resume state "
                         f"{resume_path}; {hint}")


def optimizer_step(accelerator, trainee: nn.Module, optimizer, scheduler, windows, batch, teacher_out_fn,
                   t, guard: FiniteGuard, step: int) -> dict:
    """One optimizer step: ``t.grad_accum`` micro-batches, clipping, AdamW, the schedule.

    The inner loop that training and ``kdlib.bench`` share. ``windows``/``batch``:
    the sampler's window indices and ``[batch_size·grad_accum, block + 1]`` tokens
    (shared by all processes: each takes its share); ``teacher_out_fn(idx, ids)``
    gives the teacher's outputs (or None). Returns the step's mean loss parts as
    device tensors, ``total`` included: no host sync here (fp16 loss scaling aside).
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = t.batch_size // world
    device = accelerator.device
    batch = torch.from_numpy(batch)
    if device.type == "cuda":
        batch = batch.pin_memory()
    parts_sum: dict = {}
    for micro in range(t.grad_accum):
        lo = micro * t.batch_size + rank * per_process  # this process's share of this micro-batch
        idx = windows[lo:lo + per_process]
        win = batch[lo:lo + per_process].to(device, non_blocking=True)
        ids, labels = win[:, :-1], win[:, 1:]  # [b, T] each
        teacher_out = teacher_out_fn(idx, ids)
        last = micro == t.grad_accum - 1
        with (nullcontext() if last else accelerator.no_sync(trainee)), accelerator.autocast():
            out = trainee(ids, labels, teacher_out)
            guard.update(step, out)
            accelerator.backward(out.total / t.grad_accum)
        for k, v in out.parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v / t.grad_accum
        parts_sum["total"] = parts_sum.get("total", 0.0) + out.total.detach() / t.grad_accum
    if t.grad_clip > 0:
        accelerator.clip_grad_norm_(trainee.parameters(), t.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return parts_sum


def make_optimizer(trainee: nn.Module, t, device) -> torch.optim.Optimizer:
    """AdamW with the config's groups; the fused CUDA kernel on a GPU (one launch for all parameters)."""
    extra = {"fused": True} if torch.device(device).type == "cuda" else {}
    return torch.optim.AdamW(param_groups(trainee, t.weight_decay, t.decay_all), lr=t.lr, betas=tuple(t.betas),
                             **extra)


def train(cfg: ExperimentConfig, run_dir, data_dir, *, cache_dir=None, teacher_source: Optional[str] = None,
          teacher: Optional[nn.Module] = None, budget: Optional[StorageBudget] = None, progress: bool = True,
          log: Callable[[str], None] = print, stop_after: Optional[int] = None) -> dict:
    """Train ``cfg`` in ``run_dir`` on the prepared data in ``data_dir``; return the summary.

    ``teacher_source`` ("online" or "cache"), when given, sets ``cfg.train.teacher_source``:
    the source is part of the run's config, recorded in config.json and the summary, and a
    continued run keeps it. ``stop_after`` ends the process's work after that many optimizer
    steps with the resume state saved (for tests of resuming and for time-sliced sessions).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if teacher_source is not None:
        if teacher_source not in TEACHER_SOURCES:
            raise KdlibError(f"unknown teacher source {teacher_source!r}; choose one of: "
                             f"{', '.join(TEACHER_SOURCES)} (the top-k cache is used only when asked for)")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, teacher_source=teacher_source))
    cfg.validate()
    # The run folder checked before anything touches it (a link, a file, outside the results folder).
    paths = RunPaths.of(cfg, run_dir, budget.root if budget is not None else None)
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else data_dir / "cache"
    # The scheduler steps once per optimizer step, not once per process (accelerate's default).
    try:
        accelerator = Accelerator(mixed_precision=mixed_precision(cfg.train.precision),
                                  cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
    except ValueError as e:  # e.g. a stray WORLD_SIZE without accelerate launch's other variables
        if not any(os.environ.get(v) for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")):
            raise
        raise KdlibError(f"the distributed setup in the environment is incomplete ({e}); unset WORLD_SIZE, "
                         "RANK, LOCAL_RANK and MASTER_ADDR to train in one process, or start the run with "
                         "`accelerate launch`") from None
    main = accelerator.is_main_process
    log = log if main else (lambda *_: None)
    # Every process reads the folder and takes the same decisions; only the main one writes.
    _check_config(paths, cfg)
    if paths.summary.is_file():
        log(f"{paths.root} is finished: {paths.summary}")
        return read_json(paths.summary, "summary")
    with (RunLock(paths.lock, log) if main else nullcontext()):
        if main:  # temporary files of a write that a killed process never finished
            for stale in paths.root.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        splits = _load_data(cfg, data_dir, log)
        source = teacher_source_of(cfg)
        cache = _open_cache(cfg, cache_dir, splits["train"]) if source == "cache" else None
        where: dict = {}  # _run keeps its state here: the step an interruption reports
        try:
            return _run(cfg, paths, splits, source, cache, teacher, budget, accelerator, progress, log,
                        stop_after, tqdm, where)
        except KeyboardInterrupt:
            # Ctrl-C (or a notebook's stop button): every file is whole (writes are atomic) and the
            # resume state is the last one saved; the lock goes with this block. One line, then the
            # interrupt goes on to the caller (the CLI prints its message, a notebook stops the cell).
            if "bar" in where:
                where["bar"].close()
            state = where.get("state")
            if state is None:
                log(f"{paths.root.name}: interrupted before training started; run the same command again "
                    "to continue")
            else:
                log(f"interrupted at step {state['step']}; run the same command again to continue (from step "
                    f"{where['saved']}, its last saved state)")
            raise


def _run(cfg, paths, splits, source, cache, teacher, budget, accelerator, progress, log, stop_after, tqdm,
         where=None):
    t = cfg.train
    where = {} if where is None else where
    world = accelerator.num_processes
    # Read (and a bad $KDLIB_PEAK_TFLOPS refused) before anything is written.
    peak = peak_tflops(None if accelerator.device.type == "cuda" else "cpu")
    if t.batch_size % world:
        raise KdlibError(f"train.batch_size ({t.batch_size}) must be divisible by the number of processes ({world})")
    plan = schedule(cfg, splits["train"].n_tokens)
    if accelerator.is_main_process:
        # From the config alone (parameter counts, the teacher's shape from its config), before any
        # model is built: a run the budget refuses allocates nothing and writes nothing.
        check_budget(cfg, paths.root, budget, None, plan)
    torch.manual_seed(cfg.seed)
    student = TinyGPT(cfg.model)
    if t.compile:
        student.compile()  # in place: parameter names, checkpoints and resume states stay the same
    teacher_dtype = resolve_teacher_dtype(cfg.teacher.dtype, accelerator.device)
    if source == "online" and teacher is None:
        spec = cfg.spec
        teacher = load_teacher(cfg.teacher, device=accelerator.device, dtype=teacher_dtype,
                               need_attentions=spec.needs_attentions, student_vocab_size=cfg.model.vocab_size)
    elif teacher is not None:
        teacher = teacher.to(accelerator.device)
    if teacher is not None:
        teacher_dtype = next(teacher.parameters()).dtype
    objective = DistillationLoss(cfg.loss_terms, cfg.model, teacher if source == "online" else None, compile=t.compile)
    trainee = Trainee(student, objective)
    optimizer = make_optimizer(trainee, t, accelerator.device)
    sampler = WindowSampler(splits["train"].tokens(), cfg.data.block_size, t.batch_size * t.grad_accum, cfg.seed)
    steps_per_epoch, total, eval_every = plan.steps_per_epoch, plan.steps, plan.eval_every
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, plan.warmup, t.min_lr_ratio))
    if accelerator.is_main_process:
        # Checked before anything is written: a refused run leaves no folder claimed. Again with the
        # loaded teacher's shape, where the projectors' size depends on it and the config's hint differs.
        shape = teacher_shape(teacher) if teacher is not None and objective.spec.needs_hidden_states else None
        if shape is not None and tuple(shape) != tuple(teacher_shape_hint(cfg)):
            check_budget(cfg, paths.root, budget, shape, plan)
        if not paths.config.is_file():
            atomic_write_text(paths.config, cfg.to_json() + "\n")
        paths.ensure_id()
    state = {"step": 0, "best": math.inf, "best_step": None, "bad_evals": 0, "tokens": 0, "wall": 0.0,
             "eval_wall": 0.0, "evals": 0}

    if paths.resume.is_file():
        try:
            resume = load_resume(paths.resume)
            check_resume(resume, cfg, paths, plan, source)
            _load_resume(resume, trainee, optimizer, scheduler, sampler, state, paths.resume)
        except KdlibError as e:
            raise KdlibError(f"{e}\n{restart_advice(paths)}") from None
        if state["best_step"] is not None and not paths.student.is_file() and accelerator.is_main_process:
            raise KdlibError(f"the best student of {paths.root.name} (step {state['best_step']}, validation "
                             f"perplexity {state['best']:.2f}) is missing from {paths.student}, so this run cannot "
                             "be finished from its resume state: restore that file (e.g. to the train.weights_dir "
                             f"it was in), or delete {paths.resume} to train the run again from step 0")
        log(f"resuming {paths.root.name} at step {state['step']}")
    elif accelerator.is_main_process:
        if paths.metrics.is_file() and paths.metrics.stat().st_size:
            log(f"note: {paths.root.name} has metrics but no resume state at {paths.resume}: it starts again "
                "from step 0 (a moved run folder keeps its state only with its .run-id file)")
        if paths.student.is_file():  # an earlier attempt's best student: kept, not overwritten
            os.replace(paths.student, paths.previous_student)
            log(f"note: {paths.root.name} starts again from step 0; the best student of its earlier attempt "
                f"is kept as {paths.previous_student}")
    where.update(state=state, saved=state["step"])
    trainee, optimizer, scheduler = accelerator.prepare(trainee, optimizer, scheduler)
    metrics = _metrics_until(paths.metrics, state["step"]) if accelerator.is_main_process else []
    if accelerator.is_main_process:  # drop lines written after the resume point: the rerun writes them again
        atomic_write_text(paths.metrics, "".join(json.dumps(r) + "\n" for r in metrics))
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    tokens_per_step = plan.tokens_per_step
    bar = tqdm(total=total, initial=state["step"], desc=run_name(cfg), unit="step",
               disable=not (progress and accelerator.is_main_process))
    where["bar"] = bar
    val_tokens = splits["validation"].tokens()
    last_val = None
    last_loss = None
    stopped_early = False
    steps_this_process = 0
    tokens_log = 0
    spec_h, spec_a = objective.spec.needs_hidden_states, objective.spec.needs_attentions
    if source == "online":
        def teacher_out_fn(idx, ids):
            return teacher_forward(teacher, ids, spec_h, spec_a)
    elif source == "cache":
        def teacher_out_fn(idx, ids):
            return cache.batch(idx, accelerator.device)
    else:
        def teacher_out_fn(idx, ids):
            return None
    flops_token = flops_per_token(flop_params(student), cfg.model.n_layer, cfg.model.n_embd, cfg.data.block_size,
                                  *((flop_params(teacher), *teacher_shape(teacher)) if source == "online" else ()))
    guard = FiniteGuard(source)
    clock = _TrainClock(state["wall"])
    wall_log = state["wall"]
    wall_saved = state["wall"]
    while state["step"] < total:
        trainee.train()
        windows, batch = sampler.next_batch()  # [batch_size · grad_accum] windows, shared by all processes
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        parts_sum = optimizer_step(accelerator, trainee, optimizer, scheduler, windows, batch, teacher_out_fn,
                                   t, guard, state["step"] + 1)
        faults.point("step")
        state["step"] += 1
        steps_this_process += 1
        state["tokens"] += tokens_per_step
        tokens_log += tokens_per_step
        epoch = state["step"] / steps_per_epoch
        row = None
        if state["step"] % t.log_every == 0 or state["step"] == total:
            guard.check(paths.student, paths.resume, accelerator)
            parts = {k: float(accelerator.reduce(v.detach().float(), "mean")) for k, v in parts_sum.items()}
            state["wall"] = clock.wall()  # after the sync above: the GPU has finished these steps
            total_loss = parts.pop("total")
            last_loss = total_loss
            speed = tokens_log / max(state["wall"] - wall_log, 1e-9)
            row = {"step": state["step"], "epoch": round(epoch, 4), "tokens": state["tokens"],
                   "lr": lr, "loss": total_loss,
                   **{f"loss_{k}": v for k, v in parts.items()},
                   "tokens_per_s": speed, "peak_mem_mib": _peak_mem()}
            utilisation = mfu(speed / world, flops_token, peak)  # tokens are global, the peak per device
            if utilisation is not None:
                row["mfu"] = utilisation
            wall_log, tokens_log = state["wall"], 0
        at_eval = state["step"] % eval_every == 0 or state["step"] == total
        if at_eval:
            guard.check(paths.student, paths.resume, accelerator)
            clock.pause()
            t_eval = time.perf_counter()
            val = perplexity(accelerator.unwrap_model(trainee).student, val_tokens, cfg.data.block_size,
                             stride=cfg.data.block_size, batch_size=t.eval_batch_size)
            last_val = val
            faults.point("eval")
            row = dict(row or {"step": state["step"], "epoch": round(epoch, 4), "tokens": state["tokens"]},
                       val_ppl=val)
            if val < state["best"]:
                state.update(best=val, best_step=state["step"], bad_evals=0)
                if accelerator.is_main_process:
                    save_student(accelerator.unwrap_model(trainee).student, paths.student,
                                 budget=_budget_for(paths.student, budget),
                                 exp=cfg.exp, seed=cfg.seed, step=state["step"], val_ppl=val)
            else:
                state["bad_evals"] += 1
            stopped_early = state["bad_evals"] >= t.patience
            state["evals"] += 1
            state["eval_wall"] += time.perf_counter() - t_eval
            clock.resume()
        if row is not None and accelerator.is_main_process:
            metrics.append(row)
            with open(paths.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if accelerator.is_main_process and (row is not None or state["step"] == 1):
            # The last logged loss (a step that only evaluates has none of its own); the time left
            # from this run's training speed and evaluation cost so far.
            bar.set_postfix(loss=f"{last_loss:.3f}" if last_loss is not None else "-",
                            val_ppl=f"{last_val:.1f}" if last_val else "-",
                            tok_s=f"{row['tokens_per_s']:,.0f}" if row and "tokens_per_s" in row else "-",
                            **({"mfu": f"{row['mfu']:.0%}"} if row and "mfu" in row else {}),
                            eta=_eta(state, plan, clock.wall()))
        bar.update(1)
        # ~10 minutes of training since the last save; decided at log lines and evaluations (where
        # every process syncs anyway), and by all processes together, since saving has collectives.
        due = row is not None and clock.wall() - wall_saved >= t.save_every_s
        if row is not None and world > 1:
            due = float(accelerator.reduce(torch.tensor(float(due), device=accelerator.device), "sum")) > 0
        if at_eval or due or stopped_early or state["step"] == total or \
                (stop_after and steps_this_process >= stop_after):
            guard.check(paths.student, paths.resume, accelerator)
            state["wall"] = clock.wall()
            clock.pause()
            _save_resume(paths, cfg, source, trainee, optimizer, scheduler, sampler, state, accelerator, budget)
            clock.resume()
            wall_saved = state["wall"]
            where["saved"] = state["step"]
        if stopped_early:
            log(f"early stop at step {state['step']}: no improvement in {t.patience} evaluations")
            break
        if stop_after and steps_this_process >= stop_after and state["step"] < total:
            bar.close()
            return {"stopped_at": state["step"]}
    bar.close()
    state["wall"] = clock.wall()
    device = accelerator.device
    summary = _summary(cfg, paths, splits, teacher, state, metrics, stopped_early, n_student, n_teacher, source,
                       plan, device, teacher_dtype)
    if accelerator.is_main_process:
        atomic_write_json(paths.summary, summary)
        # A finished run is never resumed: its resume state (several times the student's size)
        # goes, so a sweep's results fit the budget. Written summary first: a kill in between
        # still leaves a finished run.
        paths.resume.unlink(missing_ok=True)
        test = summary.get("test_ppl")
        log(f"{paths.root.name}: best val ppl {summary['best_val_ppl']:.2f} at step {summary['best_step']}, "
            + (f"test ppl {test:.2f} (stride {summary['eval_stride']})" if test is not None else
               f"no test ppl: no student was saved at {paths.student}"))
        if paths.weights_dir is not None:
            keep_best_student(paths.root.parent, budget, log)
    accelerator.wait_for_everyone()
    return summary


def _budget_for(path: Path, budget: Optional[StorageBudget]) -> Optional[StorageBudget]:
    """``budget`` if ``path`` lies inside its folder (a file elsewhere is not the budget's)."""
    if budget is None or not path.resolve().is_relative_to(budget.root.resolve()):
        return None
    return budget


def _eta(state: dict, plan: Schedule, wall: float) -> str:
    """The run's time left, h:mm:ss: its remaining steps at this run's training speed so far, plus
    its remaining evaluations at their average cost (early stopping may end it sooner)."""
    if state["step"] < 1:
        return "-"
    per_step = wall / state["step"]
    per_eval = state["eval_wall"] / state["evals"] if state["evals"] else 0.0
    left = (plan.steps - state["step"]) * per_step + max(plan.evals - state["evals"], 0) * per_eval
    m, sec = divmod(int(left), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}"


def keep_best_student(folder: Path, budget: Optional[StorageBudget], log=print) -> Optional[str]:
    """train.weights = "best": the finished run of ``folder`` with the lowest best validation
    perplexity keeps a copy of its student in its run folder; no other run there does.

    A copy is removed only when its original is still in weights_dir (so nothing is lost: a run
    whose original is gone keeps its copy, and still competes for best); a copy that would not
    fit the budget is not made (and said so). Returns the name of the run holding the best copy.
    """
    import shutil

    finished = []
    for run in sorted(p for p in Path(folder).iterdir() if p.is_dir() and (p / "summary.json").is_file()):
        try:  # a link (RunPaths.of refuses it) is not a run of this folder: never copied into or deleted
            paths = RunPaths.of(ExperimentConfig.load(run / "config.json"), run)
            summary = read_json(run / "summary.json", "summary")
        except KdlibError:
            continue
        ppl = summary.get("best_val_ppl")
        if paths.weights_dir is None or not isinstance(ppl, (int, float)) or not math.isfinite(ppl) \
                or not (paths.student.is_file() or paths.kept_student.is_file()):
            continue
        finished.append((ppl, run.name, paths))
    if not finished:
        return None
    _, best_name, best = min(finished, key=lambda f: (f[0], f[1]))
    for _, name, paths in finished:  # first the other copies: the budget then has room for the new one
        if name != best_name and paths.kept_student.is_file() and paths.student.is_file():
            paths.kept_student.unlink()
    if best.kept_student.is_file() and (not best.student.is_file()
                                        or best.kept_student.stat().st_size == best.student.stat().st_size):
        return best_name
    try:
        if budget is not None and best.kept_student.resolve().is_relative_to(budget.root.resolve()):
            budget.check(best.kept_student, best.student.stat().st_size)
    except KdlibError:
        log(f"the best student ({best_name}) does not fit the results folder's budget; it stays in "
            f"{best.student}")
        return None
    tmp = best.kept_student.with_name(f".{best.kept_student.name}.tmp")
    shutil.copyfile(best.student, tmp)
    os.replace(tmp, best.kept_student)
    log(f"best student so far: {best_name} (a copy in its run folder; every student is in {best.weights_dir})")
    return best_name


class _TrainClock:
    """Training wall time without a per-step sync: read it right after a host sync (a log line,
    an evaluation, a save), when the GPU has caught up; evaluations and saves are left out."""

    def __init__(self, base: float):
        self.base, self.start, self.excluded, self.paused_at = base, time.perf_counter(), 0.0, None

    def wall(self) -> float:
        return self.base + time.perf_counter() - self.start - self.excluded

    def pause(self) -> None:
        self.paused_at = time.perf_counter()

    def resume(self) -> None:
        self.excluded += time.perf_counter() - self.paused_at


def _peak_mem() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / MiB
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # pragma: no cover - Windows
        return float("nan")


SPEED_ONLY = ("compile", "save_every_s")  # train fields a continued run may change (_check_config)


def config_digest(cfg: ExperimentConfig) -> str:
    """sha256 of the run's full config, less the speed-only fields: what binds a resume state to it."""
    import hashlib

    d = cfg.to_dict()
    for k in SPEED_ONLY:
        d["train"].pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def restart_advice(paths: RunPaths) -> str:
    """What deleting a resume state does: said exactly, since the run's best student is at stake."""
    return (f"To train {paths.root.name} again from step 0 instead, delete {paths.resume}: its metrics.jsonl starts "
            f"over, and its best student so far ({paths.student}, if any) is kept as {paths.previous_student} "
            "(replacing an older one there); nothing else is deleted.")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_resume(resume: dict, cfg: ExperimentConfig, paths: RunPaths, plan: Schedule, source: str) -> None:
    """Refuse a resume state that is not this run's, or whose contents cannot be this run's.

    A resume state is bound to its run: experiment, seed, teacher source, the full config's digest
    and (outside the run folder, in a shared ``train.resume_dir``) the run folder's id. States of
    older versions have neither of the last two and are read on the first three. Its counters
    decide what happens next (a step past the budget would mark the run finished and delete the
    state), so they are checked for type and range here, and its parts for the types that
    ``_load_resume`` hands to ``load_state_dict``; every refusal is a ``KdlibError``.
    """
    where = f"resume state {paths.resume}"
    if resume.get("exp") != cfg.exp or resume.get("seed") != cfg.seed:
        raise KdlibError(f"{where} belongs to another run ({resume.get('exp')!r} seed {resume.get('seed')!r}, this "
                         f"run is {cfg.exp!r} seed {cfg.seed}); use another folder")
    if resume.get("teacher_source", source) != source:
        raise KdlibError(f"{where} was trained with the teacher source {resume['teacher_source']!r}, this run asks "
                         f"for {source!r}: a run keeps its source. Continue it with the same source")
    if "config_sha256" in resume and resume["config_sha256"] != config_digest(cfg):
        raise KdlibError(f"{where} was saved by a run of another configuration than {paths.config}'s (config "
                         f"digest {str(resume['config_sha256'])[:12]}, this run's {config_digest(cfg)[:12]}): it "
                         "cannot continue this run")
    if paths.resume_dir is not None and "run_id" in resume and resume["run_id"] != paths.run_id:
        raise KdlibError(f"{where} was saved by another run folder (run id {resume['run_id']!r}, {paths.id_file} "
                         f"says {paths.run_id!r}); it cannot continue this run")
    types = {"model": dict, "optimizer": dict, "scheduler": dict, "sampler": dict, "rng": dict, "state": dict}
    bad = [k for k, kind in types.items() if not isinstance(resume.get(k), kind)]
    if bad:
        raise KdlibError(f"{where} is incomplete or corrupt: {', '.join(bad)} missing or not a mapping")
    opt = resume["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise KdlibError(f"{where} is corrupt: its optimizer state has no state or param_groups")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in resume["model"].items()):
        raise KdlibError(f"{where} is corrupt: its model state is not a mapping of names to tensors")
    st = resume["state"]
    step, tokens = st.get("step"), st.get("tokens")
    if not _is_int(step) or not 0 <= step <= plan.steps:
        raise KdlibError(f"{where} is corrupt: step {step!r} is not a whole number in 0..{plan.steps} (this "
                         "run's budget of steps)")
    if not _is_int(tokens) or tokens != step * plan.tokens_per_step:
        raise KdlibError(f"{where} is corrupt: tokens {tokens!r} is not step {step} x {plan.tokens_per_step} "
                         "tokens per step")
    best, best_step = st.get("best"), st.get("best_step")
    if not _is_num(best) or math.isnan(best) or not (best_step is None or (_is_int(best_step)
                                                                          and 1 <= best_step <= step)):
        raise KdlibError(f"{where} is corrupt: best {best!r} at step {best_step!r} (step {step})")
    for key in ("bad_evals", "evals"):
        if not _is_int(st.get(key)) or st[key] < 0:
            raise KdlibError(f"{where} is corrupt: {key} {st.get(key)!r} is not a whole number >= 0")
    for key in ("wall", "eval_wall"):
        if not _is_num(st.get(key)) or not math.isfinite(st[key]) or st[key] < 0:
            raise KdlibError(f"{where} is corrupt: {key} {st.get(key)!r} is not a number of seconds")
    last = resume["scheduler"].get("last_epoch")
    if last != step:
        raise KdlibError(f"{where} is corrupt: its schedule is at step {last!r}, its counters at step {step}")


def _load_resume(resume: dict, trainee, optimizer, scheduler, sampler, state: dict, path: Path) -> None:
    """Load a state ``check_resume`` passed into the run's objects; anything they reject (shapes,
    missing entries, RNG states) is a ``KdlibError``, never a traceback."""
    what = "model"
    try:
        trainee.load_state_dict(resume["model"])
        what = "optimizer"
        optimizer.load_state_dict(resume["optimizer"])
        for p in optimizer.state:  # load_state_dict does not compare the moments' shapes to the params
            for k, v in optimizer.state[p].items():
                if isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape:
                    raise ValueError(f"{k} has shape {tuple(v.shape)} for a parameter of {tuple(p.shape)}")
        what = "scheduler"
        unknown = set(resume["scheduler"]) - set(scheduler.state_dict())
        if unknown:
            raise ValueError(f"unknown entries {sorted(unknown)}")
        scheduler.load_state_dict(resume["scheduler"])
        what = "data position"
        sampler.load_state_dict(resume["sampler"])
        what = "random number generator"
        _set_rng_state(resume["rng"])
    except KdlibError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise KdlibError(f"resume state {path}: its {what} does not fit this run ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300] if str(e) else e!r}); it is corrupt or of another "
                         "model") from None
    state.update({k: resume["state"][k] for k in state if k in resume["state"]})


def _save_resume(paths, cfg, source, trainee, optimizer, scheduler, sampler, state, accelerator, budget) -> None:
    if not accelerator.is_main_process:
        return
    resume = {"exp": cfg.exp, "seed": cfg.seed, "teacher_source": source, "kdlib_version": __version__,
              "config_sha256": config_digest(cfg), "run_id": paths.run_id,
              "model": accelerator.unwrap_model(trainee).state_dict(), "optimizer": optimizer.state_dict(),
              "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(), "rng": _rng_state(),
              "state": dict(state)}
    save_resume(paths.resume, resume, _budget_for(paths.resume, budget))


def _metrics_until(path: Path, step: int) -> list[dict]:
    """The metrics lines of a resumed run up to its resume step; a line whose step is not a whole
    number (edited by hand) is a clear error naming the file, not a crash in a comparison."""
    rows = read_jsonl(path)
    bad = [r for r in rows if isinstance(r.get("step", 0), bool) or not isinstance(r.get("step", 0), int)]
    if bad:
        raise KdlibError(f"{path} has a line whose step is {bad[0].get('step')!r}, not a whole number: it was "
                         "edited or damaged. Restore it, or delete the run folder to train the run again")
    return [r for r in rows if r.get("step", 0) <= step]


def _summary(cfg, paths, splits, teacher, state, metrics, stopped_early, n_student, n_teacher, source, plan,
             device, teacher_dtype) -> dict:
    from .checkpoint import load_student

    stride = cfg.data.block_size // 2
    evals = [m for m in metrics if "val_ppl" in m]
    best = load_student(paths.student) if paths.student.is_file() else None
    summary = {
        "exp": cfg.exp, "preset": cfg.preset, "seed": cfg.seed, "feature": cfg.loss.feature,
        "teacher_source": source, "cache_top_k": cfg.cache.top_k if source == "cache" else None,
        "teacher_dtype": str(teacher_dtype).replace("torch.", ""),
        "best_val_ppl": state["best"], "best_step": state["best_step"],
        "final_val_ppl": evals[-1]["val_ppl"] if evals else None,
        "steps": state["step"], "tokens": state["tokens"], "budget_tokens": plan.tokens,
        "budget_steps": plan.steps, "stopped_early": stopped_early,
        "train_wall_s": state["wall"], "tokens_per_s": state["tokens"] / max(state["wall"], 1e-9),
        "eval_wall_s": state.get("eval_wall", 0.0),
        "device": device_name(), "params_student": n_student, "params_teacher": n_teacher,
        "val_split": "validation", "test_split": "test",
        "eval_block_size": cfg.data.block_size, "eval_stride": stride, "in_training_eval_stride": cfg.data.block_size,
        "student_path": str(paths.student.resolve()), "kdlib_version": __version__,
        # What `eval` checks its data against: another tokenizer's ids would give a number that means nothing.
        "tokenizer_hash": splits["train"].manifest["inputs"]["tokenizer"]["hash"],
    }
    if best is not None:
        best = best.to(device)  # final perplexities on the training device, whatever the experiment
        summary["best_val_ppl_sliding"] = perplexity(best, splits["validation"].tokens(), cfg.data.block_size,
                                                     stride, cfg.train.eval_batch_size)
        summary["test_ppl"] = perplexity(best, splits["test"].tokens(), cfg.data.block_size, stride,
                                         cfg.train.eval_batch_size)
    summary["teacher_test_ppl"] = teacher_perplexity(cfg, splits["test"], teacher if source == "online" else None,
                                                     device)
    return summary


def teacher_perplexity(cfg: ExperimentConfig, split, teacher: Optional[nn.Module] = None, device=None) -> float:
    """The teacher's perplexity on ``split`` under the students' protocol, in the dtype it runs in on
    ``device``; computed once per data folder (the key names teacher, dtype, data and protocol)."""
    stride = cfg.data.block_size // 2
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = next(teacher.parameters()).dtype if teacher is not None else resolve_teacher_dtype(cfg.teacher.dtype,
                                                                                              device)
    key = {"teacher": asdict(cfg.teacher), "dtype": str(dtype).replace("torch.", ""),
           "split": split.manifest["split"], "data_sha256": split.manifest["sha256"],
           "block_size": cfg.data.block_size, "stride": stride}
    path = split.path.parent / "teacher_ppl.json"
    entries = read_json(path, "teacher perplexity file").get("entries", []) if path.is_file() else []
    for entry in entries:
        if entry["key"] == key:
            return entry["ppl"]
    if teacher is None:
        teacher = load_teacher(cfg.teacher, device=device, dtype=dtype, student_vocab_size=cfg.model.vocab_size)
    ppl = perplexity(teacher, split.tokens(), cfg.data.block_size, stride, cfg.train.eval_batch_size)
    atomic_write_json(path, {"entries": entries + [{"key": key, "ppl": ppl}]})
    return ppl
