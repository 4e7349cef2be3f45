"""kdlib.notebook: a run's config from a notebook's parameters, the cache's plan and build, a cache
run, the summary and a decoded sample (what the notebooks' cells call)."""

from __future__ import annotations

import json
import shutil

import pytest

import kdlib.data
import kdlib.notebook
from kdlib.config import preset
from kdlib.errors import KdlibError
from kdlib.launch import RunChoices, RunFolders
from kdlib.notebook import experiment_name, run_config


def test_experiment_name_and_config_helpers():
    assert experiment_name() == "ce"
    assert experiment_name("none", "none", False) == "ce"
    assert experiment_name("last2last", "kl", True) == "last2last-kl-cos"
    assert experiment_name(None, "gjsd0.3") == "gjsd0.3"
    with pytest.raises(KdlibError, match="feature map"):
        experiment_name("kl")
    with pytest.raises(KdlibError, match="not a divergence"):
        experiment_name(None, "layerwise")
    cfg = run_config("smoke", experiment_name("layerwise", "js", False, "attention"), 2,
                     RunChoices(feature="attention", max_steps=3))
    assert (cfg.exp, cfg.loss.feature, cfg.seed, cfg.train.max_steps) == ("layerwise-js", "attention", 2, 3)
    assert cfg.train.resume_dir is None  # off Colab: inside the run folder
    with pytest.raises(KdlibError, match="unknown preset"):
        run_config("nope")


def test_cache_plan_says_size_and_place_and_refuses_what_does_not_fit(tmp_path, smoke_data, monkeypatch, capsys):
    import kdlib.cache

    cfg = run_config("smoke", "kl")
    need = kdlib.notebook.cache_plan(cfg, smoke_data[0], tmp_path / "cache")
    out = capsys.readouterr().out
    assert need > 0 and f"in {tmp_path / 'cache'} (local disk)" in out and "GiB free there" in out
    monkeypatch.setattr(kdlib.cache, "free_bytes", lambda folder: need)  # no room for the margin
    with pytest.raises(KdlibError, match="nothing was written"):
        kdlib.notebook.cache_plan(cfg, smoke_data[0], tmp_path / "cache")
    with pytest.raises(KdlibError, match="nothing was written"):
        kdlib.cache.build_cache(cfg, smoke_data[0], tmp_path / "cache", log=lambda *_: None, progress=False)
    assert not (tmp_path / "cache").exists()


def test_a_cache_run_builds_its_missing_cache_first_and_reports_its_coverage(tmp_path, smoke_data):
    import kdlib.cache

    data = tmp_path / "data"
    shutil.copytree(smoke_data[0], data)
    cfg = run_config("smoke", "kl", choices=RunChoices(max_steps=2, teacher_source="cache"))
    lines = []
    summary = kdlib.notebook.train_run(cfg, RunFolders(tmp_path / "runs", data, tmp_path / "cache"), log=lines.append,
                                       progress=False)
    assert summary["teacher_source"] == "cache" and summary["steps"] == 2
    assert any("building it on this runtime first" in line for line in lines)
    fidelity = next(line for line in lines if line.startswith("fidelity:"))
    cov = kdlib.cache.coverage(kdlib.cache.TopKCache(tmp_path / "cache", "train"))
    assert f"the top {cfg.cache.top_k} tokens keep {cov['mean']:.1%} of the teacher's probability mass" in fidelity
    assert 0 < cov["p05"] <= cov["median"] <= 1


def test_summary_text_and_decoded_sample(tmp_path, smoke_data, capsys):
    from kdlib.data import load_split
    from kdlib.tokenizer import tokenizer_of

    cfg = preset("smoke")
    text = kdlib.notebook.show_sample(cfg, smoke_data[0], n_tokens=40)
    assert "40 training tokens, decoded:" in capsys.readouterr().out
    ids = tokenizer_of(cfg, smoke_data[0])(text)["input_ids"]
    tokens = load_split(smoke_data[0], "train").tokens()
    assert 30 <= len(ids) <= 50 and len(text) > 40  # real text, about as many tokens back
    assert len(tokens) > 40
    with pytest.raises(KdlibError, match="positive number of tokens"):
        kdlib.notebook.show_sample(cfg, smoke_data[0], n_tokens=-3)
    summary = {"exp": "kl", "seed": 0, "teacher_source": "online", "best_val_ppl": 123.456, "best_step": 8,
               "final_val_ppl": 130.0, "test_ppl": 125.0, "eval_block_size": 32, "eval_stride": 16,
               "teacher_test_ppl": 80.0, "steps": 10, "tokens": 2560, "budget_tokens": 5120,
               "stopped_early": True, "train_wall_s": 3.2, "device": "cpu", "tokens_per_s": 800.0,
               "student_path": "/x/student.safetensors"}
    shown = kdlib.notebook.summary_text(summary)
    assert "123.46 at step 8" in shown and "125.00 (block 32, stride 16); teacher 80.00" in shown
    assert "2,560 of a budget of 5,120 (stopped early)" in shown and "3.2 s on cpu" in shown
    assert kdlib.notebook.summary_text({"stopped_at": 5}).startswith("stopped at step 5")
    assert "agreement" not in shown  # a summary from before the test metrics: no line for them
    from results_helpers import metrics_summary

    shown = kdlib.notebook.summary_text({**summary, "test_metrics": metrics_summary(bucket_ppl=(10, 20, 40, 80, None))})
    assert "top-1 agreement 0.500, KL(teacher || student) 0.400 nats/token" in shown
    assert "0.0500; teacher 0.0200" in shown and "10.0, 20.0, 40.0, 80.0, - (most frequent first)" in shown
    assert "agreement" not in kdlib.notebook.summary_text({**summary, "test_metrics": {"student": "?"}})


def test_cache_plan_counts_only_what_is_left_to_build(tmp_path, cache_data, monkeypatch, capsys):
    import kdlib.cache

    cfg = run_config("smoke", "kl")
    cache = tmp_path / "cache"
    shutil.copytree(cache_data / "cache", cache)
    monkeypatch.setattr(kdlib.cache, "free_bytes", lambda folder: 0)  # a full disk
    kdlib.notebook.cache_plan(cfg, cache_data, cache)  # complete: nothing to write, so it fits
    assert "complete" in capsys.readouterr().out
    manifest = json.loads((cache / "train.cache.json").read_text())
    n = manifest["windows"]
    manifest.update(complete=False, complete_windows=n - 4)  # interrupted: 4 windows left
    (cache / "train.cache.json").write_text(json.dumps(manifest))
    need = kdlib.cache.cache_bytes(cfg, kdlib.data.load_split(cache_data, "train"))
    left = need * 4 // n
    monkeypatch.setattr(kdlib.cache, "free_bytes", lambda folder: left + kdlib.cache.FREE_MARGIN)
    kdlib.notebook.cache_plan(cfg, cache_data, cache)
    assert f"{kdlib.cache.size_text(left)} still to build" in capsys.readouterr().out
    monkeypatch.setattr(kdlib.cache, "free_bytes", lambda folder: left)
    with pytest.raises(KdlibError, match="plus a 256 MiB margin; nothing was written"):
        kdlib.notebook.cache_plan(cfg, cache_data, cache)
