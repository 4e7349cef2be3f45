"""kdlib.stats: means and 95% CIs per experiment, paired effects, the JS early/late finding."""

import math

import matplotlib
import numpy as np
import pytest
from results_helpers import make_run

from kdlib import analysis, plots, results, stats
from kdlib.config import preset
from kdlib.errors import KdlibError


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


def _grid(root, scores: dict, cache=()):
    """Run folders with test perplexity ``scores[exp][seed]``; ``cache``: the experiments trained from the cache."""
    for exp, by_seed in scores.items():
        for seed, test in enumerate(by_seed):
            make_run(root, exp.split("@")[0], seed, [300], test, cache=exp.endswith("@cache"))
    return results.load_runs(root)[0]


def test_significance_is_the_paired_t_test_by_seed_with_its_interval(tmp_path):
    from scipy.stats import t as student_t
    from scipy.stats import ttest_rel

    scores = {"ce": [200.0, 204.0, 199.0, 207.0], "kl": [150.0, 151.0, 153.0, 149.0],
              "js": [170.0, 171.5, 173.0, 172.0], "kl-cos": [150.5, 150.0, 154.0, 149.5]}
    sig = stats.significance(_grid(tmp_path, scores))
    assert set(zip(sig["label"], sig["baseline"])) == {
        ("ce", "kl"), ("js", "kl"), ("kl-cos", "kl"), ("kl", "ce"), ("js", "ce"), ("kl-cos", "ce")}
    for _, row in sig.iterrows():
        exp, base = np.array(scores[row["label"]]), np.array(scores[row["baseline"]])
        ref = ttest_rel(exp, base)
        assert (row["t"], row["p"]) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
        d = exp - base
        half = student_t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        assert (row["mean_diff"], row["ci_low"], row["ci_high"]) == pytest.approx((d.mean(), d.mean() - half,
                                                                                   d.mean() + half))
        assert row["pairs"] == 4 and row["metric"] == "test_ppl" and row["note"] == ""
    # kl-cos vs kl: differences (0.5, -1, 1, 0.5), far from significant; every row vs ce is lower
    verdicts = dict(zip(zip(sig["label"], sig["baseline"]), sig["verdict"]))
    assert verdicts[("kl-cos", "kl")] == "no difference" and verdicts[("js", "kl")] == "higher"
    assert {verdicts[(e, "ce")] for e in ("kl", "js", "kl-cos")} == {"lower"}


def test_holm_against_a_hand_worked_example():
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, running max -> 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # the cap at 1: 0.4 x 3 = 1.2 -> 1, and the running max carries it to the larger p-values
    assert stats.holm([0.4, 0.5, 0.9]) == pytest.approx([1.0, 1.0, 1.0])
    assert stats.holm([0.02]) == pytest.approx([0.02])


def test_significance_corrects_over_each_baselines_family(tmp_path):
    from scipy.stats import ttest_rel

    scores = {"ce": [200.0, 203.0, 201.0], "kl": [150.0, 152.0, 151.5], "js": [180.0, 182.5, 181.0],
              "rkl": [151.0, 153.25, 152.15], "kl-cos": [150.5, 152.5, 151.0]}
    sig = stats.significance(_grid(tmp_path, scores))
    # rkl vs kl: p = 0.031 alone, but second largest of four: 0.031 x 2 > 0.05, no difference after Holm
    rkl = sig[(sig["label"] == "rkl") & (sig["baseline"] == "kl")].iloc[0]
    assert rkl["p"] < 0.05 < rkl["p_holm"] and rkl["verdict"] == "no difference"
    for baseline in ("kl", "ce"):
        family = sig[sig["baseline"] == baseline]
        raw = [ttest_rel(scores[e], scores[baseline]).pvalue for e in family["label"]]
        m, order = len(raw), np.argsort(raw)
        expected, running = [0.0] * m, 0.0
        for i, k in enumerate(order):  # Holm's step-down, written out
            running = max(running, min(1.0, raw[k] * (m - i)))
            expected[k] = running
        assert list(family["p_holm"]) == pytest.approx(expected) and set(family["holm_m"]) == {4}
        for _, row in family.iterrows():
            word = ("lower" if row["mean_diff"] < 0 else "higher") if row["p_holm"] < 0.05 else "no difference"
            assert row["verdict"] == word


def test_with_one_seed_nothing_is_testable_and_no_number_is_printed(tmp_path):
    sig = stats.significance(_grid(tmp_path, {"ce": [200.0], "kl": [150.0], "js": [170.0]}))
    assert len(sig) == 4 and set(sig["verdict"]) == {"not testable"}
    assert set(sig["note"]) == {"1 seed: no test possible"}
    assert sig[["mean_diff", "ci_low", "ci_high", "t", "p", "p_holm"]].isna().all().all()


