"""Notebook helpers and an ipywidgets training panel.

Works with ipywidgets 7.7.1 (what Colab ships) and 8.x: only widgets, traits
and calls both have (``Dropdown``, ``IntText``, ``Label``, ``Button``,
``Image``, ``Output``, ``observe``, ``on_click``). ipywidgets is imported only
by ``panel``: the other helpers work without it.

::

    results_dir = kdlib.ui.results_folder()        # Drive on Colab (mounted), ./runs elsewhere
    p = kdlib.ui.panel("colab-a100", results_dir)   # dropdowns, Train, live validation perplexity
    p                                               # display it (or display(p.widget))

The panel trains in the kernel's main thread (the button blocks the kernel,
as a cell would); a background thread polls the run's ``metrics.jsonl`` and
redraws the validation-perplexity plot as evaluations land. The plot is an
``Image`` widget: setting a trait from a thread is safe on both ipywidgets
versions, where writing into an ``Output`` from a thread is not.
"""

from __future__ import annotations

import importlib.util
import io
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, Optional, Union

from .config import PRESETS, ExperimentConfig, preset as make_preset
from .errors import KdlibError, choices
from .fileio import read_jsonl
from .grid import FEATURES, MAPS, parse

PathLike = Union[str, Path]

DRIVE = Path("/content/drive")  # where Colab mounts Google Drive
COLAB_RESUME_DIR = "/content/kdlib-resume"  # the runtime's local disk: resume state is several x the student
COLAB_WEIGHTS_DIR = "/content/kdlib-weights"  # the students a 100 MiB Drive budget cannot hold
DIVERGENCES = ("kl", "js")  # the study's; experiment_name takes any the grammar does
BUDGET_MIB = 100.0  # the results folder's storage budget, as the CLI's --budget-mib
# The presets the notebooks and the panel offer. Not "demo": it trains its own
# teacher first (`python -m kdlib demo`), which a notebook run does not.
NOTEBOOK_PRESETS = ("smoke", "colab-t4", "colab-a100", "study")


# --------------------------------------------------------------------------
# where things live


def on_colab() -> bool:
    """True inside Google Colab (its ``google.colab`` module is loaded or importable)."""
    if "google.colab" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):  # no ``google`` package at all
        return False


def drive_folder(name: str) -> Path:
    """``MyDrive/name`` on Colab's Google Drive, mounting Drive first (created if missing)."""
    try:
        from google.colab import drive

        drive.mount(str(DRIVE))
    except Exception as e:
        raise KdlibError(
            f"Google Drive could not be mounted at {DRIVE} ({type(e).__name__}: {e}). Re-run this cell and "
            "accept the authorisation prompt (choose your Google account and allow access to Google "
            "Drive), or keep the files on this runtime's disk instead by giving a local folder (e.g. "
            "results_dir='/content/runs'; it is lost when the runtime is recycled).") from e
    folder = DRIVE / "MyDrive" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def results_folder(name: str = "kdlib", local: PathLike = "runs") -> Path:
    """Where runs are kept: ``/content/drive/MyDrive/NAME`` on Colab (Drive mounted), else ``local``.

    On Colab a failed mount raises ``KdlibError`` saying how to fix it.
    """
    return drive_folder(name) if on_colab() else Path(local)


def data_folder(preset: str, data_dir: Optional[PathLike] = None, drive_name: str = "kdlib-data") -> Path:
    """A preset's prepared-data folder: ``data_dir`` if given, else ``data/PRESET`` (the CLI's default)
    or, on Colab, ``MyDrive/kdlib-data/PRESET``: each Colab notebook runs on its own machine, so data
    that 01 prepares reaches 02 and 03 only through Drive."""
    if preset not in PRESETS:
        raise KdlibError(f"unknown preset {preset!r}; choose one of: {choices(PRESETS)}")
    if data_dir:
        return Path(data_dir)
    return drive_folder(f"{drive_name}/{preset}") if on_colab() else Path("data") / preset


