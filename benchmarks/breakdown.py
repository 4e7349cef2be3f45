"""Where a training step's time goes, reference vs kdlib, one experiment (CPU: parts timed alone).

    python benchmarks/breakdown.py --shapes cpu --exp layerwise-kl-cos

Times (median of --repeats) of each part of one step at the benchmark's shapes:
the teacher's forward as the original ran it (float32, tracking gradients) and
as kdlib runs it (inference mode); the output losses' forward + backward as the
original wrote them (dense softmax tensors, ``+ eps`` logs) and kdlib's fused
chunked pass; the student's forward + backward with explicit attention and with
SDPA. On a GPU the parts overlap and this split is not meaningful: use the
profiler there.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# The kdlib beside this script, not whichever one is installed, and this folder as ``benchmarks``.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from kdlib import bench, losses  # noqa: E402
from kdlib.grid import parse  # noqa: E402
from kdlib.models import TinyGPT, teacher_forward  # noqa: E402

from benchmarks.reference import reference_loss, reference_teacher  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="cpu", choices=sorted(bench.SHAPES))
    ap.add_argument("--exp", default="layerwise-kl-cos")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    shapes = bench.get_shapes(args.shapes)
    spec = parse(args.exp)
    cfg = bench.config_at_shapes(shapes, args.exp)
    torch.manual_seed(0)
    win = torch.from_numpy(bench.token_windows(shapes, n_batches=1))
    ids, labels = win[:, :-1], win[:, 1:]
    student = TinyGPT(cfg.model)
    ref_teacher = reference_teacher(shapes, torch.device("cpu"), need_attentions=False)
    teacher = bench.frozen_teacher(shapes.teacher, torch.device("cpu"), need_attentions=False)
    V = shapes.vocab_size
    s = torch.randn(*ids.shape, V, requires_grad=True)
    t = teacher_forward(teacher, ids).logits
    c = cfg.loss_terms

    def ref_loss():
        s.grad = None
        reference_loss(spec, s, t, labels).backward()

    def fused_loss():
        s.grad = None
        total, _ = losses.output_losses(s, labels, t, w_ce=c.w_ce, divergence=c.spec.divergence, w_div=c.w_div,
                                        temperature=c.temperature, cosine=c.spec.cosine, w_cos=c.w_cos,
                                        label_smoothing=c.label_smoothing)
        total.backward()

    def student_step(explicit: bool):
        def run():
            student.zero_grad(set_to_none=True)
            student(ids, output_attentions=explicit).logits.float().pow(2).mean().backward()
        return run

    def ref_teacher_step():
        ref_teacher.zero_grad(set_to_none=True)
        ref_teacher(ids).logits.pow(2).mean().backward()

    rows = [("teacher forward + its backward (reference: the loss's backward ran through it)",
             timed(ref_teacher_step, args.repeats)),
            ("teacher forward, inference mode (kdlib)", timed(lambda: teacher_forward(teacher, ids), args.repeats)),
            ("output losses fwd+bwd, dense with + eps (reference)", timed(ref_loss, args.repeats)),
            ("output losses fwd+bwd, fused and chunked (kdlib)", timed(fused_loss, args.repeats)),
            ("student fwd+bwd, explicit attention (reference)", timed(student_step(True), args.repeats)),
            ("student fwd+bwd, SDPA (kdlib)", timed(student_step(False), args.repeats))]
    print(f"{args.exp} at the {shapes.name} shapes ({shapes.batch_size} x {shapes.block_size} tokens, V = {V:,}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| part | ms |\n|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
