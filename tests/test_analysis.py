"""kdlib.analysis: the report, one per protocol, each opened by its protocol."""

import json
import math

import pandas as pd
import pytest
from helpers import student_flops, teacher_forward_flops
from results_helpers import budget_of, make_run

from kdlib import analysis, stats
from kdlib.cli import main
from kdlib.config import preset
from kdlib.errors import KdlibError
from kdlib.results import load_runs


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
        stats.experiment_table(out["runs"])


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


def test_results_md_marks_the_rows_that_differ_and_says_when_no_test_is_possible(tmp_path):
    scores = {"ce": [200.0, 204.0, 199.0], "kl": [150.0, 151.0, 153.0], "kl-cos": [150.5, 150.0, 154.0]}
    for exp, by_seed in scores.items():
        for seed, test in enumerate(by_seed):
            make_run(tmp_path / "runs", exp, seed, [300], test)
    before = list(stats.experiment_table(load_runs(tmp_path / "runs")[0]).columns)
    out = analysis.report(tmp_path / "runs", tmp_path / "out", log=lambda *_: None)
    table = pd.read_csv(tmp_path / "out" / "results.csv", index_col=0)
    assert list(table.columns) == before + ["vs_kl", "vs_ce"]  # results.csv keeps its columns, new ones at the end
    # kl-cos - kl per seed: (0.5, -1, 1): no difference; both KD rows clearly below ce, ce above kl
    assert table[["vs_kl", "vs_ce"]].to_dict("index") == {
        "ce": {"vs_kl": "higher", "vs_ce": "-"}, "kl": {"vs_kl": "-", "vs_ce": "lower"},
        "kl-cos": {"vs_kl": "no difference", "vs_ce": "lower"}}
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## Which rows differ" in md and "Holm-corrected over each baseline's family" in md
    assert "### Against `kl`" in md and "| kl-cos | kl | 3 | 0.1667 |" in md
    written = pd.read_csv(tmp_path / "out" / "significance.csv")
    assert len(written) == 4 and list(written["verdict"]) == list(out["groups"][0]["significance"]["verdict"])
    assert {"significance.png", "significance.pdf"} <= {p.name for p in out["figures"]}

    for exp in ("ce", "kl", "js"):  # one seed each, as the demo trains
        make_run(tmp_path / "one", exp, 0, [300], 150.0)
    sig = stats.significance(load_runs(tmp_path / "one")[0])
    md = analysis.significance_section(sig)
    assert "No test is possible with one seed" in md and "### Against" not in md
    assert set(analysis.significance_marks(sig, ["ce", "kl", "js"]).stack()) == {"-"}


def test_a_smoke_sweep_reports_fidelity_calibration_buckets_and_which_rows_differ(smoke_data, tmp_path, capsys):
    """The issue's end-to-end check: ce, kl and a feature experiment over two seeds, trained, then one
    run's metrics removed (a run from before them) and put back by `eval --metrics`, then the report:
    the metric columns, the teacher's row, the significance marks and the four figures."""
    import shutil

    import kdlib.results
    from helpers import run

    data, runs = shutil.copytree(smoke_data[0], tmp_path / "data"), tmp_path / "runs" / "smoke"
    for exp in ("ce", "kl", "layerwise-kl"):
        for seed in (0, 1):
            cfg = preset("smoke", exp)
            cfg.seed, cfg.train.max_steps = seed, 3
            run(cfg.validate(), runs / f"{exp}-seed{seed}", data)
    old = runs / "kl-seed1" / "summary.json"
    measured = json.loads(old.read_text())
    old.write_text(json.dumps({k: v for k, v in measured.items() if k != "test_metrics"}))

    before, _, _ = load_runs(tmp_path / "runs")  # the report's section, without drawing its figures
    section = analysis.metrics_section(stats.experiment_table(before), before,
                                       kdlib.results.read_test_metrics(tmp_path / "runs", before))
    assert "No test metrics in 1 finished run (smoke/kl-seed1)" in section
    assert math.isnan(before.set_index("run").loc["smoke/kl-seed1", "agreement"])

    assert main(["eval", str(runs / "kl-seed1"), "--metrics", "--data-dir", str(data)]) == 0
    assert "top-1 agreement with the teacher" in capsys.readouterr().out
    again = json.loads(old.read_text())["test_metrics"]
    assert again["student"]["agreement"] == pytest.approx(measured["test_metrics"]["student"]["agreement"])
    assert again["student"]["bucket_ppl"] == pytest.approx(measured["test_metrics"]["student"]["bucket_ppl"])

    figures = tmp_path / "report"
    out = analysis.report(tmp_path / "runs", figures, log=lambda _: None)
    table = pd.read_csv(figures / "results.csv", index_col="exp")
    for col in ("agreement", "agreement_ci95", "kl_teacher", "ece", *(f"ppl_bucket{k}" for k in range(1, 6)),
                "teacher_ece", "vs_kl", "vs_ce"):
        assert col in table, col
    assert table[["agreement", "kl_teacher", "ece", "ppl_bucket1"]].notna().all().all()
    assert set(table["vs_ce"].dropna()) <= {"lower", "higher", "no difference", "-"}
    assert table.loc["ce", "vs_ce"] == "-" and table.loc["kl", "vs_kl"] == "-"
    sig = pd.read_csv(figures / "significance.csv")
    assert set(sig["pairs"]) == {2} and sig["p_holm"].notna().all()
    md = (figures / "results.md").read_text()
    assert "| teacher | 1 | - | 0 |" in md and "bucket 5:" in md and "### Against `kl`" in md
    assert "No test metrics in" not in md
    for name in ("fidelity_vs_ppl", "reliability", "bucket_change", "significance"):
        assert (figures / f"{name}.png").stat().st_size > 0 and (figures / f"{name}.pdf").stat().st_size > 0
    assert out["groups"][0]["sections"].startswith("## Fidelity, calibration")


