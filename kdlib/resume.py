"""Continuing a run: what its resume state holds, the checks that it is this run's, and the RNG
states that make a continued run on the CPU bit-for-bit the uninterrupted one.

The file format is ``kdlib.checkpoint.save_resume``/``load_resume``; this module decides what goes in
and whether what comes out may continue a run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .config import ExperimentConfig
from .data import WindowSampler
from .errors import KdlibError
from .optim import Schedule
from .runs import RunPaths, config_digest


@dataclass
class Resumable:
    """The objects of a run whose state a resume state holds, besides its counters: the ones built
    for it, not ``accelerator.prepare``'s wrappers (which share their parameters and state)."""

    trainee: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: WindowSampler


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def restart_advice(paths: RunPaths) -> str:
    """What deleting a resume state does: said exactly, since the run's best student is at stake."""
    return (f"To train {paths.root.name} again from step 0 instead, delete {paths.resume}: its metrics.jsonl starts "
            f"over, and its best student so far ({paths.student}, if any) is kept as {paths.previous_student} "
            "(replacing an older one there); nothing else is deleted.")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_resume(resume: dict, cfg: ExperimentConfig, paths: RunPaths, plan: Schedule, source: str) -> None:
    """Refuse a resume state that is not this run's, or whose contents cannot be this run's.

    A resume state is bound to its run: experiment, seed, teacher source, the full config's digest
    and (outside the run folder, in a shared ``train.resume_dir``) the run folder's id. States of
    older versions have neither of the last two and are read on the first three. Its counters
    decide what happens next (a step past the budget would mark the run finished and delete the
    state), so they are checked for type and range here, and its parts for the types that
    ``restore`` hands to ``load_state_dict``; every refusal is a ``KdlibError``.
    """
    where = f"resume state {paths.resume}"
    if resume.get("exp") != cfg.exp or resume.get("seed") != cfg.seed:
        raise KdlibError(f"{where} belongs to another run ({resume.get('exp')!r} seed {resume.get('seed')!r}, this "
                         f"run is {cfg.exp!r} seed {cfg.seed}); use another folder")
    if resume.get("teacher_source", source) != source:
        raise KdlibError(f"{where} was trained with the teacher source {resume['teacher_source']!r}, this run asks "
                         f"for {source!r}: a run keeps its source. Continue it with the same source")
    if "config_sha256" in resume and resume["config_sha256"] not in (config_digest(cfg),
                                                                     config_digest(cfg, components_in_loss=True)):
        raise KdlibError(f"{where} was saved by a run of another configuration than {paths.config}'s (config "
                         f"digest {str(resume['config_sha256'])[:12]}, this run's {config_digest(cfg)[:12]}): it "
                         "cannot continue this run")
    if paths.resume_dir is not None and "run_id" in resume and resume["run_id"] != paths.run_id:
        raise KdlibError(f"{where} was saved by another run folder (run id {resume['run_id']!r}, {paths.id_file} "
                         f"says {paths.run_id!r}); it cannot continue this run")
    types = {"model": dict, "optimizer": dict, "scheduler": dict, "sampler": dict, "rng": dict, "state": dict}
    bad = [k for k, kind in types.items() if not isinstance(resume.get(k), kind)]
    if bad:
        raise KdlibError(f"{where} is incomplete or corrupt: {', '.join(bad)} missing or not a mapping")
    opt = resume["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise KdlibError(f"{where} is corrupt: its optimizer state has no state or param_groups")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in resume["model"].items()):
        raise KdlibError(f"{where} is corrupt: its model state is not a mapping of names to tensors")
    st = resume["state"]
    step, tokens = st.get("step"), st.get("tokens")
    if not _is_int(step) or not 0 <= step <= plan.steps:
        raise KdlibError(f"{where} is corrupt: step {step!r} is not a whole number in 0..{plan.steps} (this "
                         "run's budget of steps)")
    if not _is_int(tokens) or tokens != step * plan.tokens_per_step:
        raise KdlibError(f"{where} is corrupt: tokens {tokens!r} is not step {step} x {plan.tokens_per_step} "
                         "tokens per step")
    best, best_step = st.get("best"), st.get("best_step")
    if not _is_num(best) or math.isnan(best) or not (best_step is None or (_is_int(best_step)
                                                                          and 1 <= best_step <= step)):
        raise KdlibError(f"{where} is corrupt: best {best!r} at step {best_step!r} (step {step})")
    for key in ("bad_evals", "evals"):
        if not _is_int(st.get(key)) or st[key] < 0:
            raise KdlibError(f"{where} is corrupt: {key} {st.get(key)!r} is not a whole number >= 0")
    for key in ("wall", "eval_wall"):
        if not _is_num(st.get(key)) or not math.isfinite(st[key]) or st[key] < 0:
            raise KdlibError(f"{where} is corrupt: {key} {st.get(key)!r} is not a number of seconds")
    last = resume["scheduler"].get("last_epoch")
    if last != step:
        raise KdlibError(f"{where} is corrupt: its schedule is at step {last!r}, its counters at step {step}")


def restore(resume: dict, objs: Resumable, state: dict, path: Path) -> None:
    """Load a state ``check_resume`` passed into the run's objects and counters ``state``; anything
    they reject (shapes, missing entries, RNG states) is a ``KdlibError``, never a traceback."""
    trainee, optimizer, scheduler, sampler = objs.trainee, objs.optimizer, objs.scheduler, objs.sampler
    what = "model"
    try:
        trainee.load_state_dict(resume["model"])
        what = "optimizer"
        optimizer.load_state_dict(resume["optimizer"])
        for p in optimizer.state:  # load_state_dict does not compare the moments' shapes to the params
            for k, v in optimizer.state[p].items():
                if isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape:
                    raise ValueError(f"{k} has shape {tuple(v.shape)} for a parameter of {tuple(p.shape)}")
        what = "scheduler"
        unknown = set(resume["scheduler"]) - set(scheduler.state_dict())
        if unknown:
            raise ValueError(f"unknown entries {sorted(unknown)}")
        scheduler.load_state_dict(resume["scheduler"])
        what = "data position"
        sampler.load_state_dict(resume["sampler"])
        what = "random number generator"
        set_rng_state(resume["rng"])
    except KdlibError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise KdlibError(f"resume state {path}: its {what} does not fit this run ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300] if str(e) else e!r}); it is corrupt or of another "
                         "model") from None
    state.update({k: resume["state"][k] for k in state if k in resume["state"]})


def capture(cfg: ExperimentConfig, paths: RunPaths, objs: Resumable, state: dict, source: str) -> dict:
    """The resume state of a run now: bound to it (experiment, seed, teacher source, config digest,
    run id), its objects' states and its counters."""
    return {"exp": cfg.exp, "seed": cfg.seed, "teacher_source": source, "kdlib_version": __version__,
            "config_sha256": config_digest(cfg), "run_id": paths.run_id,
            "model": objs.trainee.state_dict(), "optimizer": objs.optimizer.state_dict(),
            "scheduler": objs.scheduler.state_dict(), "sampler": objs.sampler.state_dict(), "rng": rng_state(),
            "state": dict(state)}
