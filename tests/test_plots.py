"""kdlib.plots: the report's figures, their lines and what their axes say."""

import matplotlib
import numpy as np
import pandas as pd
from results_helpers import make_run

from kdlib import plots, results, stats


def test_a_figure_for_n_runs_has_n_lines(tmp_path):
    for exp in ("ce", "kl", "js", "last2all-kl"):
        make_run(tmp_path, exp, 0, [300, 200], 210.0)
    runs, curves, _ = results.load_runs(tmp_path)
    fig = plots.val_curves(runs, curves)
    assert len(fig.axes[0].lines) == 4
    fig = plots.grouped_curves(runs, curves, "divergence")
    assert sum(len(ax.lines) for ax in fig.axes) == 4
    matplotlib.pyplot.close("all")


def test_curves_of_runs_with_one_evaluation_show_their_points(tmp_path):
    for exp in ("ce", "kl"):
        make_run(tmp_path, exp, 0, [200], 210.0)
    runs, curves, _ = results.load_runs(tmp_path)
    for fig in (plots.val_curves(runs, curves), plots.grouped_curves(runs, curves, "divergence")):
        lines = [line for ax in fig.axes for line in ax.lines]
        assert len(lines) == 2
        assert all(len(line.get_xdata()) == 1 and line.get_marker() not in (None, "", " ", "None") for line in lines)
    matplotlib.pyplot.close("all")


def test_axes_say_which_split_and_protocol_they_plot(tmp_path):
    make_run(tmp_path, "ce", 0, [300, 200], 210.0)
    make_run(tmp_path, "kl", 0, [300, 150], 160.0)
    runs, curves, _ = results.load_runs(tmp_path)
    block, test_stride, val_stride = (int(runs.loc[0, k]) for k in ("block_size", "test_stride", "val_stride"))
    table = stats.experiment_table(runs)
    assert plots.ppl_bars(table, runs=runs).axes[0].get_ylabel() == \
        f"test perplexity (block {block}, stride {test_stride})"
    assert plots.cost_vs_ppl(table, runs=runs).axes[0].get_ylabel().startswith("test perplexity (block")
    assert plots.val_curves(runs, curves).axes[0].get_ylabel() == \
        f"validation perplexity (block {block}, stride {val_stride})"
    no_test = table.assign(test_ppl=float("nan"))
    label = plots.ppl_bars(no_test, runs=runs).axes[0].get_ylabel()
    assert label.startswith(f"best validation perplexity (block {block}, stride {val_stride})") and "no test" in label
    # Runs of two protocols on one axis: no protocol is claimed.
    mixed = pd.concat([runs, runs.assign(block_size=block * 2)])
    assert plots.eval_protocol(mixed, "test") == ""
    matplotlib.pyplot.close("all")


def test_the_significance_figure_shows_each_difference_its_interval_and_holm_p(tmp_path):
    from scipy.stats import t as student_t
    from scipy.stats import ttest_rel

    ce, kl = np.array([200.0, 204.0, 199.0]), np.array([150.0, 151.0, 153.0])
    for seed in range(3):
        make_run(tmp_path, "ce", seed, [300], ce[seed])
        make_run(tmp_path, "kl", seed, [300], kl[seed])
    fig = plots.significance_table(stats.significance(results.load_runs(tmp_path)[0]))
    cells = fig.axes[0].tables[0].get_celld()
    text = {(r, c): cell.get_text().get_text() for (r, c), cell in cells.items()}
    rows = {text[(r, 0)]: r for (r, c) in text if c == 0}
    d = kl - ce  # kl vs ce; ce vs kl is its negative. Each family has one test: Holm leaves p as it is
    half = student_t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    p = ttest_rel(kl, ce).pvalue
    assert text[(rows["kl"], 3)] == f"{d.mean():+.3g} [{d.mean() - half:+.3g}, {d.mean() + half:+.3g}]"
    assert text[(rows["ce"], 1)] == f"{-d.mean():+.3g} [{-d.mean() - half:+.3g}, {-d.mean() + half:+.3g}]"
    assert text[(rows["kl"], 4)] == text[(rows["ce"], 2)] == f"{p:.2g}"
    assert text[(rows["kl"], 1)] == text[(rows["ce"], 3)] == "baseline"
    colour = {k: matplotlib.colors.to_hex(cell.get_facecolor()) for k, cell in cells.items()}
    assert colour[(rows["kl"], 3)] == plots.SHADE["lower"] and colour[(rows["ce"], 1)] == plots.SHADE["higher"]
    assert colour[(rows["kl"], 1)] == "#ffffff"
    caption = " ".join(t.get_text() for t in fig.axes[0].texts).replace("\n", " ")
    assert all(word in caption for word in ("Paired t-test", "Holm", "alpha 0.05", "m = 1 against kl"))
    matplotlib.pyplot.close("all")


def test_the_significance_figure_with_one_seed_says_no_test_is_possible(tmp_path):
    for exp in ("ce", "kl", "js"):
        make_run(tmp_path, exp, 0, [300], 150.0)
    fig = plots.significance_table(stats.significance(results.load_runs(tmp_path)[0]))
    assert len(fig.axes[0].tables) == 0
    said = " ".join(t.get_text() for t in fig.axes[0].texts).replace("\n", " ")
    assert "No test is possible with one seed" in said and "needs at least 2" in said
    matplotlib.pyplot.close("all")


