"""What the notebooks' cells call: a run's config from the parameters, its plan, training, the top-k
cache, the summary, a sample of the data and the figures, each printed or shown for a notebook.

The configs and the training are ``kdlib.launch``'s (the CLI's too); the folders are
``kdlib.colab``'s. The widget panel (``kdlib.ui``) calls the same functions.

::

    exp = kdlib.notebook.experiment_name("layerwise", "kl", cosine=True)   # layerwise-kl-cos
    cfg = kdlib.notebook.run_config("colab-t4", exp)
    where = kdlib.colab.folders("colab-t4", data_dir="", results_dir="").run_folders("colab-t4")
    kdlib.notebook.show_plan(cfg, where)                  # stops here when the run does not fit
    summary = kdlib.notebook.train_run(cfg, where, plan=False)
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Union

from .colab import COLAB_CACHE_DIR, NOTEBOOK_PRESETS, default_resume_dir, medium
from .config import PRESETS, ExperimentConfig
from .errors import KdlibError, choices as listed
from .fileio import read_jsonl
from .grid import MAPS, parse
from .launch import BUDGET_MIB, RunChoices, RunFolders, run_config as launch_config, train_run as launch_train

PathLike = Union[str, Path]
STUDY_DIVERGENCES = ("kl", "js")  # the study's two output divergences; experiment_name takes any the grammar does


# --------------------------------------------------------------------------
# a run from the notebook's choices


def none_if_off(value) -> Optional[str]:
    """A notebook parameter's part, or None for off (None, "", "none")."""
    return None if value in (None, "", "none", "None") else str(value)


def experiment_name(feature_map: Optional[str] = None, divergence: Optional[str] = None, cosine: bool = False,
                    feature: str = "hidden") -> str:
    """The experiment name of a combination (``None``/"none" = that part off); all off is ``ce``.

    ``experiment_name("layerwise", "kl", True)`` is ``layerwise-kl-cos``.
    """
    fmap, div = none_if_off(feature_map), none_if_off(divergence)
    if fmap is not None and fmap not in MAPS:
        raise KdlibError(f"unknown feature map {fmap!r}; choose one of: none, {listed(MAPS)}")
    if div is not None and (div in MAPS or div in ("cos", "ce") or "-" in div):
        raise KdlibError(f"{div!r} is not a divergence; choose none, {listed(STUDY_DIVERGENCES)} or another the "
                         "grammar reads (rkl, tvd, gjsd0.3, ...)")
    parts = [p for p in (fmap, div) if p] + (["cos"] if cosine else [])
    return parse("-".join(parts) or "ce", feature).name


def run_config(preset: str, exp: str = "ce", seed: Optional[int] = None,
               choices: Optional[RunChoices] = None, log: Callable[[str], None] = print) -> ExperimentConfig:
    """The validated config of one run (``kdlib.launch.run_config``, as ``python -m kdlib train``).

    Arguments:
        exp: the experiment (``experiment_name`` builds one from a notebook's parameters).
        seed: None = the preset's first (``kdlib.config.preset_seeds``), as ``train`` and ``sweep``.
        choices: the feature kind, teacher source, a cut budget, ...; the resume folder, when they
            name none, is ``kdlib.colab.default_resume_dir``'s (on Colab the runtime's disk).
    """
    if preset not in PRESETS:
        raise KdlibError(f"unknown preset {preset!r}; choose one of: {listed(NOTEBOOK_PRESETS)}")
    choices = choices or RunChoices()
    if choices.resume_dir is None:
        choices = replace(choices, resume_dir=default_resume_dir(preset) or "")
    return launch_config(preset, exp, seed, choices, log)


def run_folder(cfg: ExperimentConfig, results_dir: PathLike) -> Path:
    """The run's folder in ``results_dir``: ``PRESET/EXP[-attn][-topK]-seedSEED``."""
    from .train import run_dir

    return run_dir(results_dir, cfg)


def describe(cfg: ExperimentConfig, results_dir: PathLike) -> str:
    """One line: the experiment, whether it is one of the study's 14, and its run folder."""
    where = "in the study grid" if cfg.spec.in_grid else "outside the study grid"
    return f"experiment: {cfg.exp} ({where}) -> run folder {run_folder(cfg, results_dir)}"


def plan_text(cfg: ExperimentConfig, folders: RunFolders) -> str:
    """What this run will cost (``kdlib.plan``): tokens, steps, evaluations, time, bytes against the
    results folder's budget. Measured on this runtime's GPU; an estimate without one."""
    return _plan(cfg, folders).to_text()


def _plan(cfg: ExperimentConfig, folders: RunFolders):
    from .plan import plan

    return plan(cfg.preset, cfgs=[cfg], results_dir=folders.results_dir, data_dir=folders.data_dir,
                budget_bytes=folders.budget().limit_bytes)


def show_plan(cfg: ExperimentConfig, folders: RunFolders, log: Callable[[str], None] = print):
    """Print the run's plan (``plan_text``) and stop with ``KdlibError`` when it does not fit the
    results folder's budget: nothing is trained, nothing written. Returns the ``Plan``."""
    from .plan import check_fits

    p = _plan(cfg, folders)
    log(p.to_text())
    check_fits(p)
    return p


