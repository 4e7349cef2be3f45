"""kdlib.losses.chunked: the chunk engine equals the dense path, and keeps its promises.

The chunked path against the dense one (values and gradients, every formula,
chunk sizes that divide N, leave a short last chunk, equal N and exceed it),
inference-mode teachers and labels, no rows and no counted row, repeated
backward passes through one graph (``_RowMean`` makes its gradient in the
forward pass and only rescales it in backward), float16 gradients under loss
scaling, calls that want no gradient, peak memory, and the chunk-size check.

Run ``pytest -s tests/losses/test_chunked.py`` to see the measured memory figures.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from kdlib import losses as L
from kdlib.errors import KdlibError
from kdlib.memory import MiB as MIB
from kdlib.memory import peak_cpu_bytes as peak_bytes
from loss_helpers import (CE_CASES, F16, F32, F64, LOGIT_CASES, SAME, TIGHT, call, case_id, ce_or_loss, chunk_id,
                          logits, random_labels, random_mask, reference_ce)

CHUNK_SHAPE = (3, 7, 19)  # N = 21 positions
W = dict(w_ce=0.7, w_div=1.3, w_cos=0.4)
TAU = 2.0


# --------------------------------------------------------------------------
# 1. chunked path = dense path


@pytest.mark.parametrize("case", LOGIT_CASES + CE_CASES, ids=case_id)
def test_chunked_matches_dense_values_and_grads(case):
    s0, t0 = logits(CHUNK_SHAPE, seed=1), logits(CHUNK_SHAPE, seed=2)
    for mask in (None, random_mask(CHUNK_SHAPE[:-1])):
        labels = torch.randint(0, CHUNK_SHAPE[-1], CHUNK_SHAPE[:-1], generator=torch.Generator().manual_seed(3))
        if mask is not None:
            labels[~mask] = -100

        def run(chunk_size):
            s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
            v = ce_or_loss(case, s, t, TAU, labels if case[0] == "ce" else mask, chunk_size)
            v.backward()
            return v, s.grad, t.grad

        v_d, gs_d, gt_d = run(None)
        for chunk in (1, 4, 21, "auto"):  # divides N, leaves a last chunk of 1, = N, > N
            v_c, gs_c, gt_c = run(chunk)
            assert_close(v_c, v_d, **SAME)
            assert_close(gs_c, gs_d, **SAME)
            if case[0] == "ce":
                assert gt_c is None and gt_d is None
            else:
                assert_close(gt_c, gt_d, **SAME)
            if mask is not None:  # positions outside the mask get exactly zero gradient
                assert torch.equal(gs_c[~mask], torch.zeros_like(gs_c[~mask]))


@pytest.mark.parametrize("chunk", [2, None], ids=chunk_id)
def test_inference_mode_teacher_logits(chunk):
    torch.manual_seed(7)
    head = nn.Linear(6, CHUNK_SHAPE[-1])
    h = torch.randn(*CHUNK_SHAPE[:-1], 6)
    with torch.inference_mode():
        t_inf = head(h)  # a teacher forward pass as the trainer runs it
    assert t_inf.is_inference()
    with torch.no_grad():
        t_ref = head(h)
    mask = random_mask(CHUNK_SHAPE[:-1])
    for case in LOGIT_CASES:
        s_inf, s_ref = (logits(CHUNK_SHAPE, seed=1).requires_grad_() for _ in range(2))
        v_inf = call(*case, s_inf, t_inf, TAU, mask, chunk)
        v_inf.backward()
        v_ref = call(*case, s_ref, t_ref, TAU, mask, chunk)
        v_ref.backward()
        assert_close(v_inf, v_ref, rtol=0, atol=0, msg=str(case))
        assert_close(s_inf.grad, s_ref.grad, rtol=0, atol=0, msg=str(case))


def test_inference_mode_labels_cross_entropy():
    with torch.inference_mode():
        labels = random_labels(CHUNK_SHAPE[:-1], CHUNK_SHAPE[-1]) * 1
    assert labels.is_inference()
    for chunk in (2, None):
        s = logits(CHUNK_SHAPE, seed=1).requires_grad_()
        v = L.cross_entropy(s, labels, label_smoothing=0.1, chunk_size=chunk)
        v.backward()
        assert_close(v, torch.tensor(reference_ce(s, labels, 0.1), dtype=F32))
        assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("chunk", [2, None], ids=chunk_id)
def test_empty_input_gives_zero_in_the_input_precision(chunk):
    for dtype in (F64, F32):
        s = torch.zeros(0, 5, dtype=dtype, requires_grad=True)
        for case in LOGIT_CASES:
            v = call(*case, s, torch.zeros(0, 5, dtype=dtype), TAU, chunk_size=chunk)
            assert v.item() == 0.0
            assert v.dtype == dtype, (case, v.dtype)


@pytest.mark.parametrize("chunk", [2, None], ids=chunk_id)
def test_fully_false_mask_gives_exact_zero_and_zero_grad(chunk):
    for case in LOGIT_CASES + [("ce", 0.1)]:
        s, t = logits((2, 3, 7), seed=1).requires_grad_(), logits((2, 3, 7), seed=2).requires_grad_()
        nothing = torch.full((2, 3), -100) if case[0] == "ce" else torch.zeros(2, 3, dtype=torch.bool)
        v = ce_or_loss(case, s, t, TAU, nothing, chunk)
        assert v.item() == 0.0, case  # exactly zero, not NaN
        v.backward()
        assert torch.equal(s.grad, torch.zeros_like(s)), case
        if case[0] != "ce":
            assert torch.equal(t.grad, torch.zeros_like(t)), case


def test_bad_chunk_size():
    def message(bad):
        return rf"chunk_size must be 'auto', None \(dense\) or an integer >= 1, got {re.escape(repr(bad))}"

    for bad in [0, -2, 1.5, "big", True, "Auto"]:
        with pytest.raises(KdlibError, match=message(bad)):
            L.kl_divergence(logits((2, 3, 5), seed=1), logits((2, 3, 5), seed=2), chunk_size=bad)
    s, t, y = logits((2, 3, 5), seed=1), logits((2, 3, 5), seed=2), torch.zeros(2, 3, dtype=torch.long)
    for entry in (lambda: L.cosine_loss(s, t, chunk_size=0), lambda: L.cross_entropy(s, y, chunk_size=0),
                  lambda: L.sparse_kl(s, *L.teacher_top_k(t, 2), chunk_size=0),
                  lambda: L.output_losses(s, y, t, divergence="kl", chunk_size=0)):
        with pytest.raises(KdlibError, match=message(0)):
            entry()


# --------------------------------------------------------------------------
# 2. repeated backward passes through one graph (CE + KL + cosine in one pass)


SHAPE = (2, 5, 11)  # N = 10 positions: chunk 3 leaves a last chunk of one row


def _retain_setup(seed=15):
    return logits(SHAPE, F64, seed=seed), logits(SHAPE, F64, seed=seed + 1), random_labels(SHAPE[:-1], SHAPE[-1],
                                                                                           seed=seed)


def _fused_kl_cos(s, labels, t, chunk):
    return L.output_losses(s, labels, t, divergence="kl", cosine=True, temperature=TAU, chunk_size=chunk, **W)[0]


def _reference_grad(s0, labels, t):
    """One fresh graph, one backward, the dense path."""
    s = s0.clone().requires_grad_()
    grad, = torch.autograd.grad(_fused_kl_cos(s, labels, t, None), s)
    return grad.clone()


@pytest.mark.parametrize("scales", [(1.0, 3.0), (3.0, 1.0), (0.0, 1.0)], ids=["1then3", "3then1", "0then1"])
def test_second_backward_through_one_graph_returns_the_scaled_gradient(scales):
    """autograd.grad twice through one graph (retain_graph): each call gets scale·gradient, and a
    gradient handed out by the first call is not changed by the second."""
    s0, t, labels = _retain_setup()
    ref = _reference_grad(s0, labels, t)
    a, b = scales
    s = s0.clone().requires_grad_()
    total = _fused_kl_cos(s, labels, t, 3)
    first, = torch.autograd.grad(a * total, s, retain_graph=True)
    first_value = first.clone()
    second, = torch.autograd.grad(b * total, s, retain_graph=True)
    assert_close(first_value, a * ref, **TIGHT)
    assert_close(second, b * ref, **TIGHT)
    assert_close(first, first_value, rtol=0, atol=0)  # the first result was not overwritten


@pytest.mark.parametrize("student", ["leaf", "non_leaf"])
def test_retain_graph_backward_accumulates_first_plus_second(student):
    """total.backward(retain_graph=True); (3·total).backward() leaves 1·g + 3·g = 4·g in .grad."""
    s0, t, labels = _retain_setup()
    ref = _reference_grad(s0, labels, t)
    x = s0.clone().requires_grad_()
    s = x if student == "leaf" else x * 1.0
    total = _fused_kl_cos(s, labels, t, 3)
    total.backward(retain_graph=True)
    assert_close(x.grad, ref, **TIGHT)
    (3.0 * total).backward()
    assert_close(x.grad, 4.0 * ref, **TIGHT)


def test_incoming_gradient_scales_the_result():
    s0, t, labels = _retain_setup()
    ref = _reference_grad(s0, labels, t)
    for chunk in (3, None):
        for scale in (3.0, -0.5, 1024.0):
            s = s0.clone().requires_grad_()
            (scale * _fused_kl_cos(s, labels, t, chunk)).backward()
            assert_close(s.grad, scale * ref, **TIGHT)


# --------------------------------------------------------------------------
# 3. float16 student logits: the gradient may not underflow


FP16_N, FP16_V = 4096, 512  # over half the gradient's elements are below 6e-8, fp16's smallest step
# torch.amp.GradScaler starts at 2**16 (inf in fp16, so it must never be cast to fp16) and
# halves it on overflow; 2**12 is finite in fp16, so a gradient kept in fp16 shows as underflow
LOSS_SCALES = [2.0**12, 2.0**16]


@pytest.fixture(scope="module")
def fp16_case():
    """grad(dtype, chunk, scale): d(scale · (CE + KL))/ds for the same fp16-valued logits, cached."""
    g = torch.Generator().manual_seed(0)
    s16 = (torch.randn(FP16_N, FP16_V, generator=g) * 3).to(F16)
    t16 = (torch.randn(FP16_N, FP16_V, generator=g) * 3).to(F16)
    labels = torch.randint(0, FP16_V, (FP16_N,), generator=g)
    labels[::7] = -100
    grads = {}

    def grad(dtype, chunk, scale):
        key = (dtype, chunk, scale)
        if key not in grads:
            s = s16.to(dtype, copy=True).requires_grad_()
            total, _ = L.output_losses(s, labels, t16.to(dtype), divergence="kl", chunk_size=chunk)
            (total * scale).backward()
            grads[key] = s.grad
        return grads[key]

    return grad


def _small(g32):
    """The nonzero elements below fp16's smallest step (6e-8): lost in fp16 unless loss-scaled first."""
    small = (g32.abs() < 6e-8) & (g32 != 0)
    assert small.float().sum() > 0.3 * (g32 != 0).float().sum()  # the regime this is about
    return small