def _metric_runs(tmp_path):
    """ce and kl over seeds 0 and 1, each with test metrics (results_helpers.metrics_summary)."""
    from results_helpers import metrics_summary

    values = {("ce", 0): (0.40, 0.60, (10, 20, 40, 80, 160)), ("ce", 1): (0.42, 0.58, (12, 22, 44, 88, 176)),
              ("kl", 0): (0.50, 0.40, (9, 18, 30, 60, 100)), ("kl", 1): (0.52, 0.38, (11, 20, 34, 64, 120))}
    for (exp, seed), (agreement, kl, buckets) in values.items():
        make_run(tmp_path, exp, seed, [300, 200], 150.0 + seed + (exp == "ce") * 20,
                 test_metrics=metrics_summary(agreement=agreement, kl_teacher=kl, bucket_ppl=buckets))
    runs, _, _ = results.load_runs(tmp_path)
    return runs, values


def test_the_fidelity_figure_has_a_point_per_run_at_its_numbers_and_the_teachers_line(tmp_path):
    runs, values = _metric_runs(tmp_path)
    fig = plots.fidelity_vs_ppl(runs)
    agreement_ax, kl_ax = fig.axes[:2]
    points = {tuple(p) for c in agreement_ax.collections for p in c.get_offsets().tolist()}
    expected = {(a, 150.0 + s + (e == "ce") * 20) for (e, s), (a, _, _) in values.items()}
    assert points == expected
    kl_points = {tuple(p) for c in kl_ax.collections for p in c.get_offsets().tolist()}
    assert {x for x, _ in kl_points} == {k for _, k, _ in values.values()}
    teacher = [line for line in agreement_ax.lines if line.get_label().startswith("teacher")]
    assert len(teacher) == 1 and teacher[0].get_ydata()[0] == 30.0  # metrics_summary's teacher ppl
    matplotlib.pyplot.close("all")


def test_the_bucket_figure_draws_each_experiments_change_against_ce_per_bucket(tmp_path):
    runs, values = _metric_runs(tmp_path)
    table = stats.experiment_table(runs)
    fig = plots.bucket_change(table, {"min_count": [900, 300, 100, 30, 0], "max_count": [900, 400, 200, 90, 29]})
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].lines}
    ce = np.mean([values[("ce", 0)][2], values[("ce", 1)][2]], axis=0)
    kl = np.mean([values[("kl", 0)][2], values[("kl", 1)][2]], axis=0)
    assert np.allclose(lines["kl"], 100 * (kl / ce - 1))
    assert np.allclose(lines["teacher"], 100 * ((kl + ce) / 4 / ce - 1))  # the teacher's buckets: half each run's
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks[0] == "1\n900" and ticks[4] == "5\n0-29"
    matplotlib.pyplot.close("all")


def test_the_reliability_diagram_pools_seeds_by_tokens_and_leaves_out_thin_bins(tmp_path):
    runs, _ = _metric_runs(tmp_path)
    bins = {r: results.read_test_metrics(tmp_path, runs)[r] for r in runs["run"]}
    first, second = (bins[r]["student"]["reliability"] for r in ("kl-seed0", "kl-seed1"))
    first.update(count=[10] + first["count"][1:], confidence=[0.05] + first["confidence"][1:],
                 accuracy=[0.5] + first["accuracy"][1:])  # a bin of 10 tokens: under MIN_BIN_TOKENS
    second.update(count=second["count"][:4] + [300] + second["count"][5:],
                  accuracy=second["accuracy"][:4] + [0.1] + second["accuracy"][5:])
    fig = plots.reliability_diagram(runs, bins)
    kl = next(line for line in fig.axes[0].lines if line.get_label().startswith("kl "))
    # bin 5: 100 tokens at accuracy 0.25 (ece 0.05 below 0.3) and 300 at 0.1, pooled by count
    assert kl.get_xdata().tolist() == [0.3] and np.allclose(kl.get_ydata(), [(100 * 0.25 + 300 * 0.1) / 400])
    assert any(line.get_label().startswith("teacher (ECE 0.020)") for line in fig.axes[0].lines)
    matplotlib.pyplot.close("all")


def test_the_cost_figure_plots_each_rows_training_pflop_with_ce_at_exp_as_a_baseline(tmp_path):
    for exp, test in (("ce", 210.0), ("ce@kl", 190.0), ("kl", 160.0), ("js", 175.0)):
        make_run(tmp_path, exp, 0, [300, test + 5], test)
    runs, _, _ = results.load_runs(tmp_path)
    table = stats.experiment_table(runs)
    fig = plots.cost_vs_ppl(table, runs=runs)
    points = fig.axes[1].collections[0]
    xy = points.get_offsets()
    assert [tuple(p) for p in np.asarray(xy)] == list(zip(table["train_pflop"], table["test_ppl"]))
    grey = matplotlib.colors.to_rgba("0.5")
    colours = [tuple(c) for c in points.get_facecolors()]
    assert [c == grey for c in colours] == [e in ("ce", "ce@kl", "kl") for e in table.index]
    assert "PFLOP" in fig.axes[1].get_xlabel()
    matplotlib.pyplot.close("all")
