"""Measuring kdlib's own training step: tokens/s, ms/step, peak memory and MFU per experiment.

``python -m kdlib bench`` (and ``kdlib.plan``, which times a preset's step with ``KdlibStep``).
Two paths, same shapes, same token windows:

- ``kdlib``: kdlib's training step itself (``kdlib.step.TrainStep``):
  the teacher in inference mode and half precision, bf16/fp16 autocast, SDPA,
  the fused chunked output losses, no host sync in the step, fused AdamW on a
  GPU, optionally ``torch.compile`` on the student.
- ``cached``: the same step with the teacher's top-k (k = 32) from memory
  instead of the teacher, for output-only experiments.

Each measurement: a few warm-up steps, then the median of timed steps, each
between device synchronisations; peak memory of a step; model FLOPs per token
and MFU (``kdlib.perf``) when the device's peak is known.

The comparison with the original study's method (its step re-implemented), the
losses alone and data preparation live outside the package, in
``benchmarks/bench.py``, which measures with ``measure_step`` from here.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from . import __version__
from .config import TinyGPTConfig, preset
from .errors import KdlibError, choices
from .grid import EXPERIMENTS, parse
from .memory import MiB, peak_cpu_bytes
from .perf import device_peak, flop_params, flops_per_token, measured_peak_tflops, mfu

PATHS = ("kdlib", "cached")
FEATURE_DESCRIPTIONS = {"hidden": "hidden states", "attention": "attention maps"}


@dataclass(frozen=True)
class Shapes:
    """One benchmark size: the student, the teacher (GPT-2 architecture, random weights) and the batch."""

    name: str
    student: dict  # TinyGPTConfig fields
    teacher: dict  # transformers.GPT2Config fields
    batch_size: int
    block_size: int
    warmup: int = 3
    steps: int = 10

    @property
    def vocab_size(self) -> int:
        return self.student["vocab_size"]


SHAPES = {
    # The study: TinyGPT 8x512 (50.95M parameters) from GPT-2 small's shape (124M), 64 x 128 tokens.
    "study": Shapes("study", asdict(TinyGPTConfig()),
                    dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
                    batch_size=64, block_size=128),
    # The study's proportions (teacher 1.5x deeper and wider) at a size 2 CPU cores run in minutes.
    "cpu": Shapes("cpu", dict(vocab_size=8192, block_size=64, n_layer=4, n_head=4, n_embd=128, d_ff=512,
                              dropout=0.0),
                  dict(n_layer=6, n_embd=192, n_head=6, vocab_size=8192, n_positions=64),
                  batch_size=16, block_size=64, warmup=2, steps=8),
    # Seconds: for CI and tests (no thresholds).
    "smoke": Shapes("smoke", dict(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32, d_ff=64,
                                  dropout=0.0),
                    dict(n_layer=3, n_embd=48, n_head=2, vocab_size=512, n_positions=32),
                    batch_size=4, block_size=32, warmup=1, steps=2),
}


def get_shapes(name: str, **override) -> Shapes:
    if name not in SHAPES:
        raise KdlibError(f"unknown benchmark shapes {name!r}; choose one of: {choices(SHAPES)}")
    return replace(SHAPES[name], **{k: v for k, v in override.items() if v is not None})


# --------------------------------------------------------------------------
# what every measurement shares


def cuda_or_cpu() -> torch.device:
    """The device benchmarks run on: this process's GPU if it has one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def release(dev: torch.device) -> None:
    """Free what earlier measurements left, so it does not count in the next one's peak."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def config_at_shapes(shapes: Shapes, exp: str, feature: str = "hidden"):
    """The study preset's loss for ``exp`` at ``shapes``, with kdlib's training precision (auto)."""
    cfg = preset("study")
    cfg.model = TinyGPTConfig(**shapes.student)
    cfg.teacher.random_init = dict(shapes.teacher)
    cfg.teacher.name = "random-gpt2"
    cfg.data.block_size = shapes.block_size
    cfg.train.batch_size = shapes.batch_size
    cfg.train.precision = "auto"
    cfg.loss.feature = feature
    if (cfg.model.n_layer, shapes.teacher["n_layer"]) != (8, 12):
        cfg.loss.layer_map = "spread"  # the study's odd-layer map is defined for 8 -> 12 blocks only
    return cfg.with_experiment(exp).validate()


def token_windows(shapes: Shapes, n_batches: int = 4, seed: int = 0) -> np.ndarray:
    """A fixed pool of random token windows [n_batches · batch, block + 1]: the same data for every path."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, shapes.vocab_size, size=(n_batches * shapes.batch_size, shapes.block_size + 1),
                        dtype=np.int64)


