"""Benchmarks: training throughput of the original method and of kdlib, the losses alone, data prep.

``python -m kdlib bench`` (docs/benchmarks.md has the results and commands).
Three training paths, same shapes, same token windows, same experiment:

- ``reference``: the original study's method, re-implemented here as its
  notebook ran it: float32; the teacher's forward outside ``no_grad`` with
  trainable parameters (so backward also runs through the teacher); explicit
  attention in student and teacher; full-vocabulary softmax tensors with
  ``+ eps`` inside the logs; attention-map "hidden MSE"; the loss read back
  every step; on a GPU, in a subprocess with ``CUDA_LAUNCH_BLOCKING=1``.
- ``kdlib``: the training step of ``kdlib.train`` itself (``kdlib.step.TrainStep``):
  the teacher in inference mode and half precision, bf16/fp16 autocast, SDPA,
  the fused chunked output losses, no host sync in the step, fused AdamW on a
  GPU, optionally ``torch.compile`` on the student.
- ``cached``: the same step with the teacher's top-k (k = 32) from memory
  instead of the teacher, for output-only experiments.

Each measurement: a few warm-up steps, then the median of timed steps, each
between device synchronisations; peak memory of a step; model FLOPs per token
and MFU (``kdlib.perf``) when the device's peak is known.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .config import TinyGPTConfig, preset
from .errors import KdlibError, choices
from .grid import EXPERIMENTS, parse
from .losses import layer_pairs
from .memory import MiB, peak_cpu_bytes
from .perf import device_peak, flop_params, flops_per_token, measured_peak_tflops, mfu

PATHS = ("reference", "kdlib", "cached")
FEATURES = {"hidden": "hidden states", "attention": "attention maps"}
SECTIONS = ("train", "divergence", "prep")
WIKITEXT103_CHARS = 540e6  # characters of WikiText-103's raw train split, about


@dataclass(frozen=True)
class Shapes:
    """One benchmark size: the student, the teacher (GPT-2 architecture, random weights) and the batch."""

    name: str
    student: dict  # TinyGPTConfig fields
    teacher: dict  # transformers.GPT2Config fields
    batch_size: int
    block_size: int
    divergence_rows: int  # N x V of the divergence-only benchmark
    divergence_vocab: int
    prep_mb: float  # megabytes of text for the data-preparation benchmark
    warmup: int = 3
    steps: int = 10
    divergence_repeats: int = 3

    @property
    def vocab_size(self) -> int:
        return self.student["vocab_size"]


SHAPES = {
    # The study: TinyGPT 8x512 (50.95M parameters) from GPT-2 small's shape (124M), 64 x 128 tokens.
    "study": Shapes("study", asdict(TinyGPTConfig()),
                    dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
                    batch_size=64, block_size=128, divergence_rows=8192, divergence_vocab=50257, prep_mb=32),
    # The study's proportions (teacher 1.5x deeper and wider) at a size 2 CPU cores run in minutes.
    "cpu": Shapes("cpu", dict(vocab_size=8192, block_size=64, n_layer=4, n_head=4, n_embd=128, d_ff=512,
                              dropout=0.0),
                  dict(n_layer=6, n_embd=192, n_head=6, vocab_size=8192, n_positions=64),
                  batch_size=16, block_size=64, divergence_rows=8192, divergence_vocab=50257, prep_mb=32,
                  warmup=2, steps=8, divergence_repeats=1),
    # Seconds: for CI and tests (no thresholds).
    "smoke": Shapes("smoke", dict(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32, d_ff=64,
                                  dropout=0.0),
                    dict(n_layer=3, n_embd=48, n_head=2, vocab_size=512, n_positions=32),
                    batch_size=4, block_size=32, divergence_rows=256, divergence_vocab=512, prep_mb=0.5,
                    warmup=1, steps=2, divergence_repeats=1),
}


def get_shapes(name: str, **override) -> Shapes:
    if name not in SHAPES:
        raise KdlibError(f"unknown benchmark shapes {name!r}; choose one of: {choices(SHAPES)}")
    return replace(SHAPES[name], **{k: v for k, v in override.items() if v is not None})


# --------------------------------------------------------------------------
# the pieces every path shares


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def experiment_config(shapes: Shapes, exp: str, feature: str = "hidden"):
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


def _teacher(shapes: Shapes, dev: torch.device, *, reference: bool, need_attentions: bool):
    from .models import _use_eager_attention, load_teacher, random_teacher

    model = random_teacher(shapes.teacher)
    if reference:
        # As the notebook had it: float32, trainable, eval mode; Hugging Face's default attention
        # (SDPA), eager only where attention maps are trained on. Giving the reference the same
        # attention kernel as kdlib keeps its gap to kdlib about the method, not the kernel.
        if need_attentions:
            _use_eager_attention(model)
        return model.to(dev).eval()
    return load_teacher(model, device=dev, need_attentions=need_attentions)


# --------------------------------------------------------------------------
# the reference: the original study's step


REFERENCE_EPS = 1e-8


def reference_loss(spec, s_logits, t_logits, labels, s_attn=None, t_attn=None, pairs=(),
                   temperature: float = 2.0, eps: float = REFERENCE_EPS):
    """The original notebook's loss: dense softmax tensors, ``log(p + eps)``, weights 0.5/0.5/0.05/0.05."""
    V = s_logits.shape[-1]
    ce = F.cross_entropy(s_logits.reshape(-1, V), labels.reshape(-1),
                         label_smoothing=0.1 if spec.divergence == "kl" else 0.0)
    if spec.divergence is None:
        return ce
    T = temperature
    p_s, p_t = F.softmax(s_logits / T, dim=-1), F.softmax(t_logits / T, dim=-1)  # [B, T, V] each
    if spec.divergence == "kl":
        kd = (p_t * (torch.log(p_t + eps) - torch.log(p_s + eps))).sum(-1).mean()
    elif spec.divergence == "js":
        m = 0.5 * (p_s + p_t)
        kd = 0.5 * ((p_t * (torch.log(p_t + eps) - torch.log(m + eps))).sum(-1)
                    + (p_s * (torch.log(p_s + eps) - torch.log(m + eps))).sum(-1)).mean()
    else:
        raise KdlibError(f"the reference implements the study's divergences (kl, js), not {spec.divergence!r}")
    loss = 0.5 * kd * T * T + 0.5 * ce
    if spec.cosine:
        loss = loss + 0.05 * (1.0 - F.cosine_similarity(s_logits, t_logits, dim=-1)).mean()
    if pairs:
        mse = sum(F.mse_loss(s_attn[i].mean(1), t_attn[j].mean(1)) for i, j in pairs) / len(pairs)
        loss = loss + 0.05 * mse
    return loss


