"""Launching runs: a run's config from the user's choices, and its training in its run folder.

The CLI (``train``, ``sweep``, ``plan``) and the notebooks (``kdlib.notebook``, the panel in
``kdlib.ui``) both build their configs with ``run_configs`` and train them with ``train_run``, so a
notebook run and ``python -m kdlib train`` with the same choices are the same run. The modules that
import torch are imported where they are needed: ``python -m kdlib --help`` starts without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .config import ExperimentConfig, preset as make_preset, preset_seeds
from .errors import KdlibError

PathLike = Union[str, Path]
BUDGET_MIB = 100.0  # the results folder's storage budget when none is given (the CLI's --budget-mib)


@dataclass
class RunChoices:
    """What a user may choose for every run of a sweep beyond its preset, experiment and seed.

    ``None`` (and ``compile=False``) keeps the preset's value.
    """
    feature: Optional[str] = None  # "hidden" or "attention": what the feature maps compare
    # "online" or "cache": the cache serves the output-only experiments; the others stay online (said once)
    teacher_source: Optional[str] = None
    max_steps: Optional[int] = None  # cuts every run's budget short (a try)
    compile: bool = False  # torch.compile the student and the loss formulas
    weights: Optional[str] = None  # "run" or "best": where the students are kept
    weights_dir: Optional[str] = None  # the local folder for the students with weights = "best"
    resume_dir: Optional[str] = None  # the resume state's folder; "" = the run folder
    # A sensitivity sweep: {"loss.temperature": (1, 2), "train.lr": (3e-4, 6e-4)}, every run of the sweep
    # once per point of their product (kdlib.config.sweep; the CLI's --set); None = no sweep.
    sweep: Optional[dict] = None

    def apply(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """``cfg`` with these choices set (in place), the teacher source aside: it depends on the experiment."""
        if self.feature is not None:
            cfg.loss.feature = self.feature
        if self.max_steps is not None:
            cfg.train.max_steps = self.max_steps
        if self.compile:
            cfg.train.compile = True
        if self.weights is not None:
            cfg.train.weights = self.weights
        if self.weights_dir is not None:
            cfg.train.weights_dir = self.weights_dir
        if self.resume_dir is not None:
            cfg.train.resume_dir = self.resume_dir or None
        return cfg


def run_configs(preset: str, exps: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None,
                choices: Optional[RunChoices] = None, log: Callable[[str], None] = print) -> list[ExperimentConfig]:
    """The validated configs of ``exps`` x ``seeds`` (x the points of ``choices.sweep``) under ``preset``
    with ``choices`` (defaults: the 14 of the grid, the preset's seeds); a bad experiment name is
    refused before any config is built."""
    from .plan import sweep_configs

    choices = choices or RunChoices()
    base = choices.apply(make_preset(preset))
    for exp in exps or ():
        base.with_experiment(exp)  # refuses a bad name before any work
    return sweep_configs(base, exps, seeds, choices.teacher_source, log=log, sweep=choices.sweep)


def run_config(preset: str, exp: str, seed: Optional[int] = None, choices: Optional[RunChoices] = None,
               log: Callable[[str], None] = print) -> ExperimentConfig:
    """One run's validated config: ``run_configs`` for one experiment and one seed (None = the preset's
    first, as ``python -m kdlib train``)."""
    seed = preset_seeds(preset)[0] if seed is None else seed
    return run_configs(preset, [exp], [seed], choices, log)[0]


@dataclass
class RunFolders:
    """Where a run reads and writes: its results folder (held to ``budget_mib``), data and cache."""
    results_dir: PathLike
    data_dir: PathLike
    cache_dir: Optional[PathLike] = None  # None = DATA_DIR/cache
    budget_mib: float = BUDGET_MIB

    def budget(self):
        """The results folder's ``StorageBudget``; ``KdlibError`` for a budget that is not a positive size."""
        from .checkpoint import MiB, StorageBudget

        if not (0 < self.budget_mib < 1e9):
            raise KdlibError(f"the storage budget (--budget-mib, a notebook's budget_mib) must be a positive "
                             f"number of MiB, got {self.budget_mib:g}")
        return StorageBudget(self.results_dir, int(self.budget_mib * MiB))


def train_run(cfg: ExperimentConfig, folders: RunFolders, train_fn: Optional[Callable[..., dict]] = None,
              log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train ``cfg`` in its run folder under ``folders.results_dir``; return its summary.

    An interrupted run resumes, a finished one returns its summary without training.
    ``train_fn`` defaults to ``kdlib.train.train`` (the panel's tests pass a stand-in).
    """
    from .train import run_dir, train

    budget = folders.budget()
    return (train_fn or train)(cfg, run_dir(folders.results_dir, cfg), folders.data_dir,
                               cache_dir=folders.cache_dir, budget=budget, log=log, progress=progress)
