"""The report: a results folder -> tables and figures per protocol, each opened by its protocol.

``report`` reads the runs (``kdlib.results``), splits them by protocol and computes the tables
(``kdlib.stats``), then writes per protocol group ``results.csv``/``results.md`` (the .md opens
with the protocol statement, then its table, the test metrics beside perplexity: fidelity,
calibration, frequency buckets (``metrics_section``), and ends with which rows differ from ``kl``
and ``ce`` (``significance_section``)), ``runs.csv``, ``cosine_effect.csv``, ``js_early_late.csv``,
``significance.csv`` and the figures (``kdlib.plots``); for a sensitivity sweep, ``sweep.csv``, a
"Sensitivity" section and a ``sweep_KEY`` figure per swept key.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from .errors import KdlibError
from .fileio import atomic_write_text
from .results import (BUCKET_COLUMNS, PROTOCOL_COLUMNS, TEACHER_COLUMNS, load_runs,
                      read_test_metrics, reference_runs)
from .stats import (experiment_table, js_early_late, paired_differences, protocol_groups, significance,
                    significance_method, sweep_table, why_untestable)

def _values(series, fmt=str) -> str:
    values = [v for v in dict.fromkeys(series) if pd.notna(v)]
    return ", ".join(fmt(v) for v in values) if values else "-"


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def protocol_lines(runs: pd.DataFrame) -> list[str]:
    """One protocol group's protocol, as Markdown bullets: data, scores and how they were measured,
    tokens per run, teacher and its source. ``results.md`` starts with them."""
    n, finished = len(runs), int(runs["finished"].sum())
    block, test_stride, val_stride = (_values(runs[c]) for c in ("block_size", "test_stride", "val_stride"))
    lines = [f"- Preset `{_values(runs['preset'])}`; data: {_values(runs['dataset'])}; "
             f"{_count(n, 'run')} ({finished} finished), seeds {_values(sorted(runs['seed']))}."]
    if runs["test_ppl"].notna().any():
        lines.append(f"- Scores (`test_ppl`, `vs_no_kd_pct`): the test split, sliding window of block {block}, "
                     f"stride {test_stride}, the best student of each run.")
    else:
        lines.append("- Scores: no run has a test score yet (unfinished runs); `test_ppl` and `vs_no_kd_pct` "
                     f"are empty (test protocol: block {block}, stride {test_stride}).")
    lines.append(f"- Validation (`best_val_ppl`, `final_val_ppl`, `vs_no_kd_val_pct`): the whole validation "
                 f"split, block {block}, stride {val_stride}, during training.")
    equal = runs["exp"].astype(str).str.startswith("ce@")  # ce@EXP: the budget of EXP's compute, stated apart
    budget = runs.loc[~equal, "budget_tokens"].dropna()
    stated = (f"{_values(budget, lambda v: f'{int(v):,}')} (the budget)" if len(budget)
              else f"{_values(runs['budget'])} of the training split")
    for exp, group in runs[equal].groupby("exp"):
        stated += f"; `{exp}`: {_values(group['budget_tokens'].dropna(), lambda v: f'{int(v):,}')} ({exp[3:]}'s FLOPs)"
    trained = runs["tokens"]
    done = f"{int(trained.min()):,}" if trained.min() == trained.max() \
        else f"{int(trained.min()):,} to {int(trained.max()):,}"
    short = (runs["tokens"] < runs["budget_tokens"]).fillna(False).any()  # each run against its own budget
    lines.append(f"- Tokens per run: {stated}; trained: {done}"
                 + (" (early stopping and unfinished runs stop sooner)." if short else "."))
    kd = runs[runs["teacher_source"] != "none"]
    if kd.empty:
        lines.append("- Teacher: none (no KD run).")
    else:
        sources = Counter("online" if s != "cache" else f"top-{k} cache" if pd.notna(k) else "cache"
                          for s, k in zip(kd["teacher_source"], kd["cache_top_k"]))
        lines.append(f"- Teacher: {_values(kd['teacher'])}; its outputs: "
                     + ", ".join(f"{src} ({_count(c, 'run')})" for src, c in sources.items())
                     + (f"; no teacher: {_count(n - len(kd), 'run')} "
                        f"({_values(runs.loc[runs['teacher_source'] == 'none', 'label'])})" if n > len(kd) else "")
                     + ".")
    lines += compute_lines(runs)
    lines.append("- Mean and 95% CI over seeds (Student t); `-`: no value.")
    return lines


def compute_lines(runs: pd.DataFrame) -> list[str]:
    """The protocol's compute: each row's ``train_pflop`` by kdlib's FLOPs model, what ``ce@EXP`` is, and
    each top-k cache's one-off build, stated once (it is in no row: its runs share it)."""
    pflop = runs["train_pflop"].dropna()
    if pflop.empty:
        return []
    span = f"{pflop.min():.4g}" if pflop.min() == pflop.max() else f"{pflop.min():.4g} to {pflop.max():.4g}"
    line = (f"- Compute (`train_pflop`, kdlib's FLOPs model: tokens trained x training FLOPs per token, the "
            f"teacher's forward included when it ran online): {span} PFLOP per run")
    equal = sorted({e for e in runs["exp"] if str(e).startswith("ce@")})
    if equal:
        line += "; " + ", ".join(f"`{e}` is the no-KD student trained for the FLOPs of `{e[3:]}`" for e in equal)
    cached = runs[runs["teacher_source"] == "cache"]
    for top_k, group in cached.groupby(cached["cache_top_k"].fillna(0)):
        cost = group["cache_pflop"].dropna()
        what = f"the top-{int(top_k)} cache's one-off build" if top_k else "the top-k cache's one-off build"
        line += (f"; {what}, {cost.iloc[0]:.4g} PFLOP, shared by its {_count(len(group), 'run')}, counted once"
                 if len(cost) else f"; {what}: not recorded (summaries before kdlib counted it)")
    return [line + "."]


