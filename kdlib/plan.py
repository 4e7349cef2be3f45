"""What a sweep will cost before it starts: tokens, steps, evaluations, time and bytes per run.

``python -m kdlib plan --preset colab-a100`` (and the start of every ``train``
and ``sweep``, and the notebooks before training) show, per run of the sweep:
its token budget (the same for every experiment of a preset), optimizer steps,
epochs, evaluations, the estimated time, and the bytes it leaves in the results
folder and elsewhere; then the grid's totals and whether the results folder's
storage budget holds them.

Time comes from one of two sources, always named:

- **measured**: a few of kdlib's own training steps per kind of experiment on
  this machine's GPU (seconds; ``device="measure"`` also on a CPU), at the
  preset's shapes, with a random GPT-2-architecture teacher of the configured
  shape; evaluations at the same achieved FLOP/s.
- **estimate**: kdlib's FLOPs model (``kdlib.perf``) at a stated MFU on a
  named GPU (the one the preset is sized for, when there is no GPU here).
  The stated MFUs are assumptions until ``benchmarks/gpu_session.sh`` measures
  them (docs/benchmarks.md).

The time is an upper bound in one respect: early stopping can end a run sooner.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .checkpoint import MiB
from .config import ExperimentConfig, preset as make_preset, preset_seeds
from .errors import KdlibError, choices
from .grid import EXPERIMENTS, parse

# The GPU each preset is sized for: the plan's device when there is no GPU here.
TARGET_GPU = {"colab-a100": "A100", "colab-t4": "T4", "study": "A100"}
# Stated model-FLOPs utilisation per GPU for kdlib's step (assumed, not measured:
# gpu_session.sh measures it). The T4's is lower: fp16 with loss scaling, and
# memory bandwidth (320 GB/s) limits the vocabulary-sized loss.
STATED_MFU = {"A100": 0.35, "H100": 0.35, "H200": 0.35, "L40S": 0.30, "L40": 0.30, "L4": 0.30, "V100": 0.30,
              "T4": 0.25}
# Dense float32 peaks (TFLOP/s, no TF32: PyTorch's default for matmuls), for fp32 runs.
FP32_PEAK = {"A100": 19.5, "H100": 67.0, "H200": 67.0, "L40S": 91.6, "L40": 90.5, "L4": 30.3, "V100": 15.7,
             "T4": 8.1}
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
        lines = [f"plan: preset {self.preset}, {len(exps)} experiment(s) x {len(seeds)} seed(s) "
                 f"({', '.join(map(str, seeds))}) = {len(self.runs)} run(s); time {self.time_source}",
                 f"{'run':<30}{'tokens':>14}{'steps':>9}{'epochs':>8}{'evals':>7}{'time':>10}"
                 f"{'results':>11}{'elsewhere':>11}"]
        for r in self.runs:
            lines.append(f"{r.name:<30}{r.tokens:>14,}{r.steps:>9,}{r.epochs:>8.2f}{r.evals:>7}"
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
                  log: Callable[[str], None] = print) -> list[ExperimentConfig]:
    """The validated configs of ``exps`` x ``seeds`` (defaults: the 14 of the grid, the preset's seeds).

    ``teacher_source="cache"`` gives the top-k cache to the output-only experiments; the others
    need the full teacher and stay online (said once, and every cached run is labelled).
    """
    import copy

    exps = list(dict.fromkeys(parse(e, base.loss.feature).name for e in (exps or EXPERIMENTS)))  # once each
    seeds = list(dict.fromkeys(preset_seeds(base.preset) if seeds is None else seeds))
    if not seeds:
        raise KdlibError("no seeds given; give at least one (the preset's: "
                         f"{', '.join(map(str, preset_seeds(base.preset)))})")
    online_only = []
    cfgs = []
    for seed in seeds:
        for exp in exps:
            cfg = copy.deepcopy(base).with_experiment(exp)
            cfg.seed = seed
            if teacher_source is not None:
                spec = parse(cfg.exp, cfg.loss.feature)
                if teacher_source == "cache" and not spec.output_only:
                    if spec.needs_teacher and cfg.exp not in online_only:
                        online_only.append(cfg.exp)
                    cfg.train.teacher_source = "online"
                else:
                    cfg.train.teacher_source = teacher_source
            cfgs.append(cfg.validate())
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
    from .data import SPLITS, load_split, token_dtype

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
    from .data import PYTHON_DOCS

    if d.dataset not in (None, PYTHON_DOCS) and "wikitext-103" in (d.dataset_config or ""):
        splits = dict(WIKITEXT103_TOKENS)
        note = "not prepared yet: WikiText-103's approximate sizes"
    else:
        from .data import _python_docs

        if d.dataset == PYTHON_DOCS:
            chars = sum(len(t) for t in _python_docs())
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


def _teacher_dims(cfg: ExperimentConfig) -> dict:
    """GPT-2-architecture dimensions of the configured teacher (GPT-2 small's for a hub name; the
    demo's own teacher, which it trains first, for the demo preset). Its vocabulary is the student's."""
    r = cfg.teacher.random_init
    if r is None and cfg.preset == "demo" and cfg.teacher.name == "gpt2":
        from .demo import TEACHER_SHAPE

        r = {**TEACHER_SHAPE, "vocab_size": cfg.model.vocab_size, "n_positions": cfg.model.block_size}
    if r is not None:
        return {"n_layer": r["n_layer"], "n_embd": r["n_embd"], "n_head": r["n_head"],
                "vocab_size": r["vocab_size"], "n_positions": r["n_positions"], "n_inner": r.get("n_inner")}
    config = Path(cfg.teacher.name) / "config.json"
    if config.is_file():
        from .fileio import read_json

        c = read_json(config, "teacher config")
        return {"n_layer": c.get("n_layer", 12), "n_embd": c.get("n_embd", 768), "n_head": c.get("n_head", 12),
                "vocab_size": c.get("vocab_size", 50257), "n_positions": c.get("n_positions", 1024),
                "n_inner": c.get("n_inner")}
    return {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": cfg.model.vocab_size, "n_positions": 1024,
            "n_inner": None}


def flops(cfg: ExperimentConfig, source: str) -> tuple[float, float, float]:
    """(training FLOPs per token, student forward FLOPs per token, teacher forward FLOPs per token)."""
    from .perf import flops_per_token
    from .storage import projector_parameters, student_parameters

    m, T = cfg.model, cfg.data.block_size
    n_student = student_parameters(cfg) - (m.block_size * m.n_embd if m.positions == "learned" else 0)
    t = _teacher_dims(cfg)
    d_ff = t["n_inner"] or 4 * t["n_embd"]
    n_teacher = t["vocab_size"] * t["n_embd"] + t["n_layer"] * (4 * t["n_embd"] ** 2 + 2 * t["n_embd"] * d_ff
                                                                + 9 * t["n_embd"] + d_ff) + 2 * t["n_embd"]
    student_fwd = 2 * n_student + 4 * m.n_layer * m.n_embd * T
    teacher_fwd = 2 * n_teacher + 4 * t["n_layer"] * t["n_embd"] * T
    train = flops_per_token(n_student, m.n_layer, m.n_embd, T,
                            *((n_teacher, t["n_layer"], t["n_embd"]) if source == "online" else ()))
    train += 6 * projector_parameters(cfg, (t["n_layer"], t["n_embd"]))
    return float(train), float(student_fwd), float(teacher_fwd)


def _gpu_key(name: str) -> Optional[str]:
    import re

    for key in sorted(STATED_MFU, key=len, reverse=True):
        if re.search(rf"\b{key}\b", name.upper()):
            return key
    return None


def _estimated_rate(cfg: ExperimentConfig, gpu: str) -> tuple[float, str]:
    """(achieved FLOP/s, description) for ``cfg`` on a named GPU at its stated MFU."""
    from .perf import device_peak

    key = _gpu_key(gpu)
    if key is None:
        raise KdlibError(f"no stated MFU for GPU {gpu!r}; name one of: {choices(STATED_MFU)}, or plan on "
                         "this machine's own device (--device measure)")
    if cfg.train.precision in ("bf16", "fp16", "auto"):
        peak, precision = device_peak(key)[0], "bf16/fp16"
    else:
        peak, precision = FP32_PEAK[key], "fp32"
    mfu = STATED_MFU[key]
    return peak * 1e12 * mfu, (f"estimate for one {key}: kdlib's FLOPs model at a stated {mfu:.0%} MFU of its "
                               f"{peak:g} TFLOP/s {precision} peak (assumed, not measured)")


def measure_rates(cfgs: Sequence[ExperimentConfig], steps: int = 3, warmup: int = 2) -> dict:
    """Achieved training FLOP/s of kdlib's step on this machine, per kind of experiment in ``cfgs``
    (feature map, cosine, divergence, teacher source): {kind: FLOP/s}. A few steps each, on random
    token windows, with a random teacher of the configured shape."""
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The measurement draws random weights: on forked generators, so a run that plans first
    # trains exactly as one that does not.
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        return _measure(cfgs, dev, steps, warmup)


def _measure(cfgs, dev, steps: int, warmup: int) -> dict:
    import gc
    import time

    import numpy as np
    import torch

    from .bench import KdlibStep
    from .models import load_teacher, random_teacher, resolve_teacher_dtype
    from .runs import teacher_source_of

    rates, teachers = {}, {}
    for cfg in cfgs:
        key = _kind(cfg)
        if key in rates:
            continue
        source = teacher_source_of(cfg)
        attn = parse(cfg.exp, cfg.loss.feature).needs_attentions
        if source != "none" and attn not in teachers:  # one random teacher of the configured shape
            dims = {k: v for k, v in _teacher_dims(cfg).items() if v is not None}
            teachers[attn] = load_teacher(random_teacher(dims), device=dev,
                                          dtype=resolve_teacher_dtype(cfg.teacher.dtype, dev), need_attentions=attn)
        n = cfg.train.batch_size * cfg.train.grad_accum
        windows = np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=(n, cfg.data.block_size + 1),
                                                    dtype=np.int64)
        step = KdlibStep(None, cfg.exp, dev, cached=source == "cache", windows=windows, top_k=cfg.cache.top_k,
                         cfg=cfg, teacher=teachers.get(attn))
        idx, times = np.arange(n), []
        for i in range(warmup + steps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(idx, windows)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        step.finish()
        rates[key] = n * cfg.data.block_size * flops(cfg, source)[0] / sorted(times)[len(times) // 2]
        del step
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the run that follows gets the memory back
    return rates


def _kind(cfg: ExperimentConfig) -> tuple:
    from .runs import teacher_source_of

    spec = parse(cfg.exp, cfg.loss.feature)
    return (spec.feature_map, spec.feature if spec.feature_map else None, spec.cosine,
            spec.divergence is not None, teacher_source_of(cfg))


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    from .bench import cpu_name

    return f"this CPU ({cpu_name()})"


# --------------------------------------------------------------------------
# the plan


def plan(base, exps: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None, *,
         teacher_source: Optional[str] = None, device: str = "auto", results_dir=None, data_dir=None,
         budget_bytes: int = 100 * MiB, cfgs: Optional[Sequence[ExperimentConfig]] = None,
         measured: Optional[dict] = None, log: Callable[[str], None] = lambda *_: None) -> Plan:
    """The plan of a sweep of ``base`` (a preset name or config) over ``exps`` x ``seeds``.

    Arguments:
        device: "auto" (measure on this machine's GPU; without one, estimate for the GPU the preset
            is sized for, or measure on the CPU for the CPU presets), "measure" (this machine,
            whatever it is), or a GPU name with a stated MFU (A100, T4, H100, ...).
        results_dir: the results folder (its current contents count against the budget).
        data_dir: the prepared data (default data/PRESET; exact token counts when prepared).
        cfgs: the run configs themselves (instead of ``exps``/``seeds``/``teacher_source``).
        measured: {experiment name: tokens/s} measured elsewhere (``kdlib bench``), used for time.
    """
    from .cache import bytes_per_token
    from .optim import schedule
    from .runs import RunPaths, run_name, teacher_source_of
    from .storage import estimate_run_bytes, small_files_bytes, student_parameters

    base = make_preset(base) if isinstance(base, str) else base
    cfgs = list(cfgs) if cfgs is not None else sweep_configs(base, exps, seeds, teacher_source, log=log)
    if not cfgs:
        raise KdlibError("nothing to plan: no experiments")
    presets = {c.preset for c in cfgs}
    if len(presets) > 1:
        raise KdlibError(f"a plan covers one preset; these configs are of {choices(sorted(presets))}")
    # The runs' own data config (a caller's cfgs may differ from the preset's).
    data = _data_sizes(cfgs[0], data_dir if data_dir is not None else Path("data") / base.preset)
    import torch

    notes = []
    if measured:
        time_source, dev_name = "from measured tokens/s (kdlib bench)", _device_name()
        rate_of = None
    elif device == "measure" or (device == "auto" and (torch.cuda.is_available() or base.preset not in TARGET_GPU)):
        rates = measure_rates(cfgs)
        dev_name = _device_name()
        time_source = (f"measured on {dev_name}: a few of kdlib's steps per kind of experiment"
                       + ("" if torch.cuda.is_available() else " (a CPU busy with other work reads slower)"))
        rate_of = lambda cfg: rates[_kind(cfg)]  # noqa: E731
    else:
        gpu = TARGET_GPU[base.preset] if device == "auto" else device
        dev_name = _gpu_key(gpu) or gpu
        rate_of = lambda cfg: _estimated_rate(cfg, gpu)[0]  # noqa: E731
        time_source = _estimated_rate(cfgs[0], gpu)[1]
        if device == "auto":
            notes.append(f"no GPU here: the time is for one {dev_name}, the GPU preset {base.preset} is sized for")
    runs = []
    student_bytes = 0
    for cfg in cfgs:
        source = teacher_source_of(cfg)
        sched = schedule(cfg, data.tokens["train"])
        train_flops, student_fwd, teacher_fwd = flops(cfg, source)
        # In-training evaluations: the validation split at stride = block; at the end the best
        # student on validation and test at stride = block / 2 (twice the windows).
        eval_flops = student_fwd * (sched.evals * data.tokens["validation"]
                                    + 2 * (data.tokens["validation"] + data.tokens["test"]))
        if measured:
            speed = measured.get(cfg.exp)
            if speed is None:
                raise KdlibError(f"no measured speed for {cfg.exp!r}; measured: {choices(measured)}")
            rate = speed * train_flops
        else:
            rate = rate_of(cfg)
        seconds = (sched.tokens * train_flops + eval_flops) / rate
        paths = RunPaths.of(cfg, Path(results_dir or "runs") / cfg.preset / run_name(cfg))
        small = small_files_bytes(cfg, sched)
        student = 2 * student_parameters(cfg) + STUDENT_HEADER_BYTES
        student_bytes = max(student_bytes, student)
        # weights and AdamW moments of student and projectors, and the file's header
        resume = estimate_run_bytes(cfg, True, with_student=False, small_bytes=0)
        kept_here = paths.weights_dir is None
        runs.append(RunPlan(
            name=run_name(cfg), exp=cfg.exp, seed=cfg.seed, teacher_source=source, tokens=sched.tokens,
            steps=sched.steps, epochs=sched.epochs, evals=sched.evals, flops_per_token=train_flops,
            hours=seconds / 3600, results_bytes=small + (student if kept_here else 0),
            other_bytes=0 if kept_here else student, resume_bytes=resume,
            resume_in_results=cfg.train.resume_dir is None))
    if len({r.tokens for r in runs}) > 1:
        notes.append("the runs' token budgets differ (their configs differ): they do not compare like with like")
    weights = cfgs[0].train.weights
    kept = student_bytes if weights == "best" else 0
    existing = 0
    if results_dir is not None and Path(results_dir).is_dir():
        mine = {(Path(results_dir) / c.preset / run_name(c)).resolve() for c in cfgs}
        existing = sum(f.stat().st_size for f in Path(results_dir).rglob("*")
                       if f.is_file() and not any(p in mine for p in f.resolve().parents))
    uses_cache = any(r.teacher_source == "cache" for r in runs)
    first = cfgs[0]
    cache_bytes = bytes_per_token(first.cache.top_k, first.model.vocab_size) * data.tokens["train"] if uses_cache else 0
    return Plan(preset=base.preset, runs=runs, time_source=time_source, device=dev_name, budget_bytes=budget_bytes,
                results_dir=str(results_dir) if results_dir is not None else None, existing_bytes=existing,
                kept_student_bytes=kept, data_bytes=data.bytes, cache_bytes=cache_bytes, data_note=data.note,
                weights=weights, weights_dir=cfgs[0].train.weights_dir, resume_dir=cfgs[0].train.resume_dir,
                notes=notes)


def check_fits(p: Plan) -> None:
    """Refuse a sweep whose results would not fit its results folder's budget, before it starts."""
    if p.fits:
        return
    raise KdlibError(
        f"this sweep needs up to {_size(p.peak_results_bytes)} in the results folder, more than its "
        f"{_size(p.budget_bytes)} budget; nothing was started. Keep the students outside the results folder "
        "(train.weights = 'best' with train.weights_dir: the results folder then keeps only the best one), "
        "the resume state elsewhere (train.resume_dir), free space, or raise the budget.\n" + p.to_text())
