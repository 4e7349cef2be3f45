"""Figures for the report: matplotlib, sized for a report column, saved as PNG (200 dpi) and PDF.

Every function takes tables from ``kdlib.results`` and ``kdlib.stats`` and returns a Figure;
``save`` writes it under a stable name.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from .config.sweep import format_value
from .errors import KdlibError
from .fileio import atomic_write_bytes

BASELINES = ("ce", "kl")
WIDTH = 6.5  # inches: a report column at readable font sizes


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 7})
    return plt


def save(fig, folder, name: str) -> list[Path]:
    """Write ``name``.png (200 dpi) and ``name``.pdf into ``folder``; returns both paths.

    Each figure is rendered in memory, then written with ``fileio.atomic_write_bytes`` (a temporary
    file in ``folder``, fsynced, renamed): savefig straight onto the path left, on a full disk, a PNG
    cut before its end chunk or a 0-byte PDF in place of the previous good figure. Now a failure
    leaves the previous figure as it was and no temporary file, and says so (``KdlibError``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = [folder / f"{name}.png", folder / f"{name}.pdf"]
    try:
        for path, kw in zip(out, ({"format": "png", "dpi": 200}, {"format": "pdf"})):
            buffer = io.BytesIO()
            fig.savefig(buffer, bbox_inches="tight", **kw)
            try:
                atomic_write_bytes(path, buffer.getvalue())
            except OSError as e:
                raise KdlibError(f"cannot write figure {path}: {e.strerror or e}; the previous {path.name} (if "
                                 f"any) is kept as it was. Free space in {folder} (or give another figures "
                                 "folder) and run the report again") from None
    finally:
        _plt().close(fig)
    return out


def _label(run) -> str:
    seed = "" if run["source"] == "original study" else f" s{run['seed']}"
    return f"{run['label']}{seed}"


def eval_protocol(runs, split: str = "validation") -> str:
    """How ``split``'s perplexity was measured, for an axis label: ``" (block 128, stride 64)"`` when
    every run of ``runs`` shares it (a protocol group does), else ``""``. Validation during training is
    scored on whole windows (stride = block); the test split with the sliding window."""
    key = "val_stride" if split == "validation" else "test_stride"
    if runs is None or "block_size" not in runs or key not in runs:
        return ""
    blocks, strides = set(runs["block_size"].dropna()), set(runs[key].dropna())
    if len(blocks) != 1 or len(strides) != 1:
        return ""
    return f" (block {int(next(iter(blocks)))}, stride {int(next(iter(strides)))})"


def _score(table: pd.DataFrame, runs=None):
    """(score, CI, axis label): test perplexity where the group has test scores, else best validation
    perplexity, labelled so; never the two mixed in one axis. With ``runs``, the label says the protocol."""
    if table["test_ppl"].notna().any():
        return table["test_ppl"], table["test_ci95"], "test perplexity" + eval_protocol(runs, "test")
    return (table["best_val_ppl"], table["best_val_ci95"],
            "best validation perplexity" + eval_protocol(runs, "validation") + "\n(no test scores yet)")


def _draw_curves(ax, runs: pd.DataFrame, curves: dict, x: str = "tokens", style=None):
    for _, run in runs.iterrows():
        c = curves[run["run"]]
        # markers: a run with a single evaluation still shows
        kw = {"lw": 1.1, "ls": "--" if _is_baseline(run["exp"]) else "-", "marker": "o", "ms": 2.5, **(style or {})}
        ax.plot(c[x] / (1e6 if x == "tokens" else 1), c["val_ppl"], label=_label(run), **kw)
    ax.set_yscale("log")
    ax.set_ylabel("validation perplexity" + eval_protocol(runs, "validation"))
    ax.set_xlabel("training tokens (millions)" if x == "tokens" else x)
    ax.grid(alpha=0.3, which="both")


def val_curves(runs: pd.DataFrame, curves: dict, title: str = "Validation perplexity during training"):
    """One line per run: validation perplexity against training tokens (baselines dashed)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH, 4.0))
    _draw_curves(ax, runs, curves)
    ax.set_title(title)
    ax.legend(ncol=2, frameon=False)
    return fig


def grouped_curves(runs: pd.DataFrame, curves: dict, by: str):
    """One panel per value of ``by`` ('divergence' or 'feature_map'), its runs' curves in it."""
    plt = _plt()
    groups = list(dict.fromkeys(runs[by]))
    fig, axes = plt.subplots(1, len(groups), figsize=(WIDTH, 3.2), sharey=True, squeeze=False)
    for ax, value in zip(axes[0], groups):
        _draw_curves(ax, runs[runs[by] == value], curves)
        ax.set_title(f"{by.replace('_', ' ')}: {value}")
        ax.legend(frameon=False, fontsize=6)
        if ax is not axes[0][0]:
            ax.set_ylabel("")
    fig.tight_layout()
    return fig


def ppl_bars(table: pd.DataFrame, title: str = "Perplexity by experiment (mean over seeds, 95% CI)", runs=None):
    """Test perplexity per experiment with CI whiskers (a row without a test score has no bar); best
    validation perplexity, said on the axis, when no row has a test score. ``runs``: the protocol."""
    plt = _plt()
    score, ci, ylabel = _score(table, runs)
    fig, ax = plt.subplots(figsize=(WIDTH, 3.6))
    ax.bar(range(len(table)), score, yerr=None if ci.isna().all() else ci.fillna(0), capsize=3,
           color=["0.6" if _is_baseline(e) else "C0" for e in table.index])
    ax.set_xticks(range(len(table)), table.index, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_ylim(score.min() * 0.9, score.max() * 1.05)
    ax.set_title(title + " (grey: baselines)")
    ax.grid(axis="y", alpha=0.3)
    return fig


def cosine_effect(paired: pd.DataFrame):
    """Perplexity with the cosine term minus without, per (feature map, divergence), paired by seed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH, 3.0))
    labels = [f"{m}-{d}" + ("" if f == "hidden" else " [attn]")
              for m, d, f in zip(paired["feature_map"], paired["divergence"], paired["feature"])]
    err = paired["ci95"]
    ax.bar(range(len(paired)), paired["mean_diff"], yerr=None if err.isna().all() else err.fillna(0),
           capsize=3, color=["C3" if v > 0 else "C2" for v in paired["mean_diff"]])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(paired)), labels, rotation=30, ha="right", fontsize=7)
    what = "test" if paired.get("metric", pd.Series(["test_ppl"])).iloc[0] == "test_ppl" else "best validation"
    ax.set_ylabel(f"Δ {what} perplexity (with cos − without)")
    ax.set_title("Effect of the cosine loss (below 0: it helps)")
    ax.grid(axis="y", alpha=0.3)
    return fig


def js_early_late(js: pd.DataFrame):
    """Best and final validation perplexity of each JS run: a rise after the best is finding 2."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH, 3.0))
    for i, (_, r) in enumerate(js.iterrows()):
        ax.plot([i, i], [r["best_val_ppl"], r["final_val_ppl"]], color="0.5", lw=1)
    ax.scatter(range(len(js)), js["best_val_ppl"], label="best", color="C2", zorder=3)
    ax.scatter(range(len(js)), js["final_val_ppl"], label="final", color="C3", zorder=3)
    ax.set_xticks(range(len(js)), [f"{e} s{s}" for e, s in zip(js["label"], js["seed"])], rotation=30,
                  ha="right", fontsize=7)
    ax.set_ylabel("validation perplexity")
    ax.set_title("JS runs: best vs final validation perplexity")
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def cost_vs_ppl(table: pd.DataFrame, runs=None):
    """Training wall time (left) and training compute (right: PFLOP by kdlib's FLOPs model, the teacher's
    forward included, a top-k cache's one-off build not) against perplexity per experiment (finding 1: is
    the richer loss worth it? and: is distillation worth its teacher, beside ``ce@EXP``, the no-KD
    student trained for EXP's FLOPs?). Baselines grey."""
    plt = _plt()
    score, _, ylabel = _score(table, runs)
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 3.6), sharey=True)
    for ax, col, xlabel in ((axes[0], "train_wall_s", "training wall time per run (s)"),
                            (axes[1], "train_pflop", "training PFLOP per run (kdlib's FLOPs model)")):
        shown = score.notna() & table[col].notna()  # unfinished runs have no score
        ys, xs = score[shown], table.loc[shown, col]
        ax.scatter(xs, ys, color=["0.5" if _is_baseline(e) else "C0" for e in ys.index])
        for name, x, y in zip(ys.index, xs, ys):
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.margins(x=0.15)  # room for the names of the outermost points
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.3g}"))  # no offset over the label
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    fig.suptitle("Cost against quality")
    return fig