def protocol_statement(runs: pd.DataFrame) -> str:
    """The Markdown that opens a protocol group's ``results.md``."""
    return f"# Results: preset `{_values(runs['preset'])}`\n\n" + "\n".join(protocol_lines(runs)) + "\n"


# The per-experiment columns that results.md shows in its own section (metrics_section), not in the main table.
METRIC_TABLE_COLUMNS = ["agreement", "agreement_ci95", "kl_teacher", "kl_teacher_ci95", "ece", "ece_ci95",
                        *BUCKET_COLUMNS]


def write_tables(table: pd.DataFrame, folder, name: str = "results", header: Optional[str] = None,
                 footer: str = "") -> tuple[Path, Path]:
    """``name``.csv and ``name``.md (a Markdown table) in ``folder``. ``header`` (Markdown, a
    ``protocol_statement``) opens the .md file, and the protocol columns it states are left out of
    the .md table, as are the test metrics (``footer``, a ``metrics_section``, shows them after it);
    the CSV keeps every column."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / f"{name}.csv", folder / f"{name}.md"
    atomic_write_text(csv, table.to_csv(float_format="%.4g"))
    hidden = PROTOCOL_COLUMNS + METRIC_TABLE_COLUMNS + TEACHER_COLUMNS if header else []
    shown = table.drop(columns=[c for c in hidden if c in table])
    atomic_write_text(md, (header + "\n" if header else "") + markdown(shown) + "\n" + (f"\n{footer}" if footer else ""))
    return csv, md


def _bucket_lines(buckets: dict) -> list[str]:
    return [f"  - bucket {k}: {_count(n, 'token type')}, training count "
            + ("-" if lo is None else f"{lo:,}" if lo == hi else f"{lo:,} to {hi:,}")
            + f", {100 * share:.1f}% of the training tokens"
            for k, (n, lo, hi, share) in enumerate(zip(buckets["types"], buckets["min_count"], buckets["max_count"],
                                                       buckets["train_share"]), 1)]


def metrics_section(table: pd.DataFrame, runs: pd.DataFrame, metrics: dict) -> str:
    """results.md's section on the test metrics beside perplexity: what they are, the frequency
    buckets' boundaries, a table per experiment with the teacher's row, and which runs lack them."""
    lines = ["## Fidelity, calibration and where the perplexity comes from", ""]
    missing = sorted(set(runs.loc[runs["finished"] & runs["agreement"].isna(), "run"]))
    advice = ("runs trained before kdlib measured them get them with `python -m kdlib eval RUN --metrics "
              "--device cuda` (then run the report again)")
    if not metrics:
        return "\n".join(lines + [f"No run has test metrics yet: {advice}.", ""])
    first = next(iter(metrics.values()))
    lines += [f"On the test split (block {first['block_size']}, stride {first['stride']}), the best student of "
              "each run, mean and 95% CI over seeds: `agreement` top-1 agreement with the teacher; `kl_teacher` "
              "KL(teacher ‖ student) at temperature 1, nats per token; `ece` expected calibration error of the "
              f"next-token distribution ({first['ece_bins']} equal-width confidence bins); `ppl_bucketK` "
              "perplexity on the tokens of frequency bucket K (docs/losses.md, \"Test metrics\"). The teacher's "
              "row: the teacher on the same tokens.", "",
              f"Frequency buckets ({first['buckets']['by']}):", *_bucket_lines(first["buckets"]), ""]
    shown = table[METRIC_TABLE_COLUMNS].dropna(how="all")
    teacher = {"agreement": 1.0, "kl_teacher": 0.0, "ece": table["teacher_ece"].mean(),
               **{c: table[f"teacher_{c}"].mean() for c in BUCKET_COLUMNS}}
    shown = pd.concat([shown, pd.DataFrame([teacher], index=["teacher"])])
    shown.index.name = "exp"
    lines += [markdown(shown), ""]
    if missing:
        lines += [f"No test metrics in {_count(len(missing), 'finished run')} ({', '.join(missing)}): {advice}.", ""]
    if not _has_buckets(table, "ce"):
        lines += ["No `ce` run with test metrics: the `bucket_change` figure (the change against no KD per bucket) "
                  "needs one.", ""]
    return "\n".join(lines)


def _has_buckets(table: pd.DataFrame, label: str) -> bool:
    return label in table.index and bool(table.loc[label, BUCKET_COLUMNS].notna().any())


def markdown(table: pd.DataFrame) -> str:
    cols = [table.index.name or ""] + list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [_fmt(v) for v in row]) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None or v is pd.NA:
        return "-"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def significance_marks(sig: pd.DataFrame, index, baselines=("kl", "ce")) -> pd.DataFrame:
    """Columns ``vs_kl``, ``vs_ce`` for the rows ``index`` of the results table: the verdict of each
    row against that baseline (``lower``, ``higher``, ``no difference``), ``-`` for the baseline
    itself or where no test was possible."""
    marks = pd.DataFrame(index=index)
    for baseline in baselines:
        rows = sig[(sig["baseline"] == baseline) & (sig["verdict"] != "not testable")]
        marks[f"vs_{baseline}"] = [dict(zip(rows["label"], rows["verdict"])).get(label, "-") for label in index]
    return marks


def significance_section(sig: pd.DataFrame) -> str:
    """The Markdown section "Which rows differ" that ends ``results.md``: the test, the family and
    the correction, then one table per baseline; with no testable row, why instead of numbers."""
    if not (sig["verdict"] != "not testable").any():
        return (f"## Which rows differ\n\n{why_untestable(sig)} Where an experiment shares 2 or more seeds with `kl` "
                "or `ce`, this section tests it against them (paired t-tests by seed, Holm-corrected over each "
                "baseline's family).\n")
    lines = ["## Which rows differ", "", significance_method(sig) + " `lower`: perplexity significantly lower "
             "than the baseline's (better); `higher`: significantly higher (worse); `no difference`: not "
             "significant after the correction. A row trained from the teacher's top-k cache is tested against "
             "the baseline from the same cache where there is one (`against`). The table's columns `vs_kl` and "
             "`vs_ce` give the verdicts; `-`: the baseline itself, or no test.", ""]
    level = f"{100 * (1 - float(sig['alpha'].iloc[0])):g}% CI"
    for baseline, family in sig.groupby("baseline", sort=False):
        shown = pd.DataFrame({
            "against": family["against"], "pairs": family["pairs"], "mean_diff": family["mean_diff"],
            level: ["-" if pd.isna(lo) else f"[{lo:.4g}, {hi:.4g}]"
                    for lo, hi in zip(family["ci_low"], family["ci_high"])],
            "p": family["p"], "p_holm": family["p_holm"], "verdict": family["verdict"], "note": family["note"]})
        shown.index = pd.Index(family["label"], name="exp")
        lines += [f"### Against `{baseline}`", "", markdown(shown), ""]
    return "\n".join(lines)


def sensitivity_section(sweep: pd.DataFrame) -> str:
    """results.md's section on a sensitivity sweep: per swept key, perplexity against its values per
    experiment (``stats.sweep_table``), and the figures that draw it."""
    metric = sweep["metric"].iloc[0]
    lines = ["## Sensitivity", "",
             f"Runs of a sweep (`--set KEY=V1,V2,...`): `{metric}` per experiment and swept value, mean and 95% CI "
             "over seeds (`-` with one seed); an experiment of a product sweep names the other keys' values. "
             "Figures `sweep_KEY`; the numbers in `sweep.csv`.", ""]
    for key, rows in sweep.groupby("key", sort=False):
        shown = rows.set_index("experiment")[["value", "seeds", "ppl", "ci95"]]
        lines += [f"### `{key}`", "", markdown(shown), ""]
    return "\n".join(lines)


def _report_group(runs: pd.DataFrame, curves: dict, folder: Path, name: str, ref=None, metrics=None) -> dict:
    """One protocol group's tables and figures in ``folder``; ``metrics``: {run: its test_metrics}."""
    from . import plots

    metrics = metrics or {}
    sig = significance(runs)
    table = experiment_table(runs)
    table = table.join(significance_marks(sig, table.index))  # new columns at the end: results.csv keeps its own
    statement = protocol_statement(runs)
    sections = metrics_section(table, runs, metrics) + "\n" + significance_section(sig)
    sweep = sweep_table(runs)
    if not sweep.empty:
        sections += "\n" + sensitivity_section(sweep)
    files = list(write_tables(table, folder, "results", header=statement, footer=sections))
    files.append(folder / "significance.csv")
    atomic_write_text(files[-1], sig.to_csv(index=False, float_format="%.6g"))
    files.append(folder / "runs.csv")
    atomic_write_text(files[-1], runs.to_csv(index=False, float_format="%.6g"))
    has_test = runs["test_ppl"].notna().any()
    paired = paired_differences(runs, "test_ppl" if has_test else "best_val_ppl")
    js = js_early_late(runs)
    for stem, frame in (("cosine_effect", paired), ("js_early_late", js)):
        files.append(folder / f"{stem}.csv")
        atomic_write_text(files[-1], frame.to_csv(index=False, float_format="%.6g"))
    figures = plots.save(plots.val_curves(runs, curves), folder, "curves_all")
    figures += plots.save(plots.grouped_curves(runs, curves, "divergence"), folder, "curves_by_divergence")
    figures += plots.save(plots.grouped_curves(runs, curves, "feature_map"), folder, "curves_by_map")
    figures += plots.save(plots.ppl_bars(table, runs=runs), folder, "test_ppl" if has_test else "best_val_ppl")
    if not paired.empty:
        figures += plots.save(plots.cosine_effect(paired), folder, "cosine_effect")
    if not js.empty:
        figures += plots.save(plots.js_early_late(js), folder, "js_early_late")
    if table["train_wall_s"].notna().any():
        figures += plots.save(plots.cost_vs_ppl(table, runs=runs), folder, "cost_vs_ppl")
    figures += plots.save(plots.significance_table(sig), folder, "significance")
    if metrics:
        figures += plots.save(plots.fidelity_vs_ppl(runs), folder, "fidelity_vs_ppl")
        figures += plots.save(plots.reliability_diagram(runs, metrics), folder, "reliability")
        if _has_buckets(table, "ce"):
            buckets = next(iter(metrics.values()))["buckets"]
            figures += plots.save(plots.bucket_change(table, buckets), folder, "bucket_change")
    if ref is not None:
        figures += plots.save(plots.with_reference(runs, curves, *ref), folder, "curves_with_study")
    if not sweep.empty:
        files.append(folder / "sweep.csv")
        atomic_write_text(files[-1], sweep.to_csv(index=False, float_format="%.6g"))
        for key, fig in plots.sweep_curves(sweep, runs).items():
            figures += plots.save(fig, folder, f"sweep_{key}")
    return {"name": name, "folder": folder, "statement": statement, "table": table, "runs": runs,
            "significance": sig, "sections": sections, "figures": figures, "files": files}