def device() -> str:
    """The device for work outside the training loop (the cache's teacher pass): cuda when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------
# experiments from the notebook's choices


def _none(value) -> Optional[str]:
    return None if value in (None, "", "none", "None") else str(value)


def experiment_name(feature_map: Optional[str] = None, divergence: Optional[str] = None, cosine: bool = False,
                    feature: str = "hidden") -> str:
    """The experiment name of a combination (``None``/"none" = that part off); all off is ``ce``.

    ``experiment_name("layerwise", "kl", True)`` is ``layerwise-kl-cos``.
    """
    fmap, div = _none(feature_map), _none(divergence)
    if fmap is not None and fmap not in MAPS:
        raise KdlibError(f"unknown feature map {fmap!r}; choose one of: none, {choices(MAPS)}")
    if div is not None and (div in MAPS or div in ("cos", "ce") or "-" in div):
        raise KdlibError(f"{div!r} is not a divergence; choose none, {choices(DIVERGENCES)} or another the "
                         "grammar reads (rkl, tvd, gjsd0.3, ...)")
    parts = [p for p in (fmap, div) if p] + (["cos"] if cosine else [])
    return parse("-".join(parts) or "ce", feature).name


def experiment_config(preset: str, feature_map: Optional[str] = None, feature: Optional[str] = None,
                      divergence: Optional[str] = None, cosine: bool = False, seed: Optional[int] = None,
                      max_steps: Optional[int] = None, resume_dir: Optional[str] = "auto",
                      teacher_source: Optional[str] = None) -> ExperimentConfig:
    """The validated config of one run: ``preset`` with the chosen loss components.

    Arguments:
        feature: "hidden" or "attention" (None = the preset's).
        seed: None = the preset's first (``kdlib.config.preset_seeds``), as ``train`` and ``sweep``.
        max_steps: None = the preset's budget; a number cuts it short.
        resume_dir: where the resume state goes; "auto" = the preset's (the working folder's local
            disk for the study-sized presets), or on Colab the runtime's local disk for the others (it
            is several times the student's size: it would not fit a 100 MB Drive budget).
        teacher_source: "online" or "cache" (None = the preset's, online); the cache serves
            output-only experiments and its runs are labelled.
    """
    if preset not in PRESETS:
        raise KdlibError(f"unknown preset {preset!r}; choose one of: {choices(NOTEBOOK_PRESETS)}")
    base = make_preset(preset)
    feature = feature or base.loss.feature
    cfg = base.with_experiment(experiment_name(feature_map, divergence, cosine, feature), feature=feature)
    if seed is not None:
        cfg.seed = seed
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    if teacher_source is not None:
        cfg.train.teacher_source = teacher_source
    if resume_dir == "auto":
        resume_dir = cfg.train.resume_dir or (COLAB_RESUME_DIR if on_colab() else None)
    cfg.train.resume_dir = str(resume_dir) if resume_dir else None
    return cfg.validate()


def run_folder(cfg: ExperimentConfig, results_dir: PathLike) -> Path:
    """The run's folder in ``results_dir``: ``PRESET/EXP[-attn][-topK]-seedSEED``."""
    from .train import run_dir

    return run_dir(results_dir, cfg)


def plan_text(cfg: ExperimentConfig, results_dir: PathLike, data_dir: Optional[PathLike] = None,
              budget_mib: float = BUDGET_MIB) -> str:
    """What this run will cost (``kdlib.plan``): tokens, steps, evaluations, time, bytes against the
    results folder's budget. Measured on this runtime's GPU; an estimate without one."""
    from .checkpoint import MiB
    from .plan import plan

    return plan(cfg.preset, cfgs=[cfg], results_dir=results_dir,
                data_dir=data_dir if data_dir is not None else data_folder(cfg.preset),
                budget_bytes=int(budget_mib * MiB)).to_text()


def describe(cfg: ExperimentConfig, results_dir: PathLike) -> str:
    """One line: the experiment, whether it is one of the study's 14, and its run folder."""
    where = "in the study grid" if parse(cfg.exp).in_grid else "outside the study grid"
    return f"experiment: {cfg.exp} ({where}) -> run folder {run_folder(cfg, results_dir)}"


def train_run(cfg: ExperimentConfig, results_dir: PathLike, data_dir: Optional[PathLike] = None, *,
              train_fn: Optional[Callable[..., dict]] = None, budget_mib: float = BUDGET_MIB,
              log: Callable[[str], None] = print, progress: bool = True, show_plan: bool = True) -> dict:
    """Train ``cfg`` in its run folder under ``results_dir`` (as ``python -m kdlib train``); the summary.

    Resumes an interrupted run and returns a finished one's summary without training. ``data_dir``
    defaults to ``data_folder(cfg.preset)`` (prepared there if missing); the top-k cache in
    ``DATA_DIR/cache`` serves output-only experiments when it matches. ``train_fn`` defaults to
    ``kdlib.train.train``.
    """
    from .checkpoint import MiB, StorageBudget
    from .train import train

    if not (0 < budget_mib < 1e9):
        raise KdlibError(f"budget_mib must be a positive number of MiB, got {budget_mib}")
    run_dir = run_folder(cfg, results_dir)
    data_dir = data_folder(cfg.preset, data_dir)
    budget = StorageBudget(results_dir, int(budget_mib * MiB))
    log(f"run {run_dir} (data {data_dir})")
    if show_plan:
        log(plan_text(cfg, results_dir, data_dir, budget_mib))
    return (train_fn or train)(cfg, run_dir, data_dir, budget=budget, log=log, progress=progress)


# --------------------------------------------------------------------------
# figures and display


def val_ppl_points(run_dir: PathLike) -> tuple[list[int], list[float]]:
    """(steps, validation perplexities) logged so far in ``run_dir/metrics.jsonl``."""
    rows = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl", warn=False)  # polled while written
            if r.get("val_ppl") is not None]
    return [r["step"] for r in rows], [r["val_ppl"] for r in rows]


