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
import os
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from .config import PRESETS, ExperimentConfig, preset as make_preset
from .errors import KdlibError, choices
from .fileio import read_jsonl
from .grid import FEATURES, MAPS, parse

PathLike = Union[str, Path]

# Colab's working folder, the runtime's own disk (KDLIB_COLAB_CONTENT moves it: the tests' simulated Colab).
CONTENT = Path(os.environ.get("KDLIB_COLAB_CONTENT", "/content"))
DRIVE = CONTENT / "drive"  # where Colab mounts Google Drive
# The runtime's disk for the resume state (several times the student) of presets that name none.
COLAB_RESUME_DIR = str(CONTENT / "kdlib-local" / "resume")
COLAB_CACHE_DIR = CONTENT / "kdlib-cache"  # the top-k cache: GBs, the runtime's disk, never Drive
DIVERGENCES = ("kl", "js")  # the study's; experiment_name takes any the grammar does
BUDGET_MIB = 100.0  # the results folder's storage budget, as the CLI's --budget-mib
# The presets the notebooks and the panel offer. Not "demo": it trains its own
# teacher first (`python -m kdlib demo`), which a notebook run does not.
NOTEBOOK_PRESETS = ("smoke", "colab-t4", "colab-a100", "study")
# The presets made for a GPU (a CPU would take days), and the GPU each was sized for.
GPU_PRESETS = {"colab-t4": "T4", "colab-a100": "A100", "study": "A100"}
CHANGE_RUNTIME = "Runtime -> Change runtime type -> Hardware accelerator"

# Where everything goes on Colab, with sizes: README and 01_data_prep show this table (one text).
DRIVE_LAYOUT = """\
| where | what | size |
|---|---|---|
| `MyDrive/kdlib/PRESET/RUN/` (Drive) | per run `config.json`, `metrics.jsonl`, `summary.json` | ~25-65 KiB a run |
| `MyDrive/kdlib/PRESET/RUN/student.safetensors` (Drive) | the best finished run's student only (fp16) | 97 MiB (study's TinyGPT) |
| `MyDrive/kdlib-data/PRESET/` (Drive) | token files of 01 | ~240 MB for WikiText-103 (colab presets), ~4 MB study, <1 MB smoke |
| `MyDrive/kdlib-figures/` (Drive) | 04's tables and figures (PNG + PDF) | a few MB |
| `/content/kdlib-local/` (runtime disk) | every student and the running run's resume state | ~100 MiB a student, ~610 MiB resume |
| `/content/kdlib-cache/PRESET/` (runtime disk) | 02's top-k cache (optional) | ~15 GB for WikiText-103 |

The results folder (`MyDrive/kdlib`) is held to 100 MiB (`plan` checks it before a run starts); the data
folder is outside that budget. The runtime's disk survives a closed browser tab, not a recycled runtime."""


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


def _mount(fix: str) -> Path:
    """Mount Google Drive (once: Colab's mount is a no-op when mounted); ``fix`` says which of the
    notebook's parameters to set instead when the mount fails."""
    if (DRIVE / "MyDrive").is_dir():  # mounted already (a second mount would print, or prompt)
        return DRIVE / "MyDrive"
    try:
        from google.colab import drive

        drive.mount(str(DRIVE))
    except Exception as e:
        raise KdlibError(
            f"Google Drive could not be mounted at {DRIVE} ({type(e).__name__}: {e}). Re-run this cell and "
            "accept the authorisation prompt (choose your Google account and allow access to Google "
            f"Drive), or keep the files on this runtime's disk instead: {fix} (they are lost when the "
            "runtime is recycled).") from e
    return DRIVE / "MyDrive"


def drive_folder(name: str, fix: str = "give a local folder (e.g. results_dir = '/content/runs')") -> Path:
    """``MyDrive/name`` on Colab's Google Drive, mounting Drive first (created if missing)."""
    folder = _mount(fix) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def results_folder(name: str = "kdlib", local: PathLike = "runs") -> Path:
    """Where runs are kept: ``/content/drive/MyDrive/NAME`` on Colab (Drive mounted), else ``local``.

    On Colab a failed mount raises ``KdlibError`` saying how to fix it.
    """
    return drive_folder(name) if on_colab() else Path(local)


