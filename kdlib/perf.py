"""Throughput accounting: FLOPs per token, a device's peak, model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s ÷ the device's peak. Model FLOPs follow the
PaLM/nanoGPT convention: per token, 6·N for the student's forward and backward
(N parameters, tied embeddings counted once: the output projection is a real
matmul, the embedding lookup is free), 2·N for a teacher that only runs
forward, plus attention, 12·L·d·T for the student (forward + backward) and
4·L·d·T for the teacher (forward), T the sequence length (full, not causal,
score matrices: the convention, so numbers compare with other reports).
Recomputation and the loss's vocabulary work are not model FLOPs: they lower
MFU, which is the point of measuring it.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch
from torch import nn

from .errors import KdlibError

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's
# datasheets, by a regular expression on torch.cuda.get_device_name() (whole
# words: "L4" is not "L40S"); the first match wins. Anything else: pass the
# peak in (--peak-tflops, KDLIB_PEAK_TFLOPS).
PEAK_TFLOPS = (
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),
    (r"\bH200\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bV100\b", 125.0),
    (r"\bT4\b", 65.0),
)
PEAK_ENV = "KDLIB_PEAK_TFLOPS"


def flop_params(model: nn.Module) -> int:
    """Parameters that take part in a matmul per token: all, less learned position embeddings
    (a lookup; ``wpe`` in GPT-2 and TinyGPT). Tied input/output embeddings count once, as the
    output projection."""
    lookups = sum(m.weight.numel() for name, m in model.named_modules()
                  if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] == "wpe")
    return sum(p.numel() for p in model.parameters()) - lookups


def flops_per_token(n_student: int, student_layers: int, student_width: int, seq_len: int,
                    n_teacher: int = 0, teacher_layers: int = 0, teacher_width: int = 0) -> float:
    """Model FLOPs per trained token: student forward + backward, teacher forward (0 when cached)."""
    student = 6 * n_student + 12 * student_layers * student_width * seq_len
    teacher = 2 * n_teacher + 4 * teacher_layers * teacher_width * seq_len if n_teacher else 0
    return float(student + teacher)


def device_peak(device_name: Optional[str] = None, override: Optional[float] = None) -> tuple:
    """(peak TFLOP/s, where it came from): ``override`` ("given"), else $KDLIB_PEAK_TFLOPS, else
    the table by ``device_name`` (default: this process's GPU) ("datasheet"); (None, None) if unknown."""
    if override is not None:
        return _positive(override, "the peak TFLOP/s"), "given"
    env = os.environ.get(PEAK_ENV)
    if env:
        try:
            return _positive(float(env), f"${PEAK_ENV}"), f"${PEAK_ENV}"
        except ValueError:
            raise KdlibError(f"${PEAK_ENV} must be a number of TFLOP/s (e.g. 312 for an A100), got {env!r}") from None
    if device_name is None:
        if not torch.cuda.is_available():
            return None, None
        device_name = torch.cuda.get_device_name()
    for pattern, value in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return value, "datasheet"
    return None, None


def peak_tflops(device_name: Optional[str] = None, override: Optional[float] = None) -> Optional[float]:
    """The device's peak TFLOP/s (see ``device_peak``); None if unknown."""
    return device_peak(device_name, override)[0]


def measured_peak_tflops(device=None, n: Optional[int] = None, repeats: int = 5) -> float:
    """TFLOP/s of an n x n x n matmul on ``device`` (bf16 on a GPU with it, fp16 on an older GPU,
    float32 on a CPU), the best of ``repeats`` after a warm-up: a stand-in peak where no datasheet
    value applies (a CPU). MFU against it reads "of what this machine's matmul reaches"."""
    import time

    from .models import _half_dtype

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 2048)  # on a GPU a smaller product is as short as the launch
    dtype = _half_dtype(device)  # the teacher's: bf16 where native, else fp16; float32 on a CPU
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: kernels chosen, memory allocated
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def mfu(tokens_per_s: float, flops_token: float, peak: Optional[float]) -> Optional[float]:
    """Achieved fraction of ``peak`` TFLOP/s (None when the peak is unknown)."""
    if peak is None:
        return None
    return tokens_per_s * flops_token / (peak * 1e12)


def _positive(value: float, what: str) -> float:
    if not value > 0:
        raise KdlibError(f"{what} must be > 0, got {value!r}")
    return float(value)
