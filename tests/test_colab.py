"""kdlib.colab: where a notebook's files go and what the runtime is, off Colab and on a simulated one
(``google.colab`` faked in this process); then Run all, as a Colab user meets it: 01 -> 04 from their install cells on, the smoke preset, Drive defaults.

Each notebook gets a fresh "runtime": its own Python environment (this machine's packages, without
kdlib), its own runtime disk (``/content``: here a temporary folder, ``KDLIB_COLAB_CONTENT``) and a
kernel in which ``google.colab`` is loaded and ``drive.mount`` links the runtime's ``drive`` folder to
one shared "Google Drive". The install cell installs kdlib from "GitHub" (a local repository, through
git's ``insteadOf``) at the ref typed into its form, as a user of an unpublished copy would. The
parameters are papermill's (Colab's form fields); every folder parameter is left empty, so the
notebooks use their Drive defaults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import nbformat
import pytest
from helpers import fake_github

import kdlib.colab
from kdlib.badges import rewrite_text
from kdlib.colab import results_folder
from kdlib.errors import KdlibError
from kdlib.notebook import run_config

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# the folders, Drive and the runtime check, in this process


def fake_colab(monkeypatch, mount):
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mount)
    monkeypatch.setitem(sys.modules, "google.colab", colab)


def test_results_and_data_folders_off_colab(tmp_path):
    assert not kdlib.colab.on_colab()
    assert results_folder() == Path("runs")
    assert results_folder(local=tmp_path / "r") == tmp_path / "r"
    assert kdlib.colab.data_folder("smoke") == Path("data/smoke")
    assert kdlib.colab.data_folder("smoke", tmp_path) == tmp_path
    with pytest.raises(KdlibError, match="unknown preset"):
        kdlib.colab.data_folder("nope")


def test_results_folder_on_colab_mounts_drive(tmp_path, monkeypatch):
    mounted = []
    fake_colab(monkeypatch, mounted.append)
    monkeypatch.setattr(kdlib.colab, "DRIVE", tmp_path / "drive")
    assert kdlib.colab.on_colab()
    folder = results_folder("kd-results")
    assert mounted == [str(tmp_path / "drive")]
    assert folder == tmp_path / "drive" / "MyDrive" / "kd-results" and folder.is_dir()
    assert kdlib.colab.data_folder("smoke") == tmp_path / "drive" / "MyDrive" / "kdlib-data" / "smoke"
    assert run_config("smoke").train.resume_dir == kdlib.colab.COLAB_RESUME_DIR  # the runtime's disk


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


def test_folders_resolve_each_notebook_parameter_off_colab(tmp_path):
    f = kdlib.colab.folders("smoke", data_dir="", results_dir="", figures_dir="", cache_dir="")
    assert (f.data_dir, f.results_dir, f.figures_dir) == (Path("data/smoke"), Path("runs"), Path("figures"))
    assert f.cache_dir == Path("data/smoke/cache")  # the CLI's default
    where = kdlib.colab.folders("smoke", data_dir="", results_dir="").run_folders("smoke", budget_mib=5.0)
    assert (where.results_dir, where.data_dir, where.cache_dir, where.budget_mib) == (
        Path("runs"), Path("data/smoke"), Path("data/smoke/cache"), 5.0)  # a run's folders, as the CLI's
    f = kdlib.colab.folders("smoke", data_dir=str(tmp_path / "d"), cache_dir=" ")
    assert f.data_dir == tmp_path / "d" and f.cache_dir == tmp_path / "d" / "cache" and f.results_dir is None
    assert "data_dir" in str(f) and "(local disk)" in str(f) and "results_dir" not in str(f)
    (tmp_path / "file").write_text("x")
    with pytest.raises(KdlibError, match="is a file, not a folder"):
        kdlib.colab.folders("smoke", results_dir=str(tmp_path / "file"))
    for name in ("data_dir", "cache_dir"):  # below a file, and the cache folder too
        with pytest.raises(KdlibError, match=f"{name} = .* is inside .*file, a file, not a folder"):
            kdlib.colab.folders("smoke", **{"data_dir": "", name: str(tmp_path / "file" / "sub")})
    assert kdlib.colab.folders("smoke", cache_dir=" ~/c ").cache_dir == Path.home() / "c"  # stripped, ~ expanded
    with pytest.raises(KdlibError, match="unknown preset"):
        kdlib.colab.folders("nope", data_dir="")


def test_folders_on_colab_mount_drive_once_and_keep_the_cache_on_the_runtime_disk(tmp_path, monkeypatch):
    mounted = []
    fake_colab(monkeypatch, mounted.append)
    monkeypatch.setattr(kdlib.colab, "DRIVE", tmp_path / "drive")
    monkeypatch.setattr(kdlib.colab, "COLAB_CACHE_DIR", tmp_path / "content" / "kdlib-cache")
    f = kdlib.colab.folders("smoke", data_dir="", results_dir="", cache_dir="")
    assert mounted == [str(tmp_path / "drive")]
    mydrive = tmp_path / "drive" / "MyDrive"
    assert f.data_dir == mydrive / "kdlib-data" / "smoke" and f.results_dir == mydrive / "kdlib"
    assert f.cache_dir == tmp_path / "content" / "kdlib-cache" / "smoke"
    text = str(f)
    assert f"{mydrive / 'kdlib'}  (Google Drive)" in text and "this runtime's disk: lost when it is recycled" in text
    # Every folder given: Drive is not mounted at all.
    kdlib.colab.folders("smoke", data_dir=str(tmp_path / "d"), results_dir=str(tmp_path / "r"))
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
        kdlib.colab.folders("smoke", **given)
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
    text, problems = kdlib.colab.runtime_report("colab-t4")
    assert "GPU: Tesla T4, 15.0 GiB, bf16 in hardware: no (emulated, slow)" in text
    assert "preset colab-t4: student in fp16 autocast, teacher in fp16, made for one T4" in text
    assert problems == []
    text, problems = kdlib.colab.runtime_report("colab-a100")  # bf16 on a T4: said, with the fix
    assert len(problems) == 1 and "only emulates" in problems[0] and "colab-t4" in problems[0]
    FakeGPU(monkeypatch, "NVIDIA A100-SXM4-40GB", 39.6, (8, 0))
    text, problems = kdlib.colab.runtime_report("colab-a100")
    assert "bf16 in hardware: yes" in text and "student in bf16 autocast" in text and problems == []


def test_a_gpu_preset_on_a_cpu_runtime_stops_the_notebooks_that_train(monkeypatch, capsys):
    assert kdlib.colab.check_runtime("smoke", needs_gpu=True).startswith("runtime: not Colab")
    with pytest.raises(KdlibError, match="run it on a machine with a CUDA GPU; or set preset = 'smoke'"):
        kdlib.colab.check_runtime("colab-t4", needs_gpu=True)
    fake_colab(monkeypatch, lambda path: None)
    with pytest.raises(KdlibError, match=r"Runtime -> Change runtime type -> Hardware accelerator -> T4 GPU"):
        kdlib.colab.check_runtime("colab-t4", needs_gpu=True)
    capsys.readouterr()
    kdlib.colab.check_runtime("study", needs_gpu=False)  # 01 and 04 need no GPU: a warning only
    out = capsys.readouterr().out
    assert "GPU: none" in out and "note: this notebook needs no GPU, but 02 and 03 with this preset do: preset " \
        "study trains on a GPU" in out and "A100 GPU" in out


def test_a_drive_path_typed_into_a_parameter_mounts_drive_first(tmp_path, monkeypatch):
    mounted = []
    fake_colab(monkeypatch, mounted.append)
    monkeypatch.setattr(kdlib.colab, "DRIVE", tmp_path / "drive")
    f = kdlib.colab.folders("smoke", data_dir=str(tmp_path / "drive" / "MyDrive" / "mine"))
    assert mounted == [str(tmp_path / "drive")] and "(Google Drive)" in str(f)


# --------------------------------------------------------------------------
# Run all on a simulated Colab runtime, one per notebook


# A Colab runtime: google.colab is a real (fake) package, loaded at start; Drive mounts by linking to the
# shared "Drive"; kdlib is not installed (this checkout's editable install is hidden).
DRIVE_MODULE = textwrap.dedent("""\
    import os
    from pathlib import Path


    def mount(mountpoint, **kwargs):
        if os.environ.get("FAKE_DRIVE_REFUSES"):
            raise ValueError("mount failed: credential propagation was unsuccessful")
        point = Path(mountpoint)
        if not point.exists():
            point.parent.mkdir(parents=True, exist_ok=True)
            point.symlink_to(os.environ["FAKE_DRIVE"], target_is_directory=True)
    """)
SITECUSTOMIZE = textwrap.dedent("""\
    import sys
    import google.colab  # noqa: F401  (Colab preloads it)
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                        and "editable" not in getattr(f, "__name__", "")]
    """)


class Colab:
    """Fresh runtimes sharing one Drive, each running one notebook."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.drive = tmp / "gdrive"
        (self.drive / "MyDrive").mkdir(parents=True)
        self.gitconfig = fake_github(tmp)
        self.fake = tmp / "fake"
        (self.fake / "google" / "colab").mkdir(parents=True)  # google: a namespace package, as installed
        (self.fake / "google" / "colab" / "__init__.py").write_text("from . import drive  # noqa: F401\n")
        (self.fake / "google" / "colab" / "drive.py").write_text(DRIVE_MODULE)
        (self.fake / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.n = 0

    def runtime(self, **env) -> tuple[str, Path]:
        """A new runtime: (its kernel's name, its /content)."""
        self.n += 1
        rt = self.tmp / f"runtime{self.n}"
        content = rt / "content"
        content.mkdir(parents=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(rt / "env")], check=True)
        spec = rt / "jupyter" / "kernels" / "colab"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [str(rt / "env" / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Colab", "language": "python",
            "env": {"PYTHONPATH": str(self.fake), "KDLIB_COLAB_CONTENT": str(content), "FAKE_DRIVE": str(self.drive),
                    "GIT_CONFIG_GLOBAL": str(self.gitconfig), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                    "OMP_NUM_THREADS": "1", **env}}))
        return str(rt / "jupyter"), content

    def run(self, name: str, refuse_drive: bool = False, **params) -> tuple[nbformat.NotebookNode, Path]:
        import papermill

        jupyter_path, content = self.runtime(**({"FAKE_DRIVE_REFUSES": "1"} if refuse_drive else {}))
        source = self.tmp / f"{name}.ipynb"
        # The user types the copy's repository and ref into the install cell's form.
        source.write_text(rewrite_text((ROOT / "notebooks" / f"{name}.ipynb").read_text(), "alice/kdlib", "v-a"))
        out = self.tmp / f"{name}.out.ipynb"
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = jupyter_path
        try:
            papermill.execute_notebook(str(source), str(out), parameters=params, cwd=str(content),
                                       progress_bar=False, kernel_name="colab")
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH")
            else:
                os.environ["JUPYTER_PATH"] = old
        return nbformat.read(str(out), as_version=4), content


