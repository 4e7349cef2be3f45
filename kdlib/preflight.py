"""Preflight: run each experiment for a couple of optimizer steps and check it is wired right.

The original study's author learned that "checking is crucial": a missing
``optimizer.step()``, a teacher that trains, a loss term that is silently
zero. ``check_experiment`` catches those in seconds, before GPU hours are
spent: on the prepared data when there is some (every split present and long
enough, windows of the right shape), else on random token windows.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from itertools import chain
from typing import Optional

import numpy as np
import torch
from torch import nn

from .checkpoint import load_student, save_student
from .data import SPLITS, WindowSampler, check_tokenizer_fits, load_split, n_windows
from .config import ExperimentConfig
from .errors import KdlibError
from .grid import parse
from .models import TinyGPT, load_teacher
from .monitor import FiniteGuard
from .objective import DistillationLoss
from .optim import make_optimizer
from .step import Trainee, TrainStep, make_accelerator, teacher_outputs


@dataclass
class CheckResult:
    exp: str
    problems: list = field(default_factory=list)  # empty = passed
    parts: dict = field(default_factory=dict)  # last step's loss components

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.ok:
            return f"ok    {self.exp:<20} " + " ".join(f"{k}={v:.4g}" for k, v in self.parts.items())
        return f"FAIL  {self.exp:<20} " + "; ".join(self.problems)


def expected_parts(objective: DistillationLoss) -> list[str]:
    c = objective.spec
    return ["ce"] + [p for p, on in ((c.divergence, c.divergence is not None), ("cos", c.cosine),
                                     ("feat", c.feature_map is not None)) if on]


def check_experiment(cfg: ExperimentConfig, teacher: Optional[nn.Module] = None, steps: int = 2,
                     batch_size: int = 2, tokens: Optional[np.ndarray] = None) -> CheckResult:
    """Train ``cfg`` for ``steps`` of training's own optimizer step (``kdlib.step.TrainStep``: its
    AdamW groups, clipping and precision, at a constant learning rate) and return what looks wrong.

    The windows come from ``tokens`` (a prepared train split) the way training cuts them, or are
    random token ids when no data is given. The student's checkpoint must round-trip.
    """
    result = CheckResult(cfg.exp)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    student = TinyGPT(cfg.model)
    objective = DistillationLoss(cfg.loss_terms, cfg.model, teacher)
    if objective.spec.needs_teacher and teacher is None:
        raise KdlibError(f"experiment {cfg.exp!r} distils from a teacher; pass one")
    accelerator = make_accelerator(cfg.train.precision)  # the one training makes: one per process
    train_cfg = dataclasses.replace(cfg.train, batch_size=batch_size, grad_accum=1)
    step = _train_step(accelerator, student, objective, teacher, train_cfg)
    trainable = dict(chain((("student." + n, p) for n, p in student.named_parameters()),
                           (("loss." + n, p) for n, p in objective.named_parameters())))
    first_grads: list = []  # the names without a usable gradient, as the first AdamW step sees them

    def look_at_grads(*_):
        if not first_grads:
            first_grads.append([n for n, p in trainable.items()
                                if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()])

    step.optimizer.optimizer.register_step_pre_hook(look_at_grads)  # the AdamW inside accelerate's wrapper
    before = {n: p.detach().clone() for n, p in trainable.items()}
    teacher_before = [p.detach().clone() for p in teacher.parameters()] if teacher is not None else []
    T = cfg.data.block_size
    sampler = WindowSampler(tokens, T, batch_size, cfg.seed) if tokens is not None else None
    for i in range(steps):
        # [batch_size, T + 1] token windows: the sampler's, or random ids without data
        windows, batch = sampler.next_batch() if sampler is not None else (
            np.arange(batch_size), torch.randint(cfg.model.vocab_size, (batch_size, T + 1), generator=gen).numpy())
        if batch.shape != (batch_size, T + 1):
            result.problems.append(f"data windows have shape {tuple(batch.shape)}, expected {(batch_size, T + 1)}")
            return result
        parts = {k: float(v) for k, v in step(windows, batch, i + 1).items()}
        total = parts.pop("total")
        result.parts = parts
        missing = set(expected_parts(objective)) - set(result.parts)
        if missing:
            result.problems.append(f"loss components missing: {', '.join(sorted(missing))}")
        bad = [k for k, v in result.parts.items() if not math.isfinite(v)]
        if bad or not math.isfinite(total):
            result.problems.append(f"step {i}: non-finite loss ({', '.join(bad) or 'total'})")
            return result
        if i == 0 and first_grads and first_grads[0]:
            result.problems.append(f"no (finite, non-zero) gradient for: {_few(first_grads[0])}")
        if teacher is not None and any(p.grad is not None for p in teacher.parameters()):
            result.problems.append("the teacher received gradients")
    unchanged = [n for n, p in trainable.items() if torch.equal(p.detach(), before[n])]
    if unchanged:
        result.problems.append(f"the optimizer did not change: {_few(unchanged)}")
    if any(not torch.equal(p, q) for p, q in zip(teacher.parameters() if teacher is not None else [], teacher_before)):
        result.problems.append("the teacher's weights changed")
    _check_round_trip(student, cfg, result)
    return result


def _train_step(accelerator, student: TinyGPT, objective: DistillationLoss, teacher: Optional[nn.Module],
                train_cfg) -> TrainStep:
    """Training's step for the student on the accelerator's device, the teacher online (moved there)."""
    trainee = Trainee(student, objective)
    optimizer = make_optimizer(trainee, train_cfg, accelerator.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    trainee, optimizer, scheduler = accelerator.prepare(trainee, optimizer, scheduler)
    if teacher is not None:
        teacher.to(accelerator.device)
    source = "online" if objective.spec.needs_teacher else "none"
    outputs = teacher_outputs(source, teacher, None, objective, accelerator.device)
    trainee.train()
    return TrainStep(accelerator, trainee, optimizer, scheduler, outputs, train_cfg, FiniteGuard())


def _check_round_trip(student: TinyGPT, cfg: ExperimentConfig, result: CheckResult) -> None:
    """The student saved and loaded again reproduces its outputs (up to float16 rounding)."""
    device = next(student.parameters()).device
    with tempfile.TemporaryDirectory() as tmp:
        try:
            save_student(student, Path(tmp) / "student.safetensors")
            again = load_student(Path(tmp) / "student.safetensors", expect=cfg.model).to(device)
        except KdlibError as e:
            result.problems.append(f"the checkpoint does not round-trip: {e}")
            return
        probe = (torch.arange(min(cfg.data.block_size, 8))[None] % cfg.model.vocab_size).to(device)
        student.eval()
        again.eval()  # both without dropout; they differ only by float16 rounding of the weights
        with torch.no_grad():
            if not torch.allclose(student(probe).logits, again(probe).logits, rtol=2e-2, atol=2e-2):
                result.problems.append("the saved student does not reproduce the trained one's outputs")


def _few(names: list, n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_data(data_dir, cfg: ExperimentConfig, batch_size: int = 2) -> np.ndarray:
    """Every split present, non-empty and long enough for a window; returns the train tokens."""
    splits = {s: load_split(data_dir, s) for s in SPLITS}
    for name, split in splits.items():
        if n_windows(split.n_tokens, cfg.data.block_size) < 1:
            raise KdlibError(f"split {name!r} in {data_dir} has {split.n_tokens} tokens: not one window of "
                             f"{cfg.data.block_size}; prepare more text")
        check_tokenizer_fits(split, cfg.model.vocab_size)
    return splits["train"].tokens()


def run_checks(base: ExperimentConfig, exps, feature: Optional[str] = None, steps: int = 2, data_dir=None):
    """Check each experiment of ``exps`` under ``base`` (on the data in ``data_dir`` if given);
    yields CheckResults as they finish."""
    tokens = check_data(data_dir, base) if data_dir is not None else None
    cfgs = [base.with_experiment(e, feature=feature) for e in exps]
    specs = [parse(c.exp, feature=c.loss.feature) for c in cfgs]
    teacher = None
    if any(s.needs_teacher for s in specs):
        teacher = load_teacher(base.teacher, need_attentions=any(s.needs_attentions for s in specs),
                               student_vocab_size=base.model.vocab_size)
    for cfg in cfgs:
        yield check_experiment(cfg, teacher, steps=steps, tokens=tokens)