class ReferenceStep:
    """One training step of the original method (see the module docstring)."""

    def __init__(self, shapes: Shapes, exp: str, dev: torch.device):
        from .models import TinyGPT

        self.spec = parse(exp)
        torch.manual_seed(0)
        self.student = TinyGPT(TinyGPTConfig(**shapes.student)).to(dev).train()
        n_s, n_t = shapes.student["n_layer"], shapes.teacher["n_layer"]
        layer_map = self.spec.feature_map
        if layer_map == "layerwise" and (n_s, n_t) == (8, 12):
            layer_map = "study"  # the notebook's odd-layer map
        self.pairs = layer_pairs(layer_map, n_s, n_t) if layer_map else []
        self.teacher = _teacher(shapes, dev, reference=True, need_attentions=bool(self.pairs)) \
            if self.spec.needs_teacher else None
        self.n_student = flop_params(self.student)
        self.n_teacher = flop_params(self.teacher) if self.teacher is not None else 0
        self.teacher_shape = (shapes.teacher["n_layer"], shapes.teacher["n_embd"]) if self.n_teacher else (0, 0)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.01)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.dev = dev

    def __call__(self, idx, batch: np.ndarray) -> float:
        win = torch.from_numpy(batch).to(self.dev)
        ids, labels = win[:, :-1], win[:, 1:]
        s_out = self.student(ids, output_attentions=True)  # explicit attention, maps kept
        t_out = None
        if self.teacher is not None:
            t_out = self.teacher(ids, output_attentions=bool(self.pairs))  # not under no_grad
        loss = reference_loss(self.spec, s_out.logits, None if t_out is None else t_out.logits, labels,
                              s_out.attentions, None if t_out is None else t_out.attentions, self.pairs)
        self.optimizer.zero_grad()
        if self.teacher is not None:
            self.teacher.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()  # the notebook read every step's loss back


