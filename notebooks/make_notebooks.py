"""Write the four notebooks from one place, so their badges, install cells and parameters agree.

    python notebooks/make_notebooks.py            # rewrites notebooks/*.ipynb
    python notebooks/make_notebooks.py OUT_DIR    # writes them elsewhere (the tests compare)

The notebooks are written without outputs and with fixed cell ids, so running
this twice gives the same files. The GitHub repository in the badges and the
install command is ``kdlib.badges.REPO`` (change it with ``python -m kdlib
badges --repo OWNER/REPO``). Every piece of logic is a kdlib call; the cells
only name folders and pass parameters.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kdlib, installed or not

from kdlib.badges import REPO, badge_markdown, install_url  # noqa: E402
from kdlib.grid import MAPS  # noqa: E402
from kdlib.ui import DIVERGENCES, NOTEBOOK_PRESETS  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_PRESET = "colab-t4"  # what a Colab user gets from the badge; CI passes preset="smoke"


def options(values) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def install_cell(imports: str) -> str:
    return f"""\
# On Colab: install kdlib from GitHub. pip keeps every package that already satisfies kdlib's
# requirements, so Colab's torch (kdlib needs >= 2.6) is not upgraded, and kdlib does not depend
# on ipywidgets, so Colab's 7.7.1 stays. Elsewhere: the kdlib installed from this checkout
# (`pip install -e .` at the repository root), or the checkout itself when opened from notebooks/.
import importlib.util, os, subprocess, sys

if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "{install_url(REPO)}"], check=True)
elif importlib.util.find_spec("kdlib") is None:
    sys.path.insert(0, os.path.abspath(".."))
import {imports}
print("kdlib", kdlib.__version__)"""


PRESET_PARAM = (f'preset = "{DEFAULT_PRESET}"  #@param {options(NOTEBOOK_PRESETS)}\n'
                "# smoke: seconds on a CPU, to try the notebooks; colab-t4 / colab-a100: the corrected\n"
                "# protocol on one Colab GPU (40M / 100M tokens a run, ~25 / ~9 minutes); study: the\n"
                "# original study's regime (50 epochs of a 1.65M-token subset, fp32). docs/protocol.md")
DATA_PARAM = ('data_dir = ""  #@param {type:"string"}\n'
              '# "" = MyDrive/kdlib-data/PRESET on Colab, data/PRESET in the working folder elsewhere')
RESULTS_PARAM = ('results_dir = ""  #@param {type:"string"}\n'
                 '# "" = MyDrive/kdlib on Colab (Drive is mounted), runs/ in the working folder elsewhere')


def params_cell(*lines: str):
    cell = new_code_cell("#@title Parameters\n" + "\n".join(lines))
    cell.metadata.update({"tags": ["parameters"], "cellView": "form"})
    return cell


def header(number: str, title: str, text: str) -> str:
    return f"# {number} · {title}\n\n{text}\n\n{badge_markdown(f'{number}_{NAMES[number]}', REPO)}"


NAMES = {"01": "data_prep", "02": "teacher_cache", "03": "train", "04": "analysis"}


def data_prep():
    return [
        new_markdown_cell(header("01", "Prepare the data", """\
Tokenizes every split of the preset's corpus whole, with no truncation (WikiText-103 with GPT-2's \
tokenizer for the study and Colab presets; Python's own documentation with a small BPE trained on it \
for `smoke` and `demo`, offline), and prints texts, characters, tokens and tokens per character per \
split; a split with implausibly few tokens per character is refused. It writes `train.bin`, \
`validation.bin` and `test.bin` (flat token ids) with a manifest `.json` each to the data folder: on \
Colab `MyDrive/kdlib-data/PRESET` on Google Drive, since each notebook runs on its own machine and \
02 and 03 read it from there; elsewhere `data/PRESET`. Run again with the same inputs, it reuses the \
files.""")),
        new_code_cell(install_cell("kdlib.config, kdlib.data, kdlib.ui")),
        params_cell(PRESET_PARAM, DATA_PARAM),
        new_code_cell("""\
data_dir = kdlib.ui.data_folder(preset, data_dir)
splits = kdlib.data.prepare(kdlib.config.preset(preset), data_dir)  # prints the per-split table
print(f"token files in {data_dir}")"""),
    ]


