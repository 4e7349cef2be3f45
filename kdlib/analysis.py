"""Runs -> tables and statistics for the report.

A results folder holds run folders (``config.json``, ``metrics.jsonl``,
``summary.json``), finished or not, any mix of experiments and seeds.
``load_runs`` reads them into one row per run plus each run's validation
curve, and says which folders it skipped and why. ``experiment_table``
gives mean and 95% confidence interval (Student t over seeds) per
experiment and the change against the no-KD baseline; ``paired_differences``
measures an effect (the cosine term) seed by seed; ``js_early_late`` tests
the original study's second finding (JS perplexity falls fast, then rises).
``reference_runs`` loads the original study's curves, shipped with kdlib.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from .errors import KdlibError
from .fileio import atomic_write_text, read_json, read_jsonl
from .grid import EXPERIMENTS, parse

# The original study's epoch: about 1.65M training tokens (reference/original_study.md).
STUDY_EPOCH_TOKENS = 1_650_000
RUN_COLUMNS = ["run", "source", "exp", "seed", "feature", "divergence", "feature_map", "cosine", "finished",
               "best_val_ppl", "final_val_ppl", "test_ppl", "best_step", "best_epoch", "steps", "tokens",
               "train_wall_s", "tokens_per_s", "teacher_source"]


def read_metrics(run_dir) -> pd.DataFrame:
    """A run's metrics.jsonl as a table; a half-written line (an interrupted write) is skipped
    with a warning."""
    return pd.DataFrame(read_jsonl(Path(run_dir) / "metrics.jsonl"))


def _components(exp: str, feature: str) -> dict:
    spec = parse(exp, feature)
    return {"divergence": spec.divergence or "none", "feature_map": spec.feature_map or "none",
            "cosine": spec.cosine}


def load_runs(results_dir) -> tuple[pd.DataFrame, dict, list]:
    """(one row per run, {run: validation curve [step, tokens, epoch, val_ppl]}, [(folder, why skipped)])."""
    folder = Path(results_dir)
    rows, curves, skipped = [], {}, []
    if not folder.is_dir():
        return pd.DataFrame(columns=RUN_COLUMNS), curves, [(str(folder), "no such folder")]
    for run in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            config = read_json(run / "config.json", "run config")
            exp, seed, feature = config["exp"], config["seed"], config["loss"]["feature"]
            comp = _components(exp, feature)
        except (KdlibError, KeyError, TypeError) as e:
            skipped.append((run.name, f"no readable kdlib config ({e})"))
            continue
        metrics = read_metrics(run)
        if "val_ppl" not in metrics or metrics["val_ppl"].dropna().empty:
            skipped.append((run.name, "no evaluation in metrics.jsonl yet"))
            continue
        curve = metrics.dropna(subset=["val_ppl"])[["step", "tokens", "epoch", "val_ppl"]].reset_index(drop=True)
        best = curve.loc[curve["val_ppl"].idxmin()]
        row = {"run": run.name, "source": "kdlib", "exp": exp, "seed": seed, "feature": feature, **comp,
               "finished": (run / "summary.json").is_file(), "best_val_ppl": best["val_ppl"],
               "final_val_ppl": curve["val_ppl"].iloc[-1], "best_step": int(best["step"]),
               "best_epoch": float(best["epoch"]), "steps": int(metrics["step"].max()),
               "tokens": int(metrics["tokens"].max())}
        if row["finished"]:
            try:
                summary = read_json(run / "summary.json", "summary")
            except KdlibError as e:
                skipped.append((run.name, f"unreadable summary.json ({e}); reported from its metrics"))
                summary = {}
            for key in ("test_ppl", "train_wall_s", "tokens_per_s", "teacher_source"):
                row[key] = summary.get(key)
        rows.append(row)
        curves[run.name] = curve
    return pd.DataFrame(rows, columns=RUN_COLUMNS), curves, skipped


def reference_runs() -> tuple[pd.DataFrame, dict]:
    """The original study's 14 runs (validation perplexity per epoch), as a run set.

    Source: the study's notebook, cell 'Graphs in Report' (see the file's 'source' and 'metric'
    fields). Tokens are epochs × 1.65M, the study's epoch.
    """
    data = json.loads(resources.files("kdlib").joinpath("reference/original_study_curves.json").read_text())
    rows, curves = [], {}
    for exp, run in data["runs"].items():
        ppl = pd.Series(run["val_ppl_per_epoch"], dtype=float)
        epochs = pd.Series(range(1, len(ppl) + 1))
        curve = pd.DataFrame({"step": epochs, "tokens": epochs * STUDY_EPOCH_TOKENS, "epoch": epochs,
                              "val_ppl": ppl})
        name = f"study:{exp}"
        curves[name] = curve
        rows.append({"run": name, "source": "original study", "exp": exp, "seed": 42, "feature": "attention",
                     **_components(exp, "attention"), "finished": True, "best_val_ppl": ppl.min(),
                     "final_val_ppl": ppl.iloc[-1], "best_step": int(ppl.idxmin()) + 1,
                     "best_epoch": int(ppl.idxmin()) + 1, "steps": len(ppl),
                     "tokens": len(ppl) * STUDY_EPOCH_TOKENS})
    return pd.DataFrame(rows, columns=RUN_COLUMNS), curves


def ci95(values) -> float:
    """Half-width of the Student-t 95% confidence interval of the mean (NaN for fewer than 2 values)."""
    from scipy import stats

    v = pd.Series(values, dtype=float).dropna()
    if len(v) < 2:
        return math.nan
    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def experiment_table(runs: pd.DataFrame, order: Optional[list] = None, baseline: str = "ce") -> pd.DataFrame:
    """Mean and 95% CI over seeds per experiment (and feature kind), and the change against no KD.

    The score is the test perplexity where the runs have one, else the best validation perplexity.
    """
    if runs.empty:
        return pd.DataFrame()
    runs = runs.copy()
    runs["key"] = [e if f == "hidden" or parse(e, f).feature_map is None else f"{e} [attn]"
                   for e, f in zip(runs["exp"], runs["feature"])]
    g = runs.groupby("key", sort=False)
    table = pd.DataFrame({
        "seeds": g["seed"].count(),
        "best_val_ppl": g["best_val_ppl"].mean(), "best_val_ci95": g["best_val_ppl"].apply(ci95),
        "final_val_ppl": g["final_val_ppl"].mean(),
        "test_ppl": g["test_ppl"].mean(), "test_ci95": g["test_ppl"].apply(ci95),
        "best_step": g["best_step"].mean(), "best_epoch": g["best_epoch"].mean(), "tokens": g["tokens"].mean(),
        "train_wall_s": g["train_wall_s"].mean(), "tokens_per_s": g["tokens_per_s"].mean(),
    })
    table.index.name = "exp"
    score = table["test_ppl"].where(table["test_ppl"].notna(), table["best_val_ppl"])
    if baseline in table.index:
        table["vs_no_kd_pct"] = 100 * (score / score.loc[baseline] - 1)
    order = order or list(EXPERIMENTS)
    rank = {e: i for i, e in enumerate(order)}
    table = table.iloc[sorted(range(len(table)),
                              key=lambda i: (rank.get(table.index[i].split(" ")[0], len(rank)), table.index[i]))]
    return table


def paired_differences(runs: pd.DataFrame, metric: str = "test_ppl") -> pd.DataFrame:
    """The cosine term's effect per (feature map, divergence): ``metric`` with cos minus without,
    paired by seed, with mean, 95% CI and the number of pairs."""
    if runs.empty:
        return pd.DataFrame(columns=["feature_map", "divergence", "pairs", "mean_diff", "ci95"])
    value = runs[metric].where(runs[metric].notna(), runs["best_val_ppl"])
    df = runs.assign(value=value)
    rows = []
    for (fmap, div, feature), group in df.groupby(["feature_map", "divergence", "feature"]):
        with_cos = group[group["cosine"]].set_index("seed")["value"]
        without = group[~group["cosine"]].set_index("seed")["value"]
        seeds = with_cos.index.intersection(without.index)
        if len(seeds) == 0:
            continue
        diff = with_cos.loc[seeds] - without.loc[seeds]
        rows.append({"feature_map": fmap, "divergence": div, "feature": feature, "pairs": len(seeds),
                     "mean_diff": diff.mean(), "ci95": ci95(diff)})
    return pd.DataFrame(rows)


def js_early_late(runs: pd.DataFrame) -> pd.DataFrame:
    """Per JS run: when validation perplexity was best, and how much it rose after (final − best)."""
    js = runs[runs["divergence"] == "js"]
    out = js[["run", "exp", "seed", "best_step", "best_epoch", "steps", "best_val_ppl", "final_val_ppl"]].copy()
    out["rise"] = out["final_val_ppl"] - out["best_val_ppl"]
    out["rise_pct"] = 100 * out["rise"] / out["best_val_ppl"]
    return out.reset_index(drop=True)


def write_tables(table: pd.DataFrame, folder, name: str = "results") -> tuple[Path, Path]:
    """``name``.csv and ``name``.md (a Markdown table) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / f"{name}.csv", folder / f"{name}.md"
    atomic_write_text(csv, table.to_csv(float_format="%.4g"))
    atomic_write_text(md, markdown(table) + "\n")
    return csv, md


