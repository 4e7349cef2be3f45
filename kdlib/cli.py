"""``python -m kdlib ...``: parse arguments, call into kdlib, print. No logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .errors import KdlibError


def _grid(args: argparse.Namespace) -> int:
    from .config import preset
    from .grid import EXPERIMENTS, parse

    if not args.json:
        print("\n".join(EXPERIMENTS))
        return 0
    base = preset(args.preset)
    feature = args.feature or base.loss.feature
    rows = []
    for name in EXPERIMENTS:
        spec = parse(name, feature=feature)
        rows.append({**spec.to_dict(), "output_only": spec.output_only,
                     "loss": dataclasses.asdict(spec.apply(base.loss).effective())})
    print(json.dumps({"preset": args.preset, "experiments": rows}, indent=2))
    return 0


def _check(args: argparse.Namespace) -> int:
    from .config import preset
    from .grid import EXPERIMENTS
    from .preflight import run_checks

    base = preset(args.preset)
    for exp in args.exps or ():
        base.with_experiment(exp, feature=args.feature)  # refuses a bad name before any work
    failed = 0
    data_dir = args.data_dir
    if data_dir is None and Path(f"data/{args.preset}/train.json").is_file():
        data_dir = f"data/{args.preset}"
    if data_dir is None:
        print("no prepared data (python -m kdlib prep): checking on random token windows", file=sys.stderr)
    for result in run_checks(base, args.exps or EXPERIMENTS, feature=args.feature, steps=args.steps,
                             data_dir=data_dir):
        print(result.line(), flush=True)
        failed += not result.ok
    total = len(args.exps or EXPERIMENTS)
    print(f"{total - failed} passed, {failed} failed")
    return 1 if failed else 0


def _peak(text: str):
    if text == "measure":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of TFLOP/s or 'measure', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the peak must be > 0 TFLOP/s, got {text}")
    return value


def _bench(args: argparse.Namespace) -> int:
    from . import bench
    from .fileio import read_json

    command = "python -m kdlib bench " + " ".join(args.argv)
    if args.merge:
        report = bench.merge_reports([read_json(Path(p), "benchmark report") for p in args.merge], command=command)
    else:
        shapes = bench.get_shapes(args.shapes, steps=args.steps, warmup=args.warmup)
        report = bench.run_bench(shapes, exps=args.exps or bench.EXPERIMENTS, paths=args.paths,
                                 sections=args.sections, feature=args.feature, compile=args.compile,
                                 peak=args.peak_tflops, command=command, out_dir=args.out)
        print()
    print(bench.to_markdown(report))
    if args.out:
        for path in bench.write_report(report, args.out):
            print(f"wrote {path}")
    return 0


def _data_dir(args: argparse.Namespace) -> str:
    return args.data_dir or f"data/{args.preset}"


def _prep(args: argparse.Namespace) -> int:
    from .config import preset
    from .data import prepare

    folder = _data_dir(args)
    prepare(preset(args.preset), folder)
    print(f"token files in {folder}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from .cache import build_cache
    from .config import preset
    from .grid import parse
    from .models import device_of

    cfg = preset(args.preset, args.exp)
    spec = parse(cfg.exp, cfg.loss.feature)
    if not spec.needs_teacher:
        raise KdlibError(f"{cfg.exp} has no teacher term: nothing to cache. Build the cache for the experiment "
                         "that will read it (e.g. --exp kl)")
    if not spec.output_only:
        print(f"note: {cfg.exp} needs the teacher online (features or cosine); the cache serves output-only "
              "experiments with the same temperature", file=sys.stderr)
    device_of(args.device)  # before any work: a GPU that is not here
    folder = args.cache_dir or f"{_data_dir(args)}/cache"
    for split in args.splits:
        cache = build_cache(cfg, _data_dir(args), folder, split=split, device=args.device)
        print(f"{split}: top-{cache.k} cache complete in {folder}")
    return 0


def _experiment_config(args: argparse.Namespace, exp: str, seed: Optional[int]):
    from .config import preset

    cfg = preset(args.preset).with_experiment(exp, feature=args.feature)
    if seed is not None:
        cfg.seed = seed
    _apply_run_options(args, cfg)
    return cfg.validate()


def _apply_run_options(args: argparse.Namespace, cfg) -> None:
    """The run options that change a config: budget cut, compile, teacher source, weights."""
    if getattr(args, "max_steps", None) is not None:
        cfg.train.max_steps = args.max_steps
    if getattr(args, "compile", False):
        cfg.train.compile = True
    if getattr(args, "weights", None) is not None:
        cfg.train.weights = args.weights
    if getattr(args, "weights_dir", None) is not None:
        cfg.train.weights_dir = args.weights_dir
    if getattr(args, "resume_dir", None) is not None:
        cfg.train.resume_dir = args.resume_dir or None


def _budget(args: argparse.Namespace):
    from .checkpoint import MiB, StorageBudget

    if not (0 < args.budget_mib < 1e9):
        raise KdlibError(f"--budget-mib must be a positive number of MiB, got {args.budget_mib:g}")
    return StorageBudget(args.runs, int(args.budget_mib * MiB))


def _sweep_configs(args: argparse.Namespace, exps, seeds) -> list:
    from .config import preset
    from .plan import sweep_configs

    base = preset(args.preset)
    if args.feature:
        base.loss.feature = args.feature
    _apply_run_options(args, base)
    for exp in exps or ():
        base.with_experiment(exp)  # refuses a bad name before any work
    return sweep_configs(base, exps, seeds, args.teacher_source, log=lambda m: print(m, file=sys.stderr))


def _plan_for(args: argparse.Namespace, cfgs, device: str = "auto"):
    from .plan import plan

    budget = _budget(args)
    return plan(cfgs[0].preset, cfgs=cfgs, device=device, results_dir=args.runs, data_dir=_data_dir(args),
                budget_bytes=budget.limit_bytes)


def _train_one(args, cfg, teacher=None) -> dict:
    from .train import run_dir, train

    return train(cfg, run_dir(args.runs, cfg), _data_dir(args), cache_dir=args.cache_dir, teacher=teacher,
                 budget=_budget(args))


def _main_process() -> bool:
    """Not under `accelerate launch` with several processes: the plan's measurement is a
    one-process job (its steps would wait on the other processes' collectives)."""
    import os

    return os.environ.get("WORLD_SIZE", "1") == "1"


def _train(args: argparse.Namespace) -> int:
    cfgs = _sweep_configs(args, [args.exp], [args.seed] if args.seed is not None else None)[:1]
    if _main_process():
        print(_plan_for(args, cfgs).to_text(), flush=True)
    _train_one(args, cfgs[0])
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .plan import check_fits
    from .train import run_name

    cfgs = _sweep_configs(args, args.exps, args.seeds)
    if _main_process():
        p = _plan_for(args, cfgs)
        check_fits(p)  # before the first run, not halfway through
        print(p.to_text(), flush=True)
    for i, cfg in enumerate(cfgs, 1):
        print(f"[{i}/{len(cfgs)}] {run_name(cfg)}", flush=True)
        _train_one(args, cfg)
    print(f"sweep done: {len(cfgs)} runs in {Path(args.runs) / cfgs[0].preset}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    cfgs = _sweep_configs(args, args.exps, args.seeds)
    p = _plan_for(args, cfgs, device=args.device)
    print(p.to_json() if args.json else p.to_text())
    return 0


# A preset's name as it may appear in a path (data/PRESET): no "/", no "..", no leading dot.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _checked_preset(cfg, config_path: Path) -> str:
    """A run config's preset, refused unless it is a plain name: eval reads data/PRESET."""
    if not _SAFE_NAME.fullmatch(cfg.preset) or ".." in cfg.preset:
        from .config import PRESETS
        from .errors import choices

        raise KdlibError(f"{config_path} names preset {cfg.preset!r}, which is not a preset's name (kdlib's are "
                         f"{choices(PRESETS)}); the config was edited or is not kdlib's: nothing was read")
    return cfg.preset


def _check_eval_data(run: Path, cfg, split) -> None:
    """Refuse data the run's student was not trained on: another corpus or BPE size (the config says),
    another tokenizer (the tokenizer hash, where the run's summary records it)."""
    from .data import check_prepared_for, check_vocab
    from .fileio import read_json

    check_vocab(split, cfg.model.vocab_size)
    check_prepared_for(cfg, split)
    found = split.manifest["inputs"]["tokenizer"]["hash"]
    try:
        trained = read_json(run / "summary.json", "summary").get("tokenizer_hash")
    except KdlibError:  # unfinished, or an unreadable summary: nothing recorded to compare with
        trained = None
    if isinstance(trained, str) and trained != found:
        raise KdlibError(f"{split.path} was tokenized with another tokenizer (hash {found[:12]}) than run "
                         f"{run.name} was trained on ({trained[:12]}): the same ids stand for other text, and "
                         "its perplexity would mean nothing. Give --data-dir the data folder the run trained on")
    if not isinstance(trained, str):
        print(f"note: {run.name} records no tokenizer hash (unfinished, or trained by an older kdlib), so whether "
              f"{split.path.parent} was tokenized like its training data is not checked", file=sys.stderr)


def _eval(args: argparse.Namespace) -> int:
    import math

    import torch

    from .checkpoint import load_student
    from .config import ExperimentConfig
    from .data import checked_split
    from .evaluate import perplexity
    from .runs import RunPaths

    run = Path(args.run_dir)
    cfg = ExperimentConfig.load(run / "config.json")
    preset_name = _checked_preset(cfg, run / "config.json")  # before it names any path
    data_dir = args.data_dir or f"data/{preset_name}"
    paths = RunPaths.of(cfg, run)
    student = paths.kept_student if paths.kept_student.is_file() else paths.student
    from .checkpoint import student_metadata

    meta = student_metadata(student)["meta"]
    if (meta.get("exp"), meta.get("seed")) not in ((cfg.exp, cfg.seed), (None, None)):
        raise KdlibError(f"{student} is the student of {meta.get('exp')}-seed{meta.get('seed')} (its metadata), "
                         f"not of this run ({cfg.exp}, seed {cfg.seed}); put the run's own student back, or "
                         "eval the run it came from")
    model = load_student(student, expect=cfg.model)
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise KdlibError(f"student {student} has non-finite weights (inf or NaN in {', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): the file is corrupt or the run diverged; its "
                         "perplexity would mean nothing. Train the run again (delete its folder first)")
    split = checked_split(data_dir, args.split, cfg.model.vocab_size)  # checksum and ids, once per process
    _check_eval_data(run, cfg, split)
    block = cfg.data.block_size if args.block_size is None else args.block_size
    stride = block // 2 if args.stride is None else args.stride
    ppl = perplexity(model, split.tokens(), block, stride)
    if not math.isfinite(ppl):
        raise KdlibError(f"the {args.split} perplexity of {student} is not finite ({ppl}): the student "
                         "assigns (almost) zero probability to the text; is it the data the run trained on?")
    print(f"{run.name}: {args.split} perplexity {ppl:.3f} (block {block}, stride {stride})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.dir, quick=args.quick)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .analysis import report

    out = report(args.runs, args.figures, reference=args.reference)
    cols = ["seeds", "best_val_ppl", "test_ppl", "test_ci95", "vs_no_kd_pct", "vs_no_kd_val_pct"]
    for group in out["groups"]:  # one per protocol: runs of two are never in one table
        print(f"\n{group['statement']}(in {group['folder']})")
        print(group["table"][cols].to_string(float_format=lambda v: f"{v:.2f}"))
    print(f"{len(out['files'])} tables and {len(out['figures'])} figure files in {args.figures}")
    return 0


def _badges(args: argparse.Namespace) -> int:
    from .badges import rewrite_badges

    changed = rewrite_badges(Path(args.root), args.repo, args.ref)
    print("\n".join(str(p) for p in changed) or f"badges already point at {args.repo}"
          + (f"@{args.ref}" if args.ref else ""))
    return 0


def _storage(args: argparse.Namespace) -> int:
    from .storage import MiB, StorageBudget, delete_weights

    if not (0 < args.limit_mib < 1e9):
        raise KdlibError(f"--limit-mib must be a positive number of MiB, got {args.limit_mib:g}")
    if not Path(args.dir).is_dir():
        raise KdlibError(f"no such results folder: {args.dir}; give the folder that holds the runs "
                         "(train's --runs, default runs)")
    budget = StorageBudget(args.dir, int(args.limit_mib * MiB))
    if args.delete_weights:
        freed = delete_weights(budget, args.delete_weights)
        print(f"deleted the weights of {', '.join(args.delete_weights)}: {mib_text(freed)} freed")
    print(budget.report())
    return 0


def mib_text(n_bytes: int) -> str:
    """Bytes in MiB as printed next to a budget: two significant digits below 10 MiB (0.05 MiB is not
    "0.0 MiB"), hundredths above."""
    from .checkpoint import MiB

    value = n_bytes / MiB
    return f"{value:.2g} MiB" if abs(value) < 10 else f"{value:,.2f} MiB"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS

    parser = argparse.ArgumentParser(prog="python -m kdlib",
                                     description="Compare knowledge-distillation losses for a small GPT student.",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kdlib {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("grid", help="print the study's 14 experiment names, in order",
                       description="Print the study's 14 experiment names, one per line; with --json, "
                                   "each one's loss components and its full loss config under a preset.")
    p.add_argument("--json", action="store_true", help="print each experiment's loss spec as JSON")
    p.add_argument("--preset", default="study", choices=sorted(PRESETS),
                   help="preset whose loss weights --json shows (default: study)")
    p.add_argument("--feature", choices=("hidden", "attention"),
                   help="feature kind for the feature-map experiments (default: the preset's)")
    p.set_defaults(func=_grid)

    p = sub.add_parser("check", help="preflight: a few training steps per experiment, checking the wiring",
                       description="Run each experiment for a few optimizer steps on random token windows "
                                   "and check that every loss component is finite and present, every "
                                   "student parameter and projector gets a gradient and moves, and the "
                                   "teacher gets none and does not change. One line per experiment; exit "
                                   "code 1 if any fails.")
    p.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="preset (default: smoke)")
    p.add_argument("--exps", "--exp", nargs="+", metavar="NAME",
                   help="experiments to check (default: the 14 of the grid)")
    p.add_argument("--feature", choices=("hidden", "attention"),
                   help="feature kind for the feature-map experiments (default: the preset's)")
    p.add_argument("--steps", type=_positive_int, default=2, help="optimizer steps per experiment (default: 2)")
    p.add_argument("--data-dir", help="prepared data to check on (default: data/PRESET if prepared)")
    p.set_defaults(func=_check)

    p = sub.add_parser("prep", help="tokenize the preset's corpus into token files",
                       description="Tokenize every split of the preset's corpus (no truncation) into flat "
                                   "token files with manifests, print tokens per split, and refuse a split "
                                   "with implausibly few tokens. Re-running with the same inputs reuses the "
                                   "files.")
    p.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="preset (default: smoke)")
    p.add_argument("--data-dir", help="output folder (default: data/PRESET)")
    p.set_defaults(func=_prep)

    p = sub.add_parser("cache", help="build the teacher's top-k cache for output-only experiments",
                       description="Run the teacher once over the prepared windows and keep, per position, "
                                   "its top-k log-probabilities at the experiment's temperature, their ids "
                                   "and the log tail mass. Resumable: run it again after an interruption.")
    p.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="preset (default: smoke)")
    p.add_argument("--exp", default="kl", help="experiment whose temperature the cache uses (default: kl)")
    p.add_argument("--splits", nargs="+", default=["train"], choices=("train", "validation", "test"))
    p.add_argument("--data-dir", help="prepared token folder (default: data/PRESET)")
    p.add_argument("--cache-dir", help="cache folder (default: DATA_DIR/cache)")
    p.add_argument("--device", help="device for the teacher (default: cpu)")
    p.set_defaults(func=_cache)

    def run_options(p, plan_only=False):
        p.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="preset (default: smoke)")
        p.add_argument("--feature", choices=("hidden", "attention"),
                       help="feature kind for the feature-map experiments (default: the preset's)")
        p.add_argument("--runs", default="runs",
                       help="results folder (default: runs); each run goes to RUNS/PRESET/RUN")
        p.add_argument("--budget-mib", type=float, default=100.0, help="storage budget of the results folder")
        p.add_argument("--data-dir", help="prepared token folder (default: data/PRESET; prepared if missing)")
        p.add_argument("--teacher-source", choices=("online", "cache"),
                       help="where the teacher's outputs come from (default: the preset's, online): 'cache' "
                            "gives the top-k cache to the output-only experiments (a sparse objective, "
                            "labelled in the run name and the report); the others stay online")
        p.add_argument("--max-steps", type=_positive_int,
                       help="cut every run's budget to this many optimizer steps (a short try)")
        p.add_argument("--weights", choices=("run", "best"),
                       help="run: every student in its run folder; best: every student in --weights-dir and "
                            "only the best run's copy in the results folder (default: the preset's)")
        p.add_argument("--weights-dir", help="local folder for the students with --weights best")
        p.add_argument("--resume-dir", help="folder for the resume state ('' = the run folder; default: the "
                                            "preset's)")
        if plan_only:
            return
        p.add_argument("--cache-dir", help="top-k cache folder (default: DATA_DIR/cache)")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the student and the loss formulas (faster steps after a "
                            "minute or two of compiling)")

    p = sub.add_parser("train", help="train one experiment (resumes an interrupted run)",
                       description="Train one experiment in RUNS/PRESET/EXP-seedSEED, after printing its plan "
                                   "(tokens, steps, evaluations, time, bytes). Started again on the same "
                                   "folder, it continues from the resume state; a finished run is not "
                                   "trained again.")
    run_options(p)
    p.add_argument("--exp", required=True, help="experiment name (python -m kdlib grid lists the 14)")
    p.add_argument("--seed", type=int, help="seed (default: the preset's first)")
    p.set_defaults(func=_train)

    p = sub.add_parser("sweep", help="train experiments x seeds one after another, skipping finished runs",
                       description="Print the sweep's plan, refuse it before the first run if its results "
                                   "would not fit the storage budget, then train each experiment for each "
                                   "seed in RUNS/PRESET/; finished runs are skipped, interrupted ones resumed.")
    run_options(p)
    p.add_argument("--exps", nargs="+", metavar="NAME", help="experiments (default: the 14 of the grid)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the preset's)")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("plan", help="what a sweep will cost: tokens, steps, evaluations, time, bytes",
                       description="Per run of a sweep: its tokens (the same for every experiment of a preset), "
                                   "steps, epochs, evaluations, the estimated time and the bytes it leaves in "
                                   "the results folder and elsewhere; the grid's totals and whether the "
                                   "results folder's budget holds them. The time is measured (a few of kdlib's "
                                   "steps on this machine's GPU) or, with no GPU here, estimated for the GPU "
                                   "the preset is sized for from the FLOPs model at a stated MFU.")
    run_options(p, plan_only=True)
    p.add_argument("--exps", nargs="+", metavar="NAME", help="experiments (default: the 14 of the grid)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the preset's)")
    p.add_argument("--device", default="auto",
                   help="auto (measure on this GPU; without one, estimate for the preset's GPU, or measure "
                        "on the CPU for smoke/demo), measure (this machine), or a GPU name: A100, T4, H100, "
                        "L4, ... (default: auto)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)

    p = sub.add_parser("eval", help="perplexity of a run's student on a split",
                       description="Score a run's saved student under the sliding-window protocol.")
    p.add_argument("run_dir", help="a run folder (with config.json and student.safetensors)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--stride", type=_positive_int, help="window stride (default: block_size // 2)")
    p.add_argument("--block-size", type=_positive_int, help="window length (default: the run's block size)")
    p.add_argument("--data-dir", help="prepared token folder (default: data/PRESET)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="the whole study offline on a CPU: data, teacher, cache, 14 runs, results",
                       description="Run the study end to end with no network: Python's own documentation as "
                                   "text, a BPE tokenizer and a small GPT-2-architecture teacher trained on "
                                   "it, the top-k cache, the preflight check, the 14 experiments with a small "
                                   "student, then the results table and figures. About 10-15 minutes on 2 "
                                   "CPU cores; finished steps are reused when run again.")
    p.add_argument("--dir", default="demo", help="output folder (default: demo)")
    p.add_argument("--quick", action="store_true", help="a few steps per run (for CI): checks the pipeline")
    p.set_defaults(func=_demo)

    p = sub.add_parser("report", help="tables and figures from a results folder",
                       description="Read every run in a results folder (finished or not), write the "
                                   "per-experiment table (mean and 95% CI over seeds, change against no KD) "
                                   "as CSV and Markdown, per-run and effect tables, and the figures (PNG and "
                                   "PDF). Runs it cannot read are listed with the reason and skipped.")
    p.add_argument("runs", nargs="?", default="runs", help="results folder (default: runs)")
    p.add_argument("--figures", default="figures", help="output folder (default: figures)")
    p.add_argument("--reference", action="store_true",
                   help="also the original study's table and curves (shipped with kdlib), and ours beside them")
    p.set_defaults(func=_report)

    p = sub.add_parser("bench", help="benchmarks: the original method vs kdlib vs the top-k cache, losses, data prep",
                       description="Training throughput (tokens/s, ms/step, peak memory, MFU) of each experiment "
                                   "along three paths at the same shapes and data: 'reference' (the original "
                                   "study's method re-implemented), 'kdlib' (kdlib's training step) and "
                                   "'cached' (the top-k cache, output-only experiments); the divergences "
                                   "alone, dense vs chunked; and tokenization speed. Prints Markdown; --out "
                                   "writes bench.json and bench.md. Results: docs/benchmarks.md.")
    p.add_argument("--shapes", default="cpu", choices=("study", "cpu", "smoke"),
                   help="study: the study's models and batch (GPU); cpu: the same proportions, minutes "
                        "on 2 cores (default); smoke: seconds")
    p.add_argument("--exps", "--exp", nargs="+", metavar="NAME", help="experiments (default: the 14)")
    p.add_argument("--paths", nargs="+", default=list(("reference", "kdlib", "cached")),
                   choices=("reference", "kdlib", "cached"), help="paths to measure (default: all three)")
    p.add_argument("--sections", nargs="+", default=["train", "divergence", "prep"],
                   choices=("train", "divergence", "prep"),
                   help="what to measure (default: everything; the dense divergences at 8,192 x 50,257 "
                        "need ~16 GB of memory)")
    p.add_argument("--feature", default="hidden", choices=("hidden", "attention"),
                   help="kdlib's feature loss: hidden states (default, SDPA) or attention maps (the study's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the student and the loss formulas on the kdlib paths")
    p.add_argument("--peak-tflops", type=_peak,
                   help="the device's peak TFLOP/s for MFU, or 'measure' (the best large matmul here); "
                        "default: the datasheet value of known GPUs, or $KDLIB_PEAK_TFLOPS")
    p.add_argument("--steps", type=_positive_int, help="timed steps per measurement (default: per shapes)")
    p.add_argument("--warmup", type=_positive_int, help="warm-up steps per measurement (default: per shapes)")
    p.add_argument("--out", help="folder for bench.json and bench.md (rewritten after every measurement)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="measure nothing: merge these bench.json files (the same shapes and machine, paths "
                        "measured in separate runs) into one report, ratios included")
    p.set_defaults(func=_bench)

    p = sub.add_parser("badges", help="point every Open-in-Colab badge and install cell at a GitHub repo and ref",
                       description="Rewrite the Open-in-Colab badges, the notebooks' install cells and the "
                                   "install URLs in notebooks/*.ipynb, README.md and kdlib/badges.py (the one "
                                   "place the repo and ref are named) to OWNER/REPO at REF.")
    p.add_argument("--repo", required=True, help="GitHub OWNER/REPO")
    p.add_argument("--ref", help="the tag, commit or branch the badges open and the install cells install "
                                 "(default: keep kdlib.badges.REF); push it before opening a badge")
    p.add_argument("--root", default=".", help="repository root (default: .)")
    p.set_defaults(func=_badges)

    p = sub.add_parser("storage", help="usage of a results folder per run, against its budget",
                       description="Print the disk usage of each run in a results folder and the total "
                                   "against the storage budget. Weights are deleted only when asked "
                                   "with --delete-weights.")
    p.add_argument("dir", nargs="?", default="runs", help="results folder (default: runs)")
    p.add_argument("--limit-mib", type=float, default=100.0, help="budget in MiB (default: 100)")
    p.add_argument("--delete-weights", nargs="+", metavar="RUN",
                   help="delete the .safetensors files (weights, resume state) of these runs, "
                        "keeping their config and metrics")
    p.set_defaults(func=_storage)
    return parser


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
