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
