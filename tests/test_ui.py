"""kdlib.ui: the training panel, under ipywidgets 7.7.1 (Colab's) and 8.x.

CI runs this file twice: with the latest ipywidgets and with 7.7.1, Colab's.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import types
from pathlib import Path

import pytest

import kdlib.colab
from kdlib.config import preset
from kdlib.errors import KdlibError
from kdlib.train import train
from kdlib.ui import panel

PNG = b"\x89PNG\r\n\x1a\n"
# ipywidgets 7.7.1 under ipykernel >= 6.22 warns on every widget it builds: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The `ipykernel.comm.Comm` class has been deprecated")


def test_ipywidgets_version_is_reported():
    import ipywidgets

    print(f"ipywidgets {ipywidgets.__version__}")  # which of the two CI runs this is
    assert int(ipywidgets.__version__.split(".")[0]) in (7, 8)


def test_label_names_the_experiment_and_whether_it_is_in_the_grid(tmp_path):
    p = panel("smoke", tmp_path)
    assert p.experiment_name() == "ce"
    assert "ce (in the study grid)" in p.name_label.value
    assert p.feature.disabled  # no feature map: the feature kind does not matter

    p.feature_map.value, p.divergence.value, p.cosine.value = "layerwise", "kl", True
    assert p.experiment_name() == "layerwise-kl-cos"
    assert "layerwise-kl-cos (in the study grid)" in p.name_label.value
    assert not p.feature.disabled

    p.divergence.value = "none"
    assert p.experiment_name() == "layerwise-cos"
    assert "layerwise-cos (outside the study grid)" in p.name_label.value

    p.feature_map.value = "none"
    assert "cos (outside the study grid)" in p.name_label.value

    p.cosine.value, p.divergence.value = False, "js"
    assert "js (outside the study grid)" in p.name_label.value

    p.feature_map.value, p.feature.value, p.seed.value = "last2all", "attention", 3
    assert p.experiment_name() == "last2all-js"
    assert "last2all-js (in the study grid)" in p.name_label.value
    assert p.name_label.value.endswith("last2all-js-attn-seed3")


def test_config_is_the_preset_with_the_selected_experiment(tmp_path):
    p = panel("smoke", tmp_path, max_steps=7)
    assert "demo" not in p.preset.options  # it trains its own teacher first: `python -m kdlib demo`
    p.preset.value = "colab-t4"
    p.feature_map.value, p.divergence.value, p.cosine.value, p.seed.value = "last2last", "js", True, 5
    cfg = p.config()
    expected = preset("colab-t4").with_experiment("last2last-js-cos", feature="hidden")
    expected.seed, expected.train.max_steps = 5, 7
    assert cfg == expected


def test_initial_choices_and_invalid_seed(tmp_path):
    p = panel("study", tmp_path, feature_map="layerwise", divergence="kl", cosine=True)
    assert p.feature.value == "attention" and p.seed.value == 42  # the study preset's defaults
    assert p.experiment_name() == "layerwise-kl-cos"
    p.seed.value = -1
    assert "invalid choice" in p.name_label.value and p.button.disabled
    p.seed.value = 1
    # A valid choice, but the study preset needs a GPU, which this machine lacks: said before Train.
    assert p.button.disabled and "trains on a GPU and this runtime has none" in p.status.value
    p.preset.value = "smoke"
    assert not p.button.disabled and p.status.value == ""


def test_train_button_trains_a_real_smoke_run_and_draws_its_curve(tmp_path, smoke_data):
    data = tmp_path / "data"
    shutil.copytree(smoke_data[0], data)  # training writes into the data folder (teacher ppl)

    def quiet_train(cfg, run_dir, data_dir, **kw):
        return train(cfg, run_dir, data_dir, **{**kw, "progress": False, "log": lambda *_: None})

    p = panel("smoke", tmp_path / "runs", data, quiet_train, divergence="kl", max_steps=4)
    assert bytes(p.plot.value) == b""
    p.button.click()
    assert p.summary is not None, p.output.outputs
    assert p.summary["exp"] == "kl" and p.summary["steps"] == 4
    assert json.loads((tmp_path / "runs" / "smoke" / "kl-seed0" / "summary.json").read_text()) == p.summary
    assert bytes(p.plot.value).startswith(PNG)
    assert "done" in p.status.value and not p.button.disabled
    # Again: a finished run is not trained again, its summary comes back.
    assert p.train() == p.summary


def test_plot_is_redrawn_while_training(tmp_path):
    seen = []

    def slow_train(cfg, run_dir, data_dir, **kw):
        run_dir.mkdir(parents=True)
        for step, ppl in ((2, 300.0), (4, 200.0)):
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "val_ppl": ppl}) + "\n")
            before = bytes(p.plot.value)
            deadline = time.monotonic() + 10
            while bytes(p.plot.value) == before and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(bytes(p.plot.value))
        return {"best_val_ppl": 200.0, "best_step": 4, "test_ppl": 210.0}

    p = panel("smoke", tmp_path / "runs", tmp_path / "data", slow_train, poll_s=0.02)
    summary = p.train()
    assert summary["best_step"] == 4
    assert len(seen) == 2 and all(png.startswith(PNG) for png in seen) and seen[0] != seen[1]
    assert "best validation perplexity 200.00 at step 4, test 210.00" in p.status.value


def test_a_failed_run_is_reported_in_the_panel(tmp_path, capsys):
    def failing_train(cfg, run_dir, data_dir, **kw):
        raise KdlibError("the loss is not finite")

    p = panel("smoke", tmp_path / "runs", tmp_path / "data", failing_train)
    p.button.click()  # outside a kernel the Output area does not capture: the message goes to stdout
    assert "error: the loss is not finite" in capsys.readouterr().out
    assert "error" in p.status.value and p.summary is None and not p.button.disabled
    with pytest.raises(KdlibError, match="not finite"):
        p.train()


def fake_colab(monkeypatch, mount):
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mount)
    monkeypatch.setitem(sys.modules, "google.colab", colab)


def test_panel_follows_its_preset_to_that_presets_data_folder(tmp_path, smoke_data):
    data = smoke_data[0]
    p = panel("smoke", tmp_path / "runs", data)
    assert p.data_dir == data and p.data_label.value == f"data: {data} (prepared)"
    assert not p.button.disabled
    p.preset.value = "colab-t4"
    assert p.data_dir == Path("data/colab-t4")  # not the smoke data: that preset's own folder
    assert "data/colab-t4 (not prepared yet" in p.data_label.value
    assert p.button.disabled and "cannot train" in p.status.value and "GPU" in p.status.value
    p.preset.value = "study"
    assert p.seed.value == 42  # a seed left at its default follows the preset
    p.seed.value = 7
    p.preset.value = "smoke"
    assert p.seed.value == 7 and p.data_dir == data and not p.button.disabled and p.status.value == ""


def test_panel_says_before_train_that_a_data_folder_is_another_presets(tmp_path, smoke_data):
    other = tmp_path / "other"
    shutil.copytree(smoke_data[0], other)
    manifest = json.loads((other / "train.json").read_text())
    manifest["inputs"]["source"] = {"kind": "hf", "dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1"}
    (other / "train.json").write_text(json.dumps(manifest))
    p = panel("smoke", tmp_path / "runs", other)
    assert p.button.disabled
    assert "holds text from Salesforce/wikitext (wikitext-2-raw-v1), and preset 'smoke' reads Python's" in p.status.value


def test_panel_on_colab_mounts_once_creates_nothing_while_browsing_and_keeps_a_typed_seed(tmp_path, monkeypatch,
                                                                                         smoke_data):
    mounted = []

    def mount(path):  # as Colab: the mount makes MyDrive appear
        mounted.append(path)
        (Path(path) / "MyDrive").mkdir(parents=True, exist_ok=True)

    fake_colab(monkeypatch, mount)
    monkeypatch.setattr(kdlib.colab, "DRIVE", tmp_path / "drive")
    p = panel("smoke", tmp_path / "runs", smoke_data[0])
    for value in ("colab-t4", "study", "colab-a100", "smoke", "colab-t4"):
        p.preset.value = value
        p.divergence.value = "js" if p.divergence.value != "js" else "kl"
    assert len(mounted) == 1  # mounted once, not on every change
    assert p.data_dir == tmp_path / "drive" / "MyDrive" / "kdlib-data" / "colab-t4"
    assert not (tmp_path / "drive" / "MyDrive" / "kdlib-data").exists()  # browsing creates no folder
    p.preset.value = "smoke"
    p.seed.value = 42
    p.preset.value, p.preset.value = "study", "smoke"
    assert p.seed.value == 42  # typed by the user: kept, even where it equals a preset's default


def test_panel_derives_another_presets_folder_from_a_given_one_named_after_its_preset(tmp_path):
    p = panel("smoke", tmp_path / "runs", tmp_path / "local" / "smoke")
    p.preset.value = "colab-t4"
    assert p.data_dir == tmp_path / "local" / "colab-t4"
    p = panel("smoke", tmp_path / "runs", tmp_path / "mine")
    p.preset.value = "colab-t4"
    assert p.data_dir == Path("data/colab-t4")  # not named after its preset: the other's default


def test_panel_status_and_plot_follow_the_selected_run(tmp_path):
    def fake_train(cfg, run_dir, data_dir, **kw):
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 2, "val_ppl": 300.0}) + "\n")
        return {"best_val_ppl": 300.0, "best_step": 2, "test_ppl": None}

    p = panel("smoke", tmp_path / "runs", tmp_path / "data", fake_train, divergence="kl")
    p.train()
    assert "kl-seed0: done" in p.status.value and p.plot.layout.display == ""
    p.divergence.value = "js"  # another run: its line and curve are not kl's
    assert p.status.value == "" and p.plot.layout.display == "none"
    p.divergence.value = "kl"  # back: kl's curve is shown again
    assert p.plot.layout.display == ""
    p.seed.value = -1
    assert "invalid choice" in p.name_label.value and p.plot.layout.display == "none"
