"""kdlib.results: a results folder -> one row per run and its curve; the original study's runs."""

import json

import pandas as pd
import pytest
from results_helpers import make_run

from kdlib import analysis, results, stats


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
