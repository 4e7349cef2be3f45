"""What the training loop watches without slowing it: non-finite losses (``FiniteGuard``), the
training wall time (``TrainClock``), the time left (``eta``) and peak memory."""

from __future__ import annotations

import time
from typing import Optional

import torch

from .errors import KdlibError
from .optim import Schedule
from .storage import MiB


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


class TrainClock:
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


def eta(state: dict, plan: Schedule, wall: float) -> str:
    """The run's time left, h:mm:ss: its remaining steps at this run's training speed so far, plus
    its remaining evaluations at their average cost (early stopping may end it sooner)."""
    if state["step"] < 1:
        return "-"
    per_step = wall / state["step"]
    per_eval = state["eval_wall"] / state["evals"] if state["evals"] else 0.0
    left = (plan.steps - state["step"]) * per_step + max(plan.evals - state["evals"], 0) * per_eval
    m, sec = divmod(int(left), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}"


def peak_mem_mib() -> float:
    """Peak memory so far: allocated on the GPU, else the process's resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / MiB
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # pragma: no cover - Windows
        return float("nan")