def teacher_cache():
    return [
        new_markdown_cell(header("02", "Teacher top-k cache", """\
Runs the teacher once over the training windows and keeps, per position, its top-k \
log-probabilities at the experiment's temperature, their token ids and the log of the remaining \
mass, in `DATA_DIR/cache/`. Only output-only experiments use it (`kl`, `js`: no feature map, no \
cosine term), and only when asked for: `03_train` with `teacher_source = "cache"` (a run whose cache \
does not match its teacher, tokenizer, data, block size, k or temperature is refused, never silently \
switched), and its runs are named and reported as `[top-k cache]`. So this notebook is optional: \
it saves the teacher's forward pass in every step of those runs. At k = 32 the cached divergence \
is a weaker objective than the online one (README, `docs/losses.md`). The size is printed before \
the build starts: about 132 bytes per training token with GPT-2's vocabulary, some 15 GB for \
WikiText-103, more than a free Drive holds; there, skip this notebook. An interrupted build \
continues where it stopped. Prepares the data first if `01_data_prep` has not.""")),
        new_code_cell(install_cell("kdlib.cache, kdlib.data, kdlib.ui")),
        params_cell(PRESET_PARAM,
                    f'divergence = "kl"  #@param {options(DIVERGENCES)}\n'
                    "# the cache is built at this divergence's temperature (the same for kl and js in every preset)",
                    DATA_PARAM),
        new_code_cell("""\
cfg = kdlib.ui.experiment_config(preset, divergence=divergence)
data_dir = kdlib.ui.data_folder(preset, data_dir)
kdlib.data.prepare(cfg, data_dir)  # reuses 01's files
cache = kdlib.cache.build_cache(cfg, data_dir, data_dir / "cache", device=kdlib.ui.device())
print(f"top-{cache.k} cache complete in {data_dir / 'cache'}")"""),
    ]


def train():
    return [
        new_markdown_cell(header("03", "Train one experiment", """\
Trains the TinyGPT student with the loss chosen in the parameters cell (a layer map for the feature \
loss on hidden states or attention maps, an output divergence, the cosine term; all off is the no-KD \
baseline `ce`) and writes the run to `RESULTS_DIR/PRESET/EXP[-attn]-seedSEED/`: `config.json`, \
`metrics.jsonl` and, at the end, `summary.json`; the best student is an fp16 `.safetensors` file \
(for the colab and study presets every student stays on the runtime's disk in `kdlib-local/weights` \
and Drive keeps a copy of the best run's only: 42 students of 97 MiB do not fit 100 MB). \
`RESULTS_DIR` is `MyDrive/kdlib` on Colab (Drive is mounted) and `runs/` elsewhere. Runtime → Run \
all trains exactly the chosen experiment; run it again after an interruption and it resumes (on \
Colab the resume state sits on the runtime's disk, too large for Drive: after a runtime reset the \
run starts over), and a finished run is not trained again. The panel below trains interactively \
instead; Run all does not press its button.""")),
        new_code_cell(install_cell("kdlib.ui")),
        params_cell(PRESET_PARAM,
                    f'feature_map = "none"  #@param {options(("none",) + MAPS)}',
                    'feature = "hidden"  #@param ["hidden", "attention"]\n'
                    "# what the feature map compares (the original study: attention maps)",
                    f'divergence = "kl"  #@param {options(("none",) + DIVERGENCES)}',
                    'cosine = False  #@param {type:"boolean"}',
                    'seed = None  #@param {type:"raw"}\n'
                    "# None = the preset's first seed (the colab presets' sweep runs seeds 0, 1, 2)",
                    'teacher_source = "online"  #@param ["online", "cache"]\n'
                    "# cache: the top-k cache of 02 for kl/js alone (a sparse objective, labelled in the report)",
                    RESULTS_PARAM, DATA_PARAM,
                    'max_steps = None  #@param {type:"raw"}\n'
                    "# None = the preset's schedule; a number cuts the run short"),
        new_code_cell("""\
results_dir = results_dir or kdlib.ui.results_folder()
data_dir = kdlib.ui.data_folder(preset, data_dir)
cfg = kdlib.ui.experiment_config(preset, feature_map, feature, divergence, cosine, seed, max_steps,
                                 teacher_source=teacher_source)
run_dir = kdlib.ui.run_folder(cfg, results_dir)
print(kdlib.ui.describe(cfg, results_dir))"""),
        new_markdown_cell("## The plan\n\n"
                          "What the run will cost before it starts: its token budget (the same for every "
                          "experiment of the preset), steps, evaluations, the time (measured on this "
                          "runtime's GPU in a few seconds; an estimate without one) and the bytes it leaves "
                          "on Drive against the 100 MB budget."),
        new_code_cell("print(kdlib.ui.plan_text(cfg, results_dir, data_dir))"),
        new_markdown_cell("## Interactive panel\n\n"
                          "Pick a combination and press **Train**: the progress bar and the validation "
                          "perplexity update as it trains. Its choices start at the parameters above."),
        new_code_cell("""\
kdlib.ui.panel(preset, results_dir, data_dir, feature_map=feature_map, feature=feature,
               divergence=divergence, cosine=cosine, seed=seed, max_steps=max_steps)"""),
        new_markdown_cell("## Train the chosen experiment\n\n"
                          "Trains the parameters' experiment (resumes it if interrupted), then plots its "
                          "validation perplexity."),
        new_code_cell("summary = kdlib.ui.train_run(cfg, results_dir, data_dir, show_plan=False)"),
        new_code_cell("kdlib.ui.show_val_ppl(run_dir)"),
    ]


