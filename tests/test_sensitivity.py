"""A sensitivity sweep end to end: `sweep --set` trains a run per point, and the report groups them by
the swept values (``stats.sweep_table``, ``plots.sweep_curves``, the results.md section)."""

import json
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
from results_helpers import make_run
from scipy import stats as scipy_stats

from kdlib import plots, results, stats
from kdlib.cli import main as cli_main
from kdlib.config import ExperimentConfig
from kdlib.config.sweep import apply_point
from kdlib.runs import run_name


def make_point_run(root, exp, seed, point, test=None, val=(300.0, 200.0)):
    """A finished run folder of one sweep point, named as kdlib names it."""
    folder = make_run(root, exp, seed, list(val), test)
    cfg = apply_point(ExperimentConfig.load(folder / "config.json"), point).validate()
    (folder / "config.json").write_text(cfg.to_json())
    return folder.rename(root / run_name(cfg))


def _mean_ci(values):
    """Mean and Student-t 95% half-width, computed here from numpy and scipy."""
    v = np.asarray(values, dtype=float)
    return v.mean(), scipy_stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))


def _product_runs(root):
    """kl over temperature {1, 2} x w_div {0.5, 1} x seeds {0, 1, 2}, test = 100 + 10 T + 20 w + seed^2; and ce."""
    for t in (1.0, 2.0):
        for w in (0.5, 1.0):
            for seed in range(3):
                make_point_run(root, "kl", seed, {"loss.temperature": t, "loss.w_div": w}, 100 + 10 * t + 20 * w + seed**2)
    make_run(root, "ce", 0, [300.0, 250.0], 260.0)


def test_the_sweep_table_groups_by_each_swept_value_and_never_mixes_points(tmp_path):
    _product_runs(tmp_path)
    runs, _, skipped = results.load_runs(tmp_path)
    assert skipped == [] and len(runs) == 13
    assert set(runs.loc[runs["exp"] == "kl", "sweep"]) == {f"temperature={t}, w_div={w}" for t in (1, 2) for w in ("0.5", 1)}
    assert runs.loc[runs["exp"] == "ce", "sweep"].tolist() == [""]
    assert len(stats.protocol_groups(runs)) == 1  # a swept loss value is not another protocol
    table = stats.experiment_table(runs)
    assert sorted(table.index) == ["ce", "kl [temperature=1, w_div=0.5]", "kl [temperature=1, w_div=1]",
                                   "kl [temperature=2, w_div=0.5]", "kl [temperature=2, w_div=1]"]
    assert set(table["seeds"]) == {1, 3}
    sweep = stats.sweep_table(runs)
    assert len(sweep) == 8 and set(sweep["metric"]) == {"test_ppl"}
    for t in (1.0, 2.0):
        for w in (0.5, 1.0):
            mean, ci = _mean_ci([100 + 10 * t + 20 * w + s**2 for s in range(3)])
            w_text, t_text = ("0.5" if w == 0.5 else "1"), str(int(t))
            along_t = sweep[(sweep["key"] == "temperature") & (sweep["experiment"] == f"kl [w_div={w_text}]")
                            & (sweep["value"] == t)].iloc[0]
            along_w = sweep[(sweep["key"] == "w_div") & (sweep["experiment"] == f"kl [temperature={t_text}]")
                            & (sweep["value"] == w)].iloc[0]
            for row in (along_t, along_w):
                assert row["seeds"] == 3 and row["ppl"] == pytest.approx(mean) and row["ci95"] == pytest.approx(ci)


def test_the_sweep_table_takes_validation_scores_without_test_scores_and_a_swept_budget_is_a_protocol(tmp_path):
    for seed, best in ((0, 40.0), (1, 44.0)):
        make_point_run(tmp_path, "kl", seed, {"loss.w_feat": 0.1}, None, val=(90.0, best))
    runs, _, _ = results.load_runs(tmp_path)
    sweep = stats.sweep_table(runs)
    assert sweep[["experiment", "key", "value", "seeds", "metric"]].values.tolist() == [
        ["kl", "w_feat", 0.1, 2, "best_val_ppl"]]
    assert sweep["ppl"].iloc[0] == pytest.approx(42.0)
    assert stats.sweep_table(runs[runs["sweep"] == ""]).empty
    budget = tmp_path / "budget"
    budget.mkdir()
    for b in (8, 16):
        make_point_run(budget, "kl", 0, {"train.batch_size": b}, 50.0)
    assert len(stats.protocol_groups(results.load_runs(budget)[0])) == 2  # tokens per run differ


