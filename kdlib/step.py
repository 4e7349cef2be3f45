"""One training step, the inner loop that training, preflight and ``kdlib.bench`` share.

``TrainStep`` runs ``grad_accum`` micro-batches of a ``Trainee`` (the student and the loss's
projectors as one module), clips, steps AdamW and the schedule, through ``accelerate`` (devices,
mixed precision, DDP); ``make_accelerator`` sets that up for a config's precision.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .config import TrainConfig
from .errors import KdlibError
from .models import TinyGPT, teacher_forward
from .monitor import FiniteGuard
from .objective import DistillationLoss
from .optim import mixed_precision


class Trainee(nn.Module):
    """The student and the loss's trainable parts (projectors) as one module, for DDP and the optimizer."""

    def __init__(self, student: TinyGPT, objective: DistillationLoss):
        super().__init__()
        self.student, self.objective = student, objective

    def forward(self, ids, labels, teacher_out):
        out = self.student(ids, output_hidden_states=self.objective.spec.needs_hidden_states,
                           output_attentions=self.objective.spec.needs_attentions)
        return self.objective(out, teacher_out, labels)


@dataclass
class TrainStep:
    """One optimizer step: ``train_cfg.grad_accum`` micro-batches, clipping, AdamW, the schedule.

    The inner loop that training, preflight and ``kdlib.bench`` share. ``teacher_out_fn(idx, ids)``
    gives the teacher's outputs for windows ``idx`` (or None); ``guard`` records a non-finite loss
    without a host sync.
    """

    accelerator: object  # accelerate.Accelerator: devices, mixed precision, DDP
    trainee: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    teacher_out_fn: Callable
    train_cfg: TrainConfig
    guard: FiniteGuard

    def __call__(self, windows, batch, step: int) -> dict:
        """``windows``/``batch``: the sampler's window indices and ``[batch_size·grad_accum, block + 1]``
        tokens (shared by all processes: each takes its share); ``step`` is the step's number (1-based).
        Returns the step's mean loss parts as device tensors, ``total`` included: no host sync here
        (fp16 loss scaling aside)."""
        accelerator, train_cfg = self.accelerator, self.train_cfg
        per_process = train_cfg.batch_size // accelerator.num_processes
        device = accelerator.device
        batch = torch.from_numpy(batch)
        if device.type == "cuda":
            batch = batch.pin_memory()
        parts_sum: dict = {}
        for micro in range(train_cfg.grad_accum):
            lo = micro * train_cfg.batch_size + accelerator.process_index * per_process  # this process's share
            idx = windows[lo:lo + per_process]
            win = batch[lo:lo + per_process].to(device, non_blocking=True)
            ids, labels = win[:, :-1], win[:, 1:]  # [b, T] each
            teacher_out = self.teacher_out_fn(idx, ids)
            last = micro == train_cfg.grad_accum - 1
            with (nullcontext() if last else accelerator.no_sync(self.trainee)), accelerator.autocast():
                out = self.trainee(ids, labels, teacher_out)
                self.guard.update(step, out)
                accelerator.backward(out.total / train_cfg.grad_accum)
            for k, v in out.parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / train_cfg.grad_accum
            parts_sum["total"] = parts_sum.get("total", 0.0) + out.total.detach() / train_cfg.grad_accum
        if train_cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(self.trainee.parameters(), train_cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return parts_sum


def make_accelerator(precision: str):
    """The run's ``accelerate.Accelerator`` for a config's precision on this machine. The scheduler
    steps once per optimizer step, not once per process (accelerate's default)."""
    from accelerate import Accelerator

    try:
        return Accelerator(mixed_precision=mixed_precision(precision), cpu=not torch.cuda.is_available(),
                           step_scheduler_with_optimizer=False)
    except ValueError as e:  # e.g. a stray WORLD_SIZE without accelerate launch's other variables
        if not any(os.environ.get(v) for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")):
            raise
        raise KdlibError(f"the distributed setup in the environment is incomplete ({e}); unset WORLD_SIZE, "
                         "RANK, LOCAL_RANK and MASTER_ADDR to train in one process, or start the run with "
                         "`accelerate launch`") from None


def teacher_outputs(source: str, teacher, cache, objective: DistillationLoss, device) -> Callable:
    """``teacher_out_fn(idx, ids)`` for a teacher source: the teacher's forward (online), the cache's
    top-k for windows ``idx`` (cache), or None (no teacher)."""
    if source == "online":
        hidden, attentions = objective.spec.needs_hidden_states, objective.spec.needs_attentions
        return lambda idx, ids: teacher_forward(teacher, ids, hidden, attentions)
    if source == "cache":
        return lambda idx, ids: cache.batch(idx, device)
    return lambda idx, ids: None