def train_run(cfg: ExperimentConfig, folders: RunFolders, train_fn: Optional[Callable[..., dict]] = None,
              log: Callable[[str], None] = print, progress: bool = True, plan: bool = True) -> dict:
    """Train ``cfg`` in its run folder (``kdlib.launch.train_run``, as ``python -m kdlib train``) after
    printing its plan (with ``plan``: it stops there when the run does not fit); return the summary.

    ``folders``: ``Folders.run_folders`` of the notebook's folders. Resumes an interrupted run and
    returns a finished one's summary without training. A run with ``train.teacher_source = "cache"``
    builds the top-k cache in ``folders.cache_dir`` first when it is missing, after checking the disk
    has room: each Colab notebook runs on its own machine, so 02's cache may be on another one.
    """
    from .runs import teacher_source_of

    run_dir = run_folder(cfg, folders.results_dir)
    folders.budget()  # a bad budget is refused before any work
    log(f"run {run_dir} (data {folders.data_dir})")
    if plan:  # stops here when it does not fit
        show_plan(cfg, folders, log)
    if teacher_source_of(cfg) == "cache" and not (run_dir / "summary.json").is_file() \
            and not _cache_complete(folders.cache_dir):
        log(f"the top-k cache is not in {folders.cache_dir}: building it on this runtime first")
        build_cache(cfg, folders.data_dir, folders.cache_dir, log=log, progress=progress)
    return launch_train(cfg, folders, train_fn, log, progress)


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
        f"({medium(Path(cache_dir))}), {state}; {size_text(free)} free there")
    if left and medium(Path(cache_dir)) == "Google Drive" and need > BUDGET_MIB * 2**20:
        raise KdlibError(f"cache_dir {cache_dir} is on Google Drive, and the cache needs {size_text(need)}: "
                         "more than a free Drive holds. Leave cache_dir empty (the runtime's disk, "
                         f"{COLAB_CACHE_DIR}), or train with the teacher online")
    if left and left + FREE_MARGIN > free:
        raise KdlibError(f"the cache needs {size_text(left)} more and {cache_dir}'s disk has {size_text(free)} "
                         f"free, less than that plus a {FREE_MARGIN // 2**20} MiB margin; nothing was written. "
                         "Give a cache_dir on a larger disk, or train with the teacher online")
    return need


def _teacher_device() -> str:
    """The device of the cache's teacher pass (outside the training loop): cuda when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_cache(cfg: ExperimentConfig, data_dir: PathLike, cache_dir: PathLike,
                log: Callable[[str], None] = print, progress: bool = True, plan: bool = True) -> dict:
    """Build (or finish) the training split's top-k cache after ``cache_plan``'s checks (printed with
    ``plan``; the build checks the disk's room either way); print and return its coverage (the
    teacher's probability mass the top k keep, ``kdlib.cache.coverage``)."""
    from . import cache as topk

    if plan:
        cache_plan(cfg, data_dir, cache_dir, log)
    built = topk.build_cache(cfg, data_dir, cache_dir, device=_teacher_device(), log=log, progress=progress)
    cov = topk.coverage(built)
    log(f"fidelity: the top {cov['k']} tokens keep {cov['mean']:.1%} of the teacher's probability mass at "
        f"temperature {built.manifest['temperature']:g} on average (median {cov['median']:.1%}, 5th percentile "
        f"{cov['p05']:.1%}; {cov['positions']:,} positions of {cov['windows']} windows); the rest is one "
        "tail bucket (docs/losses.md)")
    return cov


def number_text(value, fmt: str = "{:.2f}") -> str:
    """A summary's number for display; "-" for a missing (or hand-edited, non-numeric) one."""
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def summary_text(summary: dict) -> str:
    """A finished (or stopped) run's summary as a few lines: perplexities, steps, tokens, time."""
    def num(key, fmt="{:.2f}"):
        return number_text(summary.get(key), fmt)

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
            *_metrics_rows(summary.get("test_metrics")),
            ("steps / tokens", f"{get('steps')} / {num('tokens', '{:,}')} of a budget of "
                               f"{num('budget_tokens', '{:,}')}" + (" (stopped early)" if summary.get("stopped_early") else "")),
            ("training time", f"{num('train_wall_s', '{:.1f}' if (summary.get('train_wall_s') or 0) < 100 else '{:.0f}')}"
                              f" s on {get('device')} "
                              f"({num('tokens_per_s', '{:,.0f}')} tokens/s)"),
            ("student", str(get("student_path")))]
    return "\n".join(f"{k:<28} {v}" for k, v in rows)