# --------------------------------------------------------------------------
# kdlib's step, online or cached


class KdlibStep:
    """kdlib's own training step (``kdlib.step.TrainStep``) for one experiment."""

    def __init__(self, shapes: Optional[Shapes], exp: str, dev: torch.device, cached: bool = False,
                 feature: str = "hidden", compile: bool = False, windows: Optional[np.ndarray] = None,
                 top_k: int = 32, cfg=None, teacher=None):
        """``cfg`` (a run's config) and ``teacher`` (a frozen model) replace what ``shapes`` would
        build: ``kdlib.plan`` times a preset's own step this way."""
        from accelerate import Accelerator

        from .models import TinyGPT, teacher_forward, teacher_shape
        from .objective import DistillationLoss
        from .monitor import FiniteGuard
        from .optim import lr_factor, make_optimizer, mixed_precision
        from .step import Trainee

        cfg = cfg or experiment_config(shapes, exp, feature)
        spec = parse(cfg.exp, cfg.loss.feature)
        if cached and not spec.output_only:
            raise KdlibError(f"the cached path serves output-only experiments; {exp!r} is not")
        self.cfg, self.dev = cfg, dev
        self.accelerator = Accelerator(mixed_precision=mixed_precision(cfg.train.precision), cpu=dev.type == "cpu",
                                       step_scheduler_with_optimizer=False)
        torch.manual_seed(0)
        student = TinyGPT(cfg.model)
        if compile:
            student.compile()
        if not spec.needs_teacher:
            teacher = None
        elif teacher is None:
            teacher = _teacher(shapes, dev, reference=False, need_attentions=spec.needs_attentions)
        objective = DistillationLoss(cfg.loss, cfg.model, teacher, compile=compile)
        trainee = Trainee(student, objective)
        optimizer = make_optimizer(trainee, cfg.train, dev)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 10**6, 1, 0.1))
        self.trainee, self.optimizer, self.scheduler = self.accelerator.prepare(trainee, optimizer, scheduler)
        self.guard = FiniteGuard()
        self.n_student = flop_params(student)
        self.n_teacher = 0
        self.teacher_shape = (0, 0)
        if cached:
            self.teacher_out_fn = self._cache(teacher, windows, cfg.loss.effective().temperature, top_k)
        elif teacher is not None:
            h, a = objective.needs_hidden_states, objective.needs_attentions
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