def data_folder(preset: str, data_dir: Optional[PathLike] = None, drive_name: str = "kdlib-data",
                create: bool = True) -> Path:
    """A preset's prepared-data folder: ``data_dir`` if given, else ``data/PRESET`` (the CLI's default)
    or, on Colab, ``MyDrive/kdlib-data/PRESET``: each Colab notebook runs on its own machine, so data
    that 01 prepares reaches 02 and 03 only through Drive. ``create=False``: name it, make nothing."""
    if preset not in PRESETS:
        raise KdlibError(f"unknown preset {preset!r}; choose one of: {choices(PRESETS)}")
    if data_dir:
        return Path(data_dir)
    if not on_colab():
        return Path("data") / preset
    fix = f"set data_dir = '/content/kdlib-data/{preset}'"
    return drive_folder(f"{drive_name}/{preset}", fix) if create else _mount(fix) / drive_name / preset


def cache_folder(preset: str, data_dir: PathLike, cache_dir: Optional[PathLike] = None) -> Path:
    """The top-k cache's folder: ``cache_dir`` if given; on Colab ``/content/kdlib-cache/PRESET`` (the
    runtime's disk: GBs that Drive cannot hold); elsewhere ``DATA_DIR/cache``, as the CLI."""
    if cache_dir:
        return Path(cache_dir)
    return COLAB_CACHE_DIR / preset if on_colab() else Path(data_dir) / "cache"


# The folders a notebook names: parameter -> (Drive folder, local folder; PRESET filled in).
_FOLDERS = {
    "data_dir": ("kdlib-data/{preset}", "data/{preset}", "/content/kdlib-data/{preset}"),
    "results_dir": ("kdlib", "runs", "/content/runs"),
    "figures_dir": ("kdlib-figures", "figures", "/content/figures"),
    "cache_dir": (None, None, "/content/kdlib-cache/{preset}"),  # never on Drive by default
}


@dataclass
class Folders:
    """The folders of one notebook, resolved (see ``folders``); ``None`` for those it does not use."""
    data_dir: Optional[Path] = None
    results_dir: Optional[Path] = None
    figures_dir: Optional[Path] = None
    cache_dir: Optional[Path] = None

    def __str__(self) -> str:
        rows = []
        for name in ("data_dir", "results_dir", "figures_dir", "cache_dir"):
            path = getattr(self, name)
            if path is not None:
                rows.append(f"  {name:<12} {path}  ({_medium(path)})")
        return "folders:\n" + "\n".join(rows)


def _medium(path: Path) -> str:
    if _under(path, DRIVE):
        return "Google Drive"
    return "this runtime's disk: lost when it is recycled" if on_colab() else "local disk"


