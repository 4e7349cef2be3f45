"""Statistics over a table of runs: means and 95% confidence intervals per experiment, the cosine
term's paired effect, the JS early/late finding, which rows differ from the baselines, and the
split of runs by protocol.

``experiment_table`` gives mean and 95% confidence interval (Student t over seeds) per experiment
and the change against the no-KD baseline; ``paired_differences`` measures an effect (the cosine
term) seed by seed; ``js_early_late`` tests the original study's second finding (JS perplexity
falls fast, then rises); ``significance`` says which experiments differ from ``kl`` and ``ce``
(paired t-tests by seed, Holm-corrected). ``protocol_groups`` splits runs by protocol: nothing here averages runs
of two protocols. ``sweep_table`` gives a sensitivity sweep's perplexity against each swept value.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Optional

import numpy as np
import pandas as pd

from .config.sweep import format_value
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
        "train_pflop": g["train_pflop"].mean(),  # kdlib's FLOPs model, teacher included; a cache's build apart
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
    table = table.iloc[sorted(range(len(table)), key=lambda i: _row_rank(table.index[i], rank))]
    return table


def _row_rank(label: str, rank: dict) -> tuple:
    """A row's place: ``order``'s, unknown names after; ``ce@EXP`` (no KD at EXP's compute) right after ``ce``."""
    name = label.split(" ")[0]
    at_compute = name.startswith("ce@")
    return rank.get("ce" if at_compute else name, len(rank)), at_compute, _natural(label)


def _natural(label: str) -> tuple:
    """``label`` as a sort key whose numbers compare as numbers: ``kl [temperature=2]`` before
    ``kl [temperature=10]``, as a sweep's points go."""
    parts = re.split(r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)", label)
    return tuple((1, float(p), "") if i % 2 else (0, 0.0, p) for i, p in enumerate(parts))


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


SIGNIFICANCE_COLUMNS = ["label", "baseline", "against", "metric", "pairs", "mean_diff", "ci_low", "ci_high", "t",
                        "p", "p_holm", "holm_m", "alpha", "verdict", "note"]
# the teacher-source suffix of a label (results.run_label): "kl [top-32 cache]", "kl [cache]"
_CACHE_SUFFIX = re.compile(r" \[(?:top-\d+ )?cache\]$")


def holm(pvalues) -> np.ndarray:
    """Holm's (1979) step-down adjustment of a family of p-values, in their given order.

    Sorted ascending, the i-th smallest (i = 1..m) is multiplied by m - i + 1, a running maximum
    keeps the adjusted values in the order of the raw ones, and each is capped at 1. Rejecting
    where the adjusted value is below alpha bounds the chance of any false rejection in the family
    by alpha, with no assumption on how the tests depend on each other (they share the baseline).
    """
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(p[order] * (m - np.arange(m)))  # (m,) in ascending order of p
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def paired_t(diff, alpha: float = 0.05) -> dict:
    """The paired t-test on per-seed differences ``diff`` (at least 2, not all equal): their mean,
    the Student-t (1 - alpha) interval of it, the t statistic and the two-sided p-value."""
    from scipy import stats

    d = np.asarray(diff, dtype=float)
    n = len(d)
    mean, se = d.mean(), d.std(ddof=1) / math.sqrt(n)
    half = stats.t.ppf(1 - alpha / 2, n - 1) * se
    t = mean / se
    return {"mean_diff": mean, "ci_low": mean - half, "ci_high": mean + half, "t": t,
            "p": float(2 * stats.t.sf(abs(t), n - 1))}


def _against(label: str, baseline: str, labels: list) -> Optional[str]:
    """The row ``label`` is tested against for ``baseline``: the baseline trained from the same
    teacher cache where the grid has it (a cached run's objective differs), else the baseline
    itself; the cached baseline's own row against the online baseline (what the cache costs); None
    for the baseline's own row, or when the grid has no run of it."""
    suffix = _CACHE_SUFFIX.search(label)
    same = baseline + suffix.group(0) if suffix else baseline
    against = same if same in labels and same != label else baseline
    return None if against not in labels or against == label else against


def _compare(exp: pd.Series, base: pd.Series, metric: str, alpha: float) -> dict:
    """One comparison of two {seed: metric} series named by their labels: the test, or why there is
    none (its numbers NaN)."""
    seeds = exp.index.intersection(base.index)
    if exp.empty or base.empty:
        note = f"{exp.name if exp.empty else base.name} has no {metric}"
    elif len(seeds) == 0:
        note = "no common seeds"
    elif len(seeds) == 1:  # one seed each, or more that the two do not share
        note = "1 seed: no test possible" if len(exp) == len(base) == 1 else \
            f"1 common seed ({seeds[0]}): no test possible"
    else:
        diff = exp.loc[seeds] - base.loc[seeds]
        # equal differences on every seed give se = 0: t is undefined, not infinite
        if diff.std(ddof=1) <= 1e-12 * max(1.0, diff.abs().max()):
            note = "no variance across seeds"
        else:
            return {"pairs": len(seeds), **paired_t(diff, alpha), "note": ""}
    nan = math.nan
    return {"pairs": len(seeds), "mean_diff": nan, "ci_low": nan, "ci_high": nan, "t": nan, "p": nan,
            "verdict": "not testable", "note": note}


def significance(runs: pd.DataFrame, baselines=("kl", "ce"), metric: Optional[str] = None,
                 alpha: float = 0.05) -> pd.DataFrame:
    """Which experiments differ from each baseline: one row per (experiment label, baseline).

    ``metric`` (default ``test_ppl``, or ``best_val_ppl`` when no run has a test score) of the
    experiment minus the baseline's, paired by seed over the seeds both have; the mean difference,
    its Student-t (1 - alpha) interval (95% by default; not corrected), t and the two-sided p-value
    of the paired t-test. ``p_holm``: the p-value Holm-corrected over the family of one baseline's
    comparisons across the grid (``holm_m`` tested rows against that baseline); ``verdict``:
    ``lower`` / ``higher`` (``p_holm`` < ``alpha``, by the sign of the difference: the metric's
    direction, so for perplexity ``lower`` is better), ``no difference``, or ``not testable`` with
    the reason in ``note`` (1 seed, no common seeds, no variance across seeds, no score yet); its
    numbers are NaN.

    A row trained from the teacher's top-k cache is tested against the baseline from the same cache
    where the grid has one (``against``), else against the online baseline, and that cached baseline
    against the online one (what the cache costs); ``ce`` has no teacher,
    so every row is tested against ``ce``. A baseline's own row, and a baseline with no run, give no
    row. Two runs of one label and seed (two folders) count as their mean. Runs of several
    protocols are refused, as ``experiment_table`` refuses them.
    """
    if runs.empty:
        return pd.DataFrame(columns=SIGNIFICANCE_COLUMNS)
    labels = list(experiment_table(runs).index)  # the table's row order; refuses several protocols
    metric = metric or ("test_ppl" if runs["test_ppl"].notna().any() else "best_val_ppl")
    if metric not in runs:
        raise KdlibError(f"no column {metric!r} in the runs; use one of their score columns, e.g. 'test_ppl' "
                         "or 'best_val_ppl'")
    scores = {label: group.dropna(subset=[metric]).groupby("seed")[metric].mean().rename(label)
              for label, group in runs.groupby("label", sort=False)}
    rows = []
    for baseline in baselines:
        family = [{"label": label, "baseline": baseline, "against": against, "metric": metric,
                   **_compare(scores[label], scores[against], metric, alpha)}
                  for label in labels if (against := _against(label, baseline, labels)) is not None]
        tested = [row for row in family if row["note"] == ""]
        for row, p in zip(tested, holm([row["p"] for row in tested])):
            row.update(p_holm=p, holm_m=len(tested),
                       verdict=("lower" if row["mean_diff"] < 0 else "higher") if p < alpha else "no difference")
        rows += family
    # an experiment's comparisons together, experiments in the results table's order
    rows.sort(key=lambda row: labels.index(row["label"]))
    table = pd.DataFrame(rows, columns=SIGNIFICANCE_COLUMNS)
    table["alpha"] = alpha
    return table


def significance_method(sig: pd.DataFrame) -> str:
    """One sentence saying what ``significance`` tested, for a report: test, pairing, family, correction
    and alpha, as the table ``sig`` records them."""
    metric = sig["metric"].iloc[0] if len(sig) else "test_ppl"
    alpha = float(sig["alpha"].iloc[0]) if len(sig) else 0.05
    family = ", ".join(f"m = {int(m) if pd.notna(m) else 0} against {b}"
                       for b, m in sig.groupby("baseline", sort=False)["holm_m"].max().items())
    return (f"Paired t-test by seed of {metric} (the experiment's minus the baseline's, over the seeds both have); "
            "p-values Holm-corrected over each baseline's family, its comparisons across the grid "
            f"({family or 'none'}); alpha {alpha:g}; the {100 * (1 - alpha):g}% Student-t interval of the mean "
            "difference is not corrected.")


def why_untestable(sig: pd.DataFrame) -> str:
    """Why no row of ``sig`` has a test, as a sentence (with one seed: how many seeds a test needs)."""
    notes = Counter(sig["note"])
    if not notes:
        return "No comparison: the grid has no baseline run (kl, ce) besides the rows themselves."
    if set(notes) == {"1 seed: no test possible"}:
        return ("No test is possible with one seed: each experiment shares one seed with its baseline, and a paired "
                "t-test needs at least 2 (3 or more for an interval of use: with 2, the t quantile is 12.7). Train "
                "more seeds (python -m kdlib sweep --seeds 0 1 2) and report again.")
    return "No comparison can be tested: " + "; ".join(f"{n} x {note}" for note, n in notes.items()) + "."


SWEEP_COLUMNS = ["experiment", "key", "value", "seeds", "ppl", "ci95", "metric"]


def _point(sweep: str) -> dict:
    """``"temperature=1, w_div=0.5"`` (a runs table's ``sweep``, ``config.sweep.point_label``) -> {name: value}."""
    return {k: float(v) for k, _, v in (part.partition("=") for part in sweep.split(", "))}


def sweep_table(runs: pd.DataFrame) -> pd.DataFrame:
    """A sensitivity sweep's perplexity per experiment, swept key and value: seeds, mean and 95% CI.

    ``experiment`` is the run's label without the swept key's value (with the other keys' values of
    a product sweep: ``kl [w_div=0.5]`` along ``temperature``), so no mean mixes two points. The
    score is test perplexity where any swept run has one, else best validation perplexity (never the
    two mixed; ``metric`` says which); runs without it do not count. Empty without swept runs.
    """
    swept = runs[runs["sweep"].fillna("").astype(str) != ""] if "sweep" in runs else runs.iloc[0:0]
    metric = "test_ppl" if swept["test_ppl"].notna().any() else "best_val_ppl"
    swept = swept.dropna(subset=[metric])
    rows = []
    for _, run in swept.iterrows():
        point = _point(run["sweep"])
        base = run["label"].replace(f" [{run['sweep']}]", "", 1)
        for key, value in point.items():
            others = ", ".join(f"{k}={format_value(v)}" for k, v in point.items() if k != key)
            rows.append({"experiment": base + (f" [{others}]" if others else ""), "key": key, "value": value,
                         "seed": run["seed"], "score": run[metric]})
    if not rows:
        return pd.DataFrame(columns=SWEEP_COLUMNS)
    g = pd.DataFrame(rows).astype({"value": float, "score": float}).groupby(["experiment", "key", "value"], sort=False)
    table = pd.DataFrame({"seeds": g["seed"].nunique(), "ppl": g["score"].mean(), "ci95": g["score"].apply(ci95)})
    table = table.reset_index().sort_values(["key", "experiment", "value"], kind="stable", ignore_index=True)
    table["metric"] = metric
    return table[SWEEP_COLUMNS]
