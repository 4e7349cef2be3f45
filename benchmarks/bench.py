"""The benchmark suite: kdlib's training step against the original study's method, the losses alone,
data preparation.

    python benchmarks/bench.py --shapes cpu --out bench-cpu
    python benchmarks/bench.py --shapes study --out bench-gpu      # on a GPU
    python benchmarks/bench.py --merge a/bench.json b/bench.json --out merged

Three training paths, same shapes, same token windows, same experiment:
``reference`` (the original method, ``benchmarks/reference.py``), ``kdlib`` and
``cached`` (kdlib's own step, online and from the top-k cache, measured by
``kdlib.bench`` as ``python -m kdlib bench`` measures them). Then the divergences
alone (``divergence.py``) and tokenization speed (``prep.py``). Results and the
commands that made them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

# The kdlib beside this script, not whichever one is installed (as benchmarks/gpu_session.sh does),
# and this folder as the package ``benchmarks``.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from kdlib import bench  # noqa: E402
from kdlib.cli import peak_tflops_arg, positive_int  # noqa: E402
from kdlib.errors import KdlibError, choices  # noqa: E402
from kdlib.fileio import read_json  # noqa: E402
from kdlib.grid import EXPERIMENTS, parse  # noqa: E402

from benchmarks.divergence import divergence_bench  # noqa: E402
from benchmarks.prep import prep_bench  # noqa: E402
from benchmarks.reference import measure_reference, measure_reference_isolated  # noqa: E402
from benchmarks.report import PATHS, grid_estimate, merge_reports, to_markdown  # noqa: E402

SECTIONS = ("train", "divergence", "prep")
# Per benchmark shapes: the divergences' N x V and timed repeats, the megabytes of text tokenized.
DIVERGENCE_SIZES = {"study": (8192, 50257, 3), "cpu": (8192, 50257, 1), "smoke": (256, 512, 1)}
PREP_MB = {"study": 32, "cpu": 32, "smoke": 0.5}


def measure_path(report: dict, exp: str, path: str) -> bench.Result:
    """One row on any of the three paths; on a GPU the reference in its own process."""
    if path == "reference":
        if report["device"] == "cuda":
            bench.release(bench.cuda_or_cpu())  # the subprocess needs the memory this process still caches
            return measure_reference_isolated(report, exp)
        return measure_reference(report, exp)
    return bench.measure(report, exp, path)


def run_comparison(report: dict, exps: Sequence[str] = EXPERIMENTS, paths: Sequence[str] = PATHS,
                   sections: Sequence[str] = SECTIONS, log: Callable[[str], None] = print, out_dir=None) -> dict:
    """Measure ``sections`` into ``report`` (from ``kdlib.bench.start_report``) and return it. With
    ``out_dir`` the report is rewritten after every measurement, so a run cut short keeps what it measured."""
    for s in sections:
        if s not in SECTIONS:
            raise KdlibError(f"unknown benchmark section {s!r}; choose from: {choices(SECTIONS)}")
    for p in paths:
        if p not in PATHS:
            raise KdlibError(f"unknown benchmark path {p!r}; choose from: {choices(PATHS)}")

    def save():
        if out_dir is not None:
            bench.write_report(report, out_dir, to_markdown)

    exps = [parse(e).name for e in exps]  # refuses a bad name before any work
    shapes = bench.Shapes(**report["shapes"])
    if "train" in sections:
        results = bench.measure_rows(report, exps, paths, measure_path, log, save)
        if shapes.name == "study":  # at other shapes the hours would not be the study's
            report["grid_hours"] = grid_estimate(results)
    if "divergence" in sections:
        n, v, repeats = DIVERGENCE_SIZES[shapes.name]
        report["divergence"] = divergence_bench(n, v, bench.cuda_or_cpu(), repeats=repeats)
        save()
        for r in report["divergence"]:
            log(f"{r['divergence']:>3} {r['impl']:>8}: {r['ms']:9.1f} ms  {r['peak_mib']:9,.0f} MiB")
    if "prep" in sections:
        report["prep"] = prep_bench(PREP_MB[shapes.name])
        log(f"prep: {report['prep']['tokens_per_s']:,.0f} tokens/s")
    return report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="cpu", choices=tuple(bench.SHAPES),
                    help="study: the study's models and batch (GPU); cpu: the same proportions, minutes "
                         "on 2 cores (default); smoke: seconds")
    ap.add_argument("--exps", "--exp", nargs="+", metavar="NAME", help="experiments (default: the 14)")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS,
                    help="paths to measure (default: all three)")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                    help="what to measure (default: everything; the dense divergences at 8,192 x 50,257 "
                         "need ~16 GB of memory)")
    ap.add_argument("--feature", default="hidden", choices=tuple(bench.FEATURE_DESCRIPTIONS),
                    help="kdlib's feature loss: hidden states (default, SDPA) or attention maps (the study's)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the student and the loss formulas on the kdlib paths")
    ap.add_argument("--peak-tflops", type=peak_tflops_arg,
                    help="the device's peak TFLOP/s for MFU, or 'measure' (the best large matmul here); "
                         "default: the datasheet value of known GPUs, or $KDLIB_PEAK_TFLOPS")
    ap.add_argument("--steps", type=positive_int, help="timed steps per measurement (default: per shapes)")
    ap.add_argument("--warmup", type=positive_int, help="warm-up steps per measurement (default: per shapes)")
    ap.add_argument("--out", help="folder for bench.json and bench.md (rewritten after every measurement)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="measure nothing: merge these bench.json files (the same shapes and machine, paths "
                         "measured in separate runs, `python -m kdlib bench`'s included) into one report, "
                         "ratios included")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = " ".join(["python benchmarks/bench.py", *argv])
    try:
        if args.merge:
            report = merge_reports([read_json(Path(p), "benchmark report") for p in args.merge], command=command)
        else:
            shapes = bench.get_shapes(args.shapes, steps=args.steps, warmup=args.warmup)
            report = bench.start_report(shapes, feature=args.feature, compile=args.compile,
                                        peak=args.peak_tflops, command=command)
            run_comparison(report, exps=args.exps or EXPERIMENTS, paths=args.paths,
                           sections=args.sections, out_dir=args.out)
            print()
    except KdlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(report))
    if args.out:
        for path in bench.write_report(report, args.out, to_markdown):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
