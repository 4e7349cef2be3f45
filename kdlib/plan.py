"""What a sweep will cost before it starts: tokens, steps, evaluations, time and bytes per run.

``python -m kdlib plan --preset colab-a100`` (and the start of every ``train``
and ``sweep``, and the notebooks before training) show, per run of the sweep:
its token budget (the same for every experiment of a preset), optimizer steps,
epochs, evaluations, the estimated time, and the bytes it leaves in the results
folder and elsewhere; then the grid's totals and whether the results folder's
storage budget holds them.

The time is measured on this machine or estimated for a named GPU, and always
says which (``kdlib.speed``). It is an upper bound in one respect: early
stopping can end a run sooner.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .checkpoint import MiB
from .config import ExperimentConfig, preset as make_preset, preset_seeds
from .corpus import python_docs
from .data import PYTHON_DOCS, SPLITS, load_split, token_dtype
from .errors import KdlibError, choices
from .fileio import PathLike
from .grid import EXPERIMENTS, parse
from .speed import flops, timing

# WikiText-103 with GPT-2's tokenizer, for a plan made before `prep` (approximate;
# validation and test are WikiText-2's).
WIKITEXT103_TOKENS = {"train": 119_000_000, "validation": 247_000, "test": 288_000}
STUDENT_HEADER_BYTES = 16 * 1024  # safetensors header with the config in its metadata


@dataclass
class RunPlan:
    name: str  # the run folder's name (kdlib.train.run_name)
    exp: str
    seed: int
    teacher_source: str  # none, online, cache
    tokens: int  # the run's token budget
    steps: int
    epochs: float
    evals: int
    flops_per_token: float  # model FLOPs per trained token (student forward+backward, teacher forward)
    hours: float  # training + evaluations, without early stopping
    results_bytes: int  # what the run leaves in the results folder (config, metrics, summary; weights if kept)
    other_bytes: int  # what it leaves elsewhere (its student in weights_dir)
    resume_bytes: int  # its resume state while it runs (deleted when it finishes)
    resume_in_results: bool
    sweep: str = ""  # the run's sweep point ("temperature=1"; kdlib.config.sweep.point_label), "" for none


@dataclass
class Plan:
    preset: str
    runs: list[RunPlan]
    time_source: str  # "measured on <device>" or "estimate: ..."
    device: str
    budget_bytes: int
    results_dir: Optional[str]
    existing_bytes: int  # what the results folder already holds outside this plan's runs
    kept_student_bytes: int  # weights="best": the one student the results folder keeps
    data_bytes: int
    cache_bytes: int
    data_note: str
    weights: str
    weights_dir: Optional[str]
    resume_dir: Optional[str]
    notes: list[str] = field(default_factory=list)

    @property
    def total_hours(self) -> float:
        return sum(r.hours for r in self.runs)

    @property
    def results_bytes(self) -> int:
        """What the results folder holds once every run of the plan has finished."""
        return self.existing_bytes + sum(r.results_bytes for r in self.runs) + self.kept_student_bytes

    @property
    def peak_results_bytes(self) -> int:
        """The most the results folder holds at any time (a resume state kept there while a run trains)."""
        resume = max([r.resume_bytes for r in self.runs if r.resume_in_results], default=0)
        return self.results_bytes + resume

    @property
    def other_bytes(self) -> int:
        return sum(r.other_bytes for r in self.runs)

    @property
    def fits(self) -> bool:
        return self.peak_results_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        return {"preset": self.preset, "n_runs": len(self.runs), "runs": [asdict(r) for r in self.runs],
                "tokens_per_run": sorted({r.tokens for r in self.runs}),
                "total_tokens": sum(r.tokens for r in self.runs), "total_hours": self.total_hours,
                "time_source": self.time_source, "device": self.device,
                "results_dir": self.results_dir, "results_bytes": self.results_bytes,
                "peak_results_bytes": self.peak_results_bytes, "budget_bytes": self.budget_bytes,
                "fits": self.fits, "existing_bytes": self.existing_bytes,
                "kept_student_bytes": self.kept_student_bytes, "other_bytes": self.other_bytes,
                "resume_bytes": max([r.resume_bytes for r in self.runs], default=0),
                "data_bytes": self.data_bytes, "cache_bytes": self.cache_bytes, "data_note": self.data_note,
                "weights": self.weights, "weights_dir": self.weights_dir, "resume_dir": self.resume_dir,
                "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        exps = sorted({r.exp for r in self.runs}, key=lambda e: (_rank(e), e))
        seeds = sorted({r.seed for r in self.runs})
        points = len({r.sweep for r in self.runs})
        swept = f" x {points} sweep point(s)" if points > 1 or self.runs[0].sweep else ""
        width = max([30] + [len(r.name) + 2 for r in self.runs])
        lines = [f"plan: preset {self.preset}, {len(exps)} experiment(s) x {len(seeds)} seed(s) "
                 f"({', '.join(map(str, seeds))}){swept} = {len(self.runs)} run(s); time {self.time_source}",
                 f"{'run':<{width}}{'tokens':>14}{'steps':>9}{'epochs':>8}{'evals':>7}{'time':>10}"
                 f"{'results':>11}{'elsewhere':>11}"]
        for r in self.runs:
            lines.append(f"{r.name:<{width}}{r.tokens:>14,}{r.steps:>9,}{r.epochs:>8.2f}{r.evals:>7}"
                         f"{_duration(r.hours):>10}{_size(r.results_bytes):>11}{_size(r.other_bytes):>11}")
        where = f"{self.results_dir} " if self.results_dir else ""
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"total: {sum(r.tokens for r in self.runs):,} tokens, {_duration(self.total_hours)} "
                     f"({self.total_hours:.2f} h) on {self.device}")
        keep = (f"; the best run's student kept there ({_size(self.kept_student_bytes)}), every student in "
                f"{self.weights_dir}" if self.weights == "best" else "; every run's student in its run folder")
        lines.append(f"results folder {where}after the sweep: {_size(self.results_bytes)}, at most "
                     f"{_size(self.peak_results_bytes)} while it runs, of a {_size(self.budget_bytes)} budget: "
                     f"{verdict}{keep}")
        resume = max([r.resume_bytes for r in self.runs], default=0)
        lines.append(f"elsewhere: students {_size(self.other_bytes)}; resume state {_size(resume)} at a time "
                     f"({'in the run folder' if self.resume_dir is None else self.resume_dir}, deleted when a run "
                     f"finishes); data {_size(self.data_bytes)} ({self.data_note})"
                     + (f"; top-k cache {_size(self.cache_bytes)}" if self.cache_bytes else ""))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _rank(exp: str) -> int:
    return EXPERIMENTS.index(exp) if exp in EXPERIMENTS else len(EXPERIMENTS)


def _duration(hours: float) -> str:
    minutes = hours * 60
    if minutes < 1:
        return f"{minutes * 60:.0f} s"
    if minutes < 120:
        return f"{minutes:.1f} min"
    return f"{hours:.1f} h"


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


# --------------------------------------------------------------------------
# the pieces


def sweep_configs(base: ExperimentConfig, exps: Optional[Sequence[str]] = None,
                  seeds: Optional[Sequence[int]] = None, teacher_source: Optional[str] = None,
                  log: Callable[[str], None] = print, sweep: Optional[dict] = None) -> list[ExperimentConfig]:
    """The validated configs of ``exps`` x ``seeds`` x the points of ``sweep`` (defaults: the 14 of the
    grid, the preset's seeds, no sweep).

    ``teacher_source="cache"`` gives the top-k cache to the output-only experiments; the others
    need the full teacher and stay online (said once, and every cached run is labelled).
    ``sweep``: ``{"loss.temperature": (1, 2), ...}`` (``kdlib.config.sweep.sweep_axes``); each run
    gets one point of their product, set in its config and recorded in ``cfg.sweep``.
    """
    import copy

    from .config.sweep import acts_on, apply_point, sweep_axes, sweep_points

    exps = list(dict.fromkeys(parse(e, base.loss.feature).name for e in (exps or EXPERIMENTS)))  # once each
    seeds = list(dict.fromkeys(preset_seeds(base.preset) if seeds is None else seeds))
    if not seeds:
        raise KdlibError("no seeds given; give at least one (the preset's: "
                         f"{', '.join(map(str, preset_seeds(base.preset)))})")
    points = sweep_points(sweep_axes(sweep or {}))
    online_only = []
    cfgs = []
    for seed, exp, point in ((s, e, p) for s in seeds for e in exps for p in points):
        cfg = apply_point(copy.deepcopy(base).with_experiment(exp), point)
        cfg.seed = seed
        if teacher_source is not None:
            spec = cfg.spec
            if teacher_source == "cache" and not spec.output_only:
                if spec.needs_teacher and cfg.exp not in online_only:
                    online_only.append(cfg.exp)
                cfg.train.teacher_source = "online"
            else:
                cfg.train.teacher_source = teacher_source
        cfgs.append(cfg.validate())
    inert = [f"{key} on {exp}" for key in (sweep or {}) for exp in exps
             if not acts_on(key, parse(exp, base.loss.feature))]
    if inert and len(points) > 1:
        log(f"note: swept values that act on no term of the experiment: {', '.join(inert)}; points that differ "
            "only in them train the same student (drop the experiment from --exps, or sweep it apart)")
    if online_only:
        log(f"note: {', '.join(online_only)} need the teacher's full outputs (features or cosine) and run "
            "online; the output-only experiments use the top-k cache, labelled '[top-k cache]' in the report")
    return cfgs


@dataclass
class _Data:
    tokens: dict  # split -> tokens
    bytes: int
    note: str


def _data_sizes(cfg: ExperimentConfig, data_dir) -> _Data:
    item = 2 if token_dtype(cfg.model.vocab_size) == "uint16" else 4
    stale = ""
    if data_dir is not None and all((Path(data_dir) / f"{s}.json").is_file() for s in SPLITS):
        from .runs import check_subset

        try:
            loaded = {s: load_split(data_dir, s) for s in SPLITS}
            check_subset(cfg, loaded["train"])
            splits = {s: x.n_tokens for s, x in loaded.items()}
            return _Data(splits, sum(splits.values()) * item, f"prepared in {data_dir}")
        except KdlibError as e:
            stale = f"; {data_dir} does not serve this preset ({str(e).split(';')[0]})"
    d = cfg.data
    if d.dataset not in (None, PYTHON_DOCS) and "wikitext-103" in (d.dataset_config or ""):
        splits = dict(WIKITEXT103_TOKENS)
        note = "not prepared yet: WikiText-103's approximate sizes"
    else:
        if d.dataset == PYTHON_DOCS:
            chars = sum(len(doc) for doc in python_docs())
            chars = min(chars, d.max_chars) if d.max_chars else chars
        else:
            chars = sum(Path(p).expanduser().stat().st_size for p in d.text_files.values()
                        if Path(p).expanduser().is_file()) or 1_000_000
        per_char = 0.45  # a small BPE on English prose (measured on the smoke preset: 0.46)
        splits = {s: int(chars * r * per_char) for s, r in zip(SPLITS, d.split_ratios)}
        note = "not prepared yet: estimated from the text's characters"
    if d.train_tokens is not None:
        splits["train"] = d.train_tokens
        note += f"; train is a subset of ~{d.train_tokens:,} tokens"
    return _Data(splits, sum(splits.values()) * item, note + stale)


@dataclass
class PlanSetting:
    """Where a sweep runs, what its results folder may hold, and what its time comes from."""

    device: str = "auto"  # "auto", "measure" or a GPU name with a stated MFU (see ``plan``)
    results_dir: Optional[PathLike] = None  # its current contents count against the budget
    data_dir: Optional[PathLike] = None  # the prepared data (default data/PRESET; exact token counts when prepared)
    budget_bytes: int = 100 * MiB  # the results folder's storage budget
    measured: Optional[dict] = None  # {experiment name: tokens/s} measured elsewhere (kdlib bench), used for time


# --------------------------------------------------------------------------
# the plan


def plan(base, exps: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None, *,
         teacher_source: Optional[str] = None, cfgs: Optional[Sequence[ExperimentConfig]] = None,
         log: Callable[[str], None] = lambda *_: None, **setting) -> Plan:
    """The plan of a sweep of ``base`` (a preset name or config) over ``exps`` x ``seeds``.

    Arguments:
        cfgs: the run configs themselves (instead of ``exps``/``seeds``/``teacher_source``).
        setting: the fields of ``PlanSetting``. ``device``: "auto" (measure on this machine's GPU;
            without one, estimate for the GPU the preset is sized for, or measure on the CPU for the
            CPU presets), "measure" (this machine, whatever it is), or a GPU name with a stated MFU
            (A100, T4, H100, ...). ``measured``: tokens/s per experiment, used for time instead.
    """
    from .cache import bytes_per_token
    from .storage import student_parameters

    where = PlanSetting(**setting)
    base = make_preset(base) if isinstance(base, str) else base
    cfgs = list(cfgs) if cfgs is not None else sweep_configs(base, exps, seeds, teacher_source, log=log)
    if not cfgs:
        raise KdlibError("nothing to plan: no experiments")
    presets = {c.preset for c in cfgs}
    if len(presets) > 1:
        raise KdlibError(f"a plan covers one preset; these configs are of {choices(sorted(presets))}")
    # The runs' own data config (a caller's cfgs may differ from the preset's).
    data = _data_sizes(cfgs[0], where.data_dir if where.data_dir is not None else Path("data") / base.preset)
    time = timing(cfgs, base.preset, where.device, where.measured)
    students = [2 * student_parameters(cfg) + STUDENT_HEADER_BYTES for cfg in cfgs]  # fp16 weights, header
    runs = [_run_plan(cfg, data, time.rate, where.results_dir, student) for cfg, student in zip(cfgs, students)]
    notes = list(time.notes)
    if len({r.tokens for r, cfg in zip(runs, cfgs) if cfg.spec.compute_of is None}) > 1:
        notes.append("the runs' token budgets differ (their configs differ): they do not compare like with like")
    notes += _equal_compute_notes(cfgs)
    first = cfgs[0]
    uses_cache = any(r.teacher_source == "cache" for r in runs)
    cache_bytes = bytes_per_token(first.cache.top_k, first.model.vocab_size) * data.tokens["train"] if uses_cache else 0
    return Plan(preset=base.preset, runs=runs, time_source=time.source, device=time.device,
                budget_bytes=where.budget_bytes,
                results_dir=str(where.results_dir) if where.results_dir is not None else None,
                existing_bytes=_existing_bytes(where.results_dir, cfgs),
                kept_student_bytes=max(students) if first.train.weights == "best" else 0,
                data_bytes=data.bytes, cache_bytes=cache_bytes, data_note=data.note, weights=first.train.weights,
                weights_dir=first.train.weights_dir, resume_dir=first.train.resume_dir, notes=notes)


def _equal_compute_notes(cfgs: Sequence[ExperimentConfig]) -> list[str]:
    """One line per ``ce@EXP`` experiment: how many times the tokens of its named KD experiment it trains."""
    from .compute import compute_ratio

    ratios = {cfg.exp: (cfg.spec.compute_of, compute_ratio(cfg)) for cfg in cfgs if cfg.spec.compute_of}
    return [f"{exp} is the no-KD student at the compute of {target}: {ratio:.2f}x its tokens, the same training "
            f"FLOPs by kdlib's FLOPs model (its teacher forward included)" for exp, (target, ratio) in ratios.items()]


def _run_plan(cfg: ExperimentConfig, data: _Data, rate: Callable[[ExperimentConfig], float], results_dir,
              student_bytes: int) -> RunPlan:
    """One run's tokens, steps, evaluations, time (at ``rate`` FLOP/s) and bytes."""
    from .optim import schedule
    from .config.sweep import point_label
    from .runs import RunPaths, run_name, teacher_source_of
    from .storage import estimate_run_bytes, small_files_bytes

    source = teacher_source_of(cfg)
    sched = schedule(cfg, data.tokens["train"])
    train_flops, student_fwd, teacher_fwd = flops(cfg, source)
    # In-training evaluations: the validation split at stride = block; at the end the best
    # student on validation and test at stride = block / 2 (twice the windows), then the test
    # metrics' pass: the student and the teacher on the test windows (kdlib.scoring).
    eval_flops = student_fwd * (sched.evals * data.tokens["validation"]
                                + 2 * (data.tokens["validation"] + data.tokens["test"])) \
        + (student_fwd + teacher_fwd) * 2 * data.tokens["test"]
    seconds = (sched.tokens * train_flops + eval_flops) / rate(cfg)
    paths = RunPaths.of(cfg, Path(results_dir or "runs") / cfg.preset / run_name(cfg))
    kept_here = paths.weights_dir is None
    return RunPlan(
        name=run_name(cfg), exp=cfg.exp, seed=cfg.seed, teacher_source=source, tokens=sched.tokens,
        steps=sched.steps, epochs=sched.epochs, evals=sched.evals, flops_per_token=train_flops,
        hours=seconds / 3600, results_bytes=small_files_bytes(cfg, sched) + (student_bytes if kept_here else 0),
        other_bytes=0 if kept_here else student_bytes,
        # weights and AdamW moments of student and projectors, and the file's header
        resume_bytes=estimate_run_bytes(cfg, True, with_student=False, small_bytes=0),
        resume_in_results=cfg.train.resume_dir is None, sweep=point_label(cfg.sweep))


def _existing_bytes(results_dir, cfgs: Sequence[ExperimentConfig]) -> int:
    """What the results folder already holds outside the folders of ``cfgs``' runs."""
    from .runs import run_name

    if results_dir is None or not Path(results_dir).is_dir():
        return 0
    mine = {(Path(results_dir) / c.preset / run_name(c)).resolve() for c in cfgs}
    return sum(f.stat().st_size for f in Path(results_dir).rglob("*")
               if f.is_file() and not any(p in mine for p in f.resolve().parents))


def check_fits(p: Plan) -> None:
    """Refuse a sweep whose results would not fit its results folder's budget, before it starts."""
    if p.fits:
        return
    raise KdlibError(
        f"this sweep needs up to {_size(p.peak_results_bytes)} in the results folder, more than its "
        f"{_size(p.budget_bytes)} budget; nothing was started. Keep the students outside the results folder "
        "(train.weights = 'best' with train.weights_dir: the results folder then keeps only the best one), "
        "the resume state elsewhere (train.resume_dir), free space, or raise the budget.\n" + p.to_text())
