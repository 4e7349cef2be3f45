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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KdlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