def folders(preset: Optional[str] = None, *, data_dir: Optional[PathLike] = None,
            results_dir: Optional[PathLike] = None, figures_dir: Optional[PathLike] = None,
            cache_dir: Optional[PathLike] = None) -> Folders:
    """Resolve the folders a notebook's parameters name, mounting Google Drive once if one needs it.

    Each argument is a notebook parameter: ``None`` = this notebook has no such parameter; ``""`` =
    the default (on Colab ``MyDrive/kdlib-data/PRESET``, ``MyDrive/kdlib``, ``MyDrive/kdlib-figures``
    on Drive and ``/content/kdlib-cache/PRESET`` on the runtime's disk; elsewhere ``data/PRESET``,
    ``runs``, ``figures`` and ``DATA_DIR/cache``, the CLI's); a path = that folder. When Drive cannot
    be mounted, the error names exactly this notebook's parameters to set instead.
    """
    if preset is not None and preset not in PRESETS:
        raise KdlibError(f"unknown preset {preset!r}; choose one of: {choices(NOTEBOOK_PRESETS)}")
    given = {"data_dir": data_dir, "results_dir": results_dir, "figures_dir": figures_dir, "cache_dir": cache_dir}
    given = {k: (None if v is None else str(v).strip()) for k, v in given.items()}
    fill = {"preset": preset or "PRESET"}
    paths = {k: Path(v).expanduser() for k, v in given.items() if v}
    colab = on_colab()
    defaults = [k for k, v in given.items() if v == "" and k != "cache_dir"]  # the cache never goes to Drive
    on_drive = [k for k, p in paths.items() if _under(p, DRIVE)]
    mydrive = None
    if colab and (defaults or on_drive):
        fix = "set " + " and ".join(f"{k} = '{_FOLDERS[k][2].format(**fill)}'" for k in defaults + on_drive) \
            + " in the parameters cell"
        mydrive = _mount(fix)
    for name in defaults:
        if colab:
            paths[name] = mydrive / _FOLDERS[name][0].format(**fill)
            paths[name].mkdir(parents=True, exist_ok=True)
        else:
            paths[name] = Path(_FOLDERS[name][1].format(**fill))
    if given["cache_dir"] is not None and "cache_dir" not in paths:
        paths["cache_dir"] = cache_folder(preset or "PRESET", paths.get("data_dir", Path("data") / fill["preset"]))
    for name, path in paths.items():
        blocked = next((p for p in (path, *path.absolute().parents) if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            where = "is a file" if blocked == path else f"is inside {blocked}, a file"
            raise KdlibError(f"{name} = {str(path)!r} {where}, not a folder; give a folder")
    return Folders(**paths)


def _under(path: Path, folder: Path) -> bool:
    try:
        Path(path).absolute().relative_to(Path(folder).absolute())
        return True
    except ValueError:
        return False


def device() -> str:
    """The device for work outside the training loop (the cache's teacher pass): cuda when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------
# the runtime


def runtime_report(preset: Optional[str] = None) -> tuple[str, list[str]]:
    """(what this runtime is, problems for ``preset``): Colab or not, the GPU, its memory and bf16
    support, the versions that matter, and what the preset will run in (its precisions)."""
    import platform

    import torch
    import transformers

    lines = [f"runtime: {'Google Colab' if on_colab() else 'not Colab (' + platform.system() + ')'}, "
             f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}"]
    problems = []
    gpu = torch.cuda.is_available()
    if gpu:
        props = torch.cuda.get_device_properties(0)
        bf16 = torch.cuda.get_device_capability(0)[0] >= 8
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, bf16 in hardware: "
                     f"{'yes' if bf16 else 'no (emulated, slow)'}")
    else:
        bf16 = False
        lines.append(f"GPU: none (CPU only, {os.cpu_count()} cores)")
    if preset is not None:
        from .models import resolve_teacher_dtype
        from .optim import mixed_precision

        cfg = make_preset(preset)
        names = {"no": "fp32", "fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast",
                 "auto": "bf16/fp16 autocast on a GPU"}
        student, here = names[cfg.train.precision], names[mixed_precision(cfg.train.precision)]
        student += "" if here == student else f" (fp32 on this runtime's CPU)"
        teacher = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[
            str(resolve_teacher_dtype(cfg.teacher.dtype, "cuda" if gpu else "cpu")).replace("torch.", "")]
        made_for = f", made for one {GPU_PRESETS[preset]}" if preset in GPU_PRESETS else ", made for a CPU"
        lines.append(f"preset {preset}: student in {student}, teacher in {teacher}{made_for}")
        if preset in GPU_PRESETS and not gpu:
            where = (f"choose {CHANGE_RUNTIME} -> {GPU_PRESETS[preset]} GPU -> Save, then Runtime -> Run all"
                     if on_colab() else "run it on a machine with a CUDA GPU")
            problems.append(f"preset {preset} trains on a GPU and this runtime has none (a CPU would take "
                            f"days): {where}; or set preset = 'smoke' to try the notebooks on a CPU")
        elif gpu and cfg.train.precision == "bf16" and not bf16:
            problems.append(f"preset {preset} trains in bf16, which this GPU ({props.name}) only emulates, "
                            "slowly: choose preset 'colab-t4' (fp16) for this GPU, or an A100 runtime "
                            f"({CHANGE_RUNTIME})")
    return "\n".join(lines), problems


def check_runtime(preset: Optional[str] = None, needs_gpu: bool = False, log: Callable[[str], None] = print) -> str:
    """Print where this notebook runs (``runtime_report``); with ``needs_gpu`` (the notebooks that train
    or run the teacher) a GPU preset on a runtime without a GPU, or bf16 on a GPU without it, stops here
    with ``KdlibError`` saying how to choose a GPU; otherwise such problems are printed as warnings."""
    text, problems = runtime_report(preset)
    log(text)
    if problems and needs_gpu:
        raise KdlibError("; ".join(problems))
    for problem in problems:
        log(f"note: this notebook needs no GPU, but 02 and 03 with this preset do: {problem}")
    return text


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
    return _plan(cfg, results_dir, data_dir, budget_mib).to_text()


def _plan(cfg, results_dir, data_dir, budget_mib):
    from .checkpoint import MiB
    from .plan import plan

    return plan(cfg.preset, cfgs=[cfg], results_dir=results_dir,
                data_dir=data_dir if data_dir is not None else data_folder(cfg.preset),
                budget_bytes=int(budget_mib * MiB))


def show_plan(cfg: ExperimentConfig, results_dir: PathLike, data_dir: Optional[PathLike] = None,
              budget_mib: float = BUDGET_MIB, log: Callable[[str], None] = print):
    """Print the run's plan (``plan_text``) and stop with ``KdlibError`` when it does not fit the
    results folder's budget: nothing is trained, nothing written. Returns the ``Plan``."""
    from .plan import check_fits

    p = _plan(cfg, results_dir, data_dir, budget_mib)
    log(p.to_text())
    check_fits(p)
    return p


def describe(cfg: ExperimentConfig, results_dir: PathLike) -> str:
    """One line: the experiment, whether it is one of the study's 14, and its run folder."""
    where = "in the study grid" if parse(cfg.exp).in_grid else "outside the study grid"
    return f"experiment: {cfg.exp} ({where}) -> run folder {run_folder(cfg, results_dir)}"


def train_run(cfg: ExperimentConfig, results_dir: PathLike, data_dir: Optional[PathLike] = None, *,
              cache_dir: Optional[PathLike] = None, train_fn: Optional[Callable[..., dict]] = None,
              budget_mib: float = BUDGET_MIB, log: Callable[[str], None] = print, progress: bool = True,
              plan: bool = True) -> dict:
    """Train ``cfg`` in its run folder under ``results_dir`` (as ``python -m kdlib train``); the summary.

    Resumes an interrupted run and returns a finished one's summary without training. ``data_dir``
    defaults to ``data_folder(cfg.preset)`` (prepared there if missing). A run with
    ``train.teacher_source = "cache"`` reads the top-k cache in ``cache_dir`` (default
    ``cache_folder``: on Colab the runtime's disk) and builds it there first when it is missing,
    after checking the disk has room. ``train_fn`` defaults to ``kdlib.train.train``.
    """
    from .checkpoint import MiB, StorageBudget
    from .runs import teacher_source_of
    from .train import train

    if not (0 < budget_mib < 1e9):
        raise KdlibError(f"budget_mib must be a positive number of MiB, got {budget_mib}")
    run_dir = run_folder(cfg, results_dir)
    data_dir = data_folder(cfg.preset, data_dir)
    cache_dir = cache_folder(cfg.preset, data_dir, cache_dir)
    budget = StorageBudget(results_dir, int(budget_mib * MiB))
    log(f"run {run_dir} (data {data_dir})")
    if plan:  # stops here when it does not fit
        show_plan(cfg, results_dir, data_dir, budget_mib, log)
    if teacher_source_of(cfg) == "cache" and not (run_dir / "summary.json").is_file() \
            and not _cache_complete(cache_dir):
        log(f"the top-k cache is not in {cache_dir}: building it on this runtime first")
        build_cache(cfg, data_dir, cache_dir, log=log, progress=progress)
    return (train_fn or train)(cfg, run_dir, data_dir, cache_dir=cache_dir, budget=budget, log=log,
                               progress=progress)


# --------------------------------------------------------------------------
# data and the top-k cache, shown


def show_sample(cfg: ExperimentConfig, data_dir: PathLike, n_tokens: int = 80, log: Callable[[str], None] = print) -> str:
    """Print ``n_tokens`` of the prepared training split decoded back to text (mid-split)."""
    from .data import sample_text

    text, n = sample_text(cfg, data_dir, "train", n_tokens)
    log(f"{n} training tokens, decoded:\n" + "\n".join("    " + line for line in text.splitlines()))
    return text


def _cache_complete(cache_dir: Path) -> bool:
    from .fileio import read_json

    manifest = Path(cache_dir) / "train.cache.json"
    try:
        return manifest.is_file() and read_json(manifest, "cache manifest").get("complete") is True
    except KdlibError:
        return False


def cache_plan(cfg: ExperimentConfig, data_dir: PathLike, cache_dir: PathLike,
               log: Callable[[str], None] = print) -> int:
    """Print the cache's size, where it goes, how much of it is still to build and that disk's free
    space; ``KdlibError`` (before anything is written) when the rest does not fit, or when a cache
    larger than the results budget would go to Drive. Returns the cache's bytes."""
    from .cache import FREE_MARGIN, cache_bytes, free_bytes, remaining_bytes, size_text
    from .data import load_split

    tokens = load_split(data_dir, "train")
    need, left = cache_bytes(cfg, tokens), remaining_bytes(cfg, tokens, cache_dir)
    free = free_bytes(cache_dir)
    state = "complete" if left == 0 else ("to build" if left == need else f"{size_text(left)} still to build")
    log(f"top-{cfg.cache.top_k} cache of the training split: {size_text(need)} in {cache_dir} "
        f"({_medium(Path(cache_dir))}), {state}; {size_text(free)} free there")
    if left and _medium(Path(cache_dir)) == "Google Drive" and need > BUDGET_MIB * 2**20:
        raise KdlibError(f"cache_dir {cache_dir} is on Google Drive, and the cache needs {size_text(need)}: "
                         "more than a free Drive holds. Leave cache_dir empty (the runtime's disk, "
                         f"{COLAB_CACHE_DIR}), or train with the teacher online")
    if left and left + FREE_MARGIN > free:
        raise KdlibError(f"the cache needs {size_text(left)} more and {cache_dir}'s disk has {size_text(free)} "
                         f"free, less than that plus a {FREE_MARGIN // 2**20} MiB margin; nothing was written. "
                         "Give a cache_dir on a larger disk, or train with the teacher online")
    return need


def build_cache(cfg: ExperimentConfig, data_dir: PathLike, cache_dir: PathLike,
                log: Callable[[str], None] = print, progress: bool = True, plan: bool = True) -> dict:
    """Build (or finish) the training split's top-k cache after ``cache_plan``'s checks (printed with
    ``plan``; the build checks the disk's room either way); print and return its coverage (the
    teacher's probability mass the top k keep, ``kdlib.cache.coverage``)."""
    from . import cache as topk

    if plan:
        cache_plan(cfg, data_dir, cache_dir, log)
    built = topk.build_cache(cfg, data_dir, cache_dir, device=device(), log=log, progress=progress)
    cov = topk.coverage(built)
    log(f"fidelity: the top {cov['k']} tokens keep {cov['mean']:.1%} of the teacher's probability mass at "
        f"T = {built.manifest['temperature']:g} on average (median {cov['median']:.1%}, 5th percentile "
        f"{cov['p05']:.1%}; {cov['positions']:,} positions of {cov['windows']} windows); the rest is one "
        "tail bucket (docs/losses.md)")
    return cov


def summary_text(summary: dict) -> str:
    """A finished (or stopped) run's summary as a few lines: perplexities, steps, tokens, time."""
    def num(key, fmt="{:.2f}"):
        return _num(summary.get(key), fmt)

    def get(key):
        value = summary.get(key)
        return "-" if value is None else value

    if "best_val_ppl" not in summary:
        return f"stopped at step {summary.get('stopped_at')}: run the cell again to continue"
    rows = [("experiment", f"{get('exp')} (seed {get('seed')}, teacher {summary.get('teacher_source') or 'online'})"),
            ("best validation perplexity", f"{num('best_val_ppl')} at step {get('best_step')} "
                                           "(in-training windows)"),
            ("final validation perplexity", num("final_val_ppl")),
            ("test perplexity", f"{num('test_ppl')} (block {get('eval_block_size')}, stride "
                                f"{get('eval_stride')}); teacher {num('teacher_test_ppl')}"),
            ("steps / tokens", f"{get('steps')} / {num('tokens', '{:,}')} of a budget of "
                               f"{num('budget_tokens', '{:,}')}" + (" (stopped early)" if summary.get("stopped_early") else "")),
            ("training time", f"{num('train_wall_s', '{:.1f}' if (summary.get('train_wall_s') or 0) < 100 else '{:.0f}')}"
                              f" s on {get('device')} "
                              f"({num('tokens_per_s', '{:,.0f}')} tokens/s)"),
            ("student", str(get("student_path")))]
    return "\n".join(f"{k:<28} {v}" for k, v in rows)


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
                 teacher_source: Optional[str] = None, budget_mib: float = BUDGET_MIB, poll_s: float = 2.0):
        import ipywidgets as w

        base = make_preset(preset)  # refuses an unknown preset
        self.results_dir, self.train_fn = results_dir, train_fn
        # A data folder given for the first preset is that preset's. Another preset's is its sibling
        # when the given one is named after its preset (data/smoke -> data/colab-t4), else its default.
        self._data_given, self._data_dirs = (Path(data_dir) if data_dir else None), {}
        self._seed_edited = seed is not None
        self._run_shown = None  # the run folder the status line and plot are about
        self.max_steps, self.resume_dir, self.budget_mib, self.poll_s = max_steps, resume_dir, budget_mib, poll_s
        self.teacher_source = teacher_source
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
        self.feature_map = dropdown("feature map", ["none", *MAPS], _none(feature_map) or "none")
        self.feature = dropdown("feature", list(FEATURES), feature or base.loss.feature)
        self.divergence = dropdown("divergence", ["none", *DIVERGENCES], _none(divergence) or "none")
        self.cosine = dropdown("cosine", [("off", False), ("on", True)], bool(cosine))
        self.seed = w.IntText(value=base.seed if seed is None else seed, description="seed", style=style,
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
        """The validated ExperimentConfig of the current selections."""
        return experiment_config(self.preset.value, self.feature_map.value, self.feature.value,
                                 self.divergence.value, self.cosine.value, self.seed.value, self.max_steps,
                                 self.resume_dir, teacher_source=self.teacher_source)

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
            from .data import check_prepared_for, check_vocab, load_split
            from .runs import check_subset

            try:  # the checks training makes first
                cfg, split = self.config(), load_split(data, "train")
                check_vocab(split, cfg.model.vocab_size)
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


def _num(value, fmt: str = "{:.2f}") -> str:
    """A summary's number for display; "-" for a missing (or hand-edited, non-numeric) one."""
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _summary_line(name: str, summary: dict) -> str:
    if "best_val_ppl" not in summary:
        return f"{name}: stopped at step {summary.get('stopped_at')} (run again to continue)"
    test = summary.get("test_ppl")
    return (f"{name}: done, best validation perplexity {_num(summary['best_val_ppl'])} at step "
            f"{summary.get('best_step', '-')}" + (f", test {_num(test)}" if test is not None else ""))


def panel(preset: str = "smoke", results_dir: PathLike = "runs", data_dir: Optional[PathLike] = None,
          train_fn: Optional[Callable[..., dict]] = None, **kwargs) -> Panel:
    """The training panel (see ``Panel``); display it with ``display(p.widget)`` or as a cell's value.

    ``kwargs``: the initial ``feature_map``, ``feature``, ``divergence``, ``cosine``, ``seed``;
    ``max_steps`` (None = the preset's), ``resume_dir`` ("auto"), ``budget_mib`` (100), ``poll_s``
    (2.0, seconds between plot refreshes while training).
    """
    return Panel(preset, results_dir, data_dir, train_fn, **kwargs)
