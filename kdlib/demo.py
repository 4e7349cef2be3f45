"""The offline demo: the whole study, end to end, on a laptop CPU with no network.

1. Text: the documentation shipped with Python (``pydoc_data``, ~0.47 MB of
   real English that nobody on this project wrote), split by whole topics.
2. A byte-level BPE tokenizer trained on it (``data.tokenizer = "bpe"``).
3. A small GPT-2-architecture teacher trained on it, saved with
   ``save_pretrained`` and reused by later runs.
4. The teacher's top-k cache, the preflight check, then the 14 experiments
   with a small TinyGPT student.
5. The results table (``results.csv``, ``results.md``) and figures.

Demo-scale numbers say whether the machinery works and how the losses rank on
a tiny problem; they are not the study's results.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import ExperimentConfig, preset
from .data import WindowSampler, load_split
from .errors import KdlibError
from .evaluate import perplexity
from .fileio import atomic_write_json, read_json
from .grid import EXPERIMENTS
from .models import DEMO_TEACHER_SHAPE
from .objective import LossOutput
from .prep import prepare

TEACHER_STEPS, TEACHER_LR, TEACHER_BATCH = 500, 2e-3, 16
# The sensitivity sweeps of docs/protocol.md ("A sensitivity study"), at demo scale: (experiments,
# swept values, the original study's finding they test). One seed: a curve per weight, not a test.
SENSITIVITY = (
    (("ce", "ce@kl", "kl"), {}, "is distillation worth its teacher? no KD at kl's compute"),
    (("layerwise-kl",), {"loss.w_feat": (0.05, 0.5, 5.0)}, "finding 1: the feature term at a weight where it acts"),
    (("layerwise-js",), {"loss.temperature": (1.0, 2.0, 4.0)}, "finding 2: JS at other temperatures"),
    (("layerwise-js",), {"loss.w_div": (0.25, 0.75)}, "finding 2: JS at other divergence weights"),
    (("layerwise-kl-cos",), {"loss.w_cos": (0.05, 0.5, 5.0)}, "finding 3: the cosine term at a weight where it acts"),
)


class _LanguageModelLoss(nn.Module):
    """The teacher as ``TrainStep`` drives a trainee: plain next-token cross-entropy, no teacher of its own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, labels, teacher_out) -> LossOutput:
        logits = self.model(ids).logits  # [B, T, V]
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return LossOutput(loss, {"ce": loss.detach()})