def test_fp16_gradient_is_finite_and_close_to_fp32(fp16_case):
    g32 = fp16_case(F32, 64, 1.0)
    _small(g32)
    for chunk in (64, None):
        g16 = fp16_case(F16, chunk, 1.0)
        assert g16.dtype == F16
        assert torch.isfinite(g16).all()
        assert (g16 != 0).any()
        assert ((g16.float() - g32).norm() / g32.norm()).item() < 1e-2, chunk


@pytest.mark.parametrize("scale", LOSS_SCALES, ids=["scale2^12", "scale2^16"])
def test_fp16_gradient_under_loss_scaling_keeps_the_small_elements(fp16_case, scale):
    """Under a GradScaler-style loss scale the small elements are representable in
    fp16: unscaled, they must match the fp32 gradient, not underflow to 0.

    Fails if the gradient is rounded to fp16 before the loss scale is applied (the
    small elements then come back as 0 or multiples of 6e-8) or if the scale itself
    is cast to fp16 (2**16 is inf there).
    """
    g32 = fp16_case(F32, 64, 1.0)
    small = _small(g32)
    for chunk in (64, None):
        g16 = fp16_case(F16, chunk, scale)
        assert g16.dtype == F16
        assert torch.isfinite(g16).all()
        unscaled = g16.float() / scale
        representable = small & ((g32 * scale).to(F16) != 0)  # nonzero in fp16 once scaled
        lost = ((unscaled == 0) & representable).float().sum() / representable.float().sum()
        assert lost < 1e-3, f"{lost:.1%} of the small gradient elements underflowed to 0 (chunk {chunk})"
        small_error = (unscaled - g32)[small].norm() / g32[small].norm()
        print(f"\n[fp16] chunk={chunk} scale={scale:g}: {lost:.2%} of the small elements lost, "
              f"relative error on them {small_error:.2e}")
        assert small_error < 0.05, f"relative error {small_error:.3f} on the small elements (chunk {chunk})"
        assert ((unscaled - g32).norm() / g32.norm()).item() < 1e-2


