import json
import math

import matplotlib
import pandas as pd
import pytest

from kdlib import analysis, plots
from kdlib.cli import main
from kdlib.config import preset
from kdlib.errors import KdlibError

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
T_975_2DF = 4.302652729911275  # Student t quantile, 2 degrees of freedom


def make_run(root, exp, seed, val, test=None, finished=True, wall=10.0, preset_name="smoke", cache=False,
             **train):
    """A run folder as kdlib.train writes it, with validation perplexities ``val`` every 10 steps.

    ``preset_name``: the preset (and so the protocol) of the run; ``cache``: its teacher outputs
    come from the top-k cache (folder ``EXP-topK-seedN``); ``train``: train-config fields to set
    (another budget is another protocol).
    """
    cfg = preset(preset_name, exp)
    cfg.seed = seed
    cfg.train.teacher_source = "cache" if cache else "online"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    folder = root / f"{exp}{f'-top{cfg.cache.top_k}' if cache else ''}-seed{seed}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(cfg.to_json())
    rows = [{"step": 10 * (i + 1), "epoch": i + 1.0, "tokens": 1000 * (i + 1), "loss": 1.0, "val_ppl": v}
            for i, v in enumerate(val)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        block = cfg.data.block_size
        source = "none" if exp == "ce" else "cache" if cache else "online"
        (folder / "summary.json").write_text(json.dumps({
            "test_ppl": test, "train_wall_s": wall, "tokens_per_s": 100.0, "teacher_source": source,
            "cache_top_k": cfg.cache.top_k if cache else None, "eval_block_size": block,
            "eval_stride": block // 2, "in_training_eval_stride": block}))
    return folder


def budget_of(cfg) -> int:
    """Tokens per run of a config with a max_tokens budget: whole steps of it."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_size
    return cfg.train.max_tokens // per_step * per_step


def test_reference_runs_reproduce_the_original_study_table():
    runs, curves = analysis.reference_runs()
    table = analysis.experiment_table(runs)
    assert len(runs) == 14 and len(curves) == 14
    for exp, (best, epoch) in STUDY_TABLE.items():
        key = exp if exp in ("ce", "kl") else f"{exp} [attn]"  # the study's features were attention maps
        assert table.loc[key, "best_val_ppl"] == pytest.approx(best, abs=0.005), exp
        assert table.loc[key, "best_epoch"] == epoch, exp


def test_means_confidence_intervals_and_change_against_no_kd(tmp_path):
    for seed, test in enumerate([100.0, 110.0, 120.0]):
        make_run(tmp_path, "ce", seed, [300, 200], test)
    for seed, test in enumerate([10.0, 12.0, 14.0]):
        make_run(tmp_path, "kl", seed, [50, 40, 45], test)
    runs, curves, skipped = analysis.load_runs(tmp_path)
    assert skipped == [] and len(runs) == 6
    table = analysis.experiment_table(runs)
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
    runs, _, _ = analysis.load_runs(tmp_path)
    paired = analysis.paired_differences(runs)
    row = paired.iloc[0]
    assert (row["feature_map"], row["divergence"], row["pairs"]) == ("layerwise", "js", 2)
    assert row["mean_diff"] == pytest.approx(-1.0)
    assert row["ci95"] == pytest.approx(12.7062047361747 * math.sqrt(32) / math.sqrt(2))  # t(0.975, 1df)


def test_js_early_late_measures_the_rise_after_the_best(tmp_path):
    make_run(tmp_path, "js", 0, [300, 150, 180, 200], 190.0)
    make_run(tmp_path, "kl", 0, [300, 150, 140], 141.0)
    runs, _, _ = analysis.load_runs(tmp_path)
    js = analysis.js_early_late(runs)
    assert list(js["exp"]) == ["js"]
    assert (js.loc[0, "best_step"], js.loc[0, "rise"]) == (20, 50)
    assert js.loc[0, "rise_pct"] == pytest.approx(100 * 50 / 150)


def test_unreadable_runs_are_skipped_with_the_reason_and_the_rest_reported(tmp_path):
    make_run(tmp_path, "ce", 0, [300, 200], 210.0)
    kl = make_run(tmp_path, "kl", 0, [300, 150], None, finished=False)
    with open(kl / "metrics.jsonl", "a") as f:
        f.write('{"step": 30, "val_pp')  # a half-written line of an interrupted run
    (tmp_path / "no-metrics").mkdir()
    (tmp_path / "no-metrics" / "config.json").write_text(preset("smoke", "js").to_json())
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "config.json").write_text("{broken")
    old = make_run(tmp_path, "js", 0, [400], 390.0)
    old_cfg = json.loads((old / "config.json").read_text())
    del old_cfg["cache"]  # a run from an older kdlib, before the cache section existed
    (old / "config.json").write_text(json.dumps(old_cfg))
    lines = []
    with pytest.warns(UserWarning, match="not a JSON object"):  # kl's half-written line
        out = analysis.report(tmp_path, tmp_path / "out", log=lines.append)
    reasons = dict(out["skipped"])
    assert set(reasons) == {"no-metrics", "not-a-run"}
    assert "no evaluation" in reasons["no-metrics"] and "config" in reasons["not-a-run"]
    assert any(line.startswith("skipped no-metrics:") for line in lines)
    table = out["table"]
    assert set(table.index) == {"ce", "kl", "js"}
    assert table.loc["kl", "best_val_ppl"] == 150 and math.isnan(table.loc["kl", "test_ppl"])


def test_report_writes_tables_and_figures(tmp_path):
    results = tmp_path / "runs"
    for seed in (0, 1):
        make_run(results, "ce", seed, [300, 200 + seed], 210.0 + seed)
        make_run(results, "kl", seed, [250, 150 + seed], 160.0 + seed)
        make_run(results, "js", seed, [250, 170, 190 + seed], 185.0 + seed)
        make_run(results, "js-cos", seed, [250, 160, 170 + seed], 175.0 + seed)
    out = analysis.report(results, tmp_path / "fig", reference=True, log=lambda *_: None)
    names = {p.name for p in out["figures"]}
    for stem in ("curves_all", "curves_by_divergence", "curves_by_map", "test_ppl", "cosine_effect",
                 "js_early_late", "cost_vs_ppl", "original_study_curves", "curves_with_study"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names, stem
    assert all(p.stat().st_size > 1000 for p in out["figures"])
    md = (tmp_path / "fig" / "results.md").read_text()
    assert md.startswith("# Results: preset `smoke`") and "\n| exp | seeds |" in md and "| kl | 2 |" in md
    assert pd.read_csv(tmp_path / "fig" / "results.csv", index_col=0).loc["kl", "seeds"] == 2
    assert "| ce | 367.1 | 21 |" in (tmp_path / "fig" / "original_study.md").read_text()


def test_a_figure_for_n_runs_has_n_lines(tmp_path):
    for exp in ("ce", "kl", "js", "last2all-kl"):
        make_run(tmp_path, exp, 0, [300, 200], 210.0)
    runs, curves, _ = analysis.load_runs(tmp_path)
    fig = plots.val_curves(runs, curves)
    assert len(fig.axes[0].lines) == 4
    fig = plots.grouped_curves(runs, curves, "divergence")
    assert sum(len(ax.lines) for ax in fig.axes) == 4
    matplotlib.pyplot.close("all")


def test_report_on_an_empty_or_missing_folder_says_so(tmp_path, capsys):
    with pytest.raises(KdlibError, match="no run with an evaluation"):
        analysis.report(tmp_path, tmp_path / "out", log=lambda *_: None)
    assert main(["report", str(tmp_path / "missing"), "--figures", str(tmp_path / "out")]) == 2
    err = capsys.readouterr()
    assert "error: no run with an evaluation" in err.err and "skipped" in err.out


def test_report_cli_with_the_reference_only(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none"), "--figures", str(tmp_path / "out"), "--reference"]) == 0
    assert (tmp_path / "out" / "original_study.md").is_file()
    assert (tmp_path / "out" / "original_study_curves.png").stat().st_size > 1000


def test_a_half_written_metrics_line_is_skipped_with_a_warning(tmp_path):
    run = make_run(tmp_path, "kl", 0, [300, 150], None, finished=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 30, "val_pp')
    with pytest.warns(UserWarning, match="line 3 is not a JSON object"):
        m = analysis.read_metrics(run)
    assert list(m["val_ppl"]) == [300, 150]


def test_runs_of_two_presets_give_two_reports_never_one_mixed_table(tmp_path):
    results, out_dir = tmp_path / "runs", tmp_path / "out"
    for seed in (0, 1):
        make_run(results / "smoke", "ce", seed, [300, 200], 200.0)
        make_run(results / "smoke", "kl", seed, [300, 100], 100.0 + seed)
    make_run(results / "demo", "ce", 0, [900, 800], 800.0, preset_name="demo")
    make_run(results / "demo", "kl", 0, [900, 400], 400.0, preset_name="demo")
    lines = []
    out = analysis.report(results, out_dir, log=lines.append)
    assert [g["name"] for g in out["groups"]] == ["demo", "smoke"]
    assert out["table"].empty and len(out["runs"]) == 6
    smoke = pd.read_csv(out_dir / "smoke" / "results.csv", index_col=0)
    demo = pd.read_csv(out_dir / "demo" / "results.csv", index_col=0)
    assert (smoke.loc["kl", "seeds"], smoke.loc["kl", "test_ppl"]) == (2, 100.5)
    assert (demo.loc["kl", "seeds"], demo.loc["kl", "test_ppl"]) == (1, 400.0)
    assert set(smoke["preset"]) == {"smoke"} and set(demo["preset"]) == {"demo"}
    assert (out_dir / "smoke" / "curves_all.png").is_file() and (out_dir / "demo" / "test_ppl.png").is_file()
    assert not (out_dir / "results.csv").exists()  # no table over both
    index = (out_dir / "results.md").read_text()
    assert "[smoke/](smoke/results.md)" in index and "[demo/](demo/results.md)" in index
    assert "never averaged together" in index and any("2 protocols" in line for line in lines)
    with pytest.raises(KdlibError, match="2 protocols"):
        analysis.experiment_table(out["runs"])


def test_one_preset_with_two_budgets_is_two_protocols(tmp_path):
    make_run(tmp_path / "runs" / "a", "kl", 0, [300, 100], 100.0)
    make_run(tmp_path / "runs" / "b", "kl", 0, [300, 90], 90.0, max_tokens=2 * preset("smoke").train.max_tokens)
    out = analysis.report(tmp_path / "runs", tmp_path / "out", log=lambda *_: None)
    names = [g["name"] for g in out["groups"]]
    assert len(names) == 2 and all(n.startswith("smoke-") for n in names) and names[0] != names[1]
    assert [g["table"].loc["kl", "seeds"] for g in out["groups"]] == [1, 1]


def test_results_md_and_the_csvs_state_the_protocol(tmp_path):
    cfg = preset("smoke")
    block, budget = cfg.data.block_size, budget_of(cfg)
    for seed in (0, 1):
        make_run(tmp_path / "runs", "ce", seed, [300, 200], 210.0)
        make_run(tmp_path / "runs", "kl", seed, [300, 150], 160.0)
    analysis.report(tmp_path / "runs", tmp_path / "out", log=lambda *_: None)
    md = (tmp_path / "out" / "results.md").read_text()
    head = md[:md.index("| exp |")]
    assert "preset `smoke`" in head and "data: python-docs" in head
    assert f"the test split, sliding window of block {block}, stride {block // 2}" in head
    assert f"the whole validation split, block {block}, stride {block}, during training" in head
    assert f"Tokens per run: {budget:,}" in head
    assert "its outputs: online (2 runs)" in head and "no teacher: 2 runs (ce)" in head
    protocol = {"preset": "smoke", "block_size": block, "test_stride": block // 2, "val_stride": block,
                "budget_tokens": budget}
    for name in ("results.csv", "runs.csv"):
        table = pd.read_csv(tmp_path / "out" / name)
        for col, value in protocol.items():
            assert list(table[col].unique()) == [value], (name, col)


def test_budget_of_an_older_config_without_max_tokens(tmp_path):
    run = make_run(tmp_path, "kl", 0, [300, 150], None, finished=False)
    cfg = json.loads((run / "config.json").read_text())
    del cfg["train"]["max_tokens"]
    cfg["train"]["epochs"] = 3
    (run / "config.json").write_text(json.dumps(cfg))
    runs, _, skipped = analysis.load_runs(tmp_path)
    assert skipped == [] and pd.isna(runs.loc[0, "budget_tokens"]) and runs.loc[0, "budget"].startswith("3 epochs")
    assert "Tokens per run: 3 epochs" in analysis.protocol_statement(runs)


def test_the_change_against_no_kd_never_takes_validation_scores(tmp_path):
    make_run(tmp_path, "ce", 0, [300, 200], 210.0)
    make_run(tmp_path, "kl", 0, [300, 150], None, finished=False)  # no test score yet
    make_run(tmp_path, "kl-cos", 0, [300, 140], 150.0)
    table = analysis.experiment_table(analysis.load_runs(tmp_path)[0])
    assert math.isnan(table.loc["kl", "vs_no_kd_pct"])
    assert table.loc["kl", "vs_no_kd_val_pct"] == pytest.approx(100 * (150 / 200 - 1))
    assert table.loc["kl-cos", "vs_no_kd_pct"] == pytest.approx(100 * (150 / 210 - 1))
    runs, _, _ = analysis.load_runs(tmp_path)
    assert analysis.paired_differences(runs).empty  # kl has no test score: no pair, none filled in
    paired = analysis.paired_differences(runs, "best_val_ppl")
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
    table = analysis.experiment_table(analysis.load_runs(tmp_path)[0])
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
    runs, curves, _ = analysis.load_runs(tmp_path)
    assert dict(zip(runs["run"], runs["label"]))[unfinished.name] == f"js [top-{k} cache]"
    table = analysis.experiment_table(runs)
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


def test_the_nested_layout_runs_preset_run_is_read(tmp_path):
    make_run(tmp_path / "smoke", "ce", 0, [300, 200], 210.0)
    make_run(tmp_path / "smoke", "kl", 0, [300, 150], 160.0)
    make_run(tmp_path, "js", 0, [300, 170], 175.0)  # an older flat run beside them
    (tmp_path / "smoke" / "notes").mkdir()
    (tmp_path / "empty").mkdir()
    runs, curves, skipped = analysis.load_runs(tmp_path)
    assert sorted(runs["run"]) == ["js-seed0", "smoke/ce-seed0", "smoke/kl-seed0"]
    assert set(curves) == set(runs["run"])
    assert dict(skipped).keys() == {"smoke/notes", "empty"}
    out = analysis.report(tmp_path, tmp_path / "out", log=lambda *_: None)
    assert set(out["table"].index) == {"ce", "kl", "js"} and (tmp_path / "out" / "results.md").is_file()


def test_curves_of_runs_with_one_evaluation_show_their_points(tmp_path):
    for exp in ("ce", "kl"):
        make_run(tmp_path, exp, 0, [200], 210.0)
    runs, curves, _ = analysis.load_runs(tmp_path)
    for fig in (plots.val_curves(runs, curves), plots.grouped_curves(runs, curves, "divergence")):
        lines = [line for ax in fig.axes for line in ax.lines]
        assert len(lines) == 2
        assert all(len(line.get_xdata()) == 1 and line.get_marker() not in (None, "", " ", "None") for line in lines)
    matplotlib.pyplot.close("all")


def test_axes_say_which_split_and_protocol_they_plot(tmp_path):
    make_run(tmp_path, "ce", 0, [300, 200], 210.0)
    make_run(tmp_path, "kl", 0, [300, 150], 160.0)
    runs, curves, _ = analysis.load_runs(tmp_path)
    block, test_stride, val_stride = (int(runs.loc[0, k]) for k in ("block_size", "test_stride", "val_stride"))
    table = analysis.experiment_table(runs)
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