def _is_baseline(label: str) -> bool:
    """``ce``, ``kl`` and ``ce@EXP`` (no KD at EXP's compute) are the baselines a KD row is read against."""
    name = str(label).split(" ")[0]
    return name in BASELINES or name.startswith("ce@")


def with_reference(runs, curves, ref_runs, ref_curves):
    """New runs (solid) beside the original study's (thin, grey) on one token axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH, 4.0))
    _draw_curves(ax, ref_runs, ref_curves, style={"color": "0.7", "lw": 0.7, "ms": 1.5})
    _draw_curves(ax, runs, curves)
    ax.set_xscale("log")
    ax.set_title("These runs (colour) and the original study's (grey)")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[len(ref_runs):], labels[len(ref_runs):], ncol=2, frameon=False)
    return fig


def _colours(labels) -> dict:
    """A colour per experiment label, in the order given (``ce`` grey, ``kl`` black; ``ce@EXP`` is drawn
    as a baseline, dashed or square, in a colour of its own)."""
    plt = _plt()
    cmap = plt.get_cmap("tab20")
    others = [lab for lab in labels if lab not in BASELINES]
    colours = {lab: cmap(i % 20) for i, lab in enumerate(others)}
    return {**colours, "ce": "0.55", "kl": "0.15"}


def fidelity_vs_ppl(runs: pd.DataFrame):
    """Top-1 agreement with the teacher and KL(teacher ‖ student) against test perplexity, one point
    per run, the teacher's perplexity marked (a dashed line: its agreement is 1 and its KL 0, off the
    students' scale): a student can gain perplexity without matching its teacher better, and the
    reverse (Stanton et al. 2021)."""
    plt = _plt()
    shown = runs.dropna(subset=["agreement", "kl_teacher", "test_ppl"])
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 3.6), sharey=True)
    colours = _colours(list(dict.fromkeys(shown["label"])))
    for label, group in shown.groupby("label", sort=False):
        for ax, col in zip(axes, ("agreement", "kl_teacher")):
            ax.scatter(group[col], group["test_ppl"], s=14, color=colours[label], label=label,
                       marker="s" if _is_baseline(label) else "o")
    teacher = shown["teacher_test_ppl"].dropna()
    if len(teacher):
        for ax in axes:
            ax.axhline(teacher.iloc[0], color="C3", ls="--", lw=1,
                       label=f"teacher: ppl {teacher.iloc[0]:.1f} (agreement 1, KL 0)")
    axes[0].set_xlabel("top-1 agreement with the teacher")
    axes[1].set_xlabel("KL(teacher ‖ student), nats/token")
    axes[0].set_ylabel("test perplexity" + eval_protocol(runs, "test"))
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    rows = -(-len(labels) // 4)
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False, fontsize=6)
    axes[0].set_title("Fidelity to the teacher against test perplexity, one point per run", loc="left")
    fig.tight_layout(rect=(0, 0.035 * rows + 0.02, 1, 1))
    return fig


MIN_BIN_TOKENS = 30  # a reliability bin with fewer tokens is not drawn: its accuracy is noise


def _pooled_bins(bins: list) -> tuple[list, list, int]:
    """(mean confidence, accuracy) per bin of at least MIN_BIN_TOKENS tokens over several runs'
    reliability bins, pooled by token count, and the tokens in all."""
    count = [sum(b["count"][i] for b in bins) for i in range(len(bins[0]["count"]))]
    conf, acc = [], []
    for i, n in enumerate(count):
        if n >= MIN_BIN_TOKENS:
            conf.append(sum(b["count"][i] * (b["confidence"][i] or 0) for b in bins) / n)
            acc.append(sum(b["count"][i] * (b["accuracy"][i] or 0) for b in bins) / n)
    return conf, acc, sum(count)


def reliability_diagram(runs: pd.DataFrame, metrics: dict):
    """Accuracy against confidence of the next-token prediction per confidence bin (bins of at least
    MIN_BIN_TOKENS tokens), each experiment's seeds pooled, and the teacher (black); the diagonal is
    perfect calibration. ``metrics``: {run: its summary's test_metrics} (``results.read_test_metrics``);
    the legend gives each curve's ECE (over every bin)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH, 4.2))
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":", label="perfect calibration")
    shown = runs[runs["run"].isin(metrics)]
    colours = _colours(list(dict.fromkeys(shown["label"])))
    for label, group in shown.groupby("label", sort=False):
        conf, acc, _ = _pooled_bins([metrics[r]["student"]["reliability"] for r in group["run"]])
        base = _is_baseline(label)
        ax.plot(conf, acc, marker="o", ms=2.5, lw=1.3 if base else 0.9, alpha=1 if base else 0.75,
                color=colours[label], ls="--" if base else "-", label=f"{label} (ECE {group['ece'].mean():.3f})")
    if len(shown):
        teacher = metrics[shown["run"].iloc[0]]["teacher"]
        conf, acc, _ = _pooled_bins([teacher["reliability"]])
        ax.plot(conf, acc, marker="*", ms=5, lw=1.8, color="k", label=f"teacher (ECE {teacher['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"confidence (the top token's probability), bin mean; bins of >= {MIN_BIN_TOKENS} tokens")
    ax.set_ylabel("accuracy (the top token is the next token)")
    ax.set_title(f"Reliability of the next-token distribution on the test split{eval_protocol(runs, 'test')}")
    ax.legend(fontsize=6, frameon=False, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def bucket_change(table: pd.DataFrame, buckets: dict, baseline: str = "ce"):
    """Perplexity change against no KD (%) per training-frequency bucket, one line per experiment and
    the teacher's: does distillation help on frequent tokens or on rare ones? ``buckets``: a run's
    ``test_metrics["buckets"]`` (the boundaries, for the axis)."""
    from .results import BUCKET_COLUMNS

    plt = _plt()
    base = table.loc[baseline, BUCKET_COLUMNS].astype(float)
    fig, ax = plt.subplots(figsize=(WIDTH, 3.8))
    x = range(1, len(BUCKET_COLUMNS) + 1)
    colours = _colours(list(table.index))
    for label, row in table.drop(index=baseline).iterrows():
        change = 100 * (row[BUCKET_COLUMNS].astype(float) / base - 1)
        ax.plot(x, change, marker="o", ms=2.5, lw=1, color=colours.get(label, "C0"),
                ls="--" if _is_baseline(label) else "-", label=label)
    teacher = table[[f"teacher_{c}" for c in BUCKET_COLUMNS]].astype(float).mean()
    if teacher.notna().any():
        ax.plot(x, 100 * (teacher.to_numpy() / base.to_numpy() - 1), marker="*", color="k", lw=1.8, label="teacher")
    ax.axhline(0, color="0.4", lw=0.8)
    ticks = [f"{k}\n{_count_range(lo, hi)}" for k, lo, hi in zip(x, buckets["min_count"], buckets["max_count"])]
    ax.set_xticks(list(x), ticks, fontsize=7)
    ax.set_xlabel("frequency bucket (1: the most frequent tokens; training-split count of the token to predict)")
    ax.set_ylabel(f"test perplexity vs {baseline} (%)")
    ax.set_title("Where distillation helps: perplexity change against no KD by token frequency (below 0: better)")
    ax.legend(fontsize=6, frameon=False, ncol=3, loc="best")
    ax.grid(alpha=0.3)
    return fig


def _count_range(low, high) -> str:
    if low is None:
        return "(empty)"
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


SHADE = {"lower": "#b8e0b0", "higher": "#f7b7a3"}  # significant after Holm: lower perplexity (better), higher


def _significance_cells(sig: pd.DataFrame, labels: list, baselines: list) -> tuple[list, list]:
    """(text, colour) per row of the table: per baseline the mean difference and its interval, and
    the Holm p-value; a baseline's own row says so, an untested one its reason."""
    by = {(r["label"], r["baseline"]): r for _, r in sig.iterrows()}
    text, colour = [], []
    for label in labels:
        cells, shades = [label], ["white"]
        for baseline in baselines:
            r = by.get((label, baseline))
            if r is None:
                pair = ["baseline", ""]
            elif r["verdict"] == "not testable":
                pair = [r["note"].split(":")[0], "-"]
            else:
                pair = [f"{r['mean_diff']:+.3g} [{r['ci_low']:+.3g}, {r['ci_high']:+.3g}]", f"{r['p_holm']:.2g}"]
            cells += pair
            shades += [SHADE.get(None if r is None else r["verdict"], "white")] * 2
        text.append(cells)
        colour.append(shades)
    return text, colour


def significance_table(sig: pd.DataFrame):
    """``stats.significance`` as a figure for a report: one row per experiment; per baseline the mean
    difference with its interval and the Holm p-value, the cells of significant rows shaded (green:
    lower perplexity than the baseline, red: higher); the test, family, correction and alpha under it.
    With no testable row, a figure that says why (one seed: how many seeds a test needs)."""
    import textwrap

    from .stats import significance_method, why_untestable

    plt = _plt()
    if not (sig["verdict"] != "not testable").any():
        fig, ax = plt.subplots(figsize=(WIDTH, 1.4))
        ax.axis("off")
        ax.set_title("Which rows differ")
        ax.text(0.5, 0.5, textwrap.fill(why_untestable(sig), 95), ha="center", va="center", fontsize=8,
                transform=ax.transAxes)
        return fig
    labels, baselines = list(dict.fromkeys(sig["label"])), list(dict.fromkeys(sig["baseline"]))
    text, colour = _significance_cells(sig, labels, baselines)
    level = f"{100 * (1 - float(sig['alpha'].iloc[0])):g}%"
    header = ["experiment"] + [h for b in baselines for h in (f"vs {b}: Δ [{level} CI]", "p (Holm)")]
    fig, ax = plt.subplots(figsize=(WIDTH, 0.3 + 0.2 * (len(labels) + 1)))
    ax.axis("off")
    share = 0.7 / len(baselines)
    table = ax.table(cellText=text, cellColours=colour, colLabels=header, cellLoc="center", bbox=[0, 0, 1, 1],
                     colWidths=[0.3] + [w for _ in baselines for w in (share * 0.72, share * 0.28)])
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    ax.set_title(f"Which rows differ: {sig['metric'].iloc[0]}, experiment − baseline, paired by seed")
    caption = significance_method(sig) + " Shaded: significant after the correction (green: lower perplexity " \
        "than the baseline, better; red: higher)."
    ax.text(0, -0.02, textwrap.fill(caption, 115), va="top", fontsize=6.5, transform=ax.transAxes)
    return fig


def sweep_curves(table: pd.DataFrame, runs=None) -> dict:
    """{swept key: Figure}: perplexity against the key's values (``stats.sweep_table``), one line per
    experiment, 95% CI bars where several seeds ran; a log x-axis where the values span more than 10x.
    ``runs``: the protocol, for the axis label."""
    plt = _plt()
    figures = {}
    for key, rows in table.groupby("key", sort=False):
        fig, ax = plt.subplots(figsize=(WIDTH, 3.4))
        colours = _colours(list(dict.fromkeys(rows["experiment"])))
        for exp, line in rows.groupby("experiment", sort=False):
            line = line.sort_values("value")  # (values,) along the x-axis
            ci = line["ci95"] if line["ci95"].notna().any() else None
            ax.errorbar(line["value"], line["ppl"], yerr=None if ci is None else ci.fillna(0), marker="o",
                        capsize=3, label=exp, color=colours.get(exp))
        low, high = rows["value"].min(), rows["value"].max()
        if low > 0 and high / low > 10:
            ax.set_xscale("log")
        values = sorted(set(rows["value"]))
        ax.set_xticks(values, [format_value(v) for v in values])
        ax.minorticks_off()
        ax.ticklabel_format(axis="y", useOffset=False)
        metric = rows["metric"].iloc[0]
        ax.set_xlabel(key)
        ax.set_ylabel(("test perplexity" + eval_protocol(runs, "test")) if metric == "test_ppl"
                      else "best validation perplexity" + eval_protocol(runs))
        seeds = rows["seeds"].max()
        ax.set_title(f"Sensitivity to {key} " + ("(mean over seeds, 95% CI)" if seeds > 1 else "(1 seed)"))
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        figures[key] = fig
    return figures
