"""kdlib.stats: means and 95% CIs per experiment, paired effects, the JS early/late finding."""

import math

import matplotlib
import pytest
from results_helpers import make_run

from kdlib import analysis, plots, results, stats
from kdlib.config import preset


T_975_2DF = 4.302652729911275  # Student t quantile, 2 degrees of freedom


def test_means_confidence_intervals_and_change_against_no_kd(tmp_path):
    for seed, test in enumerate([100.0, 110.0, 120.0]):
        make_run(tmp_path, "ce", seed, [300, 200], test)
    for seed, test in enumerate([10.0, 12.0, 14.0]):
        make_run(tmp_path, "kl", seed, [50, 40, 45], test)
    runs, curves, skipped = results.load_runs(tmp_path)
    assert skipped == [] and len(runs) == 6
    table = stats.experiment_table(runs)
    assert table.loc["kl", "test_ppl"] == pytest.approx(12.0)
    assert table.loc["kl", "test_ci95"] == pytest.approx(T_975_2DF * 2.0 / math.sqrt(3))
    assert table.loc["ce", "test_ci95"] == pytest.approx(T_975_2DF * 10.0 / math.sqrt(3))
    assert table.loc["kl", "vs_no_kd_pct"] == pytest.approx(100 * (12.0 / 110.0 - 1))
    assert table.loc["kl", "best_val_ppl"] == 40 and table.loc["kl", "best_step"] == 20
    assert table.loc["kl", "final_val_ppl"] == 45
    assert list(table.index) == ["ce", "kl"]


def test_paired_differences_pair_runs_by_seed(tmp_path):
    # with cos minus without, per seed: (20-25, 33-30) = (-5, +3); seed 2 has no pair and is left out.
    for seed, test in [(0, 25.0), (1, 30.0), (2, 99.0)]:
        make_run(tmp_path, "layerwise-js", seed, [50], test)
    for seed, test in [(0, 20.0), (1, 33.0)]:
        make_run(tmp_path, "layerwise-js-cos", seed, [50], test)
    runs, _, _ = results.load_runs(tmp_path)
    paired = stats.paired_differences(runs)
    row = paired.iloc[0]
    assert (row["feature_map"], row["divergence"], row["pairs"]) == ("layerwise", "js", 2)
    assert row["mean_diff"] == pytest.approx(-1.0)
    assert row["ci95"] == pytest.approx(12.7062047361747 * math.sqrt(32) / math.sqrt(2))  # t(0.975, 1df)


def test_js_early_late_measures_the_rise_after_the_best(tmp_path):
    make_run(tmp_path, "js", 0, [300, 150, 180, 200], 190.0)
    make_run(tmp_path, "kl", 0, [300, 150, 140], 141.0)
    runs, _, _ = results.load_runs(tmp_path)
    js = stats.js_early_late(runs)
    assert list(js["exp"]) == ["js"]
    assert (js.loc[0, "best_step"], js.loc[0, "rise"]) == (20, 50)
    assert js.loc[0, "rise_pct"] == pytest.approx(100 * 50 / 150)


def test_the_change_against_no_kd_never_takes_validation_scores(tmp_path):
    make_run(tmp_path, "ce", 0, [300, 200], 210.0)
    make_run(tmp_path, "kl", 0, [300, 150], None, finished=False)  # no test score yet
    make_run(tmp_path, "kl-cos", 0, [300, 140], 150.0)
    table = stats.experiment_table(results.load_runs(tmp_path)[0])
    assert math.isnan(table.loc["kl", "vs_no_kd_pct"])
    assert table.loc["kl", "vs_no_kd_val_pct"] == pytest.approx(100 * (150 / 200 - 1))
    assert table.loc["kl-cos", "vs_no_kd_pct"] == pytest.approx(100 * (150 / 210 - 1))
    runs, _, _ = results.load_runs(tmp_path)
    assert stats.paired_differences(runs).empty  # kl has no test score: no pair, none filled in
    paired = stats.paired_differences(runs, "best_val_ppl")
    assert (paired.loc[0, "mean_diff"], paired.loc[0, "metric"]) == (-10, "best_val_ppl")
    fig = plots.ppl_bars(table)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "test perplexity"
    heights = [b.get_height() for b in ax.patches]
    assert heights[0] == 210 and math.isnan(heights[1]) and heights[2] == 150
    matplotlib.pyplot.close("all")


def test_without_test_scores_the_baseline_change_is_empty_and_the_bars_say_validation(tmp_path):
    make_run(tmp_path, "ce", 0, [300, 200], None, finished=False)
    make_run(tmp_path, "kl", 0, [300, 150], 160.0)
    table = stats.experiment_table(results.load_runs(tmp_path)[0])
    assert math.isnan(table.loc["kl", "vs_no_kd_pct"]) and table.loc["kl", "vs_no_kd_val_pct"] == -25
    make_run(tmp_path / "val", "ce", 0, [300, 200], None, finished=False)
    make_run(tmp_path / "val", "kl", 0, [300, 150], None, finished=False)
    out = analysis.report(tmp_path / "val", tmp_path / "out", log=lambda *_: None)
    assert {"best_val_ppl.png", "curves_all.png"} <= {p.name for p in out["figures"]}
    assert "test_ppl.png" not in {p.name for p in out["figures"]}
    ax = plots.ppl_bars(out["table"]).axes[0]
    assert "validation" in ax.get_ylabel() and [b.get_height() for b in ax.patches] == [200, 150]
    matplotlib.pyplot.close("all")


def test_a_cached_kl_run_is_its_own_row_never_averaged_with_online_kl(tmp_path):
    k = preset("smoke").cache.top_k
    make_run(tmp_path, "ce", 0, [300, 200], 200.0)
    make_run(tmp_path, "kl", 0, [300, 150], 150.0)
    make_run(tmp_path, "kl", 0, [300, 180], 180.0, cache=True)
    unfinished = make_run(tmp_path, "js", 0, [300, 190], None, finished=False, cache=True)  # label from config
    runs, curves, _ = results.load_runs(tmp_path)
    assert dict(zip(runs["run"], runs["label"]))[unfinished.name] == f"js [top-{k} cache]"
    table = stats.experiment_table(runs)
    assert list(table.index) == ["ce", "kl", f"kl [top-{k} cache]", f"js [top-{k} cache]"]
    assert table.loc["kl", "test_ppl"] == 150 and table.loc[f"kl [top-{k} cache]", "test_ppl"] == 180
    assert table.loc[f"kl [top-{k} cache]", "vs_no_kd_pct"] == pytest.approx(-10)
    labels = [t.get_text() for t in plots.val_curves(runs, curves).axes[0].get_legend().get_texts()]
    assert f"kl [top-{k} cache] s0" in labels and "kl s0" in labels
    matplotlib.pyplot.close("all")
    out = analysis.report(tmp_path, tmp_path / "out", log=lambda *_: None)
    assert len(out["groups"]) == 1  # the teacher source is a row of the table, not a protocol
    md = (tmp_path / "out" / "results.md").read_text()
    assert f"| kl [top-{k} cache] | 1 |" in md and f"top-{k} cache (2 runs)" in md