def test_untestable_pairs_say_why(tmp_path):
    # js's difference to kl is 20 on both seeds; kl-cos shares no seed with kl; js-cos has no test score
    _grid(tmp_path, {"ce": [200.0, 210.0], "kl": [150.0, 160.0], "js": [170.0, 180.0]})
    for seed, test in ((2, 150.0), (3, 151.0)):
        make_run(tmp_path, "kl-cos", seed, [300], test)
    make_run(tmp_path, "js-cos", 0, [300], None, finished=False)
    sig = stats.significance(results.load_runs(tmp_path)[0]).set_index(["label", "baseline"])
    assert sig.loc[("js", "kl"), "note"] == "no variance across seeds"
    assert sig.loc[("kl-cos", "kl"), "note"] == "no common seeds"
    assert sig.loc[("js-cos", "ce"), "note"] == "js-cos has no test_ppl"
    assert set(sig.loc[sig["note"] != "", "verdict"]) == {"not testable"}
    assert sig.loc[sig["note"] != "", ["mean_diff", "t", "p", "p_holm"]].isna().all().all()


def test_a_cached_run_is_tested_against_the_baseline_from_the_same_cache(tmp_path):
    k = preset("smoke").cache.top_k
    scores = {"ce": [200.0, 203.0, 201.0], "kl": [150.0, 152.0, 151.5], "kl@cache": [160.0, 161.0, 163.0],
              "js@cache": [170.0, 172.5, 171.0]}
    sig = stats.significance(_grid(tmp_path, scores))
    against = dict(zip(zip(sig["label"], sig["baseline"]), sig["against"]))
    cached_kl, cached_js = f"kl [top-{k} cache]", f"js [top-{k} cache]"
    assert against[(cached_js, "kl")] == cached_kl
    assert against[(cached_kl, "kl")] == "kl"  # the cached kl against online kl: what the cache costs
    assert against[(cached_js, "ce")] == "ce" and against[(cached_kl, "ce")] == "ce"
    row = sig[(sig["label"] == cached_js) & (sig["baseline"] == "kl")].iloc[0]
    d = np.array(scores["js@cache"]) - np.array(scores["kl@cache"])
    assert row["mean_diff"] == pytest.approx(d.mean())
    # without a cached kl, the cached js is tested against online kl
    alone = stats.significance(_grid(tmp_path / "b", {"kl": [150.0, 152.0], "js@cache": [170.0, 172.5]}))
    assert list(zip(alone["label"], alone["against"])) == [(cached_js, "kl")]


def test_significance_refuses_runs_of_two_protocols_and_unknown_metrics(tmp_path):
    make_run(tmp_path, "kl", 0, [300], 150.0)
    make_run(tmp_path, "ce", 0, [300], 200.0, preset_name="demo")
    runs = results.load_runs(tmp_path)[0]
    with pytest.raises(KdlibError, match="protocols"):
        stats.significance(runs)
    with pytest.raises(KdlibError, match="no column 'bleu'"):
        stats.significance(runs[runs["exp"] == "kl"], metric="bleu")


def test_one_common_seed_of_several_is_said_as_such(tmp_path):
    """Seeds 0, 1 against a baseline's 1, 2: one pair, and the note says it is one common seed, not one seed."""
    for seed, val in ((0, 200.0), (1, 210.0)):
        make_run(tmp_path, "kl", seed, [300, val], val - 5)
    for seed, val in ((1, 190.0), (2, 195.0)):
        make_run(tmp_path, "layerwise-kl", seed, [300, val], val - 5)
    runs, _, _ = results.load_runs(tmp_path)
    sig = stats.significance(runs, baselines=("kl",))
    row = sig.set_index("label").loc["layerwise-kl"]
    assert row["verdict"] == "not testable" and row["note"] == "1 common seed (1): no test possible"
    assert math.isnan(row["mean_diff"])


def test_sweep_points_are_rows_in_the_order_of_their_values(tmp_path):
    """A swept value orders its rows as a number (2 before 10), not as text."""
    import json

    for value in (10.0, 2.0, 0.5):
        folder = make_run(tmp_path, "kl", 0, [300, 200], 150.0 + value)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["loss"]["temperature"], cfg["sweep"] = value, {"loss.temperature": value}
        (folder / "config.json").write_text(json.dumps(cfg))
        folder.rename(tmp_path / f"kl+temperature={value:g}-seed0")
    runs, _, _ = results.load_runs(tmp_path)
    table = stats.experiment_table(runs)
    assert list(table.index) == ["kl [temperature=0.5]", "kl [temperature=2]", "kl [temperature=10]"]
