"""kdlib.plots: the report's figures, their lines and what their axes say."""

import matplotlib
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
