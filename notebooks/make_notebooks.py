"""Write the four notebooks from one place, so their badges, install cells and parameters agree.

    python notebooks/make_notebooks.py            # rewrites notebooks/*.ipynb
    python notebooks/make_notebooks.py OUT_DIR    # writes them elsewhere (the tests compare)

The notebooks are written without outputs and with fixed cell ids, so running
this twice gives the same files. The GitHub repository and ref in the badges
and the install cell are ``kdlib.badges.REPO`` and ``REF`` (change them with
``python -m kdlib badges --repo OWNER/REPO --ref REF``). Every piece of logic
but the install is a kdlib call; the cells only name folders and pass
parameters.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kdlib, installed or not

from kdlib.badges import REF, REPO, badge_markdown  # noqa: E402
from kdlib.grid import MAPS  # noqa: E402
from kdlib.colab import DRIVE_LAYOUT, NOTEBOOK_PRESETS  # noqa: E402
from kdlib.notebook import STUDY_DIVERGENCES  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_PRESET = "colab-t4"  # what a Colab user gets from the badge; CI passes preset="smoke"


def options(values) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


# The install cell is the one cell that cannot call kdlib: kdlib is not there yet. It is the same in
# every notebook; its form shows the two fields and their help, and hides this code. It installs the
# commit that `ref` names now (so a moved branch or a new tag is picked up), and only when that commit
# is not the one installed; then kdlib's requirements that the runtime lacks (none on Colab).
INSTALL = '''#@title Install kdlib
#@markdown kdlib comes from GitHub at a pinned ref and is installed alone (`--no-deps`): Colab's torch,
#@markdown transformers, datasets and ipywidgets stay as they are. Off Colab the kdlib installed here is used.
#@markdown **repo**: the GitHub copy to install (`owner/name`, as in github.com/owner/name)
repo = "__REPO__"  #@param {type:"string"}
#@markdown **ref**: its tag, commit or branch; run this cell again after changing it (or after the branch
#@markdown moved) and the new code is installed
ref = "__REF__"  #@param {type:"string"}
import importlib, importlib.util, json, os, subprocess, sys
from importlib import metadata


def install_kdlib(repo, ref):
    repo, ref = repo.strip().removeprefix("https://github.com/").removesuffix(".git").strip("/"), ref.strip()
    if repo.split("/")[0] in ("", "OWNER") or repo.count("/") != 1:
        raise SystemExit(
            f"kdlib's GitHub repository is not set: repo is {repo!r}. Type the copy to install in this "
            "cell's repo field (owner/name, as in github.com/owner/name, e.g. alice/kdlib) and its ref (a tag, "
            "commit or branch), then run it again. For good: in your checkout run `python -m kdlib badges "
            "--repo alice/kdlib --ref v0.1.0`, commit, tag and push (docs/colab.md: Publishing your copy).")
    url = f"https://github.com/{repo}"
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # a private or missing repository fails, never prompts
    names = [f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}", f"refs/heads/{ref}"]  # a tag's commit, a tag, a branch
    found = subprocess.run(["git", "ls-remote", url, *names], capture_output=True, text=True, env=env)
    if found.returncode != 0:
        raise SystemExit(f"{url} cannot be read (git: {found.stderr.strip()[-300:]}); check repo, and that "
                         "the repository is public")
    shas = {name: sha for sha, name in (line.split("\t") for line in found.stdout.splitlines())}
    commit = next((shas[n] for n in names if n in shas), None)  # exactly REF: never old/REF or release/REF
    if commit is None and not (len(ref) >= 7 and all(c in "0123456789abcdef" for c in ref.lower())):
        raise SystemExit(f"{url} has no tag or branch {ref!r}; check ref (a tag, branch or commit hash)")
    commit = (commit or ref).lower()
    try:
        now = json.loads(metadata.distribution("kdlib").read_text("direct_url.json") or "{}")
    except metadata.PackageNotFoundError:
        now = {}
    if now.get("url") == url and now.get("vcs_info", {}).get("commit_id", "").startswith(commit):
        print(f"kdlib from {repo}@{ref} ({commit[:10]}) is installed")
        return
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    if subprocess.run([*pip, "--no-deps", "--force-reinstall", f"git+{url}@{commit}"], env=env).returncode:
        raise SystemExit(f"pip could not install {url} at {ref} ({commit[:10]}): see its message above; "
                         "check ref (a commit of that repository)")
    for name in [m for m in sys.modules if m == "kdlib" or m.startswith("kdlib.")]:
        del sys.modules[name]  # the next import reads the new code
    importlib.invalidate_caches()
    try:
        from kdlib.requirements import missing  # kdlib's requirements this runtime lacks: none on Colab
    except ImportError:  # a ref from before kdlib.requirements: its requirements are Colab's too
        missing = list
    if missing():
        subprocess.run([*pip, *missing()], check=True)
    print(f"installed kdlib from {repo}@{ref} ({commit[:10]})")


if "google.colab" in sys.modules:
    install_kdlib(repo, ref)
elif importlib.util.find_spec("kdlib") is None:  # opened from notebooks/ in a checkout
    sys.path.insert(0, os.path.abspath(".."))
'''


def install_source(repo: str = REPO, ref: str = REF) -> str:
    """The install cell's code, without the line that imports the notebook's kdlib modules."""
    return INSTALL.replace("__REPO__", repo).replace("__REF__", ref)


def install_cell(imports: str):
    cell = new_code_cell(install_source() + f"import {imports}\nprint('kdlib', kdlib.__version__)")
    cell.metadata.update({"cellView": "form"})
    return cell


def param(line: str, *help_lines: str) -> str:
    """A form field with its help text above it (``#@markdown`` lines show in Colab's form view)."""
    return "\n".join([*(f"#@markdown {h}" for h in help_lines), line])


PRESET_PARAM = param(
    f'preset = "{DEFAULT_PRESET}"  #@param {options(NOTEBOOK_PRESETS)}',
    "**preset**: *smoke* = seconds on a CPU, to try the notebooks; *colab-t4* / *colab-a100* = the corrected",
    "protocol on one Colab GPU (40M / 100M tokens a run); *study* = the original study's regime (50 epochs",
    "of a 1.65M-token subset, fp32, an A100). docs/protocol.md")
DATA_PARAM = param('data_dir = ""  #@param {type:"string"}',
                   "**data_dir**: the prepared data; empty = `MyDrive/kdlib-data/PRESET` on Colab (Drive),",
                   "`data/PRESET` elsewhere")
RESULTS_PARAM = param('results_dir = ""  #@param {type:"string"}',
                      "**results_dir**: the run folders; empty = `MyDrive/kdlib` on Colab (Drive, 100 MiB",
                      "budget), `runs/` elsewhere")


def params_cell(*fields: str):
    cell = new_code_cell("#@title Parameters\n" + "\n".join(fields))
    cell.metadata.update({"tags": ["parameters"], "cellView": "form"})
    return cell


def runtime_cell(preset: str | None, needs_gpu: bool, **folders: str):
    """Where the notebook runs and where its files go: the first cell after the parameters."""
    check = f"kdlib.colab.check_runtime({preset}, needs_gpu={needs_gpu})" if preset else "kdlib.colab.check_runtime()"
    args = ", ".join([*([preset] if preset else []), *(f"{k}={v}" for k, v in folders.items())])
    note = "  # a GPU preset on a CPU runtime stops here, saying how to pick a GPU" if needs_gpu else ""
    return new_code_cell(f"{check}{note}\nf = kdlib.colab.folders({args})\nprint(f)")


def header(number: str, title: str, text: str) -> str:
    return f"# {number} · {title}\n\n{text}\n\n{badge_markdown(f'{number}_{NAMES[number]}', REPO, REF)}"


NAMES = {"01": "data_prep", "02": "teacher_cache", "03": "train", "04": "analysis"}
WHERE = "## Where this runs\n\nThe runtime, its GPU and the preset's precision; then the folders this notebook uses."


def data_prep():
    return [
        new_markdown_cell(header("01", "Prepare the data", """\
Tokenizes every split of the preset's corpus whole, with no truncation (WikiText-103 with GPT-2's \
tokenizer for the study and Colab presets; Python's own documentation with a small BPE trained on it \
for `smoke`, offline). It writes `train.bin`, `validation.bin` and `test.bin` (flat token ids) with a \
manifest `.json` each to the data folder, which 02 and 03 read: on Colab each notebook runs on its own \
machine, so the folder is on Google Drive. Run again with the same inputs, it reuses the files.

### Where everything goes (Colab)

""" + DRIVE_LAYOUT)),
        install_cell("kdlib.colab, kdlib.config, kdlib.notebook, kdlib.prep"),
        params_cell(PRESET_PARAM, DATA_PARAM),
        new_markdown_cell(WHERE),
        runtime_cell("preset", False, data_dir="data_dir"),
        new_markdown_cell("## Tokenize\n\nTexts, characters, tokens and tokens per character per split; a split "
                          "with implausibly few tokens per character (a truncated corpus) is refused."),
        new_code_cell("cfg = kdlib.config.preset(preset)\n"
                      "splits = kdlib.prep.prepare(cfg, f.data_dir)  # prints the per-split table"),
        new_markdown_cell("## What the model reads\n\nA stretch of the training split decoded back to text: "
                          "the tokenizer's round trip, and a look at the data."),
        new_code_cell("kdlib.notebook.show_sample(cfg, f.data_dir)"),
    ]


def teacher_cache():
    return [
        new_markdown_cell(header("02", "Teacher top-k cache", """\
Optional. Runs the teacher once over the training windows and keeps, per position, its top-k \
log-probabilities at the experiment's temperature, their token ids and the log of the remaining mass. \
Only output-only experiments (`kl`, `js`) use it, and only when asked for (`03_train` with \
`teacher_source = "cache"`; its runs are named and reported `[top-k cache]`): it saves the teacher's \
forward pass in every step. At k = 32 the cached divergence is a weaker objective than the online one \
(`docs/cache.md`, `docs/losses.md`). It is large (about 132 bytes per training token with GPT-2's vocabulary, \
some 15 GB for WikiText-103), so on Colab it goes to the runtime's own disk, never Drive; since each \
notebook runs on its own machine, `03_train` builds it on its runtime when it is asked to use one that \
is not there. This notebook shows its size and where it goes, checks the disk has room, builds it, and \
measures how much of the teacher's distribution the top k keep. An interrupted build continues where \
it stopped.""")),
        install_cell("kdlib.colab, kdlib.notebook, kdlib.prep"),
        params_cell(PRESET_PARAM,
                    param(f'divergence = "kl"  #@param {options(STUDY_DIVERGENCES)}',
                          "**divergence**: the cache is built at this divergence's temperature (the same for kl",
                          "and js in every preset)"),
                    DATA_PARAM,
                    param('cache_dir = ""  #@param {type:"string"}',
                          "**cache_dir**: empty = `/content/kdlib-cache/PRESET` on Colab (the runtime's disk),",
                          "`DATA_DIR/cache` elsewhere")),
        new_markdown_cell(WHERE),
        runtime_cell("preset", True, data_dir="data_dir", cache_dir="cache_dir"),
        new_markdown_cell("## Size and place\n\nThe cache's size, where it goes and that disk's free space; "
                          "it stops here if the cache does not fit."),
        new_code_cell("cfg = kdlib.notebook.run_config(preset, divergence)\n"
                      "kdlib.prep.prepare(cfg, f.data_dir)  # reuses 01's files\n"
                      "kdlib.notebook.cache_plan(cfg, f.data_dir, f.cache_dir)"),
        new_markdown_cell("## Build, and its fidelity\n\nThe teacher's pass, then the share of its "
                          "probability mass the top k keep (the rest is one tail bucket)."),
        new_code_cell("coverage = kdlib.notebook.build_cache(cfg, f.data_dir, f.cache_dir, plan=False)  # checked above"),
    ]


def train():
    return [
        new_markdown_cell(header("03", "Train one experiment", """\
Trains the TinyGPT student with the loss chosen in the parameters (a layer map for the feature loss on \
hidden states or attention maps, an output divergence, the cosine term; all off is the no-KD baseline \
`ce`) into `RESULTS_DIR/PRESET/EXP[-attn]-seedSEED/`: `config.json`, `metrics.jsonl` and, at the end, \
`summary.json`. For the colab and study presets every student stays on the runtime's disk and Drive \
keeps the best run's only (42 students of 97 MiB do not fit 100 MB; the layout with sizes is in \
`01_data_prep` and `docs/colab.md`). Runtime → Run all trains exactly the chosen experiment after showing \
its plan; run it again after an interruption and it resumes (after a runtime reset it starts over: \
the resume state is on the runtime's disk), and a finished run is not trained again. The panel trains \
interactively instead; Run all does not press its button.""")),
        install_cell("kdlib.colab, kdlib.launch, kdlib.notebook, kdlib.ui"),
        params_cell(PRESET_PARAM,
                    param(f'feature_map = "none"  #@param {options(("none",) + MAPS)}',
                          "**feature_map**: which student layer matches which teacher layer in the feature loss",
                          "(none = no feature loss)"),
                    param('feature = "hidden"  #@param ["hidden", "attention"]',
                          "**feature**: what the feature map compares (the original study: attention maps)"),
                    param(f'divergence = "kl"  #@param {options(("none",) + STUDY_DIVERGENCES)}',
                          "**divergence**: the output divergence to the teacher (none = no output term)"),
                    param('cosine = False  #@param {type:"boolean"}',
                          "**cosine**: add the cosine term between student and teacher logits (the original study's)"),
                    param('seed = None  #@param {type:"raw"}',
                          "**seed**: None = the preset's first (the colab presets' sweep runs 0, 1, 2)"),
                    param('teacher_source = "online"  #@param ["online", "cache"]',
                          "**teacher_source**: cache = 02's top-k cache, for kl/js alone (a sparse objective,",
                          "labelled in the report; built on this runtime if missing)"),
                    RESULTS_PARAM, DATA_PARAM,
                    param('max_steps = None  #@param {type:"raw"}',
                          "**max_steps**: None = the preset's token budget; a number cuts the run short")),
        new_markdown_cell(WHERE),
        runtime_cell("preset", True, results_dir="results_dir", data_dir="data_dir"),
        new_code_cell("""\
exp = kdlib.notebook.experiment_name(feature_map, divergence, cosine, feature)
choices = kdlib.launch.RunChoices(feature=feature, teacher_source=teacher_source, max_steps=max_steps)
cfg = kdlib.notebook.run_config(preset, exp, seed, choices)
where = f.run_folders(preset)
run_dir = kdlib.notebook.run_folder(cfg, where.results_dir)
print(kdlib.notebook.describe(cfg, where.results_dir))"""),
        new_markdown_cell("## The plan\n\n"
                          "What the run will cost before it starts: its token budget (the same for every "
                          "experiment of the preset), steps, evaluations, the time (measured on this "
                          "runtime's GPU in a few seconds; an estimate without one) and the bytes it leaves "
                          "on Drive against the 100 MiB budget. Run all stops here if it does not fit."),
        new_code_cell("plan = kdlib.notebook.show_plan(cfg, where)"),
        new_markdown_cell("## Interactive panel\n\n"
                          "Pick a combination and press **Train**: the progress bar and the validation "
                          "perplexity update as it trains. Its choices start at the parameters above; "
                          "another preset uses that preset's data folder, and a choice that cannot run here "
                          "says why before you press Train."),
        new_code_cell("""\
kdlib.ui.panel(preset, f.results_dir, f.data_dir, feature_map=feature_map, feature=feature,
               divergence=divergence, cosine=cosine, seed=seed, max_steps=max_steps,
               teacher_source=teacher_source)"""),
        new_markdown_cell("## Train the chosen experiment\n\n"
                          "Trains the parameters' experiment (resumes it if interrupted) with a progress bar, "
                          "then shows its summary and its validation perplexity."),
        new_code_cell("summary = kdlib.notebook.train_run(cfg, where, plan=False)\n"
                      "print(kdlib.notebook.summary_text(summary))"),
        new_code_cell("kdlib.notebook.show_val_ppl(run_dir)"),
    ]


def analysis():
    return [
        new_markdown_cell(header("04", "Analysis", """\
Reads every run folder in the results folder (runs it cannot read yet are listed with the reason) and \
writes the report to the figures folder: per experiment the best and final validation and the test \
perplexity with their mean and 95% confidence interval over seeds and the change against the no-KD \
baseline (`results.csv`, `results.md`), the students' fidelity to the teacher (top-1 agreement, KL), \
their calibration (ECE, reliability diagram) and their perplexity by token-frequency bucket, which rows \
differ from `kl` and `ce` (paired by seed, Holm-corrected), one row per run (`runs.csv`), the cosine \
term's effect paired by seed, JS's early best and later rise, and the figures as PNG and PDF; then shows \
the tables and the figures here, lists what was written where, and ends with a few prompts continued by \
the teacher, `ce`, `kl` and the best run. `reference` adds the original study's table and curves \
(shipped with kdlib) beside these runs.""")),
        install_cell("kdlib.analysis, kdlib.colab, kdlib.notebook"),
        params_cell(RESULTS_PARAM,
                    param('figures_dir = ""  #@param {type:"string"}',
                          "**figures_dir**: the report; empty = `MyDrive/kdlib-figures` on Colab, `figures/`",
                          "elsewhere"),
                    param('reference = False  #@param {type:"boolean"}',
                          "**reference**: add the original study's table and curves beside these runs"),
                    param('data_dir = ""  #@param {type:"string"}',
                          "**data_dir**: the prepared data the runs trained on (its tokenizer, for the samples);",
                          "empty = the runs' preset's, `MyDrive/kdlib-data/PRESET` on Colab, `data/PRESET`",
                          "elsewhere")),
        new_markdown_cell(WHERE),
        runtime_cell(None, False, results_dir="results_dir", figures_dir="figures_dir",
                     data_dir="data_dir or None"),  # None: the preset is the runs', known only later
        new_markdown_cell("## The report\n\nThe table (one protocol group at a time, with its stated "
                          "protocol), the figures, and the files written."),
        new_code_cell("""\
result = kdlib.analysis.report(f.results_dir, f.figures_dir, reference=reference)  # prints skipped runs
kdlib.notebook.show_report(result)"""),
        new_markdown_cell("## What the students say\n\n"
                          "The same prompts continued by the teacher, the no-KD baseline `ce`, plain `kl` and "
                          "the best run (lowest test perplexity), 40 tokens each, sampled from the top-p 0.9 "
                          "nucleus with seed 0: the same seed on the same device gives the same text. A "
                          "student that is not here (on Colab Drive keeps the best run's only) is left out, "
                          "with a note."),
        new_code_cell("samples = kdlib.notebook.samples_table(f.results_dir, f.data_dir)\n"
                      "kdlib.notebook.show_samples(samples)"),
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
