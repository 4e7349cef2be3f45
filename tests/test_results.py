"""kdlib.results: a results folder -> one row per run and its curve; the original study's runs."""

import json
import math

import pandas as pd
import pytest
from helpers import student_flops, teacher_forward_flops
from results_helpers import make_run, metrics_summary

from kdlib import analysis, results, stats
from kdlib.config import preset


# reference/original_study.md, "Its results (best validation perplexity / epoch)".
STUDY_TABLE = {
    "ce": (367.08, 21), "kl": (197.17, 50),
    "layerwise-kl": (203.93, 50), "layerwise-kl-cos": (198.70, 49),
    "layerwise-js": (293.61, 28), "layerwise-js-cos": (276.68, 28),
    "last2last-kl": (201.08, 47), "last2last-kl-cos": (203.59, 50),
    "last2last-js": (291.68, 29), "last2last-js-cos": (264.72, 23),
    "last2all-kl": (204.57, 50), "last2all-kl-cos": (199.98, 50),
    "last2all-js": (272.18, 22), "last2all-js-cos": (269.96, 23),
}


def test_reference_runs_reproduce_the_original_study_table():
    runs, curves = results.reference_runs()
    table = stats.experiment_table(runs)
    assert len(runs) == 14 and len(curves) == 14
    for exp, (best, epoch) in STUDY_TABLE.items():
        key = exp if exp in ("ce", "kl") else f"{exp} [attn]"  # the study's features were attention maps
        assert table.loc[key, "best_val_ppl"] == pytest.approx(best, abs=0.005), exp
        assert table.loc[key, "best_epoch"] == epoch, exp


