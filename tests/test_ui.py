"""kdlib.ui: the panel (ipywidgets 7.7.1 and 8.x), the notebook helpers, Colab's Drive.

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

import kdlib.ui
from kdlib.config import preset
from kdlib.errors import KdlibError
from kdlib.train import train
from kdlib.ui import experiment_config, experiment_name, panel, results_folder

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


def test_experiment_name_and_config_helpers():
    assert experiment_name() == "ce"
    assert experiment_name("none", "none", False) == "ce"
    assert experiment_name("last2last", "kl", True) == "last2last-kl-cos"
    assert experiment_name(None, "gjsd0.3") == "gjsd0.3"
    with pytest.raises(KdlibError, match="feature map"):
        experiment_name("kl")
    with pytest.raises(KdlibError, match="not a divergence"):
        experiment_name(None, "layerwise")
    cfg = experiment_config("smoke", "layerwise", "attention", "js", False, seed=2, max_steps=3)
    assert (cfg.exp, cfg.loss.feature, cfg.seed, cfg.train.max_steps) == ("layerwise-js", "attention", 2, 3)
    assert cfg.train.resume_dir is None  # off Colab: inside the run folder
    with pytest.raises(KdlibError, match="unknown preset"):
        experiment_config("nope")


def test_results_and_data_folders_off_colab(tmp_path):
    assert not kdlib.ui.on_colab()
    assert results_folder() == Path("runs")
    assert results_folder(local=tmp_path / "r") == tmp_path / "r"
    assert kdlib.ui.data_folder("smoke") == Path("data/smoke")
    assert kdlib.ui.data_folder("smoke", tmp_path) == tmp_path
    with pytest.raises(KdlibError, match="unknown preset"):
        kdlib.ui.data_folder("nope")


def fake_colab(monkeypatch, mount):
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mount)
    monkeypatch.setitem(sys.modules, "google.colab", colab)


def test_results_folder_on_colab_mounts_drive(tmp_path, monkeypatch):
    mounted = []
    fake_colab(monkeypatch, mounted.append)
    monkeypatch.setattr(kdlib.ui, "DRIVE", tmp_path / "drive")
    assert kdlib.ui.on_colab()
    folder = results_folder("kd-results")
    assert mounted == [str(tmp_path / "drive")]
    assert folder == tmp_path / "drive" / "MyDrive" / "kd-results" and folder.is_dir()
    assert kdlib.ui.data_folder("smoke") == tmp_path / "drive" / "MyDrive" / "kdlib-data" / "smoke"
    assert experiment_config("smoke").train.resume_dir == kdlib.ui.COLAB_RESUME_DIR


def test_failed_drive_mount_says_how_to_fix_it(monkeypatch):
    def refuse(path):
        raise ValueError("mount failed")

    fake_colab(monkeypatch, refuse)
    with pytest.raises(KdlibError) as e:
        results_folder()
    message = str(e.value)
    assert "mount failed" in message
    assert "Re-run this cell and accept the authorisation" in message
    assert "local folder" in message


# --------------------------------------------------------------------------
# the notebooks' folders, runtime check, cache and summary helpers


def test_folders_resolve_each_notebook_parameter_off_colab(tmp_path):
    f = kdlib.ui.folders("smoke", data_dir="", results_dir="", figures_dir="", cache_dir="")
    assert (f.data_dir, f.results_dir, f.figures_dir) == (Path("data/smoke"), Path("runs"), Path("figures"))
    assert f.cache_dir == Path("data/smoke/cache")  # the CLI's default
    f = kdlib.ui.folders("smoke", data_dir=str(tmp_path / "d"), cache_dir=" ")
    assert f.data_dir == tmp_path / "d" and f.cache_dir == tmp_path / "d" / "cache" and f.results_dir is None
    assert "data_dir" in str(f) and "(local disk)" in str(f) and "results_dir" not in str(f)
    (tmp_path / "file").write_text("x")
    with pytest.raises(KdlibError, match="is a file, not a folder"):
        kdlib.ui.folders("smoke", results_dir=str(tmp_path / "file"))
    for name in ("data_dir", "cache_dir"):  # below a file, and the cache folder too
        with pytest.raises(KdlibError, match=f"{name} = .* is inside .*file, a file, not a folder"):
            kdlib.ui.folders("smoke", **{"data_dir": "", name: str(tmp_path / "file" / "sub")})
    assert kdlib.ui.folders("smoke", cache_dir=" ~/c ").cache_dir == Path.home() / "c"  # stripped, ~ expanded
    with pytest.raises(KdlibError, match="unknown preset"):
        kdlib.ui.folders("nope", data_dir="")


def test_folders_on_colab_mount_drive_once_and_keep_the_cache_on_the_runtime_disk(tmp_path, monkeypatch):
    mounted = []
    fake_colab(monkeypatch, mounted.append)
    monkeypatch.setattr(kdlib.ui, "DRIVE", tmp_path / "drive")
    monkeypatch.setattr(kdlib.ui, "COLAB_CACHE_DIR", tmp_path / "content" / "kdlib-cache")
    f = kdlib.ui.folders("smoke", data_dir="", results_dir="", cache_dir="")
    assert mounted == [str(tmp_path / "drive")]
    mydrive = tmp_path / "drive" / "MyDrive"
    assert f.data_dir == mydrive / "kdlib-data" / "smoke" and f.results_dir == mydrive / "kdlib"
    assert f.cache_dir == tmp_path / "content" / "kdlib-cache" / "smoke"
    text = str(f)
    assert f"{mydrive / 'kdlib'}  (Google Drive)" in text and "this runtime's disk: lost when it is recycled" in text
    # Every folder given: Drive is not mounted at all.
    kdlib.ui.folders("smoke", data_dir=str(tmp_path / "d"), results_dir=str(tmp_path / "r"))
    assert len(mounted) == 1


@pytest.mark.parametrize("given, fix", [
    ({"data_dir": ""}, "set data_dir = '/content/kdlib-data/smoke' in the parameters cell"),
    ({"data_dir": "/x", "results_dir": ""}, "set results_dir = '/content/runs' in the parameters cell"),
    ({"results_dir": "", "figures_dir": ""},
     "set results_dir = '/content/runs' and figures_dir = '/content/figures' in the parameters cell"),
])
def test_a_failed_mount_names_the_parameters_left_empty(monkeypatch, given, fix):
    def refuse(path):
        raise ValueError("mount failed")

    fake_colab(monkeypatch, refuse)
    with pytest.raises(KdlibError) as e:
        kdlib.ui.folders("smoke", **given)
    assert fix in str(e.value) and "mount failed" in str(e.value)


class FakeGPU:
    """torch.cuda as a runtime with one GPU of this name, memory and compute capability shows it."""

    def __init__(self, monkeypatch, name, gib, capability):
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda i=0: types.SimpleNamespace(name=name, total_memory=int(gib * 2**30)))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capability)


def test_runtime_report_names_the_gpu_and_the_presets_precision(monkeypatch):
    FakeGPU(monkeypatch, "Tesla T4", 15.0, (7, 5))
    text, problems = kdlib.ui.runtime_report("colab-t4")
    assert "GPU: Tesla T4, 15.0 GiB, bf16 in hardware: no (emulated, slow)" in text
    assert "preset colab-t4: student in fp16 autocast, teacher in fp16, made for one T4" in text
    assert problems == []
    text, problems = kdlib.ui.runtime_report("colab-a100")  # bf16 on a T4: said, with the fix
    assert len(problems) == 1 and "only emulates" in problems[0] and "colab-t4" in problems[0]
    FakeGPU(monkeypatch, "NVIDIA A100-SXM4-40GB", 39.6, (8, 0))
    text, problems = kdlib.ui.runtime_report("colab-a100")
    assert "bf16 in hardware: yes" in text and "student in bf16 autocast" in text and problems == []


def test_a_gpu_preset_on_a_cpu_runtime_stops_the_notebooks_that_train(monkeypatch, capsys):
    assert kdlib.ui.check_runtime("smoke", needs_gpu=True).startswith("runtime: not Colab")
    with pytest.raises(KdlibError, match="run it on a machine with a CUDA GPU; or set preset = 'smoke'"):
        kdlib.ui.check_runtime("colab-t4", needs_gpu=True)
    fake_colab(monkeypatch, lambda path: None)
    with pytest.raises(KdlibError, match=r"Runtime -> Change runtime type -> Hardware accelerator -> T4 GPU"):
        kdlib.ui.check_runtime("colab-t4", needs_gpu=True)
    capsys.readouterr()
    kdlib.ui.check_runtime("study", needs_gpu=False)  # 01 and 04 need no GPU: a warning only
    out = capsys.readouterr().out
    assert "GPU: none" in out and "note: this notebook needs no GPU, but 02 and 03 with this preset do: preset " \
        "study trains on a GPU" in out and "A100 GPU" in out


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


def test_cache_plan_says_size_and_place_and_refuses_what_does_not_fit(tmp_path, smoke_data, monkeypatch, capsys):
    import kdlib.cache

    cfg = experiment_config("smoke", divergence="kl")
    need = kdlib.ui.cache_plan(cfg, smoke_data[0], tmp_path / "cache")
    out = capsys.readouterr().out
    assert need > 0 and f"in {tmp_path / 'cache'} (local disk)" in out and "GiB free there" in out
    monkeypatch.setattr(kdlib.cache, "free_bytes", lambda folder: need)  # no room for the margin
    with pytest.raises(KdlibError, match="nothing was written"):
        kdlib.ui.cache_plan(cfg, smoke_data[0], tmp_path / "cache")
    with pytest.raises(KdlibError, match="nothing was written"):
        kdlib.cache.build_cache(cfg, smoke_data[0], tmp_path / "cache", log=lambda *_: None, progress=False)
    assert not (tmp_path / "cache").exists()


def test_a_cache_run_builds_its_missing_cache_first_and_reports_its_coverage(tmp_path, smoke_data):
    import kdlib.cache

    data = tmp_path / "data"
    shutil.copytree(smoke_data[0], data)
    cfg = experiment_config("smoke", divergence="kl", max_steps=2, teacher_source="cache")
    lines = []
    summary = kdlib.ui.train_run(cfg, tmp_path / "runs", data, cache_dir=tmp_path / "cache", log=lines.append,
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
    text = kdlib.ui.show_sample(cfg, smoke_data[0], n_tokens=40)
    assert "40 training tokens, decoded:" in capsys.readouterr().out
    ids = tokenizer_of(cfg, smoke_data[0])(text)["input_ids"]
    tokens = load_split(smoke_data[0], "train").tokens()
    assert 30 <= len(ids) <= 50 and len(text) > 40  # real text, about as many tokens back
    assert len(tokens) > 40
    with pytest.raises(KdlibError, match="positive number of tokens"):
        kdlib.ui.show_sample(cfg, smoke_data[0], n_tokens=-3)
    summary = {"exp": "kl", "seed": 0, "teacher_source": "online", "best_val_ppl": 123.456, "best_step": 8,
               "final_val_ppl": 130.0, "test_ppl": 125.0, "eval_block_size": 32, "eval_stride": 16,
               "teacher_test_ppl": 80.0, "steps": 10, "tokens": 2560, "budget_tokens": 5120,
               "stopped_early": True, "train_wall_s": 3.2, "device": "cpu", "tokens_per_s": 800.0,
               "student_path": "/x/student.safetensors"}
    shown = kdlib.ui.summary_text(summary)
    assert "123.46 at step 8" in shown and "125.00 (block 32, stride 16); teacher 80.00" in shown
    assert "2,560 of a budget of 5,120 (stopped early)" in shown and "3.2 s on cpu" in shown
    assert kdlib.ui.summary_text({"stopped_at": 5}).startswith("stopped at step 5")


def test_a_drive_path_typed_into_a_parameter_mounts_drive_first(tmp_path, monkeypatch):
    mounted = []
    fake_colab(monkeypatch, mounted.append)
    monkeypatch.setattr(kdlib.ui, "DRIVE", tmp_path / "drive")
    f = kdlib.ui.folders("smoke", data_dir=str(tmp_path / "drive" / "MyDrive" / "mine"))
    assert mounted == [str(tmp_path / "drive")] and "(Google Drive)" in str(f)


def test_panel_on_colab_mounts_once_creates_nothing_while_browsing_and_keeps_a_typed_seed(tmp_path, monkeypatch,
                                                                                         smoke_data):
    mounted = []

    def mount(path):  # as Colab: the mount makes MyDrive appear
        mounted.append(path)
        (Path(path) / "MyDrive").mkdir(parents=True, exist_ok=True)

    fake_colab(monkeypatch, mount)
    monkeypatch.setattr(kdlib.ui, "DRIVE", tmp_path / "drive")
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


def test_cache_plan_counts_only_what_is_left_to_build(tmp_path, cache_data, monkeypatch, capsys):
    import kdlib.cache

    cfg = experiment_config("smoke", divergence="kl")
    cache = tmp_path / "cache"
    shutil.copytree(cache_data / "cache", cache)
    monkeypatch.setattr(kdlib.cache, "free_bytes", lambda folder: 0)  # a full disk
    kdlib.ui.cache_plan(cfg, cache_data, cache)  # complete: nothing to write, so it fits
    assert "complete" in capsys.readouterr().out
    manifest = json.loads((cache / "train.cache.json").read_text())
    n = manifest["windows"]
    manifest.update(complete=False, complete_windows=n - 4)  # interrupted: 4 windows left
    (cache / "train.cache.json").write_text(json.dumps(manifest))
    need = kdlib.cache.cache_bytes(cfg, kdlib.data.load_split(cache_data, "train"))
    left = need * 4 // n
    monkeypatch.setattr(kdlib.cache, "free_bytes", lambda folder: left + kdlib.cache.FREE_MARGIN)
    kdlib.ui.cache_plan(cfg, cache_data, cache)
    assert f"{kdlib.cache.size_text(left)} still to build" in capsys.readouterr().out
    monkeypatch.setattr(kdlib.cache, "free_bytes", lambda folder: left)
    with pytest.raises(KdlibError, match="plus a 256 MiB margin; nothing was written"):
        kdlib.ui.cache_plan(cfg, cache_data, cache)