def _index_md(groups: list, results_dir) -> str:
    """The top-level results.md when a results folder holds several protocols."""
    lines = [f"# Results: {len(groups)} protocols, reported apart", "",
             f"`{results_dir}` holds runs of {len(groups)} protocols (preset, data, token budget or evaluation "
             "differ). Runs of different protocols are never averaged together: each protocol has its own "
             "tables and figures in its folder.", "",
             "| folder | preset | runs | experiments | block | test stride | tokens per run | teacher outputs |",
             "|---|---|---|---|---|---|---|---|"]
    for g in groups:
        r = g["runs"]
        kd = r[r["teacher_source"] != "none"]
        sources = _values(["online" if s != "cache" else f"top-{k} cache" for s, k
                           in zip(kd["teacher_source"], kd["cache_top_k"])])
        budget = _values(r["budget_tokens"], lambda v: f"{int(v):,}") if r["budget_tokens"].notna().any() \
            else _values(r["budget"])
        lines.append(f"| [{g['name']}/]({g['name']}/results.md) | {_values(r['preset'])} | {len(r)} | "
                     f"{r['label'].nunique()} | {_values(r['block_size'])} | {_values(r['test_stride'])} | "
                     f"{budget} | {sources} |")
    for g in groups:
        lines += ["", f"## {g['name']}/", "", *protocol_lines(g["runs"])]
    return "\n".join(lines) + "\n"


