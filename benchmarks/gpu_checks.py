"""Checks only a GPU can make, for a session lent one (under a minute each).

    python benchmarks/gpu_checks.py syncs      # kdlib's step makes no host sync (CUDA sync debug mode)
    python benchmarks/gpu_checks.py losses     # chunked == dense on the GPU, under bf16 autocast too
    python benchmarks/gpu_checks.py fp16       # the fp16 + loss-scaling path (a T4's) trains, finite

One check per process: accelerate fixes the mixed precision once per process.
Each prints what it found and exits non-zero on a failure.
"""

import sys
import warnings

import numpy as np
import torch


def syncs() -> int:
    """Run a few steps of kdlib's own step with CUDA's sync debug mode on; list every sync."""
    from kdlib import bench

    shapes = bench.get_shapes("smoke")
    windows = bench.token_windows(shapes)
    dev = torch.device("cuda")
    B = shapes.batch_size
    found = 0
    for exp, cached in (("kl", False), ("layerwise-kl-cos", False), ("js-cos", False), ("kl", True)):
        step = bench.KdlibStep(shapes, exp, dev, cached=cached, windows=windows)
        step(np.arange(B), windows[:B])  # warm-up: first-call allocations and caches
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for i in range(1, 3):
                    step(np.arange(i * B, (i + 1) * B), windows[i * B:(i + 1) * B])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        hits = [w for w in caught if "synchroniz" in str(w.message).lower()]
        found += len(hits)
        print(f"{exp}{' (cached)' if cached else ''}: {len(hits)} synchronizing calls in 2 steps")
        for w in hits[:10]:
            print(f"    {w.filename}:{w.lineno}: {w.message}")
    return 1 if found else 0


def losses_check() -> int:
    """Chunked vs dense output losses on the GPU: float32, and bf16 logits under autocast."""
    from kdlib import losses

    torch.manual_seed(0)
    dev = torch.device("cuda")
    N, V = 4096, 50257
    bad = 0
    for dtype in (torch.float32, torch.bfloat16):
        s0 = torch.randn(N, V, device=dev)
        t = torch.randn(N, V, device=dev, dtype=dtype)
        y = torch.randint(0, V, (N,), device=dev)
        y[::5] = -100
        out = {}
        for chunk in ("auto", None):
            s = s0.to(dtype).requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                total, parts = losses.output_losses(s, y, t, w_ce=0.5, divergence="kl", w_div=0.5,
                                                    temperature=2.0, cosine=True, w_cos=0.05,
                                                    label_smoothing=0.1, chunk_size=chunk)
            total.backward()
            out[chunk] = (total.float(), s.grad.float())
        (ta, ga), (tb, gb) = out["auto"], out[None]
        dv = (ta - tb).abs().item() / tb.abs().item()
        dg = ((ga - gb).norm() / gb.norm()).item()
        ok = dv < 1e-5 and dg < (1e-5 if dtype == torch.float32 else 1e-2)
        bad += not ok
        print(f"{dtype}: chunked vs dense, value rel. diff {dv:.2e}, gradient rel. diff {dg:.2e}: "
              f"{'ok' if ok else 'MISMATCH'}")
    return 1 if bad else 0


def fp16() -> int:
    """A few optimizer steps with fp16 autocast, GradScaler and fused AdamW (the T4 preset's path)."""
    import kdlib.train as train
    from kdlib import bench

    shapes = bench.get_shapes("smoke")
    windows = bench.token_windows(shapes)
    real = train.mixed_precision
    train.mixed_precision = lambda precision: "fp16"  # what a T4 gets from "auto"
    try:
        step = bench.KdlibStep(shapes, "kl", torch.device("cuda"), windows=windows)
    finally:
        train.mixed_precision = real
    B = shapes.batch_size
    before = [p.detach().clone() for p in step.trainee.parameters()]
    for i in range(4):
        lo = (i % 4) * B
        step(np.arange(lo, lo + B), windows[lo:lo + B])
    step.finish()  # raises if a loss was not finite
    moved = sum(not torch.equal(a, b) for a, b in zip(before, step.trainee.parameters()))
    finite = all(torch.isfinite(p).all() for p in step.trainee.parameters())
    print(f"fp16: {moved} of {len(before)} parameter tensors moved, all finite: {finite}, "
          f"loss scale {step.accelerator.scaler.get_scale() if step.accelerator.scaler else None}")
    return 0 if moved and finite else 1


CHECKS = {"syncs": syncs, "losses": losses_check, "fp16": fp16}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CHECKS:
        sys.exit(f"usage: python benchmarks/gpu_checks.py {{{','.join(CHECKS)}}}")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: these checks need a GPU")
    sys.exit(CHECKS[sys.argv[1]]())