def _metrics_rows(metrics) -> list[tuple[str, str]]:
    """summary_text's lines for a summary's test_metrics (none for an older run's, or a malformed one)."""
    try:
        student, teacher = metrics["student"], metrics["teacher"]
        return [("fidelity to the teacher", f"top-1 agreement {student['agreement']:.3f}, KL(teacher || student) "
                                            f"{student['kl_teacher']:.3f} nats/token"),
                ("calibration (ECE)", f"{student['ece']:.4f}; teacher {teacher['ece']:.4f}"),
                ("ppl by frequency bucket", ", ".join(number_text(v, "{:.1f}") for v in student["bucket_ppl"])
                 + " (most frequent first)")]
    except (KeyError, TypeError, ValueError):
        return []


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
    """Display what ``kdlib.analysis.report`` returned: per protocol group, its protocol, its table,
    its sections on the test metrics and on which rows differ, and its PNG figures; then the
    original study's figures and the files written.

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
        if group.get("sections"):  # the test metrics and which rows differ, as results.md has them
            display(Markdown(group["sections"]))
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
# samples: what the students say


def _sample_columns(results_dir: PathLike, log: Callable[[str], None]) -> list[tuple[str, Path]]:
    """[(column, run folder)]: the ``ce`` and ``kl`` runs and the best run (lowest test perplexity,
    else best validation perplexity) among the finished runs of the best run's protocol; ``ce`` and
    ``kl`` of the best run's seed where there is one. A missing one is said in ``log``."""
    from .results import load_runs

    runs, _, _ = load_runs(results_dir)
    done = runs[runs["finished"]] if len(runs) else runs
    if not len(done):
        raise KdlibError(f"no finished run in {results_dir} to sample from: train one first (03_train, or "
                         "python -m kdlib train)")
    score = done["test_ppl"].where(done["test_ppl"].notna(), done["best_val_ppl"])
    best = done.loc[score.idxmin()]
    group = done[done["protocol"] == best["protocol"]]
    columns = []
    for label in ("ce", "kl"):
        rows = [r for _, r in group[group["label"] == label].iterrows()]
        if not rows:
            log(f"{label}: left out, no finished {label} run in the best run's protocol ({best['preset']})")
            continue
        pick = min(rows, key=lambda r: (r["seed"] != best["seed"], r["seed"]))
        if pick["run"] != best["run"]:
            columns.append((f"{label} (seed {pick['seed']})", Path(results_dir) / pick["run"]))
    columns.append((f"best: {best['label']} (seed {best['seed']})", Path(results_dir) / best["run"]))
    return columns


def _sampler(device: str, column: str, run: Path, log: Callable[[str], None]):
    """(run folder, config, student) of a run, or None with a note when its student cannot be loaded."""
    from .commands import load_run_student

    try:
        cfg, _, model = load_run_student(run, device=device)
    except (KdlibError, OSError) as e:
        log(f"{column}: left out, its student cannot be read ({e})")
        return None
    return run, cfg, model


def samples_table(results_dir: PathLike, data_dir: Optional[PathLike] = None, prompts=None, n_tokens: int = 40,
                  seed: int = 0, log: Callable[[str], None] = print):
    """One row per prompt, one column per model: the prompts continued by the teacher, ``ce``, ``kl``
    and the best run (``_sample_columns``), top-p 0.9 and seeded (``kdlib.sampling.generate``).

    Arguments:
        data_dir: the data folder the runs trained on (its tokenizer); None = the runs' preset's
            (``kdlib.colab.data_folder``: ``MyDrive/kdlib-data/PRESET`` on Colab).
        prompts: None = ``kdlib.sampling.DEFAULT_PROMPTS``.
    A model that cannot be loaded (on Colab only the best run's student is on Drive) is left out with
    a note in ``log``. The models run on the GPU where there is one: the same seed on the same device
    gives the same text.
    """
    import pandas as pd

    from .colab import data_folder
    from .commands import run_tokenizer
    from .models import load_teacher
    from .sampling import DEFAULT_PROMPTS, generate

    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    device = _teacher_device()
    models = {}
    for column, run in _sample_columns(results_dir, log):
        loaded = _sampler(device, column, run, log)
        if loaded is not None:
            models[column] = loaded[1:]
            run_dir, cfg = loaded[:2]  # the best run's, else the last readable one: the tokenizer's
    if not models:
        raise KdlibError(f"no student of {results_dir} could be read (see the notes above): nothing to sample")
    tok = run_tokenizer(run_dir, cfg, Path(data_dir) if data_dir else data_folder(cfg.preset, create=False))
    try:
        teacher = load_teacher(cfg.teacher, device=device, student_vocab_size=cfg.model.vocab_size)
        models = {"teacher": (cfg, teacher), **models}
    except (KdlibError, OSError) as e:
        log(f"teacher: left out, it cannot be loaded ({e})")
    table = {name: [tok.decode(generate(model, tok(p)["input_ids"], n_tokens, seed=seed, vocab_size=len(tok)))
                    for p in prompts] for name, (_, model) in models.items()}
    return pd.DataFrame(table, index=pd.Index(prompts, name="prompt"))


def show_samples(table) -> None:
    """Display ``samples_table``'s table with every continuation whole and wrapped (a DataFrame's own
    display cuts long text with "...")."""
    from IPython.display import HTML, display

    style = ("<style>.kdlib-samples td, .kdlib-samples th {white-space: pre-wrap; text-align: left; "
             "vertical-align: top; min-width: 12em}</style>")
    display(HTML(style + table.to_html(classes="kdlib-samples")))
