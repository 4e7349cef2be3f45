"""Statistics over a table of runs: means and 95% confidence intervals per experiment, the cosine
term's paired effect, the JS early/late finding, and the split of runs by protocol.

``experiment_table`` gives mean and 95% confidence interval (Student t over seeds) per experiment
and the change against the no-KD baseline; ``paired_differences`` measures an effect (the cosine
term) seed by seed; ``js_early_late`` tests the original study's second finding (JS perplexity
falls fast, then rises). ``protocol_groups`` splits runs by protocol: nothing here averages runs
of two protocols.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Optional

import pandas as pd

from .errors import KdlibError
from .grid import EXPERIMENTS
from .results import BUCKET_COLUMNS, PROTOCOL_COLUMNS, TEACHER_COLUMNS

def ci95(values) -> float:
    """Half-width of the Student-t 95% confidence interval of the mean (NaN for fewer than 2 values)."""
    from scipy import stats

    v = pd.Series(values, dtype=float).dropna()
    if len(v) < 2:
        return math.nan
    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def experiment_table(runs: pd.DataFrame, order: Optional[list] = None, baseline: str = "ce") -> pd.DataFrame:
    """Mean and 95% CI over seeds per experiment (its ``label``: feature kind and teacher source
    included), the change against no KD, and the protocol columns.

    ``vs_no_kd_pct`` compares test perplexities only (NaN where the row or the baseline has none);
    ``vs_no_kd_val_pct`` compares best validation perplexities. Runs of more than one protocol are
    refused: split them with ``protocol_groups`` first (``report`` does).
    """
    if runs.empty:
        return pd.DataFrame()
    protocols = list(dict.fromkeys(runs["protocol"].dropna()))
    if len(protocols) > 1:
        presets = ", ".join(str(p) for p in dict.fromkeys(runs["preset"]))
        raise KdlibError(f"these runs come from {len(protocols)} protocols (presets: {presets}); one table "
                         "averages one protocol's runs: split them with stats.protocol_groups(runs), "
                         "or use analysis.report, which writes one report per protocol")
    g = runs.groupby("label", sort=False)
    table = pd.DataFrame({
        "seeds": g["seed"].count(),
        "best_val_ppl": g["best_val_ppl"].mean(), "best_val_ci95": g["best_val_ppl"].apply(ci95),
        "final_val_ppl": g["final_val_ppl"].mean(),
        "test_ppl": g["test_ppl"].mean(), "test_ci95": g["test_ppl"].apply(ci95),
        "best_step": g["best_step"].mean(), "best_epoch": g["best_epoch"].mean(), "tokens": g["tokens"].mean(),
        "train_wall_s": g["train_wall_s"].mean(), "tokens_per_s": g["tokens_per_s"].mean(),
    })
    table.index.name = "exp"
    has_base = baseline in table.index
    for col, score in (("vs_no_kd_pct", "test_ppl"), ("vs_no_kd_val_pct", "best_val_ppl")):
        table[col] = 100 * (table[score] / table.loc[baseline, score] - 1) if has_base else math.nan
    for col in ("agreement", "kl_teacher", "ece"):  # fidelity and calibration (kdlib.metrics)
        table[col], table[f"{col}_ci95"] = g[col].mean(), g[col].apply(ci95)
    for col in BUCKET_COLUMNS:
        table[col] = g[col].mean()
    for col in TEACHER_COLUMNS:  # one teacher per protocol: the same in every row that was scored with it
        table[col] = g[col].mean()
    for col in PROTOCOL_COLUMNS:
        table[col] = g[col].first()
    order = order or list(EXPERIMENTS)
    rank = {e: i for i, e in enumerate(order)}
    table = table.iloc[sorted(range(len(table)),
                              key=lambda i: (rank.get(table.index[i].split(" ")[0], len(rank)), table.index[i]))]
    return table


def paired_differences(runs: pd.DataFrame, metric: str = "test_ppl") -> pd.DataFrame:
    """The cosine term's effect per (feature map, divergence): ``metric`` with cos minus without,
    paired by seed and teacher source, with mean, 95% CI and the number of pairs.

    Only runs that have ``metric`` take part (``"test_ppl"``, or ``"best_val_ppl"`` explicitly);
    nothing is filled in from another score.
    """
    columns = ["feature_map", "divergence", "feature", "pairs", "mean_diff", "ci95", "metric"]
    if metric not in runs:
        raise KdlibError(f"no column {metric!r} in the runs; use 'test_ppl' or 'best_val_ppl'")
    df = runs.dropna(subset=[metric])
    # a cached run is never paired with an online one
    df = df.assign(variant=df["teacher_source"].fillna("").astype(str) + ":"
                   + df["cache_top_k"].fillna(0).astype("int64").astype(str))
    rows = []
    for (fmap, div, feature, _), group in df.groupby(["feature_map", "divergence", "feature", "variant"]):
        with_cos = group[group["cosine"]].set_index("seed")[metric]
        without = group[~group["cosine"]].set_index("seed")[metric]
        seeds = with_cos.index.intersection(without.index)
        if len(seeds) == 0:
            continue
        diff = with_cos.loc[seeds] - without.loc[seeds]
        rows.append({"feature_map": fmap, "divergence": div, "feature": feature, "pairs": len(seeds),
                     "mean_diff": diff.mean(), "ci95": ci95(diff), "metric": metric})
    return pd.DataFrame(rows, columns=columns)


def js_early_late(runs: pd.DataFrame) -> pd.DataFrame:
    """Per JS run: when validation perplexity was best, and how much it rose after (final − best)."""
    js = runs[runs["divergence"] == "js"]
    out = js[["run", "exp", "label", "seed", "best_step", "best_epoch", "steps", "best_val_ppl",
              "final_val_ppl"]].copy()
    out["rise"] = out["final_val_ppl"] - out["best_val_ppl"]
    out["rise_pct"] = 100 * out["rise"] / out["best_val_ppl"]
    return out.reset_index(drop=True)


def protocol_groups(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Runs split by protocol, each with its folder name: the preset, plus a short hash of the
    protocol when two groups share a preset (``smoke-1a2b3c``)."""
    if runs.empty:
        return []
    ids = list(dict.fromkeys(runs["protocol"]))
    presets = {pid: str(runs.loc[runs["protocol"] == pid, "preset"].iloc[0]) for pid in ids}
    shared = Counter(presets.values())
    groups = []
    for pid in sorted(ids, key=lambda p: (presets[p], p)):
        # a folder name inside out_dir, whatever a config's preset says ("..", "../x" stay inside)
        slug = re.sub(r"^\.|[^A-Za-z0-9._-]+", "_", presets[pid]) + (f"-{pid[:6]}" if shared[presets[pid]] > 1 else "")
        groups.append((slug, runs[runs["protocol"] == pid].reset_index(drop=True)))
    return groups