def _release(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _peak_memory(step: Callable[[], object], dev: torch.device) -> float:
    """GPU: the most bytes allocated at once since the measurement began (weights, optimizer state
    and activations: what has to fit). CPU: the most extra bytes one step allocates (the profiler's
    replay; weights and optimizer state, allocated earlier, are not in it)."""
    if dev.type == "cuda":
        return float(torch.cuda.max_memory_allocated(dev))
    return float(peak_cpu_bytes(step))


def measure(shapes: Shapes, exp: str, path: str, *, feature: str = "hidden", compile: bool = False,
            peak: Optional[float] = None, dev: Optional[torch.device] = None) -> Result:
    """Tokens/s (median of ``shapes.steps`` timed steps after ``shapes.warmup``), peak memory, MFU."""
    dev = dev or device()
    _release(dev)  # what earlier measurements left must not count in this one's peak
    windows = token_windows(shapes)
    if path not in PATHS:
        raise KdlibError(f"unknown benchmark path {path!r}; choose one of: {choices(PATHS)}")
    step = ReferenceStep(shapes, exp, dev) if path == "reference" else \
        KdlibStep(shapes, exp, dev, cached=path == "cached", feature=feature, compile=compile, windows=windows)
    flops = flops_per_token(step.n_student, shapes.student["n_layer"], shapes.student["n_embd"], shapes.block_size,
                            *((step.n_teacher, *step.teacher_shape) if step.n_teacher else ()))
    B = shapes.batch_size
    n_batches = len(windows) // B

    def run(i: int):
        lo = (i % n_batches) * B
        return step(np.arange(lo, lo + B), windows[lo:lo + B])

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(shapes.warmup):
        run(i)
    _sync(dev)
    times = []
    for i in range(shapes.steps):
        t0 = time.perf_counter()
        run(shapes.warmup + i)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    if hasattr(step, "finish"):
        step.finish()
    mem = _peak_memory(lambda: run(0), dev)
    seconds = statistics.median(times)
    speed = B * shapes.block_size / seconds
    return Result(exp, path, speed, seconds * 1e3, mem / MiB, flops, mfu(speed, flops, peak))


def measure_reference_isolated(shapes: Shapes, exp: str, peak: Optional[float]) -> Result:
    """The reference in a fresh process with ``CUDA_LAUNCH_BLOCKING=1``, as the notebook ran (GPU only:
    the variable must be set before CUDA starts)."""
    code = ("import json, sys; from dataclasses import asdict; from kdlib import bench; "
            "a = json.loads(sys.argv[1]); "
            "r = bench.measure(bench.Shapes(**a['shapes']), a['exp'], 'reference', peak=a['peak']); "
            "print('KDLIB-BENCH ' + json.dumps(asdict(r)))")
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    arg = json.dumps({"shapes": asdict(shapes), "exp": exp, "peak": peak})
    done = subprocess.run([sys.executable, "-c", code, arg], env=env, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("KDLIB-BENCH ")]
    if done.returncode != 0 or not lines:
        raise KdlibError(f"the reference benchmark of {exp!r} failed in its subprocess:\n{done.stderr[-2000:]}")
    return Result(**json.loads(lines[-1][len("KDLIB-BENCH "):]))


# --------------------------------------------------------------------------
# the divergences alone


def divergence_bench(n: int, v: int, dev: Optional[torch.device] = None, repeats: int = 3,
                     names: Sequence[str] = ("kl", "js")) -> list[dict]:
    """Forward + backward of each divergence on [n, v] float32 logits: dense vs chunked (vs Liger)."""
    from . import losses

    dev = dev or device()
    torch.manual_seed(0)
    s = torch.randn(n, v, device=dev, requires_grad=True)
    t = torch.randn(n, v, device=dev)
    rows = []
    for name in names:
        impls = {"chunked": lambda: losses.divergence(name, s, t, 2.0, chunk_size="auto"),
                 "dense": lambda: losses.divergence(name, s, t, 2.0, chunk_size=None)}
        liger = _liger(name, s, t, 2.0) if dev.type == "cuda" else None
        if liger is not None:
            impls["liger"] = liger
        for impl, fn in impls.items():
            def fwd_bwd():
                s.grad = None
                fn().backward()

            fwd_bwd()
            _sync(dev)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fwd_bwd()
                _sync(dev)
                times.append(time.perf_counter() - t0)
            s.grad = None
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
                fwd_bwd()
                mem = torch.cuda.max_memory_allocated(dev) - base
            else:
                mem = peak_cpu_bytes(fwd_bwd)
            s.grad = None
            rows.append({"divergence": name, "impl": impl, "n": n, "v": v, "ms": statistics.median(times) * 1e3,
                         "peak_mib": mem / MiB, "x_nv_f32": mem / (n * v * 4)})
        dense = next(r for r in rows if r["divergence"] == name and r["impl"] == "dense")
        for r in rows:
            if r["divergence"] == name:
                r["mem_vs_dense"], r["time_vs_dense"] = r["peak_mib"] / dense["peak_mib"], r["ms"] / dense["ms"]
    return rows


def _liger(name: str, s, t, temperature: float):
    """Liger-Kernel's fused Triton loss for the same quantity, when the package is installed."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError:
        return None
    T = temperature
    if name == "kl":
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return lambda: kl(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * T * T
    jsd = LigerJSD(beta=0.5)
    return lambda: jsd(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * T * T


# --------------------------------------------------------------------------
# data preparation


def prep_text(megabytes: float) -> str:
    """About ``megabytes`` of local English-and-code text: Python's documentation topics and its
    standard library's sources, cycled if short. Offline; WikiText-103 itself needs the hub."""
    import sysconfig

    from .data import _python_docs

    pieces, size, want = [], 0, int(megabytes * 1e6)
    for doc in _python_docs():
        pieces.append(doc)
        size += len(doc)
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size >= want:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        pieces.append(text)
        size += len(text)
    text = "\n\n".join(pieces)
    while len(text) < want:
        text += "\n\n" + text
    return text[:want]


def prep_bench(megabytes: float, tokenizer=None) -> dict:
    """Tokens/s of kdlib's tokenization step (``data._encode``, the Rust batch encoder) on local text.

    ``tokenizer``: an object or id; default GPT-2's if it loads (needs the hub or its cache),
    else a byte-level BPE with GPT-2's vocabulary size trained here on the first 2 MB.
    """
    from .data import _encode, load_tokenizer, train_bpe

    text = prep_text(megabytes)
    lines = text.split("\n")  # WikiText comes as lines: the encoder's batches are of lines too
    name = "gpt2"
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:  # local files only: a benchmark must not wait on network timeouts
            tokenizer = load_tokenizer(AutoTokenizer.from_pretrained("gpt2", local_files_only=True))
        except (OSError, ValueError):  # not downloaded here: a stand-in of the same vocabulary size
            with tempfile.TemporaryDirectory() as d:
                tokenizer = train_bpe([text[:2_000_000]], 50257, d)
            name = "byte-level BPE, 50,257 tokens, trained here (GPT-2's is not downloaded)"
    else:
        name = getattr(tokenizer, "name_or_path", str(tokenizer))
        tokenizer = load_tokenizer(tokenizer)
    t0 = time.perf_counter()
    n_tokens = sum(ids.size for ids in _encode(tokenizer, lines))
    seconds = time.perf_counter() - t0
    chars_per_s = len(text) / seconds
    return {"tokenizer": name, "chars": len(text), "tokens": n_tokens, "seconds": seconds,
            "tokens_per_s": n_tokens / seconds, "chars_per_s": chars_per_s,
            "wikitext103_minutes": WIKITEXT103_CHARS / chars_per_s / 60, "threads": os.cpu_count()}


# --------------------------------------------------------------------------
# the whole benchmark


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


GRID_PRESET = "colab-a100"  # the preset whose shapes are the study shapes' (batch 64 x 128, hidden features)


def grid_estimate(results: Sequence[Result], preset_name: str = GRID_PRESET) -> dict:
    """Hours of ``preset_name``'s whole sweep (``kdlib.plan``: its token budget per run, its seeds,
    its evaluations) at the measured speeds: per path, and "best" (the top-k cache for the
    output-only experiments where it was measured). A path with an experiment unmeasured has no total."""
    from .plan import plan

    speed = {(r.exp, r.path): r.tokens_per_s for r in results}
    out = {}
    for path in PATHS + ("best",):
        measured = {}
        for exp in EXPERIMENTS:
            options = [speed.get((exp, p)) for p in (("cached", "kdlib") if path == "best" else (path,))]
            if path == "cached" and not parse(exp).output_only:
                options = [speed.get((exp, "kdlib"))]
            options = [x for x in options if x]
            if options:
                measured[exp] = max(options)
        if len(measured) == len(EXPERIMENTS):
            p = plan(preset_name, measured=measured, teacher_source="cache" if path in ("cached", "best") else None)
            out[path] = p.total_hours
    return out


def run_bench(shapes: Shapes, exps: Sequence[str] = EXPERIMENTS, paths: Sequence[str] = PATHS,
              sections: Sequence[str] = SECTIONS, feature: str = "hidden", compile: bool = False,
              peak: Optional[float] = None, command: str = "", log: Callable[[str], None] = print,
              out_dir=None) -> dict:
    """Measure; return the report as a dict (``to_markdown`` renders it). With ``out_dir`` the
    report is rewritten after every measurement, so a run cut short keeps what it measured."""
    for s in sections:
        if s not in SECTIONS:
            raise KdlibError(f"unknown benchmark section {s!r}; choose from: {choices(SECTIONS)}")
    for p in paths:
        if p not in PATHS:
            raise KdlibError(f"unknown benchmark path {p!r}; choose from: {choices(PATHS)}")
    exps = [parse(e).name for e in exps]  # refuses a bad name before any work
    dev = device()
    if peak == "measure":
        peak, peak_source = measured_peak_tflops(dev), "measured: this device's best large matmul"
    else:
        peak, peak_source = device_peak(None if dev.type == "cuda" else "cpu", peak)
    report = {"command": command or " ".join(sys.argv), "machine": machine(), "device": dev.type,
              "peak_tflops": peak, "peak_source": peak_source, "shapes": asdict(shapes), "feature": feature,
              "compile": compile}
    if "train" in sections:
        results = []
        report["train"] = []
        for exp in exps:
            for path in paths:
                if path == "cached" and not parse(exp).output_only:
                    continue
                if path == "reference" and dev.type == "cuda":
                    _release(dev)  # the subprocess needs the memory this process still caches
                    r = measure_reference_isolated(shapes, exp, peak)
                else:
                    r = measure(shapes, exp, path, feature=feature, compile=compile, peak=peak, dev=dev)
                results.append(r)
                report["train"].append(asdict(r))
                if out_dir is not None:
                    write_report(report, out_dir)
                log(f"{exp:>18} {path:>9}: {r.tokens_per_s:12,.0f} tokens/s  {r.step_ms:9.1f} ms/step  "
                    f"{r.peak_mem_mib:9,.0f} MiB" + (f"  MFU {r.mfu:.1%}" if r.mfu is not None else ""))
        if shapes.name == "study":  # at other shapes the hours would not be the study's
            report["grid_hours"] = grid_estimate(results)
    if "divergence" in sections:
        report["divergence"] = divergence_bench(shapes.divergence_rows, shapes.divergence_vocab, dev,
                                                repeats=shapes.divergence_repeats)
        if out_dir is not None:
            write_report(report, out_dir)
        for r in report["divergence"]:
            log(f"{r['divergence']:>3} {r['impl']:>8}: {r['ms']:9.1f} ms  {r['peak_mib']:9,.0f} MiB")
    if "prep" in sections:
        report["prep"] = prep_bench(shapes.prep_mb)
        log(f"prep: {report['prep']['tokens_per_s']:,.0f} tokens/s")
    return report


def merge_reports(reports: Sequence[dict], command: str = "") -> dict:
    """One report from several of the same shapes and machine (paths measured in separate runs,
    such as the reference in one device call and kdlib in another): their train rows in grid
    order, their other sections. Refuses reports of different shapes or devices."""
    if not reports:
        raise KdlibError("nothing to merge: give bench.json files")
    first = reports[0]
    for r in reports[1:]:
        for key in ("shapes", "device", "feature"):
            if r.get(key) != first.get(key):
                raise KdlibError(f"cannot merge benchmark reports with different {key}: "
                                 f"{first.get(key)!r} and {r.get(key)!r}")
        if r["machine"].get("gpu", r["machine"]["cpu"]) != first["machine"].get("gpu", first["machine"]["cpu"]):
            raise KdlibError("cannot merge benchmark reports from different machines")
    merged = {**first, "command": command or first["command"],
              "merged_from": [r["command"] for r in reports]}
    rows = {(row["exp"], row["path"]): row for r in reports for row in r.get("train", [])}
    order = {e: i for i, e in enumerate(EXPERIMENTS)}
    merged["train"] = sorted(rows.values(), key=lambda x: (order.get(x["exp"], len(order)), x["exp"],
                                                           PATHS.index(x["path"])))
    for section in ("divergence", "prep"):
        found = [r[section] for r in reports if section in r]
        if found:
            merged[section] = found[-1]
        else:
            merged.pop(section, None)
    if first["shapes"]["name"] == "study" and merged["train"]:
        merged["grid_hours"] = grid_estimate([Result(**row) for row in merged["train"]])
    if not merged["train"]:
        merged.pop("train")
    return merged


def to_markdown(report: dict) -> str:
    """The report as Markdown: machine, command, then one table per section."""
    m = report["machine"]
    lines = [f"Machine: {m.get('gpu', m['cpu'])} ({m['cores']} CPU cores); Python {m['python']}, torch "
             f"{m['torch']}, transformers {m['transformers']}, kdlib {m['kdlib']}"
             + (f", CUDA {m['cuda']}" if "cuda" in m else ""),
             f"Command: `{report['command']}`" + ("; merged from " + "; ".join(
                 f"`{c}`" for c in report["merged_from"]) if report.get("merged_from") else ""),
             f"Shapes: {report['shapes']['name']} (batch {report['shapes']['batch_size']} x "
             f"{report['shapes']['block_size']} tokens, V = {report['shapes']['student']['vocab_size']:,}); "
             f"kdlib's feature loss: {FEATURES[report['feature']]}; torch.compile: {report['compile']}; "
             "peak: " + (f"{report['peak_tflops']:.3g} TFLOP/s ({report.get('peak_source')})"
                         if report["peak_tflops"] else "unknown (MFU needs --peak-tflops)"), ""]
    if "train" in report:
        rows = report["train"]
        by = {(r["exp"], r["path"]): r for r in rows}
        lines += ["| experiment | path | tokens/s | ms/step | peak MiB | MFU | x reference | cached / kdlib |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            ref = by.get((r["exp"], "reference"))
            online = by.get((r["exp"], "kdlib"))
            x_ref = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref and r["path"] != "reference" else ""
            x_cached = f"{r['tokens_per_s'] / online['tokens_per_s']:.2f}" if online and r["path"] == "cached" else ""
            util = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            lines.append(f"| {r['exp']} | {r['path']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
                         f"{r['peak_mem_mib']:,.0f} | {util} | {x_ref} | {x_cached} |")
        lines += ["", "Peak MiB: " + ("the most GPU memory allocated at once (weights, optimizer state, "
                                          "activations)" if report["device"] == "cuda" else
                                          "the extra memory one step allocates (weights and optimizer state "
                                          "not included)") + ". The feature-map experiments' reference trains on "
                  f"attention maps (as the notebook did), kdlib on {FEATURES[report['feature']]}."]
        hours = report.get("grid_hours", {})
        if hours:
            from .config import preset, preset_seeds

            p = preset(GRID_PRESET)
            lines += ["", f"The {GRID_PRESET} sweep (14 experiments x {len(preset_seeds(GRID_PRESET))} seeds, "
                      f"{p.train.max_tokens:,} tokens a run, with its evaluations: `python -m kdlib plan`) at these "
                      "speeds: " + ", ".join(f"{k} {v:,.1f} h" for k, v in hours.items())]
        lines.append("")
    if "divergence" in report:
        lines += ["| divergence | implementation | N x V | ms (fwd+bwd) | peak MiB | x one [N,V] f32 | "
                  "memory / dense | time / dense |", "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in report["divergence"]:
            lines.append(f"| {r['divergence']} | {r['impl']} | {r['n']:,} x {r['v']:,} | {r['ms']:.1f} | "
                         f"{r['peak_mib']:,.0f} | {r['x_nv_f32']:.2f} | {r['mem_vs_dense']:.3f} | "
                         f"{r['time_vs_dense']:.2f} |")
        if any(r["impl"] == "liger" for r in report["divergence"]):
            lines += ["", "liger: Liger-Kernel's Triton loss, fed log-probabilities computed outside it "
                      "(two more [N, V] tensors than its fused best case)."]
        lines.append("")
    if "prep" in report:
        p = report["prep"]
        lines += [f"Data preparation: {p['chars'] / 1e6:.1f} MB of text, tokenizer {p['tokenizer']}: "
                  f"{p['tokens_per_s']:,.0f} tokens/s ({p['chars_per_s'] / 1e6:.2f} MB/s, {p['threads']} threads); "
                  f"WikiText-103 (~540 MB) extrapolated: {p['wikitext103_minutes']:.1f} min", ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir) -> tuple[Path, Path]:
    """``bench.json`` and ``bench.md`` in ``out_dir`` (written atomically)."""
    from .fileio import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench.json", report)
    atomic_write_text(out / "bench.md", to_markdown(report) + "\n")
    return out / "bench.json", out / "bench.md"