def test_without_a_ce_run_the_metrics_section_says_why_there_is_no_bucket_figure(tmp_path):
    from results_helpers import metrics_summary

    make_run(tmp_path / "runs", "kl", 0, [300, 200], 190.0, test_metrics=metrics_summary())
    out = analysis.report(tmp_path / "runs", tmp_path / "report", log=lambda _: None)
    assert "No `ce` run with test metrics" in (tmp_path / "report" / "results.md").read_text()
    assert (tmp_path / "report" / "fidelity_vs_ppl.png").is_file()
    assert not (tmp_path / "report" / "bucket_change.png").exists() and out["figures"]


def test_results_md_states_the_compute_of_every_row_and_the_cache_once(tmp_path):
    """ce@kl sits right after ce; each row's train_pflop is its runs' mean; the top-k cache's build is one
    line, shared by its runs and in none of their rows."""
    cfg = preset("smoke")
    for seed in (0, 1):
        make_run(tmp_path, "kl", seed, [250, 150 + seed], 160.0 + seed)
        make_run(tmp_path, "ce@kl", seed, [300, 180, 170 + seed], 175.0 + seed)
        make_run(tmp_path, "ce", seed, [300, 200 + seed], 210.0 + seed)
        cached = make_run(tmp_path, "kl", seed, [250, 150 + seed], 161.0 + seed, cache=True)
        summary = json.loads((cached / "summary.json").read_text())
        (cached / "summary.json").write_text(json.dumps({**summary, "cache_build_flops": 4.25e15}))
    runs, _, _ = load_runs(tmp_path)
    table = stats.experiment_table(runs)
    cached_label = f"kl [top-{cfg.cache.top_k} cache]"
    assert list(table.index) == ["ce", "ce@kl", "kl", cached_label]
    f_ce, f_teacher = student_flops(cfg), teacher_forward_flops(cfg)
    expected = {"ce": 2000 * f_ce, "ce@kl": 3000 * f_ce, "kl": 2000 * (f_ce + f_teacher), cached_label: 2000 * f_ce}
    for label, value in expected.items():
        assert table.loc[label, "train_pflop"] == pytest.approx(value / 1e15, rel=1e-9), label
    statement = analysis.protocol_statement(runs)
    assert statement.count("4.25 PFLOP") == 1 and "4.25 PFLOP, shared by its 2 runs, counted once" in statement
    assert "`ce@kl` is the no-KD student trained for the FLOPs of `kl`" in statement
    assert statement.count("- Compute (`train_pflop`") == 1
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_size
    assert f"- Tokens per run: {20 * per_step:,} (the budget); `ce@kl`: " \
           f"{round(20 * (f_ce + f_teacher) / f_ce) * per_step:,} (kl's FLOPs); trained" in statement