def frozen_teacher(gpt2_config: dict, dev: torch.device, need_attentions: bool):
    """A random GPT-2-architecture teacher (``gpt2_config``: GPT2Config fields) as training loads one."""
    from .models import load_teacher, random_teacher

    return load_teacher(random_teacher(gpt2_config), device=dev, need_attentions=need_attentions)


# --------------------------------------------------------------------------
# kdlib's step, online or cached


class KdlibStep:
    """kdlib's own training step (``kdlib.step.TrainStep``) for one run config ``cfg``.

    ``teacher``: a frozen model; default a random one of ``cfg.teacher.random_init``'s shape
    (``kdlib.plan`` passes the one it built for a preset). ``cached``: the teacher's top-k
    (``cfg.cache.top_k``) of ``windows`` from memory instead of the teacher."""

    def __init__(self, cfg, dev: torch.device, teacher=None, *, cached: bool = False,
                 windows: Optional[np.ndarray] = None, compile: bool = False):
        from accelerate import Accelerator

        from .models import TinyGPT, teacher_forward, teacher_shape
        from .objective import DistillationLoss
        from .monitor import FiniteGuard
        from .optim import lr_factor, make_optimizer, mixed_precision
        from .step import Trainee

        spec = cfg.spec
        if cached and not spec.output_only:
            raise KdlibError(f"the cached path serves output-only experiments; {cfg.exp!r} is not")
        self.cfg, self.dev = cfg, dev
        self.exp, self.path = cfg.exp, "cached" if cached else "kdlib"
        self.accelerator = Accelerator(mixed_precision=mixed_precision(cfg.train.precision), cpu=dev.type == "cpu",
                                       step_scheduler_with_optimizer=False)
        torch.manual_seed(0)
        student = TinyGPT(cfg.model)
        if compile:
            student.compile()
        if not spec.needs_teacher:
            teacher = None
        elif teacher is None:
            teacher = frozen_teacher(cfg.teacher.random_init, dev, spec.needs_attentions)
        objective = DistillationLoss(cfg.loss_terms, cfg.model, teacher, compile=compile)
        trainee = Trainee(student, objective)
        optimizer = make_optimizer(trainee, cfg.train, dev)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 10**6, 1, 0.1))
        self.trainee, self.optimizer, self.scheduler = self.accelerator.prepare(trainee, optimizer, scheduler)
        self.guard = FiniteGuard()
        self.n_student = flop_params(student)
        self.n_teacher = 0
        self.teacher_shape = (0, 0)
        if cached:
            self.teacher_out_fn = self._cache(teacher, windows, cfg.loss_terms.temperature, cfg.cache.top_k)
        elif teacher is not None:
            h, a = objective.spec.needs_hidden_states, objective.spec.needs_attentions
            self.teacher_out_fn = lambda idx, ids: teacher_forward(teacher, ids, h, a)
            self.n_teacher = flop_params(teacher)
            self.teacher_shape = teacher_shape(teacher)
        else:
            self.teacher_out_fn = lambda idx, ids: None
        self.step_no = 0

    def _cache(self, teacher, windows: np.ndarray, temperature: float, k: int):
        """The pool's top-k, as ``kdlib.cache`` stores it, computed a few windows at a time."""
        from .cache import targets_from_arrays, topk_arrays

        parts = [topk_arrays(teacher, torch.from_numpy(windows[i:i + 8, :-1]).to(self.dev), k, temperature,
                             self.cfg.model.vocab_size) for i in range(0, len(windows), 8)]
        arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        dev = self.dev  # not self: a closure over self would keep this step alive in a cycle
        return lambda idx, ids: targets_from_arrays(arrays, idx, dev)

    def __call__(self, idx, batch: np.ndarray) -> float:
        from .step import TrainStep

        self.step_no += 1
        self.trainee.train()
        TrainStep(self.accelerator, self.trainee, self.optimizer, self.scheduler, self.teacher_out_fn,
                  self.cfg.train, self.guard)(idx, batch, self.step_no)
        return math.nan  # nothing read back: kdlib's step does not sync

    def finish(self) -> None:
        self.guard.check("-", "-")


