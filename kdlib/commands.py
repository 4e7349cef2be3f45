"""What each ``python -m kdlib`` command does with its parsed arguments: call into kdlib, print.

``kdlib.cli`` parses the arguments and maps the errors to exit codes; ``COMMANDS`` names the body
of each command. The configs of train, sweep and plan come from ``kdlib.launch`` (the notebooks' too).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .errors import KdlibError
from .launch import RunChoices, RunFolders, run_configs, train_run


def _grid(args: argparse.Namespace) -> int:
    from .config import preset
    from .grid import EXPERIMENTS

    if not args.json:
        print("\n".join(EXPERIMENTS))
        return 0
    base = preset(args.preset)
    rows = []
    for name in EXPERIMENTS:
        cfg = base.with_experiment(name, feature=args.feature)
        rows.append({**cfg.spec.to_dict(), "output_only": cfg.spec.output_only, "loss": cfg.loss_terms.to_dict()})
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


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    shapes = bench.get_shapes(args.shapes, steps=args.steps, warmup=args.warmup)
    report = bench.start_report(shapes, feature=args.feature, compile=args.compile, peak=args.peak_tflops,
                                command="python -m kdlib bench " + " ".join(args.argv))
    bench.run_bench(report, exps=args.exps or bench.EXPERIMENTS, paths=args.paths, out_dir=args.out)
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
    from .prep import prepare

    folder = _data_dir(args)
    prepare(preset(args.preset), folder)
    print(f"token files in {folder}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from .cache import build_cache
    from .config import preset
    from .models import device_of

    cfg = preset(args.preset, args.exp)
    spec = cfg.spec
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



def _choices(args: argparse.Namespace) -> RunChoices:
    """The run options of train, sweep and plan (plan has no --cache-dir or --compile, train no --set)."""
    from .config.sweep import parse_sets

    return RunChoices(feature=args.feature, teacher_source=args.teacher_source, max_steps=args.max_steps,
                      compile=getattr(args, "compile", False), weights=args.weights, weights_dir=args.weights_dir,
                      resume_dir=args.resume_dir, sweep=parse_sets(getattr(args, "sets", None) or ()) or None)


def _folders(args: argparse.Namespace) -> RunFolders:
    return RunFolders(args.runs, _data_dir(args), getattr(args, "cache_dir", None), args.budget_mib)


def _run_configs(args: argparse.Namespace, exps, seeds) -> list:
    return run_configs(args.preset, exps, seeds, _choices(args), log=lambda m: print(m, file=sys.stderr))


def _plan_for(args: argparse.Namespace, cfgs, device: str = "auto"):
    from .plan import plan

    return plan(cfgs[0].preset, cfgs=cfgs, device=device, results_dir=args.runs, data_dir=_data_dir(args),
                budget_bytes=_folders(args).budget().limit_bytes)


def _main_process() -> bool:
    """Not under `accelerate launch` with several processes: the plan's measurement is a
    one-process job (its steps would wait on the other processes' collectives)."""
    import os

    return os.environ.get("WORLD_SIZE", "1") == "1"


def _train(args: argparse.Namespace) -> int:
    cfgs = _run_configs(args, [args.exp], [args.seed] if args.seed is not None else None)[:1]
    if _main_process():
        print(_plan_for(args, cfgs).to_text(), flush=True)
    train_run(cfgs[0], _folders(args))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .plan import check_fits
    from .train import run_name

    cfgs = _run_configs(args, args.exps, args.seeds)
    if _main_process():
        p = _plan_for(args, cfgs)
        check_fits(p)  # before the first run, not halfway through
        print(p.to_text(), flush=True)
    for i, cfg in enumerate(cfgs, 1):
        print(f"[{i}/{len(cfgs)}] {run_name(cfg)}", flush=True)
        train_run(cfg, _folders(args))
    print(f"sweep done: {len(cfgs)} runs in {Path(args.runs) / cfgs[0].preset}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    cfgs = _run_configs(args, args.exps, args.seeds)
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
    from .data import check_prepared_for, check_tokenizer_fits

    check_tokenizer_fits(split, cfg.model.vocab_size)
    check_prepared_for(cfg, split)
    check_run_tokenizer(run, split.manifest["inputs"]["tokenizer"]["hash"], split.path,
                        "its perplexity would mean nothing")


def check_run_tokenizer(run: Path, found: str, where: Path, consequence: str) -> None:
    """Refuse a tokenizer (its hash ``found``, of the token file or data folder ``where``) other than the
    one the run's summary records; say so on stderr when the summary records none."""
    from .fileio import read_json

    try:
        trained = read_json(run / "summary.json", "summary").get("tokenizer_hash")
    except KdlibError:  # unfinished, or an unreadable summary: nothing recorded to compare with
        trained = None
    if isinstance(trained, str) and trained != found:
        raise KdlibError(f"{where} was tokenized with another tokenizer (hash {found[:12]}) than run "
                         f"{run.name} was trained on ({trained[:12]}): the same ids stand for other text, and "
                         f"{consequence}. Give --data-dir the data folder the run trained on")
    if not isinstance(trained, str):
        folder = where.parent if where.is_file() else where
        print(f"note: {run.name} records no tokenizer hash (unfinished, or trained by an older kdlib), so whether "
              f"{folder} was tokenized like its training data is not checked", file=sys.stderr)


def load_run_student(run_dir, device: str = "cpu"):
    """(config, student file, student) of a run folder, as eval and sample read it: the run's config
    (its preset a plain name), its kept student where there is one (train.weights = "best" keeps the
    others in weights_dir), refused when its metadata names another run or a weight is not finite."""
    import torch

    from .checkpoint import load_student, student_metadata
    from .config import ExperimentConfig
    from .runs import RunPaths

    run = Path(run_dir)
    cfg = ExperimentConfig.load(run / "config.json")
    _checked_preset(cfg, run / "config.json")  # before it names any path
    paths = RunPaths.of(cfg, run)
    student = paths.kept_student if paths.kept_student.is_file() else paths.student
    meta = student_metadata(student)["meta"]
    if (meta.get("exp"), meta.get("seed")) not in ((cfg.exp, cfg.seed), (None, None)):
        raise KdlibError(f"{student} is the student of {meta.get('exp')}-seed{meta.get('seed')} (its metadata), "
                         f"not of this run ({cfg.exp}, seed {cfg.seed}); put the run's own student back, or "
                         "use the run it came from")
    model = load_student(student, device=device, expect=cfg.model)
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise KdlibError(f"student {student} has non-finite weights (inf or NaN in {', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): the file is corrupt or the run diverged; its "
                         "perplexity and its text would mean nothing. Train the run again (delete its folder first)")
    return cfg, student, model


def _eval(args: argparse.Namespace) -> int:
    import math

    from .data import checked_split
    from .evaluate import perplexity
    from .models import device_of
    from .runs import RunPaths

    device = device_of(args.device)  # before any work: a GPU that is not here
    run = Path(args.run_dir)
    cfg, student, model = load_run_student(run)
    data_dir = args.data_dir or f"data/{cfg.preset}"
    paths = RunPaths.of(cfg, run)
    block = cfg.data.block_size if args.block_size is None else args.block_size
    stride = block // 2 if args.stride is None else args.stride
    if args.metrics and (args.split, block, stride) != ("test", cfg.data.block_size, cfg.data.block_size // 2):
        raise KdlibError(f"--metrics measures the test protocol (--split test, block {cfg.data.block_size}, stride "
                         f"{cfg.data.block_size // 2}), the one its numbers are compared under; leave --split, "
                         "--block-size and --stride out")
    summary = _summary_for_metrics(paths) if args.metrics else None
    split = checked_split(data_dir, args.split, cfg.model.vocab_size)  # checksum and ids, once per process
    _check_eval_data(run, cfg, split)
    model = model.to(device)
    ppl = perplexity(model, split.tokens(), block, stride)
    if not math.isfinite(ppl):
        raise KdlibError(f"the {args.split} perplexity of {student} is not finite ({ppl}): the student "
                         "assigns (almost) zero probability to the text; is it the data the run trained on?")
    print(f"{run.name}: {args.split} perplexity {ppl:.3f} (block {block}, stride {stride})")
    if args.metrics:
        _eval_metrics(paths, cfg, model, {"test": split, "train": checked_split(data_dir, "train",
                                                                               cfg.model.vocab_size)}, summary)
    return 0


def _summary_for_metrics(paths):
    """The summary ``eval --metrics`` will write into (None: an unfinished run), read before any work:
    an unreadable one is refused before minutes of scoring, and never replaced."""
    from .fileio import read_json

    if not paths.summary.is_file():
        return None
    try:
        return read_json(paths.summary, "summary")
    except KdlibError:
        raise KdlibError(f"{paths.summary} is unreadable or corrupt, and --metrics writes into it: it holds the "
                         "run's results (do not delete it), so restore it (on Colab, from Drive's version history) "
                         "and run this again; eval without --metrics scores the student without it") from None


def _eval_metrics(paths, cfg, model, splits: dict, summary) -> None:
    """``eval --metrics``: the run's test metrics printed, and written into its summary.json (a
    finished run's; ``summary`` None: an unfinished one gets them at the end of its training)."""
    from .fileio import atomic_write_json
    from .scoring import run_metrics

    metrics = run_metrics(cfg, model, splits)
    student, teacher = metrics["student"], metrics["teacher"]
    buckets = ", ".join("-" if v is None else f"{v:.1f}" for v in student["bucket_ppl"])
    print(f"{paths.root.name}: top-1 agreement with the teacher {student['agreement']:.3f}, KL(teacher || student) "
          f"{student['kl_teacher']:.4f} nats/token, ECE {student['ece']:.4f} (teacher {teacher['ece']:.4f}); "
          f"perplexity by frequency bucket (most frequent first): {buckets}")
    if summary is None:
        print(f"note: {paths.root.name} is not finished (no summary.json): nothing written; its training writes "
              "them at its end", file=sys.stderr)
        return
    summary["test_metrics"] = metrics
    atomic_write_json(paths.summary, summary)
    print(f"written into {paths.summary} (the report reads them from there)")


def _read_prompts(path) -> list[str]:
    """The prompts of a text file, one a line (stripped; blank lines skipped), refused when it has
    none or is not UTF-8 text. A missing file is the OSError it raises (exit code 3)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark (Windows editors) is not a prompt
    except UnicodeDecodeError as e:
        raise KdlibError(f"prompts file {path} is not UTF-8 text ({e.reason} at byte {e.start}): give a text "
                         "file with one prompt a line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise KdlibError(f"prompts file {path} has no prompts (it is empty or blank): write one prompt a line")
    return prompts


def _sample_lines(prompts, continuations) -> list[str]:
    """Each prompt on its own line, its continuation indented below it (from "..."): readable in a terminal."""
    lines = []
    for i, (prompt, text) in enumerate(zip(prompts, continuations), 1):
        lines += ["", f"[{i}] {prompt}"] + ["    " + line for line in ("..." + text).splitlines()]
    return lines


def run_tokenizer(run: Path, cfg, folder: Path):
    """The tokenizer of the data folder ``folder``, refused when it is larger than the run's student's
    vocabulary or is not the one the run's summary records (its ids would decode to other text)."""
    from .tokenizer import tokenizer_hash, tokenizer_of

    tok = tokenizer_of(cfg, folder)
    if len(tok) > cfg.model.vocab_size:
        raise KdlibError(f"the tokenizer of {folder} has {len(tok)} tokens but run {run.name}'s student has "
                         f"{cfg.model.vocab_size}: give --data-dir the data folder the run trained on")
    check_run_tokenizer(run, tokenizer_hash(tok), folder, "its samples would be another text's ids decoded")
    return tok


def _sample(args: argparse.Namespace) -> int:
    from .sampling import DEFAULT_PROMPTS, generate

    prompts = _read_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    run = Path(args.run_dir)
    cfg, _, model = load_run_student(run)
    tok = run_tokenizer(run, cfg, Path(args.data_dir or f"data/{cfg.preset}"))
    continuations = [tok.decode(generate(model, tok(prompt)["input_ids"], args.tokens, top_p=args.top_p,
                                         seed=args.seed, vocab_size=len(tok)))
                     for prompt in prompts]
    print(f"{run.name}: {args.tokens} sampled tokens after each prompt (top-p {args.top_p:g}, seed {args.seed}; "
          "the same seed on the same device gives the same text)")
    print("\n".join(_sample_lines(prompts, continuations)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, run_sensitivity

    (run_sensitivity if args.sensitivity else run_demo)(args.dir, quick=args.quick)
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


COMMANDS = {"grid": _grid, "check": _check, "prep": _prep, "cache": _cache, "train": _train, "sweep": _sweep,
            "plan": _plan, "eval": _eval, "sample": _sample, "demo": _demo, "report": _report, "bench": _bench,
            "badges": _badges, "storage": _storage}
