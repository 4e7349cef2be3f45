"""``python -m kdlib ...``: parse arguments, call into kdlib, print. No logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
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
    failed = 0
    for result in run_checks(base, args.exps or EXPERIMENTS, feature=args.feature, steps=args.steps):
        print(result.line(), flush=True)
        failed += not result.ok
    total = len(args.exps or EXPERIMENTS)
    print(f"{total - failed} passed, {failed} failed")
    return 1 if failed else 0


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

    cfg = preset(args.preset, args.exp)
    if not parse(cfg.exp, cfg.loss.feature).output_only:
        print(f"note: {cfg.exp} needs the teacher online (features or cosine); the cache serves output-only "
              "experiments with the same temperature", file=sys.stderr)
    folder = args.cache_dir or f"{_data_dir(args)}/cache"
    for split in args.splits:
        cache = build_cache(cfg, _data_dir(args), folder, split=split, device=args.device)
        print(f"{split}: top-{cache.k} cache complete in {folder}")
    return 0


def _storage(args: argparse.Namespace) -> int:
    from .checkpoint import MiB, StorageBudget, delete_weights

    budget = StorageBudget(args.dir, int(args.limit_mib * MiB))
    if args.delete_weights:
        freed = delete_weights(budget, args.delete_weights)
        print(f"deleted the weights of {', '.join(args.delete_weights)}: {freed / MiB:.2f} MiB freed")
    print(budget.report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS

    parser = argparse.ArgumentParser(prog="python -m kdlib",
                                     description="Compare knowledge-distillation losses for a small GPT student.")
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
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per experiment (default: 2)")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KdlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
