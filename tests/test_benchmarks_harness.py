"""benchmarks/bench.py, report.py, divergence.py, prep.py: the comparison's harness and command, the
merge of separate runs, the sweep's hours at the measured speeds, the divergences alone and the
tokenization speed."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed with kdlib: this checkout's
    sys.path.insert(0, str(ROOT))

from benchmarks import bench as harness  # noqa: E402
from benchmarks.divergence import divergence_bench  # noqa: E402
from benchmarks.prep import prep_bench, prep_text  # noqa: E402
from benchmarks.report import GRID_PRESET, grid_estimate  # noqa: E402
from kdlib import bench  # noqa: E402
from kdlib.cli import main as kdlib_main  # noqa: E402
from kdlib.config import preset  # noqa: E402
from kdlib.grid import EXPERIMENTS, parse  # noqa: E402


def test_grid_estimate_uses_measured_speeds_and_the_cache_where_it_serves():
    results = []
    for exp in EXPERIMENTS:
        results.append(bench.Result(exp, "reference", 1000.0, 1, 1, 1))
        results.append(bench.Result(exp, "kdlib", 10000.0, 1, 1, 1))
        if parse(exp).output_only:
            results.append(bench.Result(exp, "cached", 20000.0, 1, 1, 1))
    hours = grid_estimate(results)
    # The colab-a100 sweep, as `kdlib plan` counts it: 14 experiments x 3 seeds of 100M tokens, plus
    # its evaluations at the same achieved FLOP/s (a few percent on top).
    train_hours = 42 * preset(GRID_PRESET).train.max_tokens / 3600
    assert train_hours / 1000 < hours["reference"] < 1.1 * train_hours / 1000
    assert train_hours / 10000 < hours["kdlib"] < 1.1 * train_hours / 10000
    assert hours["kdlib"] == pytest.approx(hours["reference"] / 10)
    n_cached = sum(parse(e).output_only for e in EXPERIMENTS)
    best = ((14 - n_cached) / 10000 + n_cached / 20000) * train_hours / 14
    assert best < hours["best"] < 1.1 * best and hours["cached"] == pytest.approx(hours["best"])
    assert "reference" not in grid_estimate(results[2:])  # an experiment unmeasured: no total


def test_divergence_bench_chunked_holds_a_fraction_of_the_dense_memory():
    rows = divergence_bench(4096, 8192, repeats=1)  # 8 chunks of 512 rows
    assert {(r["divergence"], r["impl"]) for r in rows} == {("kl", "chunked"), ("kl", "dense"),
                                                           ("js", "chunked"), ("js", "dense")}
    for r in rows:
        assert r["ms"] > 0 and r["peak_mib"] > 0
        if r["impl"] == "chunked":
            # the gradient plus at most ~10 chunk-sized temporaries (JS), each 512/4096 of [N, V]
            assert r["x_nv_f32"] < 1 + 10 * 512 / 4096
            assert r["mem_vs_dense"] < 0.4
        else:
            assert r["mem_vs_dense"] == 1.0


def test_prep_bench_extrapolates_from_measured_speed():
    from kdlib.tokenizer import train_bpe

    text = prep_text(0.2)
    assert len(text) == 200_000
    tok = train_bpe([text], 512, tempfile.mkdtemp())
    r = prep_bench(0.2, tokenizer=tok)
    assert r["chars"] == 200_000 and r["tokens"] > 20_000
    assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
    assert r["wikitext103_minutes"] == pytest.approx(540e6 / (r["chars"] / r["seconds"]) / 60)


def test_the_comparison_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench"
    code = harness.main(["--shapes", "smoke", "--exps", "kl", "ce", "--sections", "train", "divergence",
                         "--out", str(out)])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["command"] == ("python benchmarks/bench.py --shapes smoke --exps kl ce --sections train "
                                 f"divergence --out {out}")
    assert [(r["exp"], r["path"]) for r in report["train"]] == [
        ("kl", "reference"), ("kl", "kdlib"), ("kl", "cached"), ("ce", "reference"), ("ce", "kdlib")]
    md = (out / "bench.md").read_text()
    assert "| kl | cached |" in md and "| kl | dense |" in md and "Command: `python benchmarks/bench.py" in md
    assert "x reference" in md and "prep" not in report
    assert "| kl | cached |" in capsys.readouterr().out


def test_the_comparisons_bad_experiment_is_a_clean_error(tmp_path, capsys):
    assert harness.main(["--shapes", "smoke", "--exps", "klx", "--sections", "divergence",
                         "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "klx" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_reports_of_separate_runs_merge_into_one_table(tmp_path, capsys):
    # the reference from the comparison, kdlib's paths from `python -m kdlib bench` itself
    a, b, m = tmp_path / "a", tmp_path / "b", tmp_path / "m"
    assert harness.main(["--shapes", "smoke", "--exps", "kl", "ce", "--paths", "reference", "--sections",
                         "train", "divergence", "--out", str(a)]) == 0
    assert kdlib_main(["bench", "--shapes", "smoke", "--exps", "kl", "--out", str(b)]) == 0
    assert harness.main(["--merge", str(a / "bench.json"), str(b / "bench.json"), "--out", str(m)]) == 0
    report = json.loads((m / "bench.json").read_text())
    assert [(r["exp"], r["path"]) for r in report["train"]] == [
        ("ce", "reference"), ("kl", "reference"), ("kl", "kdlib"), ("kl", "cached")]
    assert "divergence" in report and len(report["merged_from"]) == 2
    md = (m / "bench.md").read_text()
    ratio_row = next(x for x in md.splitlines() if x.startswith("| kl | cached |"))
    assert ratio_row.rstrip(" |").split("|")[-2].strip()  # x reference, now computable
    # reports of other shapes are refused, naming why
    c = tmp_path / "c"
    report["shapes"]["name"] = "cpu"
    c.mkdir()
    (c / "bench.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert harness.main(["--merge", str(a / "bench.json"), str(c / "bench.json")]) == 2
    assert "different shapes" in capsys.readouterr().err