# --------------------------------------------------------------------------
# measuring


@dataclass
class Result:
    exp: str
    path: str
    tokens_per_s: float
    step_ms: float
    peak_mem_mib: float
    flops_per_token: float
    mfu: Optional[float] = None
    note: str = ""


def _peak_memory(step: Callable[[], object], dev: torch.device) -> float:
    """GPU: the most bytes allocated at once since the measurement began (weights, optimizer state
    and activations: what has to fit). CPU: the most extra bytes one step allocates (the profiler's
    replay; weights and optimizer state, allocated earlier, are not in it)."""
    if dev.type == "cuda":
        return float(torch.cuda.max_memory_allocated(dev))
    return float(peak_cpu_bytes(step))


def measure_step(step, shapes: Shapes, windows: np.ndarray, dev: torch.device, peak: Optional[float]) -> Result:
    """Tokens/s (median of ``shapes.steps`` timed steps after ``shapes.warmup``), peak memory, MFU of
    ``step`` (a callable ``step(idx, batch)`` with ``exp``, ``path``, ``n_student``, ``n_teacher`` and
    ``teacher_shape``; ``finish()`` if it has one) on batches of ``windows``."""
    flops = flops_per_token(step.n_student, shapes.student["n_layer"], shapes.student["n_embd"], shapes.block_size,
                            *((step.n_teacher, *step.teacher_shape) if step.n_teacher else ()))
    batch = shapes.batch_size
    n_batches = len(windows) // batch

    def run(i: int):
        lo = (i % n_batches) * batch
        return step(np.arange(lo, lo + batch), windows[lo:lo + batch])

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(shapes.warmup):
        run(i)
    sync(dev)
    times = []
    for i in range(shapes.steps):
        t0 = time.perf_counter()
        run(shapes.warmup + i)
        sync(dev)
        times.append(time.perf_counter() - t0)
    if hasattr(step, "finish"):
        step.finish()
    mem = _peak_memory(lambda: run(0), dev)
    seconds = statistics.median(times)
    speed = batch * shapes.block_size / seconds
    return Result(step.exp, step.path, speed, seconds * 1e3, mem / MiB, flops, mfu(speed, flops, peak))


def measure(report: dict, exp: str, path: str) -> Result:
    """One row: kdlib's step on ``path`` for ``exp`` at the report's shapes, feature, compile and peak."""
    if path not in PATHS:
        raise KdlibError(f"unknown benchmark path {path!r}; choose one of: {choices(PATHS)}")
    shapes, dev = Shapes(**report["shapes"]), torch.device(report["device"])
    release(dev)  # what earlier measurements left must not count in this one's peak
    windows = token_windows(shapes)
    step = KdlibStep(config_at_shapes(shapes, exp, report["feature"]), dev, cached=path == "cached",
                     windows=windows, compile=report["compile"])
    return measure_step(step, shapes, windows, dev, report["peak_tflops"])


