"""Runs -> tables: one row per run, then mean and 95% CI per experiment.

Reads a results folder of run folders (``config.json``, ``metrics.jsonl``,
``summary.json``); unfinished runs are listed with what they have so far.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import pandas as pd

from .fileio import read_json

RUN_COLUMNS = ["exp", "seed", "feature", "finished", "best_val_ppl", "final_val_ppl", "test_ppl", "best_step",
               "steps", "tokens", "train_wall_s", "tokens_per_s", "teacher_source"]


def read_metrics(run_dir) -> pd.DataFrame:
    """A run's metrics.jsonl as a table; a half-written last line is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return pd.DataFrame(rows)


def runs_table(results_dir) -> pd.DataFrame:
    """One row per run folder under ``results_dir`` (finished or not)."""
    rows = []
    for run in sorted(Path(results_dir).iterdir()) if Path(results_dir).is_dir() else []:
        if not (run / "config.json").is_file():
            continue
        config = read_json(run / "config.json", "run config")
        row = {"run": run.name, "exp": config["exp"], "seed": config["seed"],
               "feature": config["loss"]["feature"], "finished": (run / "summary.json").is_file()}
        if row["finished"]:
            row.update({k: v for k, v in read_json(run / "summary.json", "summary").items() if k in RUN_COLUMNS})
        else:
            m = read_metrics(run)
            if "val_ppl" in m:
                val = m["val_ppl"].dropna()
                row.update(best_val_ppl=val.min(), final_val_ppl=val.iloc[-1], steps=int(m["step"].max()))
        rows.append(row)
    return pd.DataFrame(rows, columns=["run"] + RUN_COLUMNS)


def _ci95(values: pd.Series) -> float:
    """Half-width of a Student-t 95% confidence interval of the mean (NaN for a single seed)."""
    from scipy import stats

    v = values.dropna()
    if len(v) < 2:
        return math.nan
    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def experiment_table(runs: pd.DataFrame, order: Optional[list] = None, baseline: str = "ce") -> pd.DataFrame:
    """Mean and 95% CI over seeds per experiment, and the change against the no-KD baseline."""
    if runs.empty:
        return pd.DataFrame()
    g = runs.groupby("exp")
    table = pd.DataFrame({
        "seeds": g["seed"].count(),
        "best_val_ppl": g["best_val_ppl"].mean(), "best_val_ci95": g["best_val_ppl"].apply(_ci95),
        "test_ppl": g["test_ppl"].mean(), "test_ci95": g["test_ppl"].apply(_ci95),
        "best_step": g["best_step"].mean(), "train_wall_s": g["train_wall_s"].mean(),
        "tokens_per_s": g["tokens_per_s"].mean(),
    })
    if baseline in table.index:
        table["vs_no_kd_pct"] = 100 * (table["test_ppl"] / table.loc[baseline, "test_ppl"] - 1)
    if order is not None:
        table = table.reindex([e for e in order if e in table.index] +
                              [e for e in table.index if e not in order])
    return table


def write_tables(table: pd.DataFrame, folder, name: str = "results") -> tuple[Path, Path]:
    """``name``.csv and ``name``.md (a Markdown table) in ``folder``."""
    from .fileio import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / f"{name}.csv", folder / f"{name}.md"
    atomic_write_text(csv, table.to_csv(float_format="%.4g"))
    atomic_write_text(md, _markdown(table) + "\n")
    return csv, md


def _markdown(table: pd.DataFrame) -> str:
    cols = [table.index.name or "exp"] + list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in table.iterrows():
        cells = [str(idx)] + [_fmt(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)
