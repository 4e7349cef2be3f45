"""``python -m kdlib ...``: parse arguments, run the command (``kdlib.commands``), map errors to exit codes.

The options that several commands share are parent parsers (``_shared``), declared once; every
command's ``--preset`` defaults to ``DEFAULT_PRESET``.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .commands import COMMANDS
from .errors import KdlibError

DEFAULT_PRESET = "smoke"  # seconds on a CPU: a command run without --preset tries the pipeline


def peak_tflops_arg(text: str):
    """--peak-tflops: a number of TFLOP/s > 0, or "measure" (benchmarks/bench.py takes it too)."""
    if text == "measure":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of TFLOP/s or 'measure', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the peak must be > 0 TFLOP/s, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _shared() -> dict:
    """The options several commands share, one parent parser per group."""
    from .config import PRESETS

    groups = {name: argparse.ArgumentParser(add_help=False) for name in ("preset", "feature", "data", "run",
                                                                         "training", "sweep")}
    groups["preset"].add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                                  help=f"preset (default: {DEFAULT_PRESET})")
    groups["feature"].add_argument("--feature", choices=("hidden", "attention"),
                                   help="feature kind for the feature-map experiments (default: the preset's)")
    groups["data"].add_argument("--data-dir", help="prepared token folder (default: data/PRESET)")
    run = groups["run"]
    run.add_argument("--runs", default="runs", help="results folder (default: runs); each run goes to RUNS/PRESET/RUN")
    run.add_argument("--budget-mib", type=float, default=100.0, help="storage budget of the results folder")
    run.add_argument("--data-dir", help="prepared token folder (default: data/PRESET; prepared if missing)")
    run.add_argument("--teacher-source", choices=("online", "cache"),
                     help="where the teacher's outputs come from (default: the preset's, online): 'cache' gives the "
                          "top-k cache to the output-only experiments (a sparse objective, labelled in the run name "
                          "and the report); the others stay online")
    run.add_argument("--max-steps", type=positive_int,
                     help="cut every run's budget to this many optimizer steps (a short try)")
    run.add_argument("--weights", choices=("run", "best"),
                     help="run: every student in its run folder; best: every student in --weights-dir and only the "
                          "best run's copy in the results folder (default: the preset's)")
    run.add_argument("--weights-dir", help="local folder for the students with --weights best")
    run.add_argument("--resume-dir", help="folder for the resume state ('' = the run folder; default: the preset's)")
    groups["training"].add_argument("--cache-dir", help="top-k cache folder (default: DATA_DIR/cache)")
    groups["training"].add_argument("--compile", action="store_true",
                                    help="torch.compile the student and the loss formulas (faster steps after a "
                                         "minute or two of compiling)")
    groups["sweep"].add_argument("--exps", nargs="+", metavar="NAME", help="experiments (default: the 14 of the grid)")
    groups["sweep"].add_argument("--seeds", nargs="+", type=int, help="seeds (default: the preset's)")
    groups["sweep"].add_argument("--set", dest="sets", action="append", metavar="KEY=V1,V2,...",
                                 help="a sensitivity sweep over a numeric loss or train field (loss.temperature, "
                                      "loss.w_div, loss.w_feat, loss.w_cos, train.lr, ...): every run once per "
                                      "value, in its own folder (kl+temperature=1-seed0); repeated, their product")
    return groups


def _command(sub, name: str, summary: str, description: str, parents=()) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=summary, description=description, parents=list(parents))
    p.set_defaults(func=COMMANDS[name])
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kdlib",
                                     description="Compare knowledge-distillation losses for a small GPT student.",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kdlib {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    shared = _shared()
    for add in (_add_study_commands, _add_data_commands, _add_run_commands, _add_result_commands,
                _add_bench_command, _add_upkeep_commands):
        add(sub, shared)
    return parser


def _add_study_commands(sub, shared: dict) -> None:
    p = _command(sub, "grid", "print the study's 14 experiment names, in order",
                 "Print the study's 14 experiment names, one per line; with --json, each one's loss components "
                 "and its full loss config under a preset.", [shared["preset"], shared["feature"]])
    p.add_argument("--json", action="store_true", help="print each experiment's loss spec as JSON")

    p = _command(sub, "check", "preflight: a few training steps per experiment, checking the wiring",
                 "Run each experiment for a few optimizer steps on random token windows and check that every "
                 "loss component is finite and present, every student parameter and projector gets a gradient "
                 "and moves, and the teacher gets none and does not change. One line per experiment; exit code "
                 "1 if any fails.", [shared["preset"], shared["feature"]])
    p.add_argument("--exps", "--exp", nargs="+", metavar="NAME",
                   help="experiments to check (default: the 14 of the grid)")
    p.add_argument("--steps", type=positive_int, default=2, help="optimizer steps per experiment (default: 2)")
    p.add_argument("--data-dir", help="prepared data to check on (default: data/PRESET if prepared)")


def _add_data_commands(sub, shared: dict) -> None:
    p = _command(sub, "prep", "tokenize the preset's corpus into token files",
                 "Tokenize every split of the preset's corpus (no truncation) into flat token files with "
                 "manifests, print tokens per split, and refuse a split with implausibly few tokens. Re-running "
                 "with the same inputs reuses the files.", [shared["preset"]])
    p.add_argument("--data-dir", help="output folder (default: data/PRESET)")

    p = _command(sub, "cache", "build the teacher's top-k cache for output-only experiments",
                 "Run the teacher once over the prepared windows and keep, per position, its top-k "
                 "log-probabilities at the experiment's temperature, their ids and the log tail mass. Resumable: "
                 "run it again after an interruption.", [shared["preset"], shared["data"]])
    p.add_argument("--exp", default="kl", help="experiment whose temperature the cache uses (default: kl)")
    p.add_argument("--splits", nargs="+", default=["train"], choices=("train", "validation", "test"))
    p.add_argument("--cache-dir", help="cache folder (default: DATA_DIR/cache)")
    p.add_argument("--device", help="device for the teacher (default: cpu)")


def _add_run_commands(sub, shared: dict) -> None:
    runs = [shared["preset"], shared["feature"], shared["run"]]
    p = _command(sub, "train", "train one experiment (resumes an interrupted run)",
                 "Train one experiment in RUNS/PRESET/EXP-seedSEED, after printing its plan (tokens, steps, "
                 "evaluations, time, bytes). Started again on the same folder, it continues from the resume "
                 "state; a finished run is not trained again.", runs + [shared["training"]])
    p.add_argument("--exp", required=True, help="experiment name (python -m kdlib grid lists the 14)")
    p.add_argument("--seed", type=int, help="seed (default: the preset's first)")

    _command(sub, "sweep", "train experiments x seeds one after another, skipping finished runs",
             "Print the sweep's plan, refuse it before the first run if its results would not fit the storage "
             "budget, then train each experiment for each seed in RUNS/PRESET/; finished runs are skipped, "
             "interrupted ones resumed.", runs + [shared["training"], shared["sweep"]])

    p = _command(sub, "plan", "what a sweep will cost: tokens, steps, evaluations, time, bytes",
                 "Per run of a sweep: its tokens (the same for every experiment of a preset), steps, epochs, "
                 "evaluations, the estimated time and the bytes it leaves in the results folder and elsewhere; "
                 "the grid's totals and whether the results folder's budget holds them. The time is measured (a "
                 "few of kdlib's steps on this machine's GPU) or, with no GPU here, estimated for the GPU the "
                 "preset is sized for from the FLOPs model at a stated MFU.", runs + [shared["sweep"]])
    p.add_argument("--device", default="auto",
                   help="auto (measure on this GPU; without one, estimate for the preset's GPU, or measure on the "
                        "CPU for smoke/demo), measure (this machine), or a GPU name: A100, T4, H100, L4, ... "
                        "(default: auto)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _add_result_commands(sub, shared: dict) -> None:
    p = _command(sub, "eval", "perplexity of a run's student on a split (--metrics: and the test metrics)",
                 "Score a run's saved student under the sliding-window protocol; with --metrics, also its "
                 "fidelity to the teacher, calibration and perplexity by frequency bucket on the test split.",
                 [shared["data"]])
    p.add_argument("run_dir", help="a run folder (with config.json and student.safetensors)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--stride", type=positive_int, help="window stride (default: block_size // 2)")
    p.add_argument("--block-size", type=positive_int, help="window length (default: the run's block size)")
    p.add_argument("--metrics", action="store_true",
                   help="also the test metrics beside perplexity (agreement and KL to the teacher, calibration "
                        "error, perplexity by frequency bucket; they need the teacher), written into the run's "
                        "summary.json for the report: for runs trained before kdlib measured them")
    p.add_argument("--device", help="device for the student and the teacher (default: cpu)")

    p = _command(sub, "sample", "seeded top-p samples of a run's student, continuing a few prompts",
                 "Continue each prompt with tokens sampled from a run's saved student (top-p, seeded on the CPU: "
                 "the same seed on the same device gives the same text) and print prompt and continuation. "
                 "The tokenizer is the one of the run's data folder.", [shared["data"]])
    p.add_argument("run_dir", help="a run folder (with config.json and student.safetensors)")
    p.add_argument("--prompts", metavar="FILE",
                   help="a UTF-8 text file, one prompt a line (default: a few fixed prompts, kdlib.sampling)")
    p.add_argument("--tokens", type=positive_int, default=40, help="tokens to sample per prompt (default: 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    p.add_argument("--top-p", type=float, default=0.9,
                   help="keep the most likely tokens up to this probability mass, in (0, 1] (default: 0.9)")

    p = _command(sub, "demo", "the whole study offline on a CPU: data, teacher, cache, 14 runs, results",
                 "Run the study end to end with no network: Python's own documentation as text, a BPE tokenizer "
                 "and a small GPT-2-architecture teacher trained on it, the top-k cache, the preflight check, the "
                 "14 experiments with a small student, then the results table and figures. About 10-15 minutes "
                 "on 2 CPU cores; finished steps are reused when run again.")
    p.add_argument("--dir", default="demo", help="output folder (default: demo)")
    p.add_argument("--quick", action="store_true", help="a few steps per run (for CI): checks the pipeline")
    p.add_argument("--sensitivity", action="store_true",
                   help="instead of the grid: the sensitivity sweeps of docs/protocol.md (feature, cosine and "
                        "divergence weights, temperature) on the demo's data and teacher, into DIR/sensitivity")

    p = _command(sub, "report", "tables and figures from a results folder",
                 "Read every run in a results folder (finished or not), write the per-experiment table (mean and "
                 "95% CI over seeds, change against no KD; fidelity to the teacher, calibration, perplexity by "
                 "frequency bucket; which rows differ from kl and ce, Holm-corrected) as CSV and Markdown, per-run "
                 "and effect tables, and the figures (PNG and PDF). Runs it cannot read are listed with the reason and skipped.")
    p.add_argument("runs", nargs="?", default="runs", help="results folder (default: runs)")
    p.add_argument("--figures", default="figures", help="output folder (default: figures)")
    p.add_argument("--reference", action="store_true",
                   help="also the original study's table and curves (shipped with kdlib), and ours beside them")


def _add_bench_command(sub, shared: dict) -> None:
    p = _command(sub, "bench", "kdlib's training step: tokens/s, ms/step, peak memory and MFU per experiment",
                 "Training throughput (tokens/s, ms/step, peak memory, MFU) of kdlib's own training step for "
                 "each experiment at the benchmark's shapes and data: 'kdlib' (the teacher online) and 'cached' "
                 "(the top-k cache, output-only experiments). Prints Markdown; --out writes bench.json and "
                 "bench.md. The comparison with the original study's method, the losses alone and data prep: "
                 "python benchmarks/bench.py. Results: docs/benchmarks.md.")
    p.add_argument("--shapes", default="cpu", choices=("study", "cpu", "smoke"),
                   help="study: the study's models and batch (GPU); cpu: the same proportions, minutes "
                        "on 2 cores (default); smoke: seconds")
    p.add_argument("--exps", "--exp", nargs="+", metavar="NAME", help="experiments (default: the 14)")
    p.add_argument("--paths", nargs="+", default=["kdlib", "cached"], choices=("kdlib", "cached"),
                   help="paths to measure (default: both)")
    p.add_argument("--feature", default="hidden", choices=("hidden", "attention"),
                   help="kdlib's feature loss: hidden states (default, SDPA) or attention maps (the study's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the student and the loss formulas")
    p.add_argument("--peak-tflops", type=peak_tflops_arg,
                   help="the device's peak TFLOP/s for MFU, or 'measure' (the best large matmul here); "
                        "default: the datasheet value of known GPUs, or $KDLIB_PEAK_TFLOPS")
    p.add_argument("--steps", type=positive_int, help="timed steps per measurement (default: per shapes)")
    p.add_argument("--warmup", type=positive_int, help="warm-up steps per measurement (default: per shapes)")
    p.add_argument("--out", help="folder for bench.json and bench.md (rewritten after every measurement)")


def _add_upkeep_commands(sub, shared: dict) -> None:
    p = _command(sub, "badges", "point every Open-in-Colab badge and install cell at a GitHub repo and ref",
                 "Rewrite the Open-in-Colab badges, the notebooks' install cells and the install URLs in "
                 "notebooks/*.ipynb, README.md and docs/*.md, and kdlib/published.json (the one place the repo "
                 "and ref are named) to OWNER/REPO at REF.")
    p.add_argument("--repo", required=True, help="GitHub OWNER/REPO")
    p.add_argument("--ref", help="the tag, commit or branch the badges open and the install cells install "
                                 "(default: keep kdlib.badges.REF); push it before opening a badge")
    p.add_argument("--root", default=".", help="repository root (default: .)")

    p = _command(sub, "storage", "usage of a results folder per run, against its budget",
                 "Print the disk usage of each run in a results folder and the total against the storage budget. "
                 "Weights are deleted only when asked with --delete-weights.")
    p.add_argument("dir", nargs="?", default="runs", help="results folder (default: runs)")
    p.add_argument("--limit-mib", type=float, default=100.0, help="budget in MiB (default: 100)")
    p.add_argument("--delete-weights", nargs="+", metavar="RUN",
                   help="delete the .safetensors files (weights, resume state) of these runs, "
                        "keeping their config and metrics")


EXIT_CODES = """\
exit codes:
  0    done
  1    check: a check failed; any command: a bug in kdlib (shown with its traceback)
  2    bad input: "error: ..." says what was wrong and what to do (a usage error too)
  3    the environment: a full disk, a folder that cannot be written, a path that is missing
       or a file where a folder is expected; "error: ..." names the path
  130  interrupted (Ctrl-C); train and sweep continue where they stopped when run again
