"""Runs -> tables and statistics for the report.

A results folder holds run folders (``config.json``, ``metrics.jsonl``,
``summary.json``), finished or not, any mix of experiments, seeds and
presets: ``RUNS/PRESET/RUN`` or the older flat ``RUNS/RUN``. ``load_runs``
reads them into one row per run plus each run's validation curve, and says
which folders it skipped and why. Each row carries its protocol (preset, data,
token budget, evaluation block and strides): ``protocol_groups`` splits runs by
it, and nothing downstream averages runs of two protocols. ``experiment_table``
gives mean and 95% confidence interval (Student t over seeds) per experiment
and the change against the no-KD baseline; ``paired_differences`` measures an
effect (the cosine term) seed by seed; ``js_early_late`` tests the original
study's second finding (JS perplexity falls fast, then rises).
``reference_runs`` loads the original study's curves, shipped with kdlib.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from .errors import KdlibError
from .fileio import atomic_write_text, read_json, read_jsonl
from .grid import EXPERIMENTS, parse

# The original study's epoch: about 1.65M training tokens (reference/original_study.md).
STUDY_EPOCH_TOKENS = 1_650_000
STUDY_EPOCHS = 50
# The protocol columns: constant within a protocol group, stated once at the top of results.md.
PROTOCOL_COLUMNS = ["preset", "block_size", "test_stride", "val_stride", "budget_tokens"]
RUN_COLUMNS = ["run", "source", "exp", "label", "seed", "feature", "divergence", "feature_map", "cosine", "finished",
               "best_val_ppl", "final_val_ppl", "test_ppl", "best_step", "best_epoch", "steps", "tokens",
               "train_wall_s", "tokens_per_s", "teacher_source", "cache_top_k", "teacher", *PROTOCOL_COLUMNS,
               "budget", "dataset", "protocol"]
_INT_COLUMNS = ["cache_top_k", "block_size", "test_stride", "val_stride", "budget_tokens"]
# The train fields that set a run's token budget (older configs lack max_tokens).
BUDGET_FIELDS = ("max_tokens", "max_steps", "epochs", "batch_size", "grad_accum")


def read_metrics(run_dir) -> pd.DataFrame:
    """A run's metrics.jsonl as a table; a half-written line (an interrupted write) is skipped
    with a warning."""
    return pd.DataFrame(read_jsonl(Path(run_dir) / "metrics.jsonl"))


def _components(exp: str, feature: str) -> dict:
    spec = parse(exp, feature)
    return {"divergence": spec.divergence or "none", "feature_map": spec.feature_map or "none",
            "cosine": spec.cosine}


def run_label(exp: str, feature: str, teacher_source: str = "online", cache_top_k=None) -> str:
    """An experiment's row key: ``kl``; ``layerwise-kl [attn]`` (attention-map features);
    ``kl [top-32 cache]`` (the teacher's outputs from its top-k cache, a different objective)."""
    name = exp if feature == "hidden" or parse(exp, feature).feature_map is None else f"{exp} [attn]"
    if teacher_source != "cache":
        return name
    return f"{name} [top-{int(cache_top_k)} cache]" if pd.notna(cache_top_k) else f"{name} [cache]"


def protocol_key(config: dict) -> dict:
    """What a run's numbers depend on besides its loss and seed: the preset, the teacher, the whole
    data section and the training budget. Runs whose keys differ are never averaged together."""
    train = config.get("train") or {}
    return {"preset": config.get("preset"), "teacher": config.get("teacher"), "data": config.get("data"),
            "train": {k: train.get(k) for k in BUDGET_FIELDS}}


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _budget(config: dict, summary: dict) -> tuple[Optional[int], str]:
    """(tokens per run, how the config sets them). The summary's budget where the run has one; else
    ``train.max_tokens`` in whole steps, cut by ``max_steps``; an epochs budget depends on the
    training split's size, which the run folder does not record (None)."""
    t, block = config.get("train") or {}, config["data"]["block_size"]
    per_step = t["batch_size"] * t.get("grad_accum", 1) * block
    if not isinstance(per_step, int) or not 0 < per_step < 2**63:
        raise _Malformed(f"its config's batch_size x grad_accum x block_size is {per_step!r}, not a number of "
                         "tokens per step")
    max_tokens, max_steps = t.get("max_tokens"), t.get("max_steps")
    how = (f"max_tokens {max_tokens:,}" if max_tokens is not None else f"{t.get('epochs')} epochs") \
        + (f", at most {max_steps:,} steps" if max_steps is not None else "")
    if summary.get("budget_tokens") is not None:
        return int(summary["budget_tokens"]), how
    if max_tokens is None:
        return None, how
    steps = max_tokens // per_step if max_steps is None else min(max_tokens // per_step, max_steps)
    return steps * per_step, how


def _dataset(data: dict) -> str:
    if data.get("dataset") == "python-docs":  # offline text: its dataset_config is unused
        name = data["dataset"]
    elif data.get("dataset"):
        name = data["dataset"] + (f" ({data['dataset_config']})" if data.get("dataset_config") else "")
    else:
        name = "text files " + ", ".join(Path(p).name for p in (data.get("text_files") or {}).values())
    if data.get("train_tokens"):
        name += f", training subset of ~{data['train_tokens']:,} tokens"
    return name


def _teacher(config: dict) -> str:
    teacher = config.get("teacher") or {}
    return "a randomly initialised GPT-2" if teacher.get("random_init") else str(teacher.get("name"))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _empty_preset_folder(folder: Path) -> bool:
    """A preset's folder with no file in it: what a run refused before it started leaves behind
    (``RUNS/PRESET/``); not worth a "skipped" line."""
    from .config import PRESETS

    return folder.name in PRESETS and not any(f.is_file() for f in folder.rglob("*"))


def run_folders(results_dir) -> tuple[list[Path], list]:
    """The run folders of a results folder (a folder holding ``config.json``) at depth 1
    (``RUNS/RUN``) or 2 (``RUNS/PRESET/RUN``), and [(folder, why not a run)] for the others."""
    folder = Path(results_dir)
    runs, skipped = [], []
    for child in _subdirs(folder):
        if (child / "config.json").is_file():
            runs.append(child)
            continue
        if _empty_preset_folder(child):
            continue
        inner = [p for p in _subdirs(child) if (p / "config.json").is_file()]
        if not inner:
            skipped.append((child.name, "no config.json: not a run folder, nor a folder of run folders"))
            continue
        runs += inner
        skipped += [(p.relative_to(folder).as_posix(), "no config.json: not a run folder")
                    for p in _subdirs(child) if p not in inner]
    return runs, skipped


class _Malformed(Exception):
    """A value of the wrong type in a run's files: the run is skipped with this reason."""


# What reading one run folder can raise on content that is not what kdlib wrote (a list for an
# object, text for a number, JSON nested too deeply to parse, an unreadable file): the run is
# skipped with the reason, and the other runs are reported.
_UNREADABLE = (KdlibError, _Malformed, KeyError, TypeError, ValueError, AttributeError, IndexError,
               RecursionError, OSError)
_KINDS = {"number": (int, float), "whole number": (int,), "string": (str,)}
# The summary and metrics fields the report reads, and their kinds (None is allowed in a summary).
SUMMARY_FIELDS = {"test_ppl": "number", "train_wall_s": "number", "tokens_per_s": "number",
                  "budget_tokens": "whole number", "eval_stride": "whole number",
                  "in_training_eval_stride": "whole number", "cache_top_k": "whole number",
                  "teacher_source": "string"}
METRIC_FIELDS = {"step": "whole number", "tokens": "whole number", "epoch": "number", "val_ppl": "number"}


def _need(value, kind: str, what: str):
    """``value`` if it is a ``kind`` of ``_KINDS`` (a bool is not a number; a number is finite, a whole
    number in 0..2**63, what a table column and a plot axis can hold), else ``_Malformed``."""
    if isinstance(value, bool) or not isinstance(value, _KINDS[kind]):
        raise _Malformed(f"{what} is {value!r}, not a {kind}")
    if kind == "number" and not math.isfinite(value):
        raise _Malformed(f"{what} is {value!r}, not a finite number")
    if kind == "whole number" and not 0 <= value < 2**63:
        raise _Malformed(f"{what} is {value!r}, out of range")
    return value


def _why(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply to read"
    return str(e) if isinstance(e, (KdlibError, _Malformed)) else f"{type(e).__name__}: {e}"


def _read_summary(run: Path, name: str) -> tuple[dict, Optional[tuple]]:
    """(the run's summary, or {} when it has none or it is malformed; the skipped line saying so)."""
    if not (run / "summary.json").is_file():
        return {}, None
    try:
        summary = read_json(run / "summary.json", "summary")
        for key, kind in SUMMARY_FIELDS.items():
            if summary.get(key) is not None:
                _need(summary[key], kind, f"its {key}")
    except _UNREADABLE as e:
        return {}, (name, f"unreadable summary.json ({_why(e)}); reported from its metrics")
    return summary, None


def _read_metric_rows(run: Path) -> pd.DataFrame:
    """metrics.jsonl as a table, every field the report reads checked: an evaluation has all four."""
    rows = read_jsonl(run / "metrics.jsonl")
    for n, row in enumerate(rows, 1):
        for key, kind in METRIC_FIELDS.items():
            if key in row or "val_ppl" in row:
                _need(row.get(key), kind, f"record {n}'s {key}")
    return pd.DataFrame(rows)


def _config_fields(config: dict, summary: dict) -> dict:
    """The row fields a run's config gives (with its summary's say on the budget and the teacher)."""
    exp, seed = _need(config["exp"], "string", "exp"), _need(config["seed"], "whole number", "seed")
    feature = _need(config["loss"]["feature"], "string", "loss.feature")
    block = _need(config["data"]["block_size"], "whole number", "data.block_size")
    if config.get("preset") is not None:
        _need(config["preset"], "string", "preset")
    budget_tokens, budget = _budget(config, summary)
    if not parse(exp, feature).needs_teacher:
        source = "none"
    else:  # old configs have no train.teacher_source: their teacher ran online
        source = summary.get("teacher_source") or (config.get("train") or {}).get("teacher_source") or "online"
    top_k = (summary.get("cache_top_k") or (config.get("cache") or {}).get("top_k")) if source == "cache" else None
    if top_k is not None:
        _need(top_k, "whole number", "cache.top_k")
    test_stride = summary.get("eval_stride", block // 2)
    val_stride = summary.get("in_training_eval_stride", block)
    return {"exp": exp, "label": run_label(exp, feature, source, top_k), "seed": seed, "feature": feature,
            **_components(exp, feature), "teacher_source": source, "cache_top_k": top_k,
            "teacher": _teacher(config) if source != "none" else None, "preset": config.get("preset"),
            "block_size": block, "test_stride": test_stride, "val_stride": val_stride,
            "budget_tokens": budget_tokens, "budget": budget, "dataset": _dataset(config["data"]),
            "protocol": _digest({**protocol_key(config), "test_stride": test_stride, "val_stride": val_stride})}


def load_runs(results_dir) -> tuple[pd.DataFrame, dict, list]:
    """(one row per run, {run: validation curve [step, tokens, epoch, val_ppl]}, [(folder, why skipped)]).

    ``run`` is the run folder's path inside ``results_dir`` (``colab-t4/kl-seed0``, or ``kl-seed0``
    in a flat folder); ``label`` the experiment's row key (``run_label``); ``protocol`` a short hash
    of the protocol (``protocol_key`` and the evaluation strides) that groups runs. A run whose
    files are unreadable or malformed (wrong JSON, a list for an object, text for a number) is
    skipped with the reason; a preset's folder with nothing in it is not listed.
    """
    folder = Path(results_dir)
    rows, curves = [], {}
    if not folder.is_dir():
        return _frame([]), curves, [(str(folder), "no such folder")]
    folders, skipped = run_folders(folder)
    for run in folders:
        name = run.relative_to(folder).as_posix()
        summary, unreadable = _read_summary(run, name)
        try:
            fields = _config_fields(read_json(run / "config.json", "run config"), summary)
        except _UNREADABLE as e:
            skipped.append((name, f"no readable kdlib config ({_why(e)})"))
            continue
        if unreadable:
            skipped.append(unreadable)
        try:
            metrics = _read_metric_rows(run)
        except _UNREADABLE as e:
            skipped.append((name, f"unreadable metrics.jsonl ({_why(e)})"))
            continue
        if "val_ppl" not in metrics or metrics["val_ppl"].dropna().empty:
            skipped.append((name, "no evaluation in metrics.jsonl yet"))
            continue
        curve = metrics.dropna(subset=["val_ppl"])[["step", "tokens", "epoch", "val_ppl"]].reset_index(drop=True)
        best = curve.loc[curve["val_ppl"].idxmin()]
        row = {"run": name, "source": "kdlib", **fields, "finished": (run / "summary.json").is_file(),
               "best_val_ppl": best["val_ppl"], "final_val_ppl": curve["val_ppl"].iloc[-1],
               "best_step": int(best["step"]), "best_epoch": float(best["epoch"]),
               "steps": int(metrics["step"].max()), "tokens": int(metrics["tokens"].max())}
        for key in ("test_ppl", "train_wall_s", "tokens_per_s"):
            row[key] = summary.get(key)
        rows.append(row)
        curves[name] = curve
    return _frame(rows), curves, skipped


def _frame(rows: list) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    for col in _INT_COLUMNS:  # whole numbers with gaps: written as integers, not 5.12e+03
        df[col] = pd.to_numeric(df[col]).astype("Int64")
    for col in ("test_ppl", "train_wall_s", "tokens_per_s"):
        df[col] = pd.to_numeric(df[col]).astype(float)
    return df


def reference_runs() -> tuple[pd.DataFrame, dict]:
    """The original study's 14 runs (validation perplexity per epoch), as a run set.

    Source: the study's notebook, cell 'Graphs in Report' (see the file's 'source' and 'metric'
    fields). Tokens are epochs × 1.65M, the study's epoch. Its only score is validation
    perplexity on non-overlapping 128-token blocks; it has no test score.
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
        source = "online" if parse(exp, "attention").needs_teacher else "none"
        rows.append({"run": name, "source": "original study", "exp": exp, "label": run_label(exp, "attention"),
                     "seed": 42, "feature": "attention", **_components(exp, "attention"), "finished": True,
                     "best_val_ppl": ppl.min(), "final_val_ppl": ppl.iloc[-1], "best_step": int(ppl.idxmin()) + 1,
                     "best_epoch": int(ppl.idxmin()) + 1, "steps": len(ppl), "tokens": len(ppl) * STUDY_EPOCH_TOKENS,
                     "teacher_source": source, "teacher": "gpt2" if source != "none" else None,
                     "preset": "original study", "block_size": 128, "val_stride": 128,
                     "budget_tokens": STUDY_EPOCHS * STUDY_EPOCH_TOKENS, "budget": f"{STUDY_EPOCHS} epochs",
                     "dataset": "WikiText-103 (the study's ~1.65M-token training text)",
                     "protocol": "original-study"})
    return _frame(rows), curves


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
                         "averages one protocol's runs: split them with analysis.protocol_groups(runs), "
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
    budget = runs["budget_tokens"].dropna()
    stated = (f"{_values(budget, lambda v: f'{int(v):,}')} (the budget)" if len(budget)
              else f"{_values(runs['budget'])} of the training split")
    trained = runs["tokens"]
    done = f"{int(trained.min()):,}" if trained.min() == trained.max() \
        else f"{int(trained.min()):,} to {int(trained.max()):,}"
    short = len(budget) and trained.min() < budget.max()
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
    lines.append("- Mean and 95% CI over seeds (Student t); `-`: no value.")
    return lines


def protocol_statement(runs: pd.DataFrame) -> str:
    """The Markdown that opens a protocol group's ``results.md``."""
    return f"# Results: preset `{_values(runs['preset'])}`\n\n" + "\n".join(protocol_lines(runs)) + "\n"


def write_tables(table: pd.DataFrame, folder, name: str = "results", header: Optional[str] = None
                 ) -> tuple[Path, Path]:
    """``name``.csv and ``name``.md (a Markdown table) in ``folder``. ``header`` (Markdown, a
    ``protocol_statement``) opens the .md file, and the protocol columns it states are left out of
    the .md table; the CSV keeps every column."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / f"{name}.csv", folder / f"{name}.md"
    atomic_write_text(csv, table.to_csv(float_format="%.4g"))
    shown = table.drop(columns=[c for c in PROTOCOL_COLUMNS if c in table]) if header else table
    atomic_write_text(md, (header + "\n" if header else "") + markdown(shown) + "\n")
    return csv, md


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


def _report_group(runs: pd.DataFrame, curves: dict, folder: Path, name: str, ref=None) -> dict:
    """One protocol group's tables and figures in ``folder``."""
    from . import plots

    table = experiment_table(runs)
    statement = protocol_statement(runs)
    files = list(write_tables(table, folder, "results", header=statement))
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
    if ref is not None:
        figures += plots.save(plots.with_reference(runs, curves, *ref), folder, "curves_with_study")
    return {"name": name, "folder": folder, "statement": statement, "table": table, "runs": runs,
            "figures": figures, "files": files}


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
    together. Per group: ``results.csv``/``results.md`` (per experiment; the .md opens with the
    protocol), ``runs.csv`` (per run), ``cosine_effect.csv``, ``js_early_late.csv`` and the figures
    (PNG + PDF). With one group they go into ``out_dir``; with several, into ``out_dir/<preset>``
    (plus a hash when two share a preset), and ``out_dir/results.md`` lists the groups. The
    original study's files go into ``out_dir``.

    Returns {'groups': [{'name', 'folder', 'statement', 'table', 'runs', 'figures', 'files'}, ...],
    'table' (the one group's; empty with several), 'runs' (all), 'figures' (all), 'files' (all),
    'skipped'}.
    """
    from . import plots

    out_dir = Path(out_dir)
    runs, curves, skipped = load_runs(results_dir)
    for name, why in skipped:
        log(f"skipped {name}: {why}")
    ref_runs, ref_curves = reference_runs() if reference else (_frame([]), {})
    if runs.empty and not reference:
        raise KdlibError(f"no run with an evaluation in {results_dir}; train some first "
                         "(python -m kdlib train / sweep), or pass --reference for the original study's")
    split = protocol_groups(runs)
    several = len(split) > 1
    groups = [_report_group(group, {r: curves[r] for r in group["run"]}, out_dir / name if several else out_dir,
                            name, (ref_runs, ref_curves) if reference else None)
              for name, group in split]
    files = [f for g in groups for f in g["files"]]
    figures = [f for g in groups for f in g["figures"]]
    if several:
        files.append(out_dir / "results.md")
        atomic_write_text(files[-1], _index_md(groups, results_dir))
    if reference:
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
