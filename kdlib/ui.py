"""The notebooks' ipywidgets training panel: dropdowns for one experiment, Train, a live plot.

Works with ipywidgets 7.7.1 (what Colab ships) and 8.x: only widgets, traits
and calls both have (``Dropdown``, ``IntText``, ``Label``, ``Button``,
``Image``, ``Output``, ``observe``, ``on_click``). ipywidgets is imported only
by ``Panel``: ``kdlib.colab`` and ``kdlib.notebook`` work without it.

::

    f = kdlib.colab.folders("colab-a100", results_dir="")   # Drive on Colab (mounted), ./runs elsewhere
    p = kdlib.ui.panel("colab-a100", f.results_dir)         # dropdowns, Train, live validation perplexity
    p                                                       # display it (or display(p.widget))

The panel trains in the kernel's main thread (the button blocks the kernel,
as a cell would); a background thread polls the run's ``metrics.jsonl`` and
redraws the validation-perplexity plot as evaluations land. The plot is an
``Image`` widget: setting a trait from a thread is safe on both ipywidgets
versions, where writing into an ``Output`` from a thread is not.
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Optional, Union

from .colab import NOTEBOOK_PRESETS, cache_folder, data_folder, runtime_report
from .config import ExperimentConfig, preset as make_preset
from .errors import KdlibError
from .grid import FEATURES, MAPS
from .launch import BUDGET_MIB, RunChoices, RunFolders
from .notebook import (STUDY_DIVERGENCES, describe, experiment_name, figure_png, none_if_off, number_text,
                       run_config, run_folder, train_run, val_ppl_figure, val_ppl_points)

PathLike = Union[str, Path]


def _quiet(_message: str) -> None:
    """The panel rebuilds its config on every change: the notes ``run_configs`` prints are for a run."""


@dataclass
class Selection:
    """The panel's first choices; None = off (the feature kind and seed: the preset's)."""
    feature_map: Optional[str] = None
    feature: Optional[str] = None
    divergence: Optional[str] = None
    cosine: bool = False
    seed: Optional[int] = None


class _Poller(threading.Thread):
    """Calls ``tick`` every ``interval`` seconds until stopped."""

    def __init__(self, tick: Callable[[], None], interval: float):
        super().__init__(daemon=True)
        self._tick, self._interval, self._done = tick, interval, threading.Event()

    def run(self) -> None:
        while not self._done.wait(self._interval):
            self._tick()

    def stop(self) -> None:
        self._done.set()
        self.join()


class Panel:
    """Dropdowns for one experiment, its name, a Train button, a live validation-perplexity plot.

    Attributes (widgets): ``preset``, ``feature_map``, ``feature``, ``divergence``, ``cosine``
    (Dropdowns), ``seed`` (IntText), ``name_label`` (Label), ``button`` (Button), ``status``
    (Label), ``plot`` (Image: the live plot), ``output`` (Output: progress bar and log) and
    ``widget``, the VBox holding them. ``summary`` is the last run's summary.
    """

    def __init__(self, preset: str = "smoke", results_dir: PathLike = "runs", data_dir: Optional[PathLike] = None,
                 train_fn: Optional[Callable[..., dict]] = None, *, start: Optional[Selection] = None,
                 choices: Optional[RunChoices] = None, budget_mib: float = BUDGET_MIB, poll_s: float = 2.0):
        import ipywidgets as w

        base = make_preset(preset)  # refuses an unknown preset
        start = start or Selection()
        self.results_dir, self.train_fn = results_dir, train_fn
        # A data folder given for the first preset is that preset's. Another preset's is its sibling
        # when the given one is named after its preset (data/smoke -> data/colab-t4), else its default.
        self._data_given, self._data_dirs = (Path(data_dir) if data_dir else None), {}
        self._seed_edited = start.seed is not None
        self._run_shown = None  # the run folder the status line and plot are about
        self.choices, self.budget_mib, self.poll_s = choices or RunChoices(), budget_mib, poll_s
        self._preset_was = self._first_preset = preset
        self.summary: Optional[dict] = None
        self._busy = False
        self._drawn = None  # the points last drawn, to redraw only when they change
        style = {"description_width": "initial"}

        def dropdown(description, options, value):
            return w.Dropdown(options=options, value=value, description=description, style=style,
                              layout=w.Layout(width="240px"))

        offered = list(NOTEBOOK_PRESETS) + ([preset] if preset not in NOTEBOOK_PRESETS else [])
        self.preset = dropdown("preset", offered, preset)
        self.feature_map = dropdown("feature map", ["none", *MAPS], none_if_off(start.feature_map) or "none")
        self.feature = dropdown("feature", list(FEATURES), start.feature or base.loss.feature)
        self.divergence = dropdown("divergence", ["none", *STUDY_DIVERGENCES], none_if_off(start.divergence) or "none")
        self.cosine = dropdown("cosine", [("off", False), ("on", True)], bool(start.cosine))
        self.seed = w.IntText(value=base.seed if start.seed is None else start.seed, description="seed", style=style,
                              layout=w.Layout(width="240px"))
        self.name_label = w.Label()
        self.data_label = w.Label()
        self.button = w.Button(description="Train", button_style="primary", icon="play")
        self.status = w.Label()
        self.plot = w.Image(format="png", layout=w.Layout(display="none"))
        self.output = w.Output()
        for control in (self.preset, self.feature_map, self.feature, self.divergence, self.cosine, self.seed):
            control.observe(self._update, names="value")
        self.seed.observe(self._seed_changed, names="value")
        self.button.on_click(self._on_click)
        self.widget = w.VBox([
            w.HBox([self.preset, self.seed]),
            w.HBox([self.feature_map, self.feature]),
            w.HBox([self.divergence, self.cosine]),
            self.name_label,
            self.data_label,
            w.HBox([self.button, self.status]),
            self.plot,
            self.output,
        ])
        self._update()

    # what the controls say

    def experiment_name(self) -> str:
        """The experiment the dropdowns select (``ce`` when everything is off)."""
        return experiment_name(self.feature_map.value, self.divergence.value, self.cosine.value,
                               self.feature.value)

    def config(self) -> ExperimentConfig:
        """The validated ExperimentConfig of the current selections (``kdlib.notebook.run_config``)."""
        choices = replace(self.choices, feature=self.feature.value)
        return run_config(self.preset.value, self.experiment_name(), self.seed.value, choices, log=_quiet)

    def run_folders(self) -> RunFolders:
        """Where the selected run reads and writes: the results folder, the selected preset's data
        folder (``data_dir``) and its cache folder (``kdlib.colab.cache_folder``)."""
        data = self.data_dir
        return RunFolders(self.results_dir, data, cache_folder(self.preset.value, data), self.budget_mib)

    @property
    def data_dir(self) -> Path:
        """The selected preset's data folder: the one given for the first preset; for another, the given
        folder's sibling named after it when the given one is named after its preset, else that
        preset's default (``data_folder``). Resolved once per preset; nothing is created."""
        name = self.preset.value
        if name not in self._data_dirs:
            given, first = self._data_given, self._first_preset
            if given is not None and name == first:
                folder = given
            elif given is not None and given.name == first:
                folder = given.parent / name
            else:
                folder = data_folder(name, create=False)
            self._data_dirs[name] = folder
        return self._data_dirs[name]

    def problems(self) -> list[str]:
        """Why the current choices cannot train here, or [] (each a sentence saying what to do)."""
        found = runtime_report(self.preset.value)[1]
        data = self.data_dir
        if (data / "train.json").is_file():
            from .data import check_prepared_for, check_tokenizer_fits, load_split
            from .runs import check_subset

            try:  # the checks training makes first
                cfg, split = self.config(), load_split(data, "train")
                check_tokenizer_fits(split, cfg.model.vocab_size)
                check_prepared_for(cfg, split)
                check_subset(cfg, split)
            except KdlibError as e:
                found.append(str(e))
        return found

    def _data_line(self) -> str:
        data = self.data_dir
        if (data / "train.json").is_file():
            return f"data: {data} (prepared)"
        return f"data: {data} (not prepared yet: Train prepares it first, or run 01_data_prep with this preset)"

    def _seed_changed(self, change) -> None:
        if not getattr(self, "_following", False):
            self._seed_edited = True  # the user's seed: kept when the preset changes

    def _update(self, change=None) -> None:
        # The feature kind matters only with a feature map.
        self.feature.disabled = self.feature_map.value == "none"
        if change is not None and change.get("owner") is self.preset and self.preset.value != self._preset_was:
            self._preset_was = self.preset.value
            new = make_preset(self.preset.value).seed
            if not self._seed_edited and self.seed.value != new:  # an untouched seed follows the preset
                self._following = True
                try:
                    self.seed.value = new  # observed: this calls _update again
                finally:
                    self._following = False
                return
        try:
            cfg = self.config()
            run = run_folder(cfg, self.results_dir)
            self.name_label.value = describe(cfg, self.results_dir)
            self.data_label.value = self._data_line()
            problems = self.problems()
        except KdlibError as e:  # e.g. a negative seed, or Drive not mounted: say so, and nothing to train
            self.name_label.value = f"invalid choice: {e}"
            self.data_label.value = ""
            self.button.disabled = True
            if not self._busy:
                self.plot.layout.display = "none"
                self._run_shown = self._drawn = None
            return
        self.button.disabled = self._busy or bool(problems)
        if self._busy:
            return
        if problems:
            self.status.value = "cannot train: " + "; ".join(problems)
        elif run != self._run_shown or self.status.value.startswith("cannot train"):
            self.status.value = ""  # a run's line stays while that run is selected
        if run != self._run_shown:
            self._run_shown, self._drawn = run, None
            self._draw(run, hide=True)  # the selected run's curve, if it has one

    # training

    def train(self) -> dict:
        """Train the selected experiment (what the button does); return its summary.

        Progress bar and log go to ``output``; the plot is redrawn as evaluations land. A finished
        run is not trained again (its summary is returned), an interrupted one resumes.
        """
        if self._busy:
            raise KdlibError("this panel is already training a run; wait for it to finish")
        cfg = self.config()
        run_dir = run_folder(cfg, self.results_dir)
        self._busy, self.button.disabled = True, True
        self.status.value = f"training {run_dir.name} ..."
        self.output.outputs = ()
        self._drawn = None
        self._draw(run_dir)  # a resumed run shows its curve so far
        poller = _Poller(lambda: self._draw(run_dir), self.poll_s)
        poller.start()
        try:
            with self.output:
                summary = train_run(cfg, self.run_folders(), self.train_fn, log=print)
        except BaseException:
            self.status.value = f"{run_dir.name}: stopped with an error (see below)"
            raise
        finally:
            poller.stop()
            self._draw(run_dir)
            self._busy = False
            self._update()
        self.summary = summary
        self.status.value = _summary_line(run_dir.name, summary)
        self._run_shown = run_dir
        return summary

    def _on_click(self, _button) -> None:
        # An exception in a widget callback goes to the kernel's log, not the notebook: show it here.
        try:
            self.train()
        except KdlibError as e:
            with self.output:
                print(f"error: {e}")
        except Exception:
            with self.output:
                traceback.print_exc()

    def _draw(self, run_dir: Path, hide: bool = False) -> None:
        try:
            points = val_ppl_points(run_dir)
            if points == self._drawn:
                return
            if points[0]:
                self.plot.value = figure_png(val_ppl_figure(run_dir))
                self.plot.layout.display = ""
            elif hide:
                self.plot.layout.display = "none"
            self._drawn = points
        except Exception as e:  # a plot that fails must not stop the training it shows
            self.status.value = f"plot failed: {type(e).__name__}: {e}"

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def _summary_line(name: str, summary: dict) -> str:
    if "best_val_ppl" not in summary:
        return f"{name}: stopped at step {summary.get('stopped_at')} (run again to continue)"
    test = summary.get("test_ppl")
    return (f"{name}: done, best validation perplexity {number_text(summary['best_val_ppl'])} at step "
            f"{summary.get('best_step', '-')}" + (f", test {number_text(test)}" if test is not None else ""))


def panel(preset: str = "smoke", results_dir: PathLike = "runs", data_dir: Optional[PathLike] = None,
          train_fn: Optional[Callable[..., dict]] = None, **kwargs) -> Panel:
    """The training panel (see ``Panel``); display it with ``display(p.widget)`` or as a cell's value.

    ``kwargs``: the first choices (``Selection``'s fields: ``feature_map``, ``feature``, ``divergence``,
    ``cosine``, ``seed``), the choices for every run (``kdlib.launch.RunChoices``' fields:
    ``max_steps``, ``teacher_source``, ``resume_dir``, ...), ``budget_mib`` (100) and ``poll_s`` (2.0,
    seconds between plot refreshes while training).
    """
    start = {k: kwargs.pop(k) for k in [f.name for f in fields(Selection)] if k in kwargs}
    run = {k: kwargs.pop(k) for k in [f.name for f in fields(RunChoices)] if k in kwargs and k != "feature"}
    return Panel(preset, results_dir, data_dir, train_fn, start=Selection(**start), choices=RunChoices(**run),
                 **kwargs)