def outputs(nb, mime: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if mime in o.get("data", {})]


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def cell_with(nb, needle: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and needle in c.source)


def test_run_all_on_colab_from_the_install_cell_with_drive_defaults(tmp_path):
    colab = Colab(tmp_path)
    mydrive = colab.drive / "MyDrive"

    nb, content = colab.run("01_data_prep", preset="smoke")
    install = text_of(nb.cells[1])
    assert "installed kdlib from alice/kdlib@v-a" in install and "kdlib 0.1.0" in install
    where = text_of(nb.cells[cell_with(nb, "check_runtime")])
    assert "runtime: Google Colab" in where and "GPU: none" in where and "preset smoke" in where
    assert f"data_dir     {content / 'drive' / 'MyDrive' / 'kdlib-data' / 'smoke'}  (Google Drive)" in where
    data = mydrive / "kdlib-data" / "smoke"
    assert all((data / f"{s}.bin").stat().st_size > 0 for s in ("train", "validation", "test"))
    assert "tokens/char" in text_of(nb.cells[cell_with(nb, "prepare(")])
    assert "training tokens, decoded:" in text_of(nb.cells[cell_with(nb, "show_sample")])

    nb, content = colab.run("02_teacher_cache", preset="smoke")
    cache = content / "kdlib-cache" / "smoke"  # the runtime's disk, not Drive
    assert json.loads((cache / "train.cache.json").read_text())["complete"] is True
    assert not (data / "cache").exists()
    shown = text_of(nb.cells[cell_with(nb, "cache_plan")])
    assert f"in {cache} (this runtime's disk: lost when it is recycled)" in shown and "GiB free there" in shown
    assert "of the teacher's probability mass" in text_of(nb.cells[cell_with(nb, "build_cache")])

    nb, content = colab.run("03_train", preset="smoke", feature_map="none", feature="hidden", divergence="kl",
                            cosine=False, seed=0, max_steps=4)
    run = mydrive / "kdlib" / "smoke" / "kl-seed0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["teacher_source"] == "online"
    plan_at, train_at = cell_with(nb, "show_plan("), cell_with(nb, "train_run(")
    assert plan_at < train_at and "plan: preset smoke" in text_of(nb.cells[plan_at])
    assert "best validation perplexity" in text_of(nb.cells[train_at])  # the summary, printed
    assert outputs(nb, "application/vnd.jupyter.widget-view+json"), "the panel was not displayed"
    assert any("image/png" in o.get("data", {}) for o in nb.cells[-1].outputs)
    assert not list(content.glob("kdlib-resume/*.pt"))  # a finished run's resume state is gone

    nb, content = colab.run("04_analysis")
    figures = mydrive / "kdlib-figures"
    assert (figures / "results.md").stat().st_size > 0
    pngs = sorted(figures.glob("*.png"))
    assert pngs and len(outputs(nb, "image/png")) == len(pngs)
    assert "kl" in outputs(nb, "text/html")[0]["data"]["text/html"]
    # what was written where, as this runtime sees it
    report = nb.cells[cell_with(nb, "analysis.report")]
    assert str(content / "drive" / "MyDrive" / "kdlib-figures" / "results.md") in text_of(report)
    samples = nb.cells[cell_with(nb, "samples_table")]  # the students read from Drive, the tokenizer too
    assert any("kdlib-samples" in o.get("data", {}).get("text/html", "") for o in samples.outputs)


def test_a_drive_that_will_not_mount_stops_with_this_notebooks_fix(tmp_path):
    # One notebook end to end (a runtime of its own costs ~8 s): the message reaches the notebook and
    # names its empty parameters. Which parameters each notebook names is folders()' own test
    # (test_a_failed_mount_names_the_parameters_left_empty), and which it passes, test_notebooks'.
    import papermill

    fix = "set data_dir = '/content/kdlib-data/smoke' and results_dir = '/content/runs' in the parameters cell"
    colab = Colab(tmp_path)
    with pytest.raises(papermill.PapermillExecutionError) as e:
        colab.run("03_train", refuse_drive=True, preset="smoke", max_steps=1)
    message = str(e.value)
    assert "Google Drive could not be mounted" in message and "credential propagation" in message
    assert fix in message
