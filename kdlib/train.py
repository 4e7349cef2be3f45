"""The training loop: a plain loop, with ``accelerate`` for devices, mixed precision and DDP.

``train`` runs one experiment with one seed in its run folder (``kdlib.runs`` says which files it
holds). A ``Run`` goes through its phases: ``setup`` (check the budget, build the student, the
teacher and the optimizer, or restore them from the resume state), then ``step``, ``evaluate`` and
``save`` until its budget of steps is spent or its patience runs out, then ``finish`` (the summary).
Each step is one ``kdlib.step.TrainStep``, the inner loop that preflight and ``kdlib.bench`` drive too.

Started again on the same folder, a run continues from its resume state; on
the CPU the continued run is bit-for-bit the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from . import __version__, faults
from .checkpoint import load_resume, load_student, save_resume, save_student
from .compute import cache_build_flops, train_flops_per_token
from .config import TEACHER_SOURCES, ExperimentConfig
from .data import WindowSampler
from .errors import KdlibError
from .evaluate import perplexity
from .fileio import atomic_write_json, atomic_write_text, read_json
from .lock import RunLock
from .models import TinyGPT, load_teacher, resolve_teacher_dtype, teacher_shape
from .monitor import FiniteGuard, TrainClock, eta, peak_mem_mib
from .objective import DistillationLoss
from .optim import lr_factor, make_optimizer, schedule
from .perf import flop_params, flops_per_token, mfu, peak_tflops
from .resume import Resumable, capture, check_resume, restart_advice, restore
from .runs import (RunPaths, check_budget, check_config, device_name, keep_best_student, load_data, metrics_until,
                   open_cache, run_dir, run_name, teacher_perplexity, teacher_source_of)
from .scoring import run_metrics
from .step import Trainee, TrainStep, make_accelerator, teacher_outputs
from .storage import StorageBudget, budget_for, teacher_shape_hint

__all__ = ["Run", "train", "run_dir", "run_name"]  # run_dir, run_name: where callers look for them


def train(cfg: ExperimentConfig, run_dir, data_dir, *, cache_dir=None, teacher_source: Optional[str] = None,
          teacher: Optional[nn.Module] = None, budget: Optional[StorageBudget] = None, progress: bool = True,
          log: Callable[[str], None] = print, stop_after: Optional[int] = None) -> dict:
    """Train ``cfg`` in ``run_dir`` on the prepared data in ``data_dir``; return the summary.

    ``teacher_source`` ("online" or "cache"), when given, sets ``cfg.train.teacher_source``:
    the source is part of the run's config, recorded in config.json and the summary, and a
    continued run keeps it. ``stop_after`` ends the process's work after that many optimizer
    steps with the resume state saved (for tests of resuming and for time-sliced sessions); it
    then returns ``{"stopped_at": step}`` instead of the summary.
    """
    if teacher_source is not None:
        if teacher_source not in TEACHER_SOURCES:
            raise KdlibError(f"unknown teacher source {teacher_source!r}; choose one of: "
                             f"{', '.join(TEACHER_SOURCES)} (the top-k cache is used only when asked for)")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, teacher_source=teacher_source))
    cfg.validate()
    # The run folder checked before anything touches it (a link, a file, outside the results folder).
    paths = RunPaths.of(cfg, run_dir, budget.root if budget is not None else None)
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else data_dir / "cache"
    accelerator = make_accelerator(cfg.train.precision)
    log = log if accelerator.is_main_process else (lambda *_: None)
    # Every process reads the folder and takes the same decisions; only the main one writes.
    check_config(paths, cfg)
    if paths.summary.is_file():
        log(f"{paths.root} is finished: {paths.summary}")
        return read_json(paths.summary, "summary")
    with (RunLock(paths.lock, log) if accelerator.is_main_process else nullcontext()):
        if accelerator.is_main_process:  # temporary files of a write that a killed process never finished
            for stale in paths.root.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        splits = load_data(cfg, data_dir, log)
        source = teacher_source_of(cfg)
        cache = open_cache(cfg, cache_dir, splits["train"]) if source == "cache" else None
        run = Run(cfg, paths, accelerator, budget, log)
        try:
            run.setup(splits, cache, teacher, progress)
            if not run.loop(stop_after):
                return {"stopped_at": run.state["step"]}
            return run.finish()
        except KeyboardInterrupt:
            run.interrupted()
            raise


class Run:
    """One run of ``train``: its objects, its counters (``state``, what a resume state keeps) and
    its phases. Every process takes the same decisions; only the main one writes files."""

    def __init__(self, cfg: ExperimentConfig, paths: RunPaths, accelerator, budget: Optional[StorageBudget],
                 log: Callable[[str], None]):
        self.cfg, self.paths, self.accelerator, self.budget, self.log = cfg, paths, accelerator, budget, log
        self.main = accelerator.is_main_process
        self.source = teacher_source_of(cfg)
        self.state: Optional[dict] = None  # the counters, once set up
        self.saved_step = 0  # the step of the last resume state saved
        self.bar = None

    # -- setup ------------------------------------------------------------------------------------

    def setup(self, splits: dict, cache, teacher: Optional[nn.Module], progress: bool) -> None:
        """Everything before the first step: the budget checks, the models and optimizer, the
        resume state (or a fresh start), the metrics file and the progress bar."""
        self.splits = splits
        self._plan()
        self._build(teacher)
        self._claim_folder()
        self._restore_or_start()
        self._prepare(cache, progress)

    def _plan(self) -> None:
        cfg, world = self.cfg, self.accelerator.num_processes
        # Read (and a bad $KDLIB_PEAK_TFLOPS refused) before anything is written.
        self.peak = peak_tflops(None if self.accelerator.device.type == "cuda" else "cpu")
        if cfg.train.batch_size % world:
            raise KdlibError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of "
                             f"processes ({world})")
        self.plan = schedule(cfg, self.splits["train"].n_tokens)
        if self.main:
            # From the config alone (parameter counts, the teacher's shape from its config), before any
            # model is built: a run the budget refuses allocates nothing and writes nothing.
            check_budget(cfg, self.paths.root, self.budget, None, self.plan)

    def _build(self, teacher: Optional[nn.Module]) -> None:
        cfg, device, train_cfg = self.cfg, self.accelerator.device, self.cfg.train
        torch.manual_seed(cfg.seed)
        self.student = TinyGPT(cfg.model)
        if train_cfg.compile:
            self.student.compile()  # in place: parameter names, checkpoints and resume states stay the same
        self.teacher_dtype = resolve_teacher_dtype(cfg.teacher.dtype, device)
        if self.source == "online" and teacher is None:
            teacher = load_teacher(cfg.teacher, device=device, dtype=self.teacher_dtype,
                                   need_attentions=cfg.spec.needs_attentions,
                                   student_vocab_size=cfg.model.vocab_size)
        elif teacher is not None:
            teacher = teacher.to(device)
        if teacher is not None:
            self.teacher_dtype = next(teacher.parameters()).dtype
        self.teacher = teacher
        self.objective = DistillationLoss(cfg.loss_terms, cfg.model, teacher if self.source == "online" else None,
                                          compile=train_cfg.compile)
        trainee = Trainee(self.student, self.objective)
        optimizer = make_optimizer(trainee, train_cfg, device)
        sampler = WindowSampler(self.splits["train"].tokens(), cfg.data.block_size,
                                train_cfg.batch_size * train_cfg.grad_accum, cfg.seed)
        plan = self.plan
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, plan.steps, plan.warmup, train_cfg.min_lr_ratio))
        self.objs = Resumable(trainee, optimizer, scheduler, sampler)

    def _claim_folder(self) -> None:
        """Checked before anything is written: a refused run leaves no folder claimed. Again with the
        loaded teacher's shape, where the projectors' size depends on it and the config's hint differs."""
        if not self.main:
            return
        cfg, paths = self.cfg, self.paths
        shape = teacher_shape(self.teacher) if self.teacher is not None and self.objective.spec.needs_hidden_states \
            else None
        if shape is not None and tuple(shape) != tuple(teacher_shape_hint(cfg)):
            check_budget(cfg, paths.root, self.budget, shape, self.plan)
        if not paths.config.is_file():
            atomic_write_text(paths.config, cfg.to_json() + "\n")
        paths.ensure_id()

    def _restore_or_start(self) -> None:
        paths = self.paths
        state = {"step": 0, "best": math.inf, "best_step": None, "bad_evals": 0, "tokens": 0, "wall": 0.0,
                 "eval_wall": 0.0, "evals": 0}
        if paths.resume.is_file():
            try:
                resume = load_resume(paths.resume)
                check_resume(resume, self.cfg, paths, self.plan, self.source)
                restore(resume, self.objs, state, paths.resume)
            except KdlibError as e:
                raise KdlibError(f"{e}\n{restart_advice(paths)}") from None
            if state["best_step"] is not None and not paths.student.is_file() and self.main:
                raise KdlibError(f"the best student of {paths.root.name} (step {state['best_step']}, validation "
                                 f"perplexity {state['best']:.2f}) is missing from {paths.student}, so this run "
                                 "cannot be finished from its resume state: restore that file (e.g. to the "
                                 f"train.weights_dir it was in), or delete {paths.resume} to train the run again "
                                 "from step 0")
            self.log(f"resuming {paths.root.name} at step {state['step']}")
        elif self.main:
            if paths.metrics.is_file() and paths.metrics.stat().st_size:
                self.log(f"note: {paths.root.name} has metrics but no resume state at {paths.resume}: it starts "
                         "again from step 0 (a moved run folder keeps its state only with its .run-id file)")
            if paths.student.is_file():  # an earlier attempt's best student: kept, not overwritten
                os.replace(paths.student, paths.previous_student)
                self.log(f"note: {paths.root.name} starts again from step 0; the best student of its earlier "
                         f"attempt is kept as {paths.previous_student}")
        self.state, self.saved_step = state, state["step"]

    def _prepare(self, cache, progress: bool) -> None:
        from tqdm.auto import tqdm

        accelerator, cfg, objs, state = self.accelerator, self.cfg, self.objs, self.state
        trainee, optimizer, scheduler = accelerator.prepare(objs.trainee, objs.optimizer, objs.scheduler)
        self.guard = FiniteGuard(self.source)
        self.train_step = TrainStep(accelerator, trainee, optimizer, scheduler,
                                    teacher_outputs(self.source, self.teacher, cache, self.objective,
                                                    accelerator.device), cfg.train, self.guard)
        self.metrics = metrics_until(self.paths.metrics, state["step"]) if self.main else []
        if self.main:  # drop lines written after the resume point: the rerun writes them again
            atomic_write_text(self.paths.metrics, "".join(json.dumps(r) + "\n" for r in self.metrics))
        self.bar = tqdm(total=self.plan.steps, initial=state["step"], desc=run_name(cfg), unit="step",
                        disable=not (progress and self.main))
        online = self.source == "online"
        self.flops_token = flops_per_token(
            flop_params(self.student), cfg.model.n_layer, cfg.model.n_embd, cfg.data.block_size,
            *((flop_params(self.teacher), *teacher_shape(self.teacher)) if online else ()))
        self.val_tokens = self.splits["validation"].tokens()
        self.clock = TrainClock(state["wall"])
        self.wall_log = self.wall_saved = state["wall"]
        self.tokens_log = 0
        self.last_loss = self.last_val = None
        self.stopped_early = False

    # -- the loop ---------------------------------------------------------------------------------

    def loop(self, stop_after: Optional[int] = None) -> bool:
        """Step, evaluate and save until the budget is spent or patience runs out (True: the run is
        done, ``finish`` it) or this process has taken ``stop_after`` steps (False: saved, to be
        continued)."""
        state, total = self.state, self.plan.steps
        steps_here = 0
        while state["step"] < total:
            row = self.step()
            steps_here += 1
            at_eval = state["step"] % self.plan.eval_every == 0 or state["step"] == total
            if at_eval:
                row = self.evaluate(row)
            self._record(row)
            due = self._save_due(row)
            paused = bool(stop_after) and steps_here >= stop_after
            if at_eval or due or self.stopped_early or state["step"] == total or paused:
                self.save()
            if self.stopped_early:
                self.log(f"early stop at step {state['step']}: no improvement in {self.cfg.train.patience} "
                         "evaluations")
                break
            if paused and state["step"] < total:
                self.bar.close()
                return False
        self.bar.close()
        return True

    def step(self) -> Optional[dict]:
        """One optimizer step; returns its metrics row at a log step (one host sync), else None."""
        state, train_cfg = self.state, self.cfg.train
        self.train_step.trainee.train()
        windows, batch = self.objs.sampler.next_batch()  # [batch_size · grad_accum] windows, for all processes
        lr = self.train_step.scheduler.get_last_lr()[0]  # the rate this step uses
        parts_sum = self.train_step(windows, batch, state["step"] + 1)
        faults.point("step")
        state["step"] += 1
        state["tokens"] += self.plan.tokens_per_step
        self.tokens_log += self.plan.tokens_per_step
        if not (state["step"] % train_cfg.log_every == 0 or state["step"] == self.plan.steps):
            return None
        self.guard.check(self.paths.student, self.paths.resume, self.accelerator)
        parts = {k: float(self.accelerator.reduce(v.detach().float(), "mean")) for k, v in parts_sum.items()}
        state["wall"] = self.clock.wall()  # after the sync above: the GPU has finished these steps
        self.last_loss = parts.pop("total")
        speed = self.tokens_log / max(state["wall"] - self.wall_log, 1e-9)
        row = {**self._position(), "lr": lr, "loss": self.last_loss, **{f"loss_{k}": v for k, v in parts.items()},
               "tokens_per_s": speed, "peak_mem_mib": peak_mem_mib()}
        utilisation = mfu(speed / self.accelerator.num_processes, self.flops_token, self.peak)  # peak per device
        if utilisation is not None:
            row["mfu"] = utilisation
        self.wall_log, self.tokens_log = state["wall"], 0
        return row

    def _position(self) -> dict:
        state = self.state
        return {"step": state["step"], "epoch": round(state["step"] / self.plan.steps_per_epoch, 4),
                "tokens": state["tokens"]}

    def evaluate(self, row: Optional[dict]) -> dict:
        """Validation perplexity (stride = block), outside the training clock; a new best student is
        saved. Returns the step's row with ``val_ppl``."""
        state, train_cfg = self.state, self.cfg.train
        self.guard.check(self.paths.student, self.paths.resume, self.accelerator)
        self.clock.pause()
        started = time.perf_counter()
        block = self.cfg.data.block_size
        val = perplexity(self.student, self.val_tokens, block, stride=block,
                         batch_size=train_cfg.eval_batch_size)
        self.last_val = val
        faults.point("eval")
        row = dict(row or self._position(), val_ppl=val)
        if val < state["best"]:
            state.update(best=val, best_step=state["step"], bad_evals=0)
            if self.main:
                save_student(self.student, self.paths.student, budget=budget_for(self.paths.student, self.budget),
                             exp=self.cfg.exp, seed=self.cfg.seed, step=state["step"], val_ppl=val)
        else:
            state["bad_evals"] += 1
        self.stopped_early = state["bad_evals"] >= train_cfg.patience
        state["evals"] += 1
        state["eval_wall"] += time.perf_counter() - started
        self.clock.resume()
        return row

    def _record(self, row: Optional[dict]) -> None:
        """The row into metrics.jsonl, the progress bar's line: the last logged loss (a step that only
        evaluates has none of its own), and the time left at this run's speed so far."""
        if row is not None and self.main:
            self.metrics.append(row)
            with open(self.paths.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if self.main and (row is not None or self.state["step"] == 1):
            self.bar.set_postfix(loss=f"{self.last_loss:.3f}" if self.last_loss is not None else "-",
                                 val_ppl=f"{self.last_val:.1f}" if self.last_val else "-",
                                 tok_s=f"{row['tokens_per_s']:,.0f}" if row and "tokens_per_s" in row else "-",
                                 **({"mfu": f"{row['mfu']:.0%}"} if row and "mfu" in row else {}),
                                 eta=eta(self.state, self.plan, self.clock.wall()))
        self.bar.update(1)

    def _save_due(self, row: Optional[dict]) -> bool:
        """~10 minutes of training since the last save; decided at log lines and evaluations (where
        every process syncs anyway), and by all processes together, since saving has collectives."""
        due = row is not None and self.clock.wall() - self.wall_saved >= self.cfg.train.save_every_s
        if row is not None and self.accelerator.num_processes > 1:
            flag = torch.tensor(float(due), device=self.accelerator.device)
            due = float(self.accelerator.reduce(flag, "sum")) > 0
        return due

    def save(self) -> None:
        """The resume state, outside the training clock (the main process writes it)."""
        self.guard.check(self.paths.student, self.paths.resume, self.accelerator)
        self.state["wall"] = self.clock.wall()
        self.clock.pause()
        if self.main:
            save_resume(self.paths.resume, capture(self.cfg, self.paths, self.objs, self.state, self.source),
                        budget_for(self.paths.resume, self.budget))
        self.clock.resume()
        self.wall_saved = self.state["wall"]
        self.saved_step = self.state["step"]

    # -- the end ----------------------------------------------------------------------------------

    def finish(self) -> dict:
        """The summary, written; the resume state deleted (a finished run is never resumed)."""
        self.state["wall"] = self.clock.wall()
        summary = self.summary()
        paths = self.paths
        if self.main:
            atomic_write_json(paths.summary, summary)
            # The resume state (several times the student's size) goes, so a sweep's results fit the
            # budget. Written summary first: a kill in between still leaves a finished run.
            paths.resume.unlink(missing_ok=True)
            test = summary.get("test_ppl")
            self.log(f"{paths.root.name}: best val ppl {summary['best_val_ppl']:.2f} at step "
                     f"{summary['best_step']}, " + (f"test ppl {test:.2f} (stride {summary['eval_stride']})"
                                                    if test is not None else
                                                    f"no test ppl: no student was saved at {paths.student}"))
            if paths.weights_dir is not None:
                keep_best_student(paths.root.parent, self.budget, self.log)
        self.accelerator.wait_for_everyone()
        return summary

    def summary(self) -> dict:
        """summary.json: the run's results (the best student's perplexities at stride = block / 2, on
        the training device), its cost and what it was measured with."""
        cfg, paths, state, plan, source = self.cfg, self.paths, self.state, self.plan, self.source
        block, stride = cfg.data.block_size, cfg.data.block_size // 2
        evals = [m for m in self.metrics if "val_ppl" in m]
        per_token = train_flops_per_token(cfg)
        summary = {
            "exp": cfg.exp, "preset": cfg.preset, "seed": cfg.seed, "feature": cfg.loss.feature,
            "teacher_source": source, "cache_top_k": cfg.cache.top_k if source == "cache" else None,
            "teacher_dtype": str(self.teacher_dtype).replace("torch.", ""),
            "best_val_ppl": state["best"], "best_step": state["best_step"],
            "final_val_ppl": evals[-1]["val_ppl"] if evals else None,
            "steps": state["step"], "tokens": state["tokens"], "budget_tokens": plan.tokens,
            "budget_steps": plan.steps, "stopped_early": self.stopped_early,
            # kdlib's FLOPs model (kdlib.compute): the teacher's forward included when it ran online
            "flops_per_token": per_token, "train_flops": state["tokens"] * per_token,
            # a cached run's teacher pass: the cache's one-off build, shared by every run that reads it
            "cache_build_flops": cache_build_flops(cfg, self.splits["train"].n_tokens) if source == "cache" else None,
            "train_wall_s": state["wall"], "tokens_per_s": state["tokens"] / max(state["wall"], 1e-9),
            "eval_wall_s": state.get("eval_wall", 0.0),
            "device": device_name(), "params_student": sum(p.numel() for p in self.student.parameters()),
            "params_teacher": sum(p.numel() for p in self.teacher.parameters()) if self.teacher is not None else 0,
            "val_split": "validation", "test_split": "test",
            "eval_block_size": block, "eval_stride": stride, "in_training_eval_stride": block,
            "student_path": str(paths.student.resolve()), "kdlib_version": __version__,
            # What `eval` checks its data against: another tokenizer's ids would give a number that means nothing.
            "tokenizer_hash": self.splits["train"].manifest["inputs"]["tokenizer"]["hash"],
        }
        if paths.student.is_file():
            best = load_student(paths.student).to(self.accelerator.device)  # whatever the experiment
            for key, split in (("best_val_ppl_sliding", "validation"), ("test_ppl", "test")):
                summary[key] = perplexity(best, self.splits[split].tokens(), block, stride,
                                          cfg.train.eval_batch_size)
            summary["test_metrics"] = run_metrics(cfg, best, self.splits,
                                                  self.teacher if source == "online" else None)
        summary["teacher_test_ppl"] = teacher_perplexity(cfg, self.splits["test"],
                                                         self.teacher if source == "online" else None,
                                                         self.accelerator.device)
        return summary

    def interrupted(self) -> None:
        """Ctrl-C (or a notebook's stop button): every file is whole (writes are atomic) and the resume
        state is the last one saved; the lock goes with ``train``'s block. One line, then the interrupt
        goes on to the caller (the CLI prints its message, a notebook stops the cell)."""
        if self.bar is not None:
            self.bar.close()
        if self.state is None:
            self.log(f"{self.paths.root.name}: interrupted before training started; run the same command again "
                     "to continue")
        else:
            self.log(f"interrupted at step {self.state['step']}; run the same command again to continue (from "
                     f"step {self.saved_step}, its last saved state)")
