"""kdlib.launch: the one config builder and the one trainer that the CLI and the notebooks share."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlib.config import preset
from kdlib.errors import KdlibError
from kdlib.launch import RunChoices, RunFolders, run_config, run_configs, train_run


def test_a_run_config_is_the_preset_with_the_experiment_and_the_choices():
    choices = RunChoices(feature="attention", max_steps=5, compile=True, weights="best", weights_dir="w",
                         resume_dir="")
    cfg = run_config("smoke", "layerwise-kl", 3, choices)
    expected = preset("smoke").with_experiment("layerwise-kl", feature="attention")
    expected.seed, expected.train.max_steps, expected.train.compile = 3, 5, True
    expected.train.weights, expected.train.weights_dir, expected.train.resume_dir = "best", "w", None
    assert cfg == expected.validate()
    assert run_config("study", "kl").seed == 42  # the preset's first seed


def test_the_cache_goes_to_the_output_only_experiments_and_the_others_are_named(capsys):
    notes = []
    cfgs = run_configs("smoke", ["kl", "layerwise-kl"], [0], RunChoices(teacher_source="cache"), log=notes.append)
    assert [c.train.teacher_source for c in cfgs] == ["cache", "online"]
    assert len(notes) == 1 and "layerwise-kl need the teacher's full outputs" in notes[0]
    with pytest.raises(KdlibError, match="unknown"):  # a bad name: refused before any config is built
        run_configs("smoke", ["kl", "nope"])


def test_train_run_trains_in_the_run_folder_within_the_budget(tmp_path):
    seen = {}

    def fake_train(cfg, run_dir, data_dir, **kw):
        seen.update(run_dir=run_dir, data_dir=data_dir, **kw)
        return {"exp": cfg.exp}

    cfg = run_config("smoke", "kl")
    folders = RunFolders(tmp_path / "runs", tmp_path / "data", budget_mib=2.0)
    assert train_run(cfg, folders, fake_train, progress=False) == {"exp": "kl"}
    assert seen["run_dir"] == tmp_path / "runs" / "smoke" / "kl-seed0" and seen["data_dir"] == tmp_path / "data"
    assert seen["budget"].limit_bytes == 2 * 2**20 and seen["cache_dir"] is None and seen["progress"] is False
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(KdlibError, match="must be a positive number of MiB"):
            train_run(cfg, RunFolders(Path("runs"), Path("data"), budget_mib=bad), fake_train)
