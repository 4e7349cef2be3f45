"""How fast a run will train, for the plan: kdlib's own step measured here, or estimated for a GPU.

Two sources, always named:

- **measured**: a few of kdlib's own training steps per kind of experiment on
  this machine's GPU (seconds; ``device="measure"`` also on a CPU), at the
  preset's shapes, with a random GPT-2-architecture teacher of the configured
  shape; evaluations at the same achieved FLOP/s.
- **estimate**: kdlib's FLOPs model (``kdlib.perf``) at a stated MFU on a
  named GPU (the one the preset is sized for, when there is no GPU here).
  The stated MFUs are assumptions until ``benchmarks/gpu_session.sh`` measures
  them (docs/benchmarks.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from .compute import flops, teacher_dims  # their home is compute (the training layer); kdlib.speed.flops stays
from .config import ExperimentConfig
from .errors import KdlibError, choices

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


def gpu_key(name: str) -> Optional[str]:
    """The key of ``STATED_MFU`` that a GPU's name names (``NVIDIA A100-SXM4-40GB`` -> ``A100``), or None."""
    for key in sorted(STATED_MFU, key=len, reverse=True):
        if re.search(rf"\b{key}\b", name.upper()):
            return key
    return None


def estimated_rate(cfg: ExperimentConfig, gpu: str) -> tuple[float, str]:
    """(achieved FLOP/s, description) for ``cfg`` on a named GPU at its stated MFU."""
    from .perf import device_peak

    key = gpu_key(gpu)
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
        key = experiment_kind(cfg)
        if key in rates:
            continue
        source = teacher_source_of(cfg)
        attn = cfg.spec.needs_attentions
        if source != "none" and attn not in teachers:  # one random teacher of the configured shape
            dims = {k: v for k, v in teacher_dims(cfg).items() if v is not None}
            teachers[attn] = load_teacher(random_teacher(dims), device=dev,
                                          dtype=resolve_teacher_dtype(cfg.teacher.dtype, dev), need_attentions=attn)
        n = cfg.train.batch_size * cfg.train.grad_accum
        windows = np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=(n, cfg.data.block_size + 1),
                                                    dtype=np.int64)
        step = KdlibStep(cfg, dev, teachers.get(attn), cached=source == "cache", windows=windows)
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


def experiment_kind(cfg: ExperimentConfig) -> tuple:
    from .runs import teacher_source_of

    spec = cfg.spec
    return (spec.feature_map, spec.feature if spec.feature_map else None, spec.cosine,
            spec.divergence is not None, teacher_source_of(cfg))


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    from .bench import cpu_name

    return f"this CPU ({cpu_name()})"


@dataclass
class Timing:
    """How a plan times its runs: the training FLOP/s a run achieves, and what that rests on."""

    rate: Callable[[ExperimentConfig], float]  # achieved training FLOP/s of a run's config
    source: str  # "measured on <device>: ...", "estimate for one A100: ..." or "from measured tokens/s"
    device: str
    notes: list[str] = field(default_factory=list)


def timing(cfgs: Sequence[ExperimentConfig], preset: str, device: str = "auto",
           measured: Optional[dict] = None) -> Timing:
    """The ``Timing`` of ``cfgs`` (runs of ``preset``) on ``device`` (see ``plan.plan``), or at the
    tokens/s ``measured`` elsewhere ({experiment name: tokens/s}, from ``kdlib bench``)."""
    import torch

    from .runs import teacher_source_of

    if measured:
        def rate(cfg: ExperimentConfig) -> float:
            speed = measured.get(cfg.exp)
            if speed is None:
                raise KdlibError(f"no measured speed for {cfg.exp!r}; measured: {choices(measured)}")
            return speed * flops(cfg, teacher_source_of(cfg))[0]

        return Timing(rate, "from measured tokens/s (kdlib bench)", device_name())
    if device == "measure" or (device == "auto" and (torch.cuda.is_available() or preset not in TARGET_GPU)):
        rates = measure_rates(cfgs)
        name = device_name()
        source = (f"measured on {name}: a few of kdlib's steps per kind of experiment"
                  + ("" if torch.cuda.is_available() else " (a CPU busy with other work reads slower)"))
        return Timing(lambda cfg: rates[experiment_kind(cfg)], source, name)
    gpu = TARGET_GPU[preset] if device == "auto" else device
    name = gpu_key(gpu) or gpu
    notes = [f"no GPU here: the time is for one {name}, the GPU preset {preset} is sized for"] if device == "auto" else []
    return Timing(lambda cfg: estimated_rate(cfg, gpu)[0], estimated_rate(cfgs[0], gpu)[1], name, notes)