def report(results_dir, out_dir, reference: bool = False, log: Callable[[str], None] = print) -> dict:
    """Tables and figures for a results folder (and, with ``reference``, the original study's curves).

    Runs are grouped by protocol (``protocol_groups``); runs of two protocols are never averaged
    together. Per group: ``results.csv``/``results.md`` (per experiment, marked ``vs_kl``/``vs_ce``;
    the .md opens with the protocol, then the test metrics' section, and ends with which rows differ), ``runs.csv`` (per run),
    ``cosine_effect.csv``, ``js_early_late.csv``, ``significance.csv`` and the figures (PNG + PDF).
    With one group they go into ``out_dir``; with several, into ``out_dir/<preset>`` (plus a hash
    when two share a preset), and ``out_dir/results.md`` lists the groups. The original study's
    files go into ``out_dir``.

    Returns {'groups': [{'name', 'folder', 'statement', 'table', 'runs', 'significance', 'sections'
    (results.md's Markdown after its table), 'figures', 'files'}, ...],
    'table' (the one group's; empty with several), 'runs' (all), 'figures' (all), 'files' (all),
    'skipped'}.
    """
    from . import plots

    out_dir = Path(out_dir)
    runs, curves, skipped = load_runs(results_dir)
    for name, why in skipped:
        log(f"skipped {name}: {why}")
    ref = reference_runs() if reference else None  # (runs, curves)
    if runs.empty and not reference:
        raise KdlibError(f"no run with an evaluation in {results_dir}; train some first "
                         "(python -m kdlib train / sweep), or pass --reference for the original study's")
    split = protocol_groups(runs)
    several = len(split) > 1
    metrics = read_test_metrics(results_dir, runs)
    groups = [_report_group(group, {r: curves[r] for r in group["run"]}, out_dir / name if several else out_dir,
                            name, ref, {r: metrics[r] for r in group["run"] if r in metrics})
              for name, group in split]
    files = [f for g in groups for f in g["files"]]
    figures = [f for g in groups for f in g["figures"]]
    if several:
        files.append(out_dir / "results.md")
        atomic_write_text(files[-1], _index_md(groups, results_dir))
    if ref is not None:
        ref_runs, ref_curves = ref
        ref_table = experiment_table(ref_runs)
        files += write_tables(ref_table[["best_val_ppl", "best_epoch", "final_val_ppl", "vs_no_kd_val_pct"]],
                              out_dir, "original_study")
        figures += plots.save(plots.val_curves(ref_runs, ref_curves, "The original study: validation perplexity"),
                              out_dir, "original_study_curves")
    if several:
        log(f"report: {len(runs)} runs of {len(groups)} protocols, never averaged together: one report each in "
            + ", ".join(str(g["folder"]) for g in groups) + f" (listed in {out_dir / 'results.md'}); "
            f"{len(skipped)} skipped")
    else:
        log(f"report: {len(runs)} runs, {len(skipped)} skipped; tables and figures in {out_dir}")
    return {"groups": groups, "table": groups[0]["table"] if len(groups) == 1 else pd.DataFrame(), "runs": runs,
            "figures": figures, "files": files, "skipped": skipped}
