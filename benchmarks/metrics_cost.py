"""What the test metrics cost: kdlib.metrics.test_metrics (student and teacher on the same windows)
against the passes it stands beside, the student's test perplexity and the teacher's, measured in
one process on the same token windows.

    python benchmarks/metrics_cost.py --shapes study --windows 16      # CPU: minutes
    python benchmarks/metrics_cost.py --shapes study --windows 512     # on a GPU

Shapes are kdlib.bench's (``study``: TinyGPT 8x512 and a GPT-2-small-shaped random teacher over
50,257 tokens, block 128); the protocol is the test protocol (stride = block / 2). Prints, and with
``--out`` writes as JSON, each pass's seconds per window and the ratios; docs/protocol.md ("What
the test metrics cost") has the figures and the estimate at the study's scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kdlib.bench import SHAPES, cuda_or_cpu, get_shapes, sync  # noqa: E402
from kdlib.cli import positive_int  # noqa: E402
from kdlib.config import TinyGPTConfig  # noqa: E402
from kdlib.evaluate import perplexity, windows  # noqa: E402
from kdlib.fileio import atomic_write_json  # noqa: E402
from kdlib.metrics import FREQUENCY_BUCKETS, frequency_buckets, test_metrics  # noqa: E402
from kdlib.models import TinyGPT, random_teacher, resolve_teacher_dtype  # noqa: E402


def _timed(fn, dev) -> float:
    sync(dev)
    start = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - start


def measure(shapes_name: str, n_windows: int, batch_size: int = 8, repeats: int = 2) -> dict:
    """Seconds of each pass over ``n_windows`` test windows (the best of ``repeats``, after a warm-up
    pass) and their ratios."""
    shapes = get_shapes(shapes_name)
    dev = cuda_or_cpu()
    block = shapes.block_size
    stride = block // 2
    torch.manual_seed(0)
    student = TinyGPT(TinyGPTConfig(**shapes.student)).to(dev)
    teacher = random_teacher(shapes.teacher).to(dev, resolve_teacher_dtype("auto", dev))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, shapes.vocab_size, size=block + (n_windows - 1) * stride)
    bucket_of = frequency_buckets(rng.zipf(1.2, size=200_000) % shapes.vocab_size, shapes.vocab_size)["bucket_of"]
    passes = {
        "student_ppl": lambda: perplexity(student, ids, block, stride, batch_size),
        "teacher_ppl": lambda: perplexity(teacher, ids, block, stride, batch_size),
        "metrics": lambda: test_metrics(student, ids, block, stride, teacher=teacher, bucket_of=bucket_of,
                                        n_buckets=FREQUENCY_BUCKETS, batch_size=batch_size),
    }
    seconds = {}
    for name, fn in passes.items():
        fn()  # warm-up: allocator, kernels
        seconds[name] = min(_timed(fn, dev) for _ in range(repeats))
    n = len(windows(len(ids), block, stride))
    return {"shapes": shapes_name, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "teacher_dtype": str(next(teacher.parameters()).dtype).replace("torch.", ""),
            "windows": n, "block_size": block, "stride": stride, "batch_size": batch_size,
            "seconds": seconds, "seconds_per_window": {k: v / n for k, v in seconds.items()},
            "metrics_vs_student_ppl": seconds["metrics"] / seconds["student_ppl"],
            "metrics_vs_both_ppl": seconds["metrics"] / (seconds["student_ppl"] + seconds["teacher_ppl"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="cpu", choices=sorted(SHAPES))
    p.add_argument("--windows", type=positive_int, default=16, help="test windows to score (default 16)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward (train.eval_batch_size)")
    p.add_argument("--out", help="write the measurement as JSON to this file")
    args = p.parse_args(argv)
    result = measure(args.shapes, args.windows, args.batch_size)
    s = result["seconds"]
    print(f"{result['shapes']} shapes on {result['device']}, {result['windows']} windows of {result['block_size']} "
          f"(stride {result['stride']}), teacher in {result['teacher_dtype']}: student ppl {s['student_ppl']:.2f} s, "
          f"teacher ppl {s['teacher_ppl']:.2f} s, metrics (both) {s['metrics']:.2f} s = "
          f"{result['metrics_vs_student_ppl']:.2f} x the student's pass, "
          f"{result['metrics_vs_both_ppl']:.2f} x the two perplexity passes")
    if args.out:
        atomic_write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