def markdown(table: pd.DataFrame) -> str:
    cols = [table.index.name or ""] + list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [_fmt(v) for v in row]) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def report(results_dir, out_dir, reference: bool = False, log: Callable[[str], None] = print) -> dict:
    """Tables and figures for a results folder (and, with ``reference``, the original study's curves).

    Writes ``results.csv``/``results.md`` (per experiment), ``runs.csv`` (per run),
    ``cosine_effect.csv``, ``js_early_late.csv`` and the figures (PNG + PDF) into ``out_dir``.
    Returns {'table', 'runs', 'figures', 'files', 'skipped'}.
    """
    from . import plots

    out_dir = Path(out_dir)
    runs, curves, skipped = load_runs(results_dir)
    for name, why in skipped:
        log(f"skipped {name}: {why}")
    ref_runs, ref_curves = reference_runs() if reference else (pd.DataFrame(columns=RUN_COLUMNS), {})
    if runs.empty and not reference:
        raise KdlibError(f"no run with an evaluation in {results_dir}; train some first "
                         "(python -m kdlib train / sweep), or pass --reference for the original study's")
    files, figures = [], []
    table = experiment_table(runs) if not runs.empty else pd.DataFrame()
    if not table.empty:
        files += write_tables(table, out_dir, "results")
        files.append(out_dir / "runs.csv")
        atomic_write_text(files[-1], runs.to_csv(index=False, float_format="%.6g"))
        paired = paired_differences(runs)
        js = js_early_late(runs)
        for name, frame in (("cosine_effect", paired), ("js_early_late", js)):
            files.append(out_dir / f"{name}.csv")
            atomic_write_text(files[-1], frame.to_csv(index=False, float_format="%.6g"))
        figures += plots.save(plots.val_curves(runs, curves), out_dir, "curves_all")
        figures += plots.save(plots.grouped_curves(runs, curves, "divergence"), out_dir, "curves_by_divergence")
        figures += plots.save(plots.grouped_curves(runs, curves, "feature_map"), out_dir, "curves_by_map")
        figures += plots.save(plots.ppl_bars(table), out_dir, "test_ppl")
        if not paired.empty:
            figures += plots.save(plots.cosine_effect(paired), out_dir, "cosine_effect")
        if not js.empty:
            figures += plots.save(plots.js_early_late(js), out_dir, "js_early_late")
        if table["train_wall_s"].notna().any():
            figures += plots.save(plots.cost_vs_ppl(table), out_dir, "cost_vs_ppl")
    if reference:
        ref_table = experiment_table(ref_runs)
        files += write_tables(ref_table[["best_val_ppl", "best_epoch", "final_val_ppl", "vs_no_kd_pct"]],
                              out_dir, "original_study")
        figures += plots.save(plots.val_curves(ref_runs, ref_curves, "The original study: validation perplexity"),
                              out_dir, "original_study_curves")
        if not runs.empty:
            figures += plots.save(plots.with_reference(runs, curves, ref_runs, ref_curves), out_dir,
                                  "curves_with_study")
    log(f"report: {len(runs)} runs, {len(skipped)} skipped; tables and figures in {out_dir}")
    return {"table": table, "runs": runs, "figures": figures, "files": files, "skipped": skipped}
