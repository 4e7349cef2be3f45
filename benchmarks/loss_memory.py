"""Peak extra memory of the vocabulary-sized losses, chunked vs dense, forward + backward.

    python benchmarks/loss_memory.py --n 8192 --v 50257 --losses kl_divergence,js_divergence

CPU only (the PyTorch profiler's allocator events). Reports MiB and the ratio
to one [N, V] float32 tensor, which is what the chunked path may hold (the
gradient) under design.md §4.
"""

import argparse
import platform

import torch

from kdlib import losses as L
from kdlib.memory import MiB, peak_cpu_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192, help="positions (default 8192 = 64 x 128)")
    ap.add_argument("--v", type=int, default=50257, help="vocabulary (default GPT-2's 50257)")
    ap.add_argument("--losses", default="kl_divergence,js_divergence,cosine_loss")
    ap.add_argument("--chunk", default="auto", help="rows per chunk, or 'auto'")
    args = ap.parse_args()
    chunk = args.chunk if args.chunk == "auto" else int(args.chunk)
    torch.manual_seed(0)
    s = torch.randn(args.n, args.v, requires_grad=True)
    t = torch.randn(args.n, args.v)
    full = args.n * args.v * 4
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"N={args.n} V={args.v}; one [N, V] float32 = {full / MiB:.1f} MiB")
    print("| loss | chunked MiB | x [N,V] | dense MiB | x [N,V] | chunked/dense |")
    print("|---|---|---|---|---|---|")
    for name in args.losses.split(","):
        fn = getattr(L, name)
        peaks = {}
        for c in (chunk, None):
            s.grad = None
            peaks[c] = peak_cpu_bytes(lambda: fn(s, t, chunk_size=c).backward())
        a, b = peaks[chunk], peaks[None]
        print(f"| {name} | {a / MiB:.1f} | {a / full:.3f} | {b / MiB:.1f} | {b / full:.3f} | {a / b:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