# --------------------------------------------------------------------------
# 4. no gradient wanted: values only, no gradient work


@pytest.fixture
def count_grad_calls(monkeypatch):
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


@pytest.mark.parametrize("how", ["no_grad", "inputs_need_no_grad"])
def test_no_gradient_wanted_gives_values_and_no_gradient_work(how, count_grad_calls):
    s0, t, labels = _retain_setup(seed=20)
    kw = dict(divergence="js", cosine=True, temperature=TAU, **W)
    for chunk in (3, None):
        want, want_parts = L.output_losses(s0.clone().requires_grad_(), labels, t, chunk_size=chunk, **kw)
        count_grad_calls.clear()
        if how == "no_grad":
            with torch.no_grad():
                total, parts = L.output_losses(s0.clone().requires_grad_(), labels, t, chunk_size=chunk, **kw)
        else:
            total, parts = L.output_losses(s0.clone(), labels, t, chunk_size=chunk, **kw)
        assert not total.requires_grad and total.grad_fn is None
        assert count_grad_calls == []  # no per-chunk gradient was computed
        assert_close(total, want.detach(), rtol=0, atol=0)
        assert_close(parts, want_parts, rtol=0, atol=0)


def test_no_grad_allocates_no_full_size_gradient_buffer():
    N, V = 256, 2048
    s = logits((N, V), F32, seed=1).requires_grad_()
    t, labels = logits((N, V), F32, seed=2), random_labels((N,), V)

    def run():
        return L.output_losses(s, labels, t, divergence="kl", cosine=True, chunk_size=16)[0]

    with torch.no_grad():
        peak_no_grad = peak_bytes(run)
    peak_grad = peak_bytes(run)  # the forward alone makes the gradient buffer when one is wanted
    full = N * V * 4
    assert peak_no_grad < 0.5 * full
    assert peak_grad >= 0.99 * full