# --------------------------------------------------------------------------
# the report


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import transformers

    info = {"cpu": cpu_name(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "kdlib": __version__}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


def start_report(shapes: Shapes, *, feature: str = "hidden", compile: bool = False,
                 peak: Union[float, str, None] = None, command: str = "") -> dict:
    """A report with no rows yet: the command, machine, device, the peak for MFU and what every row
    shares. ``peak``: TFLOP/s, "measure" (this device's best large matmul), or None (the datasheet
    value of a known GPU, or $KDLIB_PEAK_TFLOPS)."""
    if feature not in FEATURE_DESCRIPTIONS:
        raise KdlibError(f"unknown feature {feature!r}; choose one of: {choices(FEATURE_DESCRIPTIONS)}")
    dev = cuda_or_cpu()
    if peak == "measure":
        peak, peak_source = measured_peak_tflops(dev), "measured: this device's best large matmul"
    else:
        peak, peak_source = device_peak(None if dev.type == "cuda" else "cpu", peak)
    return {"command": command or " ".join(sys.argv), "machine": machine(), "device": dev.type,
            "peak_tflops": peak, "peak_source": peak_source, "shapes": asdict(shapes), "feature": feature,
            "compile": compile}


def measure_rows(report: dict, exps: Sequence[str], paths: Sequence[str], measure_one: Callable[..., Result],
                 log: Callable[[str], None], save: Callable[[], object]) -> list[Result]:
    """``measure_one(report, exp, path)`` for every experiment and path (the cached path only for
    output-only experiments), each row appended to ``report["train"]`` and ``save()``d as it comes,
    so a run cut short keeps what it measured."""
    exps = [parse(e).name for e in exps]  # refuses a bad name before any work
    results = []
    report.setdefault("train", [])
    for exp in exps:
        for path in paths:
            if path == "cached" and not parse(exp).output_only:
                continue
            r = measure_one(report, exp, path)
            results.append(r)
            report["train"].append(asdict(r))
            save()
            log(f"{exp:>18} {path:>9}: {r.tokens_per_s:12,.0f} tokens/s  {r.step_ms:9.1f} ms/step  "
                f"{r.peak_mem_mib:9,.0f} MiB" + (f"  MFU {r.mfu:.1%}" if r.mfu is not None else ""))
    return results


def run_bench(report: dict, exps: Sequence[str] = EXPERIMENTS, paths: Sequence[str] = PATHS,
              log: Callable[[str], None] = print, out_dir=None) -> dict:
    """Measure kdlib's step for ``exps`` x ``paths`` into ``report`` (from ``start_report``) and
    return it. With ``out_dir`` the report is rewritten after every measurement."""
    for p in paths:
        if p not in PATHS:
            raise KdlibError(f"unknown benchmark path {p!r}; choose from: {choices(PATHS)} (the original "
                             "method's 'reference' path: python benchmarks/bench.py)")
    measure_rows(report, exps, paths, measure, log,
                 lambda: write_report(report, out_dir) if out_dir is not None else None)
    return report


def header_lines(report: dict) -> list[str]:
    """Machine, versions, command, shapes and settings: the lines above a report's tables."""
    m, shapes = report["machine"], report["shapes"]
    merged = report.get("merged_from")
    return [f"Machine: {m.get('gpu', m['cpu'])} ({m['cores']} CPU cores); Python {m['python']}, torch "
            f"{m['torch']}, transformers {m['transformers']}, kdlib {m['kdlib']}"
            + (f", CUDA {m['cuda']}" if "cuda" in m else ""),
            f"Command: `{report['command']}`" + ("; merged from " + "; ".join(f"`{c}`" for c in merged)
                                                 if merged else ""),
            f"Shapes: {shapes['name']} (batch {shapes['batch_size']} x {shapes['block_size']} tokens, "
            f"V = {shapes['student']['vocab_size']:,}); kdlib's feature loss: "
            f"{FEATURE_DESCRIPTIONS[report['feature']]}; torch.compile: {report['compile']}; "
            "peak: " + (f"{report['peak_tflops']:.3g} TFLOP/s ({report.get('peak_source')})"
                        if report["peak_tflops"] else "unknown (MFU needs --peak-tflops)"), ""]


def peak_memory_note(report: dict) -> str:
    return "Peak MiB: " + ("the most GPU memory allocated at once (weights, optimizer state, activations)"
                           if report["device"] == "cuda" else
                           "the extra memory one step allocates (weights and optimizer state not included)") + "."


def to_markdown(report: dict) -> str:
    """The report as Markdown: machine, command, then one row per experiment and path."""
    lines = header_lines(report)
    if "train" in report:
        online = {r["exp"]: r for r in report["train"] if r["path"] == "kdlib"}
        lines += ["| experiment | path | tokens/s | ms/step | peak MiB | MFU | cached / kdlib |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in report["train"]:
            kdlib = online.get(r["exp"])
            x_cached = f"{r['tokens_per_s'] / kdlib['tokens_per_s']:.2f}" if kdlib and r["path"] == "cached" else ""
            util = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            lines.append(f"| {r['exp']} | {r['path']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
                         f"{r['peak_mem_mib']:,.0f} | {util} | {x_cached} |")
        lines += ["", peak_memory_note(report), ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir, render: Callable[[dict], str] = to_markdown) -> tuple[Path, Path]:
    """``bench.json`` and ``bench.md`` (``render(report)``) in ``out_dir`` (written atomically)."""
    from .fileio import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench.json", report)
    atomic_write_text(out / "bench.md", render(report) + "\n")
    return out / "bench.json", out / "bench.md"
