"""benchmarks/reference.py, the original study's step the benchmark compares kdlib against: its loss
is the study objective (its ``+ eps`` logs aside), it refuses divergences the study did not run, its
backward runs through the teacher (the original's mistake, reproduced), and it measures in this
process and in its own one."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed with kdlib: this checkout's
    sys.path.insert(0, str(ROOT))

from benchmarks import reference  # noqa: E402
from kdlib import bench, losses  # noqa: E402
from kdlib.errors import KdlibError  # noqa: E402
from kdlib.grid import parse  # noqa: E402
from kdlib.models import CausalLMOutput  # noqa: E402
from kdlib.objective import DistillationLoss  # noqa: E402

SMOKE = bench.get_shapes("smoke")


# The reference's code paths: CE alone; KL and JS, each with and without the cosine term; the
# attention-map MSE on each layer map (layerwise, last2last, last2all) under both divergences.
@pytest.mark.parametrize("exp", ["ce", "kl", "js-cos", "layerwise-kl-cos", "layerwise-js", "last2last-kl",
                                 "last2all-js-cos"])
def test_reference_loss_is_the_study_objective_under_attention_features(exp):
    # The study preset with attention-map features is the notebook's objective: the reference's
    # hand-written dense formulas (with + eps in the logs) must give the same number.
    torch.manual_seed(0)
    cfg = bench.config_at_shapes(SMOKE, exp, feature="attention")
    batch, seq_len, vocab = 3, 16, SMOKE.vocab_size
    n_s, n_t = SMOKE.student["n_layer"], SMOKE.teacher["n_layer"]
    s = torch.randn(batch, seq_len, vocab, dtype=torch.float64) * 2
    t = torch.randn(batch, seq_len, vocab, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (batch, seq_len))

    def attn(n_blocks, heads):  # per block [B, heads, L, L], rows summing to 1
        return tuple(torch.softmax(torch.randn(batch, heads, seq_len, seq_len, dtype=torch.float64), -1)
                     for _ in range(n_blocks))

    s_attn, t_attn = attn(n_s, 2), attn(n_t, 2)
    spec = parse(exp)
    pairs = losses.layer_pairs(cfg.loss_terms.layer_map_name, n_s, n_t) if spec.feature_map else []
    features = reference.reference_feature_loss(s_attn, t_attn, pairs) if pairs else 0.0
    ref = reference.reference_loss(spec, s, t, labels, eps=0.0) + features
    objective = DistillationLoss(cfg.loss_terms, cfg.model, (n_t, SMOKE.teacher["n_embd"]))
    ours = objective(CausalLMOutput(s, attentions=s_attn), CausalLMOutput(t, attentions=t_attn), labels).total
    torch.testing.assert_close(ref, ours, rtol=1e-10, atol=1e-12)
    # and the notebook's eps changes it only in the noise
    with_eps = reference.reference_loss(spec, s, t, labels) + features
    torch.testing.assert_close(with_eps, ours, rtol=1e-5, atol=1e-6)


def test_reference_rejects_divergences_the_study_did_not_run():
    s = torch.randn(2, 4, 8)
    with pytest.raises(KdlibError, match="kl, js"):
        reference.reference_loss(parse("rkl"), s, s, torch.zeros(2, 4, dtype=torch.long))


def test_reference_step_backpropagates_through_the_teacher_and_trains_the_student():
    step = reference.ReferenceStep(SMOKE, "layerwise-kl-cos", torch.device("cpu"))
    assert step.teacher.training is False and all(p.requires_grad for p in step.teacher.parameters())
    assert step.teacher.config._attn_implementation == "eager"
    before = [p.detach().clone() for p in step.student.parameters()]
    windows = bench.token_windows(SMOKE, n_batches=1)
    loss = step(np.arange(SMOKE.batch_size), windows)
    assert math.isfinite(loss)
    # the original's mistake, reproduced: backward ran through the teacher
    assert all(p.grad is not None for p in step.teacher.parameters() if p.dim() >= 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, step.student.parameters()))


@pytest.mark.parametrize("isolated", [False, True], ids=["this-process", "own-process"])
def test_reference_measures_in_this_process_and_in_its_own(isolated):
    # On a GPU the reference runs in a subprocess with CUDA_LAUNCH_BLOCKING=1; the plumbing is
    # the same on the CPU.
    report = bench.start_report(SMOKE, peak=1.0)
    measure = reference.measure_reference_isolated if isolated else reference.measure_reference
    r = measure(report, "kl")
    assert (r.exp, r.path) == ("kl", "reference") and r.tokens_per_s > 0 and r.peak_mem_mib > 0
    assert r.tokens_per_s == pytest.approx(SMOKE.batch_size * SMOKE.block_size / (r.step_ms / 1e3))
    assert r.mfu == pytest.approx(r.tokens_per_s * r.flops_per_token / 1e12)
    # the teacher's forward counted as kdlib's online path counts it (its wasted backward is not model FLOPs)
    online = bench.measure(report, "kl", "kdlib")
    assert r.flops_per_token == online.flops_per_token