"""
BAD_INPUT, ENVIRONMENT, INTERRUPTED = 2, 3, 130

# The arguments that name folders, and their flags: each is refused before any work when it is a file,
# or lies inside one (every command creates or reads folders there).
FOLDER_ARGS = {"runs": "--runs", "data_dir": "--data-dir", "cache_dir": "--cache-dir", "figures": "--figures",
               "weights_dir": "--weights-dir", "resume_dir": "--resume-dir", "dir": "--dir", "run_dir": "run folder",
               "root": "--root", "out": "--out"}
POSITIONAL_FOLDERS = {("report", "runs"): "results folder", ("storage", "dir"): "results folder"}


def _check_folders(args: argparse.Namespace) -> None:
    for attr, flag in FOLDER_ARGS.items():
        value = getattr(args, attr, None)
        if not isinstance(value, str) or not value:
            continue
        flag = POSITIONAL_FOLDERS.get((args.command, attr), flag)
        path = Path(value)
        above = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
        if above is None or above.is_dir():
            continue
        where = "is a file" if above == path else f"is inside {above}, which is a file"
        raise KdlibError(f"{flag} {value} {where}, not a folder; give a folder (move the file away, or choose "
                         "another path)")


def _file_of(e: BaseException) -> Optional[str]:
    """The file an exception is about: its ``filename``, else the ``path`` that the innermost kdlib
    function it passed through was reading or writing (a write's OSError and JSON's errors name none)."""
    if getattr(e, "filename", None):
        return str(e.filename)
    found, tb = None, e.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals.get("__name__", "").startswith("kdlib.") and isinstance(frame.f_locals.get("path"),
                                                                                   (str, Path)):
            found = frame.f_locals["path"]
        tb = tb.tb_next
    return str(found) if found is not None else None


def _from_json(e: BaseException) -> bool:
    """Whether ``e`` was raised while the json module was parsing (a malformed file, not a bug)."""
    tb = e.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        if name == "json" or name.startswith("json."):
            return True
        tb = tb.tb_next
    return False


def environment_message(e: OSError) -> str:
    """What an OSError means for the user, naming the path: the disk, the permissions, the folders."""
    path = _file_of(e) or "a file kdlib writes or reads"
    why = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk holding {path} is full ({why}): free space there (`python -m kdlib storage DIR` shows "
                "what the runs take) or give a folder on another disk, then run the same command again")
    if e.errno == errno.EROFS:
        return f"{path} is not writable: it is on a read-only file system; give a folder on a writable disk"
    if e.errno in (errno.EACCES, errno.EPERM):
        return (f"{path} is not writable or readable by this user ({why}); give a folder you may write to, "
                "or change its permissions")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{path}: a file stands where a folder is expected ({why}); move the file away or give another folder"
    if e.errno == errno.EISDIR:
        return f"{path} is a folder where a file is expected; move it away or give another path"
    if e.errno == errno.ENOENT:
        return f"{path} does not exist ({why}); check the path, or create what it names first"
    return f"{why}{f' ({path})' if _file_of(e) else ''}: an operating-system error; check the disk, the path " \
           "and the network, then run the same command again"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a command. Every expected fault ends in ``error: what happened; what to do`` on stderr and
    an exit code (``EXIT_CODES``); anything else is a bug and keeps its traceback."""
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # before any work started
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]  # after the subcommand: for reports
    try:
        _check_folders(args)
        return args.func(args)
    except KeyboardInterrupt:
        if args.command in ("train", "sweep"):
            what = "interrupted; the run's state is saved (as of its last checkpoint): run the same command " \
                   "again to continue"
        elif args.command in ("cache", "demo"):
            what = "interrupted; run the same command again to continue from what is finished"
        else:
            what = "interrupted"
        print(f"error: {what}", file=sys.stderr)
        return INTERRUPTED
    except KdlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    except OSError as e:
        print(f"error: {environment_message(e)}", file=sys.stderr)
        return ENVIRONMENT
    except (RecursionError, json.JSONDecodeError) as e:
        if not _from_json(e):
            raise  # a bug: its traceback
        path = _file_of(e)
        what = "is nested too deeply to read" if isinstance(e, RecursionError) else f"is not valid JSON ({e})"
        print(f"error: {path or 'a JSON file'} {what}: it is not a file kdlib wrote, or it was damaged; "
              "restore it, or delete it (and whatever kdlib made from it) to start over", file=sys.stderr)
        return BAD_INPUT
