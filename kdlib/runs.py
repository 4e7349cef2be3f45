"""A run's folder: its files (``RunPaths``), its name, the checks before it trains (its config,
its data, the storage budget), and what it leaves at the end (the summary, the kept best student).

One run = one experiment, one seed, one run folder::

    RUN/config.json        the full ExperimentConfig (refuses a folder of another experiment)
    RUN/metrics.jsonl      one JSON object per log step and per evaluation
    RUN/student.safetensors  the best student so far (fp16), on validation perplexity
    RUN/resume.safetensors   everything to continue exactly (or in train.resume_dir)
    RUN/summary.json       written at the end: best/final validation ppl, test ppl, teacher ppl, cost
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .cache import TopKCache, cache_identity
from .compute import teacher_source_of  # its home is compute; kdlib.runs.teacher_source_of stays importable
from .config import ExperimentConfig
from .config.sweep import point_label
from .data import SPLITS, check_prepared_for, check_tokenizer_fits, load_split, verify_split
from .errors import KdlibError
from .evaluate import perplexity
from .fileio import atomic_write_text, check_run_folder, read_json, read_jsonl, refuse_links, store_derived
from .prep import prepare
from .models import load_teacher, resolve_teacher_dtype
from .optim import Schedule
from .storage import MiB, StorageBudget, estimate_run_bytes, small_files_bytes


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
        train = cfg.train
        paths = cls(check_run_folder(run_dir, results_dir), Path(train.resume_dir) if train.resume_dir else None,
                    Path(train.weights_dir) if train.weights == "best" else None)
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
        return self.run_id or hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:10]

    @property
    def run_id(self) -> Optional[str]:
        """The run folder's id (``.run-id``), or None before it has one."""
        try:
            text = self.id_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text if re.fullmatch(r"[0-9a-f]{10}", text) else None

    def ensure_id(self) -> None:
        """Give the run folder its id, where its files live outside it (resume_dir, weights_dir)."""
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
    """The run folder's name: experiment and seed, the feature kind when it is attention maps,
    ``-topK`` when the teacher's outputs come from the top-k cache (``kl-top32-seed0``), and a
    sweep's values (``kl+temperature=1-seed0``: two points of a sweep never share a folder)."""
    spec = cfg.spec
    cached = f"-top{cfg.cache.top_k}" if teacher_source_of(cfg) == "cache" else ""
    swept = "+" + point_label(cfg.sweep, sep="+") if cfg.sweep else ""
    return f"{spec.name}{'-attn' if spec.needs_attentions else ''}{cached}{swept}-seed{cfg.seed}"


def run_dir(results_dir, cfg: ExperimentConfig) -> Path:
    """A run's folder in a results folder: ``RESULTS/PRESET/RUN_NAME``, so presets never collide."""
    return Path(results_dir) / cfg.preset / run_name(cfg)


# --------------------------------------------------------------------------
# before a run trains


SPEED_ONLY = ("compile", "save_every_s")  # train fields a continued run may change (check_config)


# The loss components a config.json repeated under "loss" before the experiment name became
# their one source: a resume state saved then is bound to a digest that includes them.
COMPONENTS_IN_LOSS = ("divergence", "divergence_param", "feature_map", "cosine")


def config_digest(cfg: ExperimentConfig, components_in_loss: bool = False) -> str:
    """sha256 of the run's full config, less the speed-only fields: what binds a resume state to it.

    ``components_in_loss``: the digest of the same config as kdlib wrote it before, with the
    experiment's components repeated under "loss", so that a run interrupted then still continues."""
    d = cfg.to_dict()
    for k in SPEED_ONLY:
        d["train"].pop(k, None)
    if components_in_loss:
        d["loss"].update({k: getattr(cfg.spec, k) for k in COMPONENTS_IN_LOSS})
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def check_config(paths: RunPaths, cfg: ExperimentConfig) -> None:
    """Refuse a run folder that holds a run of another configuration (the speed-only fields aside)."""
    if paths.config.is_file():
        try:
            saved = ExperimentConfig.load(paths.config)
        except KdlibError as e:
            raise KdlibError(f"{e}\nThe run folder {paths.root} has an unreadable config; use another folder") from None
        # Speed-only settings may change between a run and its continuation.
        for k in SPEED_ONLY:
            setattr(saved.train, k, getattr(cfg.train, k))
        if saved != cfg:
            diff = []
            for k in ("preset", "exp", "seed", "model", "teacher", "loss", "data", "cache", "train", "sweep"):
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


def check_budget(cfg: ExperimentConfig, run_dir, budget: Optional[StorageBudget],
                 teacher_shape: Optional[tuple[int, int]] = None, sched: Optional[Schedule] = None) -> None:
    """Refuse before training, not after hours, if the run's files will not fit the budget."""
    if budget is None:
        return
    paths = RunPaths.of(cfg, run_dir)
    inside = paths.resume.resolve().is_relative_to(budget.root.resolve())
    student_inside = paths.student.resolve().is_relative_to(budget.root.resolve())
    # Config, metrics and summary counted as the plan counts them: a flat allowance would refuse
    # runs of a sweep the plan said fits (the last ones of a colab sweep whose results folder holds
    # the kept best student, 97 MiB of 100, and 41 runs' metrics).
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


def load_data(cfg: ExperimentConfig, data_dir: Path, log) -> dict:
    """The three splits, checked before anything is trained: their manifests against this run (cheap),
    then each file against its manifest's checksum and every id against the model's vocabulary (once
    per file and process: a corrupt or foreign file would otherwise train silently or crash mid-run)."""
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


def open_cache(cfg: ExperimentConfig, cache_dir: Optional[Path], tokens) -> TopKCache:
    """The run's top-k cache, refused with a message naming the mismatch (never a silent fallback)."""
    if cache_dir is None or not (cache_dir / "train.cache.json").is_file():
        raise KdlibError(f"train.teacher_source is 'cache' but there is no top-k cache in {cache_dir}; build it "
                         "with `python -m kdlib cache`, or train with the teacher online (--teacher-source online)")
    return TopKCache(cache_dir, "train", cache_identity(cfg, tokens))


def metrics_until(path: Path, step: int) -> list[dict]:
    """The metrics lines of a resumed run up to its resume step; a line whose step is not a whole
    number (edited by hand) is a clear error naming the file, not a crash in a comparison."""
    rows = read_jsonl(path)
    bad = [r for r in rows if isinstance(r.get("step", 0), bool) or not isinstance(r.get("step", 0), int)]
    if bad:
        raise KdlibError(f"{path} has a line whose step is {bad[0].get('step')!r}, not a whole number: it was "
                         "edited or damaged. Restore it, or delete the run folder to train the run again")
    return [r for r in rows if r.get("step", 0) <= step]



# --------------------------------------------------------------------------
# after a run


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


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
    # A read-only data folder must not end a finished run (its summary is written after this).
    store_derived(path, {"entries": entries + [{"key": key, "ppl": ppl}]}, "the teacher's perplexity")
    return ppl


def keep_best_student(folder: Path, budget: Optional[StorageBudget], log=print) -> Optional[str]:
    """train.weights = "best": the finished run of ``folder`` with the lowest best validation
    perplexity keeps a copy of its student in its run folder; no other run there does.

    A copy is removed only when its original is still in weights_dir (so nothing is lost: a run
    whose original is gone keeps its copy, and still competes for best); a copy that would not
    fit the budget is not made (and said so). Returns the name of the run holding the best copy.
    """
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