def val_ppl_figure(run_dir: PathLike):
    """A matplotlib Figure of the run's validation perplexity by step (best marked).

    Built without pyplot (no global state), so it can be drawn from a thread.
    """
    from matplotlib.figure import Figure

    steps, ppl = val_ppl_points(run_dir)
    fig = Figure(figsize=(6.0, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if steps:
        ax.plot(steps, ppl, marker="o", ms=3, lw=1.2)
        best = min(range(len(ppl)), key=ppl.__getitem__)
        ax.plot([steps[best]], [ppl[best]], "*", ms=10, color="C3", label=f"best {ppl[best]:.2f} (step {steps[best]})")
        ax.legend(frameon=False, fontsize=8)
        if max(ppl) / min(ppl) > 3:
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            # Plain numbers (200, 300, 500) rather than 2x10^2; minor ticks labelled at 2, 3 and 5 only.
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "235" else ""))
    else:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes, color="0.5")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation perplexity")
    ax.set_title(Path(run_dir).name, fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def figure_png(fig) -> bytes:
    """A Figure rendered to PNG bytes (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def show_val_ppl(run_dir: PathLike) -> None:
    """Display the run's validation-perplexity plot in the notebook."""
    from IPython.display import Image, display

    display(Image(data=figure_png(val_ppl_figure(run_dir)), format="png"))


def show_report(result: dict) -> None:
    """Display what ``kdlib.analysis.report`` returned: per protocol group, its protocol, its table
    and its PNG figures; then the original study's figures and the files written.

    (``report`` itself prints the runs it skipped, with the reason.)
    """
    from IPython.display import Image, Markdown, display

    groups = result.get("groups")
    if groups is None:  # a result without groups: one table
        groups = [{"table": result.get("table"), "figures": result.get("figures", [])}]
    if not groups:
        print("no runs of ours in the table")
    shown = set()
    for group in groups:
        if group.get("statement"):
            display(Markdown(group["statement"]))
        table = group.get("table")
        if table is None or len(table) == 0:
            print("no runs of ours in the table")
        else:
            display(table)
        shown |= _show_pngs(group.get("figures", []), display, Image)
    _show_pngs([p for p in result.get("figures", []) if str(p) not in shown], display, Image)
    files = [str(p) for p in result.get("files", [])] + [str(p) for p in result.get("figures", [])]
    if files:
        print("written:\n  " + "\n  ".join(files))


def _show_pngs(paths, display, image) -> set:
    pngs = [str(p) for p in paths if Path(p).suffix.lower() == ".png"]
    for path in pngs:
        display(image(filename=path, width=650))  # 200-dpi figures at about their print size
    return set(pngs)


# --------------------------------------------------------------------------
# the panel


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
                 train_fn: Optional[Callable[..., dict]] = None, *, feature_map: Optional[str] = None,
                 feature: Optional[str] = None, divergence: Optional[str] = None, cosine: bool = False,
                 seed: Optional[int] = None, max_steps: Optional[int] = None, resume_dir: Optional[str] = "auto",
                 budget_mib: float = BUDGET_MIB, poll_s: float = 2.0):
        import ipywidgets as w

        base = make_preset(preset)  # refuses an unknown preset
        self.results_dir, self.data_dir, self.train_fn = results_dir, data_dir, train_fn
        self.max_steps, self.resume_dir, self.budget_mib, self.poll_s = max_steps, resume_dir, budget_mib, poll_s
        self.summary: Optional[dict] = None
        self._busy = False
        self._drawn = None  # the points last drawn, to redraw only when they change
        style = {"description_width": "initial"}

        def dropdown(description, options, value):
            return w.Dropdown(options=options, value=value, description=description, style=style,
                              layout=w.Layout(width="240px"))

        offered = list(NOTEBOOK_PRESETS) + ([preset] if preset not in NOTEBOOK_PRESETS else [])
        self.preset = dropdown("preset", offered, preset)
        self.feature_map = dropdown("feature map", ["none", *MAPS], _none(feature_map) or "none")
        self.feature = dropdown("feature", list(FEATURES), feature or base.loss.feature)
        self.divergence = dropdown("divergence", ["none", *DIVERGENCES], _none(divergence) or "none")
        self.cosine = dropdown("cosine", [("off", False), ("on", True)], bool(cosine))
        self.seed = w.IntText(value=base.seed if seed is None else seed, description="seed", style=style,
                              layout=w.Layout(width="240px"))
        self.name_label = w.Label()
        self.button = w.Button(description="Train", button_style="primary", icon="play")
        self.status = w.Label()
        self.plot = w.Image(format="png", layout=w.Layout(display="none"))
        self.output = w.Output()
        for control in (self.preset, self.feature_map, self.feature, self.divergence, self.cosine, self.seed):
            control.observe(self._update, names="value")
        self.button.on_click(self._on_click)
        self.widget = w.VBox([
            w.HBox([self.preset, self.seed]),
            w.HBox([self.feature_map, self.feature]),
            w.HBox([self.divergence, self.cosine]),
            self.name_label,
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
        """The validated ExperimentConfig of the current selections."""
        return experiment_config(self.preset.value, self.feature_map.value, self.feature.value,
                                 self.divergence.value, self.cosine.value, self.seed.value, self.max_steps,
                                 self.resume_dir)

    def _update(self, change=None) -> None:
        # The feature kind matters only with a feature map.
        self.feature.disabled = self.feature_map.value == "none"
        try:
            self.name_label.value = describe(self.config(), self.results_dir)
            self.button.disabled = self._busy
        except KdlibError as e:  # e.g. a negative seed: say so, and nothing to train
            self.name_label.value = f"invalid choice: {e}"
            self.button.disabled = True

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
                summary = train_run(cfg, self.results_dir, self.data_dir, train_fn=self.train_fn,
                                    budget_mib=self.budget_mib, log=print)
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

    def _draw(self, run_dir: Path) -> None:
        try:
            points = val_ppl_points(run_dir)
            if points == self._drawn:
                return
            if points[0]:
                self.plot.value = figure_png(val_ppl_figure(run_dir))
                self.plot.layout.display = ""
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
    return (f"{name}: done, best validation perplexity {summary['best_val_ppl']:.2f} at step "
            f"{summary.get('best_step')}" + (f", test {test:.2f}" if test is not None else ""))


def panel(preset: str = "smoke", results_dir: PathLike = "runs", data_dir: Optional[PathLike] = None,
          train_fn: Optional[Callable[..., dict]] = None, **kwargs) -> Panel:
    """The training panel (see ``Panel``); display it with ``display(p.widget)`` or as a cell's value.

    ``kwargs``: the initial ``feature_map``, ``feature``, ``divergence``, ``cosine``, ``seed``;
    ``max_steps`` (None = the preset's), ``resume_dir`` ("auto"), ``budget_mib`` (100), ``poll_s``
    (2.0, seconds between plot refreshes while training).
    """
    return Panel(preset, results_dir, data_dir, train_fn, **kwargs)
