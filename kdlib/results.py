"""A results folder -> one row per run and its validation curve.

A results folder holds run folders (``config.json``, ``metrics.jsonl``,
``summary.json``), finished or not, any mix of experiments, seeds and
presets: ``RUNS/PRESET/RUN`` or the older flat ``RUNS/RUN``. ``load_runs``
reads them into one row per run plus each run's validation curve, and says
which folders it skipped and why. Each row carries its protocol (preset, data,
token budget, evaluation block and strides), so that ``kdlib.stats`` never
averages runs of two protocols. ``reference_runs`` loads the original study's
curves, shipped with kdlib, as the same kind of table.
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Optional

import pandas as pd

from .config.sweep import point_label
from .errors import KdlibError
from .fileio import read_json, read_jsonl
from .grid import parse
from .metrics import ECE_BINS, FREQUENCY_BUCKETS

# The original study's epoch: about 1.65M training tokens (reference/original_study.md).
STUDY_EPOCH_TOKENS = 1_650_000
STUDY_EPOCHS = 50
# The protocol columns: constant within a protocol group, stated once at the top of results.md.
PROTOCOL_COLUMNS = ["preset", "block_size", "test_stride", "val_stride", "budget_tokens"]
# The test metrics beside perplexity (kdlib.metrics), from a summary's test_metrics: bucket 1 holds the
# most frequent tokens.
BUCKET_COLUMNS = [f"ppl_bucket{k}" for k in range(1, FREQUENCY_BUCKETS + 1)]
METRIC_COLUMNS = ["agreement", "kl_teacher", "ece", *BUCKET_COLUMNS]
TEACHER_COLUMNS = ["teacher_test_ppl", "teacher_ece", *(f"teacher_{c}" for c in BUCKET_COLUMNS)]
# Compute by kdlib's FLOPs model (kdlib.compute): a run's training PFLOP (tokens trained x FLOPs per token, the
# teacher's forward included when it ran online), and for a cached run the one-off PFLOP of the cache it read
# (shared by every run that read it: stated once in results.md, never added to a row's train_pflop).
COMPUTE_COLUMNS = ["train_pflop", "cache_pflop"]
RUN_COLUMNS = ["run", "source", "exp", "label", "sweep", "seed", "feature", "divergence", "feature_map", "cosine", "finished",
               "best_val_ppl", "final_val_ppl", "test_ppl", "best_step", "best_epoch", "steps", "tokens",
               "train_wall_s", "tokens_per_s", "teacher_source", "cache_top_k", "teacher", *PROTOCOL_COLUMNS,
               "budget", "dataset", "protocol", *METRIC_COLUMNS, *TEACHER_COLUMNS, *COMPUTE_COLUMNS]
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


def run_label(exp: str, feature: str, teacher_source: str = "online", cache_top_k=None, sweep: str = "") -> str:
    """An experiment's row key: ``kl``; ``layerwise-kl [attn]`` (attention-map features);
    ``kl [temperature=1]`` (a point of a sensitivity sweep, ``sweep`` its values: two points are two
    rows); ``kl [top-32 cache]`` (the teacher's outputs from its top-k cache, a different objective)."""
    name = exp if feature == "hidden" or parse(exp, feature).feature_map is None else f"{exp} [attn]"
    name += f" [{sweep}]" if sweep else ""
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
    train, block = config.get("train") or {}, config["data"]["block_size"]
    per_step = train["batch_size"] * train.get("grad_accum", 1) * block
    if not isinstance(per_step, int) or not 0 < per_step < 2**63:
        raise _Malformed(f"its config's batch_size x grad_accum x block_size is {per_step!r}, not a number of "
                         "tokens per step")
    max_tokens, max_steps = train.get("max_tokens"), train.get("max_steps")
    how = (f"max_tokens {max_tokens:,}" if max_tokens is not None else f"{train.get('epochs')} epochs") \
        + (f", at most {max_steps:,} steps" if max_steps is not None else "")
    if summary.get("budget_tokens") is not None:
        return int(summary["budget_tokens"]), how
    if max_tokens is None:
        return None, how
    steps = max_tokens // per_step if max_steps is None else min(max_tokens // per_step, max_steps)
    if parse(config["exp"], config["loss"]["feature"]).compute_of is not None:  # ce@EXP: EXP's FLOPs (optim.schedule)
        from .compute import equal_compute_steps
        from .config import ExperimentConfig

        steps = equal_compute_steps(ExperimentConfig.from_dict(config), steps)
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
SUMMARY_FIELDS = {"test_ppl": "number", "teacher_test_ppl": "number", "train_wall_s": "number", "tokens_per_s": "number",
                  "budget_tokens": "whole number", "eval_stride": "whole number",
                  "in_training_eval_stride": "whole number", "cache_top_k": "whole number",
                  "teacher_source": "string", "flops_per_token": "number", "cache_build_flops": "number"}
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
    try:
        summary["test_metric_fields"] = metric_fields(summary.get("test_metrics"))
    except _UNREADABLE as e:
        summary["test_metric_fields"] = {}
        return summary, (name, f"unreadable test_metrics in summary.json ({_why(e)}); reported without them")
    return summary, None


def _numbers(values, n: int, what: str, kind: str = "number") -> list:
    """``values`` as a list of ``n`` ``kind``s or None (an empty bucket or bin)."""
    if not isinstance(values, list) or len(values) != n:
        raise _Malformed(f"{what} is {values!r}, not a list of {n}")
    return [None if v is None else _need(v, kind, what) for v in values]


def check_test_metrics(metrics) -> dict:
    """A summary's ``test_metrics`` (``kdlib.scoring.run_metrics``), every field the report reads
    checked; ``_Malformed`` names the first that is not what kdlib writes."""
    if not isinstance(metrics, dict):
        raise _Malformed(f"it is {type(metrics).__name__}, not an object")
    for key in ("block_size", "stride", "ece_bins"):  # the report's protocol line and figure titles
        _need(metrics.get(key), "whole number", key)
    buckets = metrics.get("buckets")  # the boundaries results.md states and the bucket figure labels
    if not isinstance(buckets, dict):
        raise _Malformed(f"its buckets is {buckets!r}, not an object")
    _need(buckets.get("by"), "string", "buckets.by")
    for key in ("types", "min_count", "max_count"):
        _numbers(buckets.get(key), FREQUENCY_BUCKETS, f"buckets.{key}", "whole number")
    _numbers(buckets.get("train_share"), FREQUENCY_BUCKETS, "buckets.train_share")
    for who in ("student", "teacher"):
        part = metrics.get(who)
        if not isinstance(part, dict):
            raise _Malformed(f"its {who} is {part!r}, not an object")
        for key in ("ppl", "ece") + (("agreement", "kl_teacher") if who == "student" else ()):
            _need(part.get(key), "number", f"{who}.{key}")
        _numbers(part.get("bucket_ppl"), FREQUENCY_BUCKETS, f"{who}.bucket_ppl")
        bins = part.get("reliability")
        if not isinstance(bins, dict):
            raise _Malformed(f"{who}.reliability is {bins!r}, not an object")
        _numbers(bins.get("count"), ECE_BINS, f"{who}.reliability.count", "whole number")
        for key in ("confidence", "accuracy"):
            _numbers(bins.get(key), ECE_BINS, f"{who}.reliability.{key}")
    return metrics


def metric_fields(metrics) -> dict:
    """The runs table's metric columns from a summary's ``test_metrics`` ({} when it has none)."""
    if metrics is None:
        return {}
    metrics = check_test_metrics(metrics)
    student, teacher = metrics["student"], metrics["teacher"]
    return {"agreement": student["agreement"], "kl_teacher": student["kl_teacher"], "ece": student["ece"],
            **dict(zip(BUCKET_COLUMNS, student["bucket_ppl"])),
            "teacher_test_ppl": teacher["ppl"], "teacher_ece": teacher["ece"],
            **{f"teacher_{c}": v for c, v in zip(BUCKET_COLUMNS, teacher["bucket_ppl"])}}


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
    sweep = _sweep(config.get("sweep") or {})
    return {"exp": exp, "label": run_label(exp, feature, source, top_k, sweep), "sweep": sweep, "seed": seed,
            "feature": feature,
            **_components(exp, feature), "teacher_source": source, "cache_top_k": top_k,
            "teacher": _teacher(config) if source != "none" else None, "preset": config.get("preset"),
            "block_size": block, "test_stride": test_stride, "val_stride": val_stride,
            "budget_tokens": budget_tokens, "budget": budget, "dataset": _dataset(config["data"]),
            "protocol": _digest({**protocol_key(config), "test_stride": test_stride, "val_stride": val_stride})}


def _sweep(point) -> str:
    """A config's sweep point as the report writes it (``temperature=1, w_div=0.5``), "" for none."""
    if not isinstance(point, dict):
        raise _Malformed(f"its sweep is {point!r}, not an object")
    for key, value in point.items():
        _need(value, "number", f"sweep {key}")
    return point_label(point)


def compute_fields(config: dict, summary: dict, tokens: int) -> dict:
    """A run's ``COMPUTE_COLUMNS`` from its config and the tokens it trained, by kdlib's FLOPs model (older
    summaries have no FLOPs); the summary's FLOPs per token where the config no longer loads. NaN where
    neither says (a cached run whose summary predates ``cache_build_flops``: its cache's cost is unknown)."""
    from .compute import train_flops_per_token
    from .config import ExperimentConfig

    try:
        per_token = train_flops_per_token(ExperimentConfig.from_dict(config))
    except _UNREADABLE:
        per_token = summary.get("flops_per_token")
    cache = summary.get("cache_build_flops")
    return {"train_pflop": math.nan if per_token is None else tokens * per_token / 1e15,
            "cache_pflop": math.nan if cache is None else cache / 1e15}


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
            config = read_json(run / "config.json", "run config")
            fields = _config_fields(config, summary)
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
        for key in ("test_ppl", "train_wall_s", "tokens_per_s", "teacher_test_ppl"):
            row[key] = summary.get(key)
        row.update(compute_fields(config, summary, row["tokens"]))
        row.update(summary.get("test_metric_fields", {}))
        rows.append(row)
        curves[name] = curve
    return _frame(rows), curves, skipped


def read_test_metrics(results_dir, runs: pd.DataFrame) -> dict:
    """{run: its summary's ``test_metrics``} for the kdlib runs of ``runs`` that have readable ones
    (``load_runs`` lists the others as skipped): the reliability bins and the bucket boundaries the
    figures draw."""
    out = {}
    for name in runs.loc[runs["source"] == "kdlib", "run"]:
        path = Path(results_dir) / name / "summary.json"
        try:
            out[name] = check_test_metrics(read_json(path, "summary")["test_metrics"])
        except _UNREADABLE:  # no summary, no test_metrics (an older run), or malformed
            continue
    return out


def _frame(rows: list) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    for col in _INT_COLUMNS:  # whole numbers with gaps: written as integers, not 5.12e+03
        df[col] = pd.to_numeric(df[col]).astype("Int64")
    for col in ("test_ppl", "train_wall_s", "tokens_per_s", *METRIC_COLUMNS, *TEACHER_COLUMNS, *COMPUTE_COLUMNS):
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
                     "sweep": "",
                     "seed": 42, "feature": "attention", **_components(exp, "attention"), "finished": True,
                     "best_val_ppl": ppl.min(), "final_val_ppl": ppl.iloc[-1], "best_step": int(ppl.idxmin()) + 1,
                     "best_epoch": int(ppl.idxmin()) + 1, "steps": len(ppl), "tokens": len(ppl) * STUDY_EPOCH_TOKENS,
                     "teacher_source": source, "teacher": "gpt2" if source != "none" else None,
                     "preset": "original study", "block_size": 128, "val_stride": 128,
                     "budget_tokens": STUDY_EPOCHS * STUDY_EPOCH_TOKENS, "budget": f"{STUDY_EPOCHS} epochs",
                     "dataset": "WikiText-103 (the study's ~1.65M-token training text)",
                     "protocol": "original-study"})
    return _frame(rows), curves