def test_a_half_written_metrics_line_is_skipped_with_a_warning(tmp_path):
    run = make_run(tmp_path, "kl", 0, [300, 150], None, finished=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 30, "val_pp')
    with pytest.warns(UserWarning, match="line 3 is not a JSON object"):
        m = results.read_metrics(run)
    assert list(m["val_ppl"]) == [300, 150]


def test_budget_of_an_older_config_without_max_tokens(tmp_path):
    run = make_run(tmp_path, "kl", 0, [300, 150], None, finished=False)
    cfg = json.loads((run / "config.json").read_text())
    del cfg["train"]["max_tokens"]
    cfg["train"]["epochs"] = 3
    (run / "config.json").write_text(json.dumps(cfg))
    runs, _, skipped = results.load_runs(tmp_path)
    assert skipped == [] and pd.isna(runs.loc[0, "budget_tokens"]) and runs.loc[0, "budget"].startswith("3 epochs")
    assert "Tokens per run: 3 epochs" in analysis.protocol_statement(runs)


def test_the_nested_layout_runs_preset_run_is_read(tmp_path):
    make_run(tmp_path / "smoke", "ce", 0, [300, 200], 210.0)
    make_run(tmp_path / "smoke", "kl", 0, [300, 150], 160.0)
    make_run(tmp_path, "js", 0, [300, 170], 175.0)  # an older flat run beside them
    (tmp_path / "smoke" / "notes").mkdir()
    (tmp_path / "empty").mkdir()
    runs, curves, skipped = results.load_runs(tmp_path)
    assert sorted(runs["run"]) == ["js-seed0", "smoke/ce-seed0", "smoke/kl-seed0"]
    assert set(curves) == set(runs["run"])
    assert dict(skipped).keys() == {"smoke/notes", "empty"}
    out = analysis.report(tmp_path, tmp_path / "out", log=lambda *_: None)
    assert set(out["table"].index) == {"ce", "kl", "js"} and (tmp_path / "out" / "results.md").is_file()


# --------------------------------------------------------------------------
# the test metrics' columns (summary["test_metrics"], kdlib.scoring)


def test_a_summarys_test_metrics_become_the_runs_metric_columns(tmp_path):
    make_run(tmp_path, "kl", 0, [300, 150], 160.0, test_metrics=metrics_summary(
        agreement=0.62, kl_teacher=0.31, ece=0.04, bucket_ppl=[11.0, 22.0, None, 88.0, 176.0], teacher_ppl=33.0))
    make_run(tmp_path, "ce", 0, [300, 200], 210.0)  # from before test metrics: no columns, no skipped line
    runs, _, skipped = results.load_runs(tmp_path)
    assert skipped == []
    kl, ce = (runs.set_index("exp").loc[e] for e in ("kl", "ce"))
    assert (kl["agreement"], kl["kl_teacher"], kl["ece"], kl["test_ppl"]) == (0.62, 0.31, 0.04, 160.0)
    assert [kl[f"ppl_bucket{k}"] for k in (1, 2, 4, 5)] == [11.0, 22.0, 88.0, 176.0]
    assert math.isnan(kl["ppl_bucket3"])  # a bucket with no scored token
    assert (kl["teacher_test_ppl"], kl["teacher_ece"]) == (33.0, 0.02)
    assert [kl[f"teacher_ppl_bucket{k}"] for k in (1, 2, 4, 5)] == [5.5, 11.0, 44.0, 88.0]
    assert list(results.METRIC_COLUMNS) == ["agreement", "kl_teacher", "ece"] + [f"ppl_bucket{k}" for k in range(1, 6)]
    assert all(math.isnan(ce[c]) for c in results.METRIC_COLUMNS + results.TEACHER_COLUMNS)
    assert ce["test_ppl"] == 210.0
    assert all(runs[c].dtype == float for c in results.METRIC_COLUMNS + results.TEACHER_COLUMNS)
    # The figures' reliability bins and bucket boundaries: only the run that has them.
    got = results.read_test_metrics(tmp_path, runs)
    assert list(got) == ["kl-seed0"] and got["kl-seed0"]["student"]["reliability"]["count"][4] == 100


def _broken(path, value):
    """metrics_summary() with the field at ``path`` (keys) set to ``value``."""
    m = metrics_summary()
    part = m
    for key in path[:-1]:
        part = part[key]
    part[path[-1]] = value
    return m


@pytest.mark.parametrize("test_metrics, why", [
    ("agreement 0.5", "it is str, not an object"),
    ({k: v for k, v in metrics_summary().items() if k != "teacher"}, "its teacher is None, not an object"),
    (_broken(("student", "bucket_ppl"), [10.0, 20.0, 40.0]),
     "student.bucket_ppl is [10.0, 20.0, 40.0], not a list of 5"),
    (_broken(("teacher", "bucket_ppl"), [1.0, 2.0, 3.0, 4.0, "5"]), "teacher.bucket_ppl is '5', not a number"),
    (_broken(("student", "agreement"), float("nan")), "student.agreement is nan, not a finite number"),
    (_broken(("student", "kl_teacher"), "0.3"), "student.kl_teacher is '0.3', not a number"),
    (_broken(("teacher", "ece"), True), "teacher.ece is True, not a number"),
    (_broken(("student", "reliability", "count"), [1.5] * 15), "student.reliability.count is 1.5, not a whole number"),
    ({k: v for k, v in metrics_summary().items() if k != "buckets"}, "its buckets is None, not an object"),
    (_broken(("buckets", "types"), [1, 2]), "buckets.types is [1, 2], not a list of 5"),
    (_broken(("buckets", "min_count"), [900, 300, 100, -30, 0]), "buckets.min_count is -30, out of range"),
    (_broken(("buckets", "train_share"), [0.2] * 4 + [float("inf")]), "buckets.train_share is inf, not a finite number"),
    (_broken(("stride",), None), "stride is None, not a whole number"),
])
def test_malformed_test_metrics_leave_the_run_reported_without_them(tmp_path, test_metrics, why):
    make_run(tmp_path, "kl", 0, [300, 150], 160.0, test_metrics=test_metrics)
    runs, curves, skipped = results.load_runs(tmp_path)
    assert list(runs["run"]) == ["kl-seed0"] and runs.loc[0, "test_ppl"] == 160.0 and list(curves) == ["kl-seed0"]
    assert all(math.isnan(runs.loc[0, c]) for c in results.METRIC_COLUMNS + results.TEACHER_COLUMNS)
    assert skipped == [("kl-seed0", f"unreadable test_metrics in summary.json ({why}); reported without them")]
    assert results.read_test_metrics(tmp_path, runs) == {}


def test_experiment_table_averages_the_metrics_over_seeds_with_their_intervals(tmp_path):
    for seed, (agreement, kl, ece) in enumerate([(0.60, 0.30, 0.05), (0.70, 0.20, 0.02)]):
        make_run(tmp_path, "kl", seed, [300, 150], 160.0 + seed, test_metrics=metrics_summary(
            agreement=agreement, kl_teacher=kl, ece=ece, bucket_ppl=[10.0 + seed, 20.0, 40.0, 80.0, 160.0 + 2 * seed]))
    make_run(tmp_path, "ce", 0, [300, 200], 210.0, test_metrics=metrics_summary(agreement=0.4))
    runs, _, skipped = results.load_runs(tmp_path)
    assert skipped == []
    table = stats.experiment_table(runs)
    kl = table.loc["kl"]
    t = 12.706204736174707  # Student's t, 97.5th percentile, 1 degree of freedom
    for col, (a, b) in (("agreement", (0.60, 0.70)), ("kl_teacher", (0.30, 0.20)), ("ece", (0.05, 0.02))):
        sd = abs(a - b) / math.sqrt(2)  # the sample standard deviation of two values
        assert kl[col] == pytest.approx((a + b) / 2, rel=1e-12)
        assert kl[f"{col}_ci95"] == pytest.approx(t * sd / math.sqrt(2), rel=1e-9)
    assert [kl[f"ppl_bucket{k}"] for k in range(1, 6)] == pytest.approx([10.5, 20.0, 40.0, 80.0, 161.0])
    assert kl["teacher_test_ppl"] == 30.0 and kl["teacher_ppl_bucket5"] == pytest.approx(80.5)
    assert table.loc["ce", "agreement"] == 0.4 and math.isnan(table.loc["ce", "agreement_ci95"])  # one seed


def test_every_run_gets_its_training_pflop_from_its_config_and_the_tokens_it_trained(tmp_path):
    """Summaries before kdlib counted FLOPs have none: train_pflop comes from the config (parameter counts
    here, 6N + 12·L·d·T and 2N + 4·L·d·T), the teacher's forward only where it ran online; a cached run's
    cache_pflop is its summary's one-off build, never in its train_pflop."""
    make_run(tmp_path, "ce", 0, [300, 200], 210.0)
    make_run(tmp_path, "kl", 0, [300, 150, 140], 160.0)
    make_run(tmp_path, "ce@kl", 0, [300, 180], None, finished=False)
    cached = make_run(tmp_path, "kl", 0, [300, 150], 161.0, cache=True)
    summary = json.loads((cached / "summary.json").read_text())
    (cached / "summary.json").write_text(json.dumps({**summary, "cache_build_flops": 3.5e12}))
    runs, _, skipped = results.load_runs(tmp_path)
    assert skipped == []
    cfg = preset("smoke")
    f_ce, f_teacher = student_flops(cfg), teacher_forward_flops(cfg)
    pflop = dict(zip(runs["run"], runs["train_pflop"]))
    assert pflop["ce-seed0"] == pytest.approx(2000 * f_ce / 1e15, rel=1e-9)
    assert pflop["kl-seed0"] == pytest.approx(3000 * (f_ce + f_teacher) / 1e15, rel=1e-9)
    assert pflop["ce@kl-seed0"] == pytest.approx(2000 * f_ce / 1e15, rel=1e-9)
    assert pflop[f"kl-top{cfg.cache.top_k}-seed0"] == pytest.approx(2000 * f_ce / 1e15, rel=1e-9)
    cache = dict(zip(runs["run"], runs["cache_pflop"]))
    assert cache[f"kl-top{cfg.cache.top_k}-seed0"] == pytest.approx(3.5e-3)
    assert all(math.isnan(cache[r]) for r in ("ce-seed0", "kl-seed0", "ce@kl-seed0"))
    # the unfinished ce@kl's budget (no summary): the preset's 20 steps x its FLOPs ratio, whole steps
    budget = dict(zip(runs["run"], runs["budget_tokens"]))
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_size
    assert budget["ce-seed0"] == 20 * per_step
    assert budget["ce@kl-seed0"] == round(20 * (f_ce + f_teacher) / f_ce) * per_step