def test_the_sweep_figure_draws_a_line_per_experiment_with_intervals_and_a_log_axis_over_wide_values(tmp_path):
    product, lr = tmp_path / "product", tmp_path / "lr"
    product.mkdir(), lr.mkdir()
    _product_runs(product)
    for value, test in ((1e-4, 80.0), (1e-3, 60.0), (1e-2, 70.0)):
        make_point_run(lr, "kl", 0, {"train.lr": value}, test)
    sweep = stats.sweep_table(results.load_runs(product)[0])
    figures = plots.sweep_curves(sweep)
    assert sorted(figures) == ["temperature", "w_div"]
    ax = figures["temperature"].axes[0]
    assert ax.get_xscale() == "linear" and ax.get_xlabel() == "temperature"
    assert len(ax.containers) == 2 and all(c.has_yerr for c in ax.containers)  # a line per experiment, CI bars
    heights = sorted(tuple(np.round(np.asarray(c.lines[0].get_ydata(), dtype=float), 6)) for c in ax.containers)
    expected = sorted(tuple(np.round([np.mean([100 + 10 * t + 20 * w + s**2 for s in range(3)]) for t in (1, 2)], 6))
                      for w in (0.5, 1.0))
    assert heights == expected
    lr_figures = plots.sweep_curves(stats.sweep_table(results.load_runs(lr)[0]))
    lr_ax = lr_figures["lr"].axes[0]
    line = lr_ax.containers[0]
    assert lr_ax.get_xscale() == "log" and not line.has_yerr  # one seed: no interval
    assert list(line.lines[0].get_xdata()) == [1e-4, 1e-3, 1e-2] and list(line.lines[0].get_ydata()) == [80, 60, 70]
    assert "1 seed" in lr_ax.get_title()
    matplotlib.pyplot.close("all")


def test_sweep_set_trains_a_run_per_temperature_and_the_report_groups_them(tmp_path, data_dir, capsys):
    runs, figures = tmp_path / "runs", tmp_path / "figures"
    assert cli_main(["sweep", "--preset", "smoke", "--exps", "kl", "--set", "loss.temperature=1,2", "--seeds", "0",
                     "--runs", str(runs), "--data-dir", str(data_dir), "--max-steps", "2"]) == 0
    for t in (1, 2):
        config = json.loads((runs / "smoke" / f"kl+temperature={t}-seed0" / "config.json").read_text())
        assert config["loss"]["temperature"] == t and config["sweep"] == {"loss.temperature": t}
        assert (runs / "smoke" / f"kl+temperature={t}-seed0" / "summary.json").is_file()
    assert cli_main(["report", str(runs), "--figures", str(figures)]) == 0
    capsys.readouterr()
    sweep = pd.read_csv(figures / "sweep.csv")
    assert sweep[["experiment", "key", "value", "seeds"]].values.tolist() == [["kl", "temperature", 1, 1],
                                                                              ["kl", "temperature", 2, 1]]
    tests = [json.loads((runs / "smoke" / f"kl+temperature={t}-seed0" / "summary.json").read_text())["test_ppl"]
             for t in (1, 2)]
    assert sweep["ppl"].tolist() == pytest.approx(tests, rel=1e-5)
    md = (figures / "results.md").read_text()
    assert "## Sensitivity" in md and "### `temperature`" in md
    assert "| kl [temperature=1] |" in md and "| kl [temperature=2] |" in md
    assert (figures / "sweep_temperature.png").stat().st_size > 0 and (figures / "sweep_temperature.pdf").is_file()
