"""How a run optimizes: its budget in steps, the learning-rate schedule laid over it, AdamW's
parameter groups, and the mixed precision it runs in on this machine."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .compute import equal_compute_steps
from .config import ExperimentConfig, TrainConfig
from .data import n_windows
from .errors import KdlibError


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``floor`` × lr at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """A run's budget in steps and tokens, from its config and the size of its training split."""

    tokens_per_step: int  # batch_size · grad_accum · block_size
    steps_per_epoch: int  # whole batches of non-overlapping windows in the training split
    steps: int  # optimizer steps of the run (the schedule is laid over them)
    warmup: int
    eval_every: int  # steps between evaluations
    evals: int  # evaluations in a run that is not stopped early

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch


def schedule(cfg: ExperimentConfig, train_tokens: int) -> Schedule:
    """Steps, warmup and evaluation cadence of ``cfg`` on a training split of ``train_tokens`` tokens.

    The budget is ``train.max_tokens`` (rounded down to whole steps), else ``train.epochs`` passes;
    ``train.max_steps`` cuts it. Evaluations every ``eval_every`` steps, else every
    ``eval_every_tokens`` tokens, else once per epoch, and at the last step.

    ``ce@EXP`` (the no-KD student at the compute of the KD experiment ``EXP``) then takes
    ``compute.compute_ratio`` times those steps, whole steps: a KD step also pays a teacher forward
    pass, so at equal FLOPs (kdlib's model) the student alone trains on that many more tokens. The
    token or epoch budget and the step cap are scaled alike, so ``ce@EXP`` spends what ``EXP`` spends
    under the same config, and a resumed run keeps the same budget.
    """
    train_cfg, block = cfg.train, cfg.data.block_size
    batch = train_cfg.batch_size * train_cfg.grad_accum  # windows per optimizer step
    per_step = batch * block
    per_epoch = n_windows(train_tokens, block) // batch
    if per_epoch < 1:
        raise KdlibError(f"{train_tokens:,} tokens make {n_windows(train_tokens, block)} windows of {block} tokens, "
                         f"fewer than one batch of {batch}; use more data or a smaller batch")
    if train_cfg.max_tokens is not None:
        if train_cfg.max_tokens < per_step:
            raise KdlibError(f"train.max_tokens ({train_cfg.max_tokens:,}) is less than one step of {per_step:,} "
                             "tokens (batch_size x grad_accum x block_size)")
        total = train_cfg.max_tokens // per_step
    else:
        total = per_epoch * train_cfg.epochs
    if train_cfg.max_steps is not None:
        total = min(total, train_cfg.max_steps)
    total = equal_compute_steps(cfg, total)
    if train_cfg.eval_every is not None:
        every = train_cfg.eval_every
    elif train_cfg.eval_every_tokens is not None:
        every = max(1, round(train_cfg.eval_every_tokens / per_step))
    else:
        every = per_epoch
    evals = total // every + (1 if total % every else 0)
    return Schedule(per_step, per_epoch, total, max(1, int(train_cfg.warmup_frac * total)), every, evals)


def param_groups(module: nn.Module, weight_decay: float, decay_all: bool) -> list[dict]:
    """AdamW groups: decay on matrices only (embeddings and Linear weights), unless ``decay_all``."""
    params = [p for p in module.parameters() if p.requires_grad]
    if decay_all:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(trainee: nn.Module, train_cfg: TrainConfig, device) -> torch.optim.Optimizer:
    """AdamW with the config's groups; the fused CUDA kernel on a GPU (one launch for all parameters)."""
    extra = {"fused": True} if torch.device(device).type == "cuda" else {}
    return torch.optim.AdamW(param_groups(trainee, train_cfg.weight_decay, train_cfg.decay_all), lr=train_cfg.lr,
                             betas=tuple(train_cfg.betas), **extra)


def mixed_precision(precision: str) -> str:
    """accelerate's mixed_precision for a config's precision on this machine."""
    if precision == "auto":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if bf16_native() else "fp16"
    if precision in ("bf16", "fp16") and not torch.cuda.is_available():
        return "no"  # CPU autocast of the whole step is slower than fp32 and not what the preset means
    return {"fp32": "no"}.get(precision, precision)


def bf16_native(device=None) -> bool:
    """bf16 in hardware (Ampere and newer). ``torch.cuda.is_bf16_supported()`` also says yes on a T4,
    where bf16 is emulated and slow: there fp16 with loss scaling is the right choice."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8