# --------------------------------------------------------------------------
# 5. memory: the chunked path keeps one full-size tensor, the dense path several


MEM_N, MEM_V, MEM_CHUNK = 256, 50257, 16
# A chunk's own temporaries: [MEM_CHUNK, V] float32 tensors alive at once while it
# is recomputed in backward (log-probs, mixture, exps, their gradients). JS, the
# largest formula here, measured 9; the bound leaves room without letting a second
# [N, V] tensor through (12 · 16 rows = 0.75 · N rows). KL and the cosine: test_fused.py
# measures them together, with CE, in one pass.
MEM_CHUNK_TEMPORARIES = 12


def test_chunked_path_keeps_at_most_one_full_size_tensor():
    g = torch.Generator().manual_seed(0)
    s0, t = torch.randn(MEM_N, MEM_V, generator=g), torch.randn(MEM_N, MEM_V, generator=g)
    s = s0.detach().requires_grad_()  # a leaf sharing s0's storage: nothing allocated here

    def measure(chunk_size):
        s.grad = None  # freed outside the measured window

        def step():
            L.js_divergence(s, t, chunk_size=chunk_size).backward()

        peak = peak_bytes(step)
        assert s.grad is not None and s.grad.shape == s.shape
        s.grad = None
        return peak

    chunked, dense = measure(MEM_CHUNK), measure(None)
    full = MEM_N * MEM_V * 4  # one [N, V] float32 tensor
    allowance = MEM_CHUNK_TEMPORARIES * MEM_CHUNK * MEM_V * 4
    print(f"\n[memory] js_divergence N={MEM_N} V={MEM_V} chunk={MEM_CHUNK}: "
          f"chunked {chunked / MIB:.1f} MiB ({chunked / full:.3f} x [N,V]), "
          f"dense {dense / MIB:.1f} MiB ({dense / full:.3f} x [N,V]), "
          f"chunked/dense {chunked / dense:.3f}")
    assert chunked >= 0.99 * full  # the gradient itself: the measurement sees allocations
    assert chunked <= full + allowance
    assert dense >= 3 * full
    assert chunked / dense <= 0.5
