"""The vocabulary-sized divergences alone: kdlib's chunked pass against the dense formula (and Liger).

Forward + backward of KL and JS on [N, V] float32 logits, time and peak memory, at the
benchmark's N x V (8,192 x 50,257 at the study and cpu shapes: the dense path needs ~16 GB).
"""

from __future__ import annotations

import statistics
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from kdlib import losses
from kdlib.bench import cuda_or_cpu, sync
from kdlib.memory import MiB, peak_cpu_bytes


def divergence_bench(n: int, v: int, dev: Optional[torch.device] = None, repeats: int = 3,
                     names: Sequence[str] = ("kl", "js")) -> list[dict]:
    """Forward + backward of each divergence on [n, v] float32 logits: dense vs chunked (vs Liger)."""
    dev = dev or cuda_or_cpu()
    torch.manual_seed(0)
    s = torch.randn(n, v, device=dev, requires_grad=True)  # [N, V]
    t = torch.randn(n, v, device=dev)  # [N, V]
    rows = []
    for name in names:
        impls = {"chunked": lambda: losses.divergence(name, s, t, 2.0, chunk_size="auto"),
                 "dense": lambda: losses.divergence(name, s, t, 2.0, chunk_size=None)}
        liger = _liger(name, s, t, 2.0) if dev.type == "cuda" else None
        if liger is not None:
            impls["liger"] = liger
        for impl, fn in impls.items():
            ms, mem = _time_and_peak(s, fn, dev, repeats)
            rows.append({"divergence": name, "impl": impl, "n": n, "v": v, "ms": ms,
                         "peak_mib": mem / MiB, "x_nv_f32": mem / (n * v * 4)})
        dense = next(r for r in rows if r["divergence"] == name and r["impl"] == "dense")
        for r in rows:
            if r["divergence"] == name:
                r["mem_vs_dense"], r["time_vs_dense"] = r["peak_mib"] / dense["peak_mib"], r["ms"] / dense["ms"]
    return rows


def _time_and_peak(s: torch.Tensor, fn, dev: torch.device, repeats: int) -> tuple[float, float]:
    """(median ms, peak extra bytes) of ``fn()``'s forward and its backward into ``s.grad``."""
    def fwd_bwd():
        s.grad = None
        fn().backward()

    fwd_bwd()
    sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fwd_bwd()
        sync(dev)
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
    return statistics.median(times) * 1e3, mem


def _liger(name: str, s, t, temperature: float):
    """Liger-Kernel's fused Triton loss for the same quantity, when the package is installed."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError:
        return None
    scale = temperature * temperature
    if name == "kl":
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return lambda: kl(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)) * scale
    jsd = LigerJSD(beta=0.5)
    return lambda: jsd(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)) * scale