def train_teacher(cfg: ExperimentConfig, data_dir, out_dir, steps: int = TEACHER_STEPS,
                  log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Train (or reuse) the demo's GPT-2-architecture teacher; returns its save_pretrained folder.

    Trained with training's own step (``kdlib.step.TrainStep``): AdamW on every parameter, clipping
    at 1, warmup then cosine decay to 0.1 x ``TEACHER_LR``; the best of its evaluations is kept."""
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = Path(out_dir)
    train_split = load_split(data_dir, "train")
    shape = {**DEMO_TEACHER_SHAPE, "vocab_size": cfg.model.vocab_size, "n_positions": cfg.model.block_size}
    stamp = {"shape": shape, "steps": steps, "lr": TEACHER_LR, "batch": TEACHER_BATCH,
             "block_size": cfg.data.block_size, "data_sha256": train_split.manifest["sha256"], "seed": 0}
    stamp_path = out_dir / "kdlib_teacher.json"
    if stamp_path.is_file() and read_json(stamp_path, "teacher stamp").get("stamp") == stamp:
        log(f"teacher: reusing {out_dir}")
        return out_dir
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0, **shape))
    step = _teacher_step(model, cfg, steps)
    sampler = WindowSampler(train_split.tokens(), cfg.data.block_size, TEACHER_BATCH, seed=0)
    val = load_split(data_dir, "validation").tokens()
    best, best_state = math.inf, None
    bar = tqdm(range(steps), desc="teacher", unit="step", disable=not progress)
    for i in bar:
        step.trainee.train()
        windows, batch = sampler.next_batch()
        loss = step(windows, batch, i + 1)["total"]
        if (i + 1) % 100 == 0 or i + 1 == steps:
            ppl = perplexity(model, val, cfg.data.block_size, cfg.data.block_size)
            bar.set_postfix(loss=f"{loss.item():.3f}", val_ppl=f"{ppl:.1f}")
            if ppl < best:
                best, best_state = ppl, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    atomic_write_json(staging / "kdlib_teacher.json", {"stamp": stamp, "val_ppl": best})
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    log(f"teacher: {sum(p.numel() for p in model.parameters()):,} parameters, validation perplexity "
        f"{best:.2f} (block {cfg.data.block_size}, non-overlapping), saved to {out_dir}")
    return out_dir


def _teacher_step(model: nn.Module, cfg: ExperimentConfig, steps: int):
    """Training's step for the demo teacher, with the teacher's own optimizer settings."""
    from .monitor import FiniteGuard
    from .optim import lr_factor, make_optimizer
    from .step import TrainStep, make_accelerator

    train_cfg = dataclasses.replace(cfg.train, lr=TEACHER_LR, betas=(0.9, 0.95), weight_decay=0.1, decay_all=True,
                                    batch_size=TEACHER_BATCH, grad_accum=1, grad_clip=1.0)
    accelerator = make_accelerator(train_cfg.precision)  # the one the demo's runs use (one per process)
    trainee = _LanguageModelLoss(model)
    optimizer = make_optimizer(trainee, train_cfg, accelerator.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, steps // 20, 0.1))
    trainee, optimizer, scheduler = accelerator.prepare(trainee, optimizer, scheduler)
    return TrainStep(accelerator, trainee, optimizer, scheduler, lambda idx, ids: None, train_cfg, FiniteGuard())


def run_sensitivity(root="demo", quick: bool = False, log: Callable[[str], None] = print,
                    progress: bool = True) -> dict:
    """The sensitivity sweeps (``SENSITIVITY``) at demo scale on the demo's data and teacher (made
    first when missing, reused otherwise), into ``root/sensitivity/runs``, then their report in
    ``root/sensitivity/results`` (its "Sensitivity" section and ``sweep_*`` figures)."""
    from . import analysis
    from .models import load_teacher
    from .plan import sweep_configs
    from .runs import run_dir
    from .storage import StorageBudget
    from .train import train

    root = Path(root)
    data_dir, runs_dir = root / "data", root / "sensitivity" / "runs"
    base = preset("demo")
    if quick:
        base.train.max_steps, base.train.eval_every = 12, 6
    prepare(base, data_dir, log=log)
    base.teacher.name = str(train_teacher(base, data_dir, root / "teacher", steps=40 if quick else TEACHER_STEPS,
                                          log=log, progress=progress).resolve())
    teacher = load_teacher(base.teacher, student_vocab_size=base.model.vocab_size)
    budget = StorageBudget(runs_dir, 100 * 2**20)
    for exps, axes, why in SENSITIVITY:
        cfgs = sweep_configs(base, exps, [base.seed], "online", log=log, sweep=axes)
        log(f"== {why}: {', '.join(exps)} x {', '.join(axes)} ({len(cfgs)} runs)")
        for cfg in cfgs:
            train(cfg, run_dir(runs_dir, cfg), data_dir, teacher=teacher, teacher_source="online", budget=budget,
                  progress=progress, log=log)
    return analysis.report(runs_dir, root / "sensitivity" / "results", log=log)


def run_demo(root="demo", quick: bool = False, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run the whole demo under ``root``; ``quick`` cuts every run short (CI)."""
    from . import analysis
    from .cache import build_cache
    from .models import load_teacher
    from .preflight import run_checks
    from .storage import StorageBudget
    from .train import run_name, train

    t0 = time.perf_counter()
    root = Path(root)
    data_dir, runs_dir = root / "data", root / "runs"
    base = preset("demo")
    if quick:
        base.train.max_steps, base.train.eval_every = 12, 6
    log("== 1/6 data: Python's documentation, a byte-level BPE trained on it")
    prepare(base, data_dir, log=log)
    log("== 2/6 teacher: a small GPT-2-architecture model trained on the same text")
    base.teacher.name = str(train_teacher(base, data_dir, root / "teacher", steps=40 if quick else TEACHER_STEPS,
                                          log=log, progress=progress).resolve())
    log("== 3/6 the teacher's top-k cache (for the output-only experiments)")
    build_cache(base.with_experiment("kl"), data_dir, data_dir / "cache", log=log, progress=progress)
    log("== 4/6 preflight: two training steps per experiment")
    failed = [r for r in run_checks(base, EXPERIMENTS, data_dir=data_dir) if not (log(r.line()) or r.ok)]
    if failed:
        raise KdlibError(f"preflight failed for {', '.join(r.exp for r in failed)}; see above")
    log(f"== 5/6 the {len(EXPERIMENTS)} experiments, teacher online (they differ only in their loss), "
        "then kl from the top-k cache")
    teacher = load_teacher(base.teacher, student_vocab_size=base.model.vocab_size)
    budget = StorageBudget(runs_dir, 100 * 2**20)
    for i, exp in enumerate(EXPERIMENTS, 1):
        cfg = base.with_experiment(exp)
        log(f"[{i}/{len(EXPERIMENTS)}] {exp}")
        train(cfg, runs_dir / run_name(cfg), data_dir, teacher=teacher, teacher_source="online", budget=budget,
              progress=progress, log=log)
    # The same runs folder: the report labels the cached run `kl [top-K cache]`, its own row.
    cached = base.with_experiment("kl")
    cached.train = dataclasses.replace(cached.train, teacher_source="cache")  # run_name: kl-topK-seedN
    train(cached, runs_dir / run_name(cached), data_dir, teacher_source="cache", budget=budget,
          progress=progress, log=log)
    log("== 6/6 results")
    results = root / "results"
    out = analysis.report(runs_dir, results, log=log)
    table = out["table"]
    md = results / "results.md"
    wall = time.perf_counter() - t0
    cols = ["best_val_ppl", "test_ppl", "vs_no_kd_pct", "train_wall_s"]
    for group in out["groups"]:  # one, unless the runs folder holds runs of another protocol too
        log(group["table"][cols].to_string(float_format=lambda v: f"{v:.2f}"))
    log(f"demo finished in {wall / 60:.1f} min: tables and figures in {results}, runs in {runs_dir}")
    return {"table": table, "wall_s": wall, "results": md, "figures": out["figures"]}
