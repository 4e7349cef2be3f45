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
        step = bench.KdlibStep(bench.config_at_shapes(shapes, exp), dev, cached=cached, windows=windows)
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
            s = s0.clone().to(dtype).requires_grad_(True)  # a fresh leaf per run: no shared .grad
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                total, parts = losses.output_losses(s, y, t, w_ce=0.5, divergence="kl", w_div=0.5,
                                                    temperature=2.0, cosine=True, w_cos=0.05,
                                                    label_smoothing=0.1, chunk_size=chunk)
            total.backward()
            out[chunk] = (total.detach().float().clone(), s.grad.float().clone())
        (ta, ga), (tb, gb) = out["auto"], out[None]
        dv = (ta - tb).abs().item() / tb.abs().item()
        dg = ((ga - gb).norm() / gb.norm()).item()
        ok = dv < 1e-5 and dg < (1e-5 if dtype == torch.float32 else 1e-2)
        bad += not ok
        print(f"{dtype}: chunked vs dense, value rel. diff {dv:.2e}, gradient rel. diff {dg:.2e}: "
              f"{'ok' if ok else 'MISMATCH'}")
    return 1 if bad else 0


def fp16() -> int:
    """The T4 preset's path on any GPU: fp16 autocast with loss scaling, an fp16 teacher, fused AdamW,
    at GPT-2's vocabulary (where per-element loss gradients are ~1e-9 before scaling). The first
    step's gradient must match a float32 step's, and the steps must train."""
    from dataclasses import replace

    import kdlib.models as models
    import kdlib.optim as optim
    from kdlib import bench

    smoke = bench.get_shapes("smoke")
    shapes = replace(smoke, student={**smoke.student, "vocab_size": 50257},
                     teacher={**smoke.teacher, "vocab_size": 50257})
    windows = bench.token_windows(shapes)
    B = shapes.batch_size
    real_mp, real_half = optim.mixed_precision, models._half_dtype
    optim.mixed_precision = lambda precision: "fp16"  # what a T4 gets from "auto"
    models._half_dtype = lambda device: torch.float16  # and its teacher's dtype
    try:
        step = bench.KdlibStep(bench.config_at_shapes(shapes, "kl"), torch.device("cuda"), windows=windows)
    finally:
        optim.mixed_precision, models._half_dtype = real_mp, real_half
    # the first step's gradient, against the same step in float32 (same weights, same batch)
    ids = torch.from_numpy(windows[:B]).cuda()
    student = step.trainee.student
    grads = {}
    for name, ctx in (("fp16", torch.autocast("cuda", dtype=torch.float16)), ("fp32", torch.autocast("cuda", enabled=False))):
        student.zero_grad(set_to_none=True)
        with ctx:
            out = step.trainee(ids[:, :-1], ids[:, 1:], step.teacher_out_fn(np.arange(B), ids[:, :-1]))
        (out.total * (1024.0 if name == "fp16" else 1.0)).backward()  # a loss scale, as GradScaler's
        grads[name] = student.lm_head.weight.grad.float() / (1024.0 if name == "fp16" else 1.0)
    rel = ((grads["fp16"] - grads["fp32"]).norm() / grads["fp32"].norm()).item()
    student.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in step.trainee.parameters()]
    for i in range(4):
        lo = (i % 4) * B
        step(np.arange(lo, lo + B), windows[lo:lo + B])
    step.finish()  # raises if a loss was not finite
    moved = sum(not torch.equal(a, b) for a, b in zip(before, step.trainee.parameters()))
    finite = all(torch.isfinite(p).all() for p in step.trainee.parameters())
    scale = step.accelerator.scaler.get_scale() if step.accelerator.scaler else None
    ok = rel < 5e-2 and moved == len(before) and finite
    print(f"fp16: output-head gradient vs float32, relative difference {rel:.2e}; {moved} of {len(before)} "
          f"parameter tensors moved in 4 steps; all finite: {finite}; loss scale {scale}: "
          f"{'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


CHECKS = {"syncs": syncs, "losses": losses_check, "fp16": fp16}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CHECKS:
        sys.exit(f"usage: python benchmarks/gpu_checks.py {{{','.join(CHECKS)}}}")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: these checks need a GPU")
    sys.exit(CHECKS[sys.argv[1]]())