def analysis():
    return [
        new_markdown_cell(header("04", "Analysis", """\
Reads every run folder in the results folder (`MyDrive/kdlib` on Colab, `runs/` elsewhere; runs it \
cannot read yet are listed with the reason) and writes the report to the figures folder \
(`MyDrive/kdlib-figures` on Colab, `figures/` elsewhere): per experiment the best and final \
validation and the test perplexity with their mean and 95% confidence interval over seeds and the \
change against the no-KD baseline (`results.csv`, `results.md`), one row per run (`runs.csv`), the \
cosine term's effect paired by seed, JS's early best and later rise, and the figures as PNG and \
PDF; then shows the table and figures here. `reference` adds the original study's table and curves \
(shipped with kdlib) beside these runs.""")),
        new_code_cell(install_cell("kdlib.analysis, kdlib.ui")),
        params_cell(RESULTS_PARAM,
                    'figures_dir = ""  #@param {type:"string"}\n'
                    '# "" = MyDrive/kdlib-figures on Colab, figures/ in the working folder elsewhere',
                    'reference = False  #@param {type:"boolean"}'),
        new_code_cell("""\
results_dir = results_dir or kdlib.ui.results_folder()
figures_dir = figures_dir or kdlib.ui.results_folder("kdlib-figures", local="figures")
result = kdlib.analysis.report(results_dir, figures_dir, reference=reference)  # prints skipped runs
kdlib.ui.show_report(result)"""),
    ]


NOTEBOOKS = {"01_data_prep": data_prep, "02_teacher_cache": teacher_cache, "03_train": train,
             "04_analysis": analysis}
GPU = {"02_teacher_cache", "03_train"}  # Colab opens these on a GPU runtime


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=NOTEBOOKS[name]())
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name[:2]}-{i:02d}"  # fixed ids: regenerating gives the same file
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": [], "toc_visible": True},
    }
    if name in GPU:
        nb.metadata["accelerator"] = "GPU"
    nbformat.validate(nb)
    return nb


def write_all(folder: Path = HERE) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in NOTEBOOKS:
        path = folder / f"{name}.ipynb"
        nbformat.write(build(name), str(path))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(p)
