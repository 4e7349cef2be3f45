"""kdlib.losses.divergences against the math contract of design.md §4.

Every loss is checked three ways: against a naive float64 formula written out
(tests/losses/loss_helpers.py) with explicit probabilities, against an
independent implementation (torch.nn.functional, SciPy), and against the
identities and bounds the contract states. Then gradients (gradcheck),
low-precision stability and the output dtype. Cases: one per code path of the
formulas (``DIV_CASES``); each test runs the chunked path (a chunk size that
leaves a short last chunk, and ``"auto"``) and the dense one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import jensenshannon
from torch.testing import assert_close

from kdlib import losses as L
from loss_helpers import (BF16, DIV_CASES, F16, F32, F64, LOGIT_CASES, TOL, call, case_id, extreme_logits, logits,
                          np_softmax, random_labels, random_mask, reference, reference_ce, to_np)

CHUNKS = ("auto", 2, None)
# (dtype, shape, temperature): float32 on 4-d logits at τ = 2, float64 on 2-d logits at τ = 0.7
SETTINGS = [(F32, (2, 4, 5, 17), 2.0), (F64, (7, 11), 0.7)]


def setting_id(setting) -> str:
    dtype, shape, temperature = setting
    return f"{str(dtype).removeprefix('torch.')}-{'x'.join(map(str, shape))}-tau{temperature}"


def masks(shape):
    """No mask, and a random one: the two ways positions are counted."""
    return (None, random_mask(shape[:-1]))


# --------------------------------------------------------------------------
# 1. against the naive float64 formula


@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
@pytest.mark.parametrize("case", DIV_CASES, ids=case_id)
def test_divergence_matches_float64_reference(case, setting):
    dtype, shape, temperature = setting
    s, t = logits(shape, dtype, seed=1), logits(shape, dtype, seed=2)
    for mask in masks(shape):
        want = torch.tensor(reference(*case, s, t, temperature, mask), dtype=F64)
        assert want > 0.01  # the inputs really differ, so a wrong formula cannot pass
        for chunk in CHUNKS:
            got = call(*case, s, t, temperature, mask, chunk)
            assert got.dtype == dtype and got.shape == ()
            assert_close(got.to(F64), want, **TOL[dtype])


@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_cosine_matches_float64_reference(setting):
    dtype, shape, _ = setting
    s, t = logits(shape, dtype, seed=1), logits(shape, dtype, seed=2)
    for mask in masks(shape):
        want = torch.tensor(reference("cos", None, s, t, mask=mask), dtype=F64)
        for chunk in CHUNKS:
            got = L.cosine_loss(s, t, mask, chunk_size=chunk)
            assert got.dtype == dtype
            assert_close(got.to(F64), want, **TOL[dtype])


@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_cross_entropy_matches_float64_reference(setting):
    dtype, shape, _ = setting
    s = logits(shape, dtype, seed=1)
    labels = random_labels(shape[:-1], shape[-1])
    for smoothing in (0.0, 0.1, 1.0):
        want = torch.tensor(reference_ce(s, labels, smoothing), dtype=F64)
        for chunk in CHUNKS:
            got = L.cross_entropy(s, labels, label_smoothing=smoothing, chunk_size=chunk)
            assert got.dtype == dtype
            assert_close(got.to(F64), want, **TOL[dtype])


def test_divergence_by_name_matches_named_function():
    s, t, mask = logits((3, 4, 9), seed=1), logits((3, 4, 9), seed=2), random_mask((3, 4))
    for name, param in DIV_CASES + [("gjsd", 0.5), ("skl", 0.7), ("srkl", 0.1)]:
        assert_close(L.divergence(name, s, t, 2.0, mask, param=param), call(name, param, s, t, 2.0, mask),
                     rtol=0, atol=0)


# --------------------------------------------------------------------------
# 2. against independent implementations


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_kl_and_reverse_kl_match_torch_kl_div(dtype):
    shape, temperature = (2, 3, 13), 2.0
    V = shape[-1]
    s, t = logits(shape, dtype, seed=1), logits(shape, dtype, seed=2)
    for mask in masks(shape):
        keep = slice(None) if mask is None else mask.reshape(-1)
        log_q = F.log_softmax(s.to(F64).reshape(-1, V)[keep] / temperature, dim=-1)  # [n, V]
        log_p = F.log_softmax(t.to(F64).reshape(-1, V)[keep] / temperature, dim=-1)
        n = log_q.shape[0]
        want_kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / n * temperature**2
        want_rkl = F.kl_div(log_p, log_q, log_target=True, reduction="sum") / n * temperature**2
        for chunk in CHUNKS:
            assert_close(L.kl_divergence(s, t, temperature, mask, chunk_size=chunk).to(F64), want_kl, **TOL[dtype])
            assert_close(L.reverse_kl(s, t, temperature, mask, chunk_size=chunk).to(F64), want_rkl, **TOL[dtype])


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_js_matches_scipy_jensenshannon(dtype):
    shape, temperature = (2, 3, 13), 2.0
    V = shape[-1]
    s, t = logits(shape, dtype, seed=1), logits(shape, dtype, seed=2)
    for mask in masks(shape):
        keep = slice(None) if mask is None else mask.reshape(-1).numpy()
        p = np_softmax(to_np(t).reshape(-1, V) / temperature)[keep]  # [n, V]
        q = np_softmax(to_np(s).reshape(-1, V) / temperature)[keep]
        per_row = jensenshannon(p, q, base=math.e, axis=-1) ** 2  # SciPy returns the distance, √JS
        want = torch.tensor(temperature**2 * per_row.mean(), dtype=F64)
        for chunk in CHUNKS:
            assert_close(L.js_divergence(s, t, temperature, mask, chunk_size=chunk).to(F64), want, **TOL[dtype])
            assert_close(L.generalized_jsd(s, t, 0.5, temperature, mask, chunk_size=chunk).to(F64), want,
                         **TOL[dtype])


@pytest.mark.parametrize("smoothing,ignore_index", [(0.0, -100), (0.1, 0)])
def test_cross_entropy_matches_torch(smoothing, ignore_index):
    shape = (2, 3, 13)
    V = shape[-1]
    labels = random_labels(shape[:-1], V, ignore_index=ignore_index)
    s_ref = logits(shape, F32, seed=1).requires_grad_()
    want = F.cross_entropy(s_ref.reshape(-1, V), labels.reshape(-1), label_smoothing=smoothing,
                           ignore_index=ignore_index)
    want.backward()
    for chunk in CHUNKS:
        s = s_ref.detach().clone().requires_grad_()
        got = L.cross_entropy(s, labels, label_smoothing=smoothing, ignore_index=ignore_index,
                              chunk_size=chunk)
        got.backward()
        assert_close(got, want.detach())
        assert_close(s.grad, s_ref.grad)


def test_cosine_matches_torch_cosine_similarity():
    shape = (2, 3, 13)
    for mask in masks(shape):
        s_ref, t_ref = logits(shape, seed=1).requires_grad_(), logits(shape, seed=2).requires_grad_()
        keep = torch.ones(shape[:-1], dtype=torch.bool) if mask is None else mask
        want = (1.0 - F.cosine_similarity(s_ref, t_ref, dim=-1))[keep].mean()
        want.backward()
        for chunk in CHUNKS:
            s, t = s_ref.detach().clone().requires_grad_(), t_ref.detach().clone().requires_grad_()
            got = L.cosine_loss(s, t, mask, chunk_size=chunk)
            got.backward()
            assert_close(got, want.detach())
            assert_close(s.grad, s_ref.grad)
            assert_close(t.grad, t_ref.grad)


# --------------------------------------------------------------------------
# 3. identities and bounds


def test_gjsd_endpoints_are_the_two_kls_and_midpoint_is_js():
    s, t, mask = logits((3, 4, 9), seed=1), logits((3, 4, 9), seed=2), random_mask((3, 4))
    for temperature in (1.0, 0.7):
        for chunk in (2, None):
            kw = dict(temperature=temperature, mask=mask, chunk_size=chunk)
            kl, rkl, js = L.kl_divergence(s, t, **kw), L.reverse_kl(s, t, **kw), L.js_divergence(s, t, **kw)
            assert not torch.allclose(kl, rkl)  # the two endpoints are told apart
            assert_close(L.generalized_jsd(s, t, beta=0.0, **kw), kl)
            assert_close(L.generalized_jsd(s, t, beta=1.0, **kw), rkl)
            assert_close(L.generalized_jsd(s, t, beta=0.5, **kw), js)


def test_skew_kls_at_zero_are_the_kls_and_at_one_vanish():
    s, t, mask = logits((3, 4, 9), seed=1), logits((3, 4, 9), seed=2), random_mask((3, 4))
    for chunk in (2, None):
        kw = dict(temperature=2.0, mask=mask, chunk_size=chunk)
        assert_close(L.skew_kl(s, t, alpha=0.0, **kw), L.kl_divergence(s, t, **kw))
        assert_close(L.skew_reverse_kl(s, t, alpha=0.0, **kw), L.reverse_kl(s, t, **kw))
        zero = torch.tensor(0.0)
        assert_close(L.skew_kl(s, t, alpha=1.0, **kw), zero)  # KL(p‖p)
        assert_close(L.skew_reverse_kl(s, t, alpha=1.0, **kw), zero)
        # skewing towards the target shrinks the divergence
        assert L.skew_kl(s, t, alpha=0.5, **kw) < L.skew_kl(s, t, alpha=0.1, **kw) < L.kl_divergence(s, t, **kw)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
def test_js_is_bounded_by_tau2_ln2_even_for_extreme_logits(dtype):
    for temperature in (1.0, 2.0):
        bound = temperature**2 * math.log(2.0)
        s, t = extreme_logits((3, 5, 32), dtype, 1), extreme_logits((3, 5, 32), dtype, 2)
        for chunk in CHUNKS:
            js = L.js_divergence(s, t, temperature, chunk_size=chunk)
            assert torch.isfinite(js) and 0.0 < js.item() <= bound * (1 + 1e-6)
        # disjoint one-hots reach the bound: teacher all on token 0, student all on token 1
        s = torch.full((4, 32), -1e4, dtype=dtype)
        t = s.clone()
        s[:, 1] = 1e4
        t[:, 0] = 1e4
        for chunk in CHUNKS:
            js = L.js_divergence(s, t, temperature, chunk_size=chunk)
            assert_close(js, torch.tensor(bound), rtol=1e-5, atol=0.0)


def _entropy(w: float) -> float:
    return -sum(x * math.log(x) for x in (w, 1 - w) if x > 0)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(pair=arrays(np.float64, (2, 3, 6), elements=st.floats(-1e4, 1e4)),
       temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_divergences_stay_in_their_ranges_for_any_logits(pair, temperature):
    s, t = torch.from_numpy(pair[0]), torch.from_numpy(pair[1])  # [3, 6] float64
    tau2 = temperature**2
    upper = {"js": tau2 * math.log(2), "tvd": tau2}
    for name, param in DIV_CASES:
        v = call(name, param, s, t, temperature, chunk_size=2).item()
        assert math.isfinite(v) and v >= -1e-9, (name, param, v)
        if name in upper:
            assert v <= upper[name] * (1 + 1e-9), (name, v)
        if name == "gjsd" and 0 < param < 1:  # a weighted JS is at most the weights' entropy
            assert v <= tau2 * _entropy(param) * (1 + 1e-9), (name, param, v)
        if name in ("skl", "srkl") and param > 0:  # the mixture holds ≥ α of the first argument
            assert v <= tau2 * -math.log(param) * (1 + 1e-9), (name, param, v)
    cos = L.cosine_loss(s, t, chunk_size=2).item()
    assert -1e-9 <= cos <= 2 + 1e-9


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=["f32", "bf16", "f64"])
def test_identical_logits_give_zero(dtype):
    s = logits((3, 5, 23), dtype, seed=1, scale=5.0)
    s.view(-1, 23)[0] = -1e4
    s.view(-1, 23)[0, 4] = 1e4
    for case in LOGIT_CASES:
        for chunk in ("auto", None):
            for temperature in (1.0, 2.0):
                v = call(*case, s, s.clone(), temperature, chunk_size=chunk)
                assert_close(v, torch.zeros((), dtype=v.dtype), rtol=0.0, atol=1e-6, msg=f"{case} {chunk}")


# --------------------------------------------------------------------------
# 4. gradients (on the chunked path; tests/losses/test_chunked.py shows the dense one equal to it)


GC_MASK = torch.tensor([[True, False, True], [True, True, False]])  # [2, 3]


@pytest.mark.parametrize("case", LOGIT_CASES, ids=case_id)
def test_gradcheck_logit_losses_wrt_student_and_teacher(case):
    s = logits((2, 3, 5), F64, seed=3).requires_grad_()
    t = logits((2, 3, 5), F64, seed=4).requires_grad_()
    for mask in (None, GC_MASK):
        assert torch.autograd.gradcheck(lambda s, t: call(*case, s, t, 1.5, mask, 2), (s, t))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_gradcheck_cross_entropy(smoothing):
    s = logits((2, 3, 5), F64, seed=3).requires_grad_()
    labels = torch.tensor([[1, -100, 4], [0, 2, -100]])
    assert torch.autograd.gradcheck(lambda s: L.cross_entropy(s, labels, label_smoothing=smoothing, chunk_size=2),
                                    (s,))


# --------------------------------------------------------------------------
# 5. low precision: finite values and gradients for logits up to |1e4|, float32 (or float64) out


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_low_precision_extreme_logits_give_finite_loss_and_grads(dtype):
    for case in LOGIT_CASES:
        for temperature in (1.0, 2.0):
            for chunk in (3, None):
                s = extreme_logits((2, 4, 64), dtype, 1).requires_grad_()
                t = extreme_logits((2, 4, 64), dtype, 2).requires_grad_()
                assert s.abs().max() >= 1e4 and torch.isfinite(s).all()
                v = call(*case, s, t, temperature, random_mask((2, 4)), chunk)
                where = (case, temperature, chunk)
                assert v.dtype == F32 and torch.isfinite(v), (where, v)
                v.backward()
                for x in (s, t):
                    assert x.grad.dtype == dtype, where
                    assert torch.isfinite(x.grad).all(), where


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_low_precision_extreme_logits_cross_entropy(dtype):
    for chunk in (3, None):
        s = extreme_logits((2, 4, 64), dtype, 1).requires_grad_()
        labels = random_labels((2, 4), 64)
        v = L.cross_entropy(s, labels, label_smoothing=0.1, chunk_size=chunk)
        assert v.dtype == F32 and torch.isfinite(v)
        v.backward()
        assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("dtype,want", [(F64, F64), (F32, F32), (BF16, F32), (F16, F32)],
                         ids=["f64", "f32", "bf16", "f16"])
def test_output_dtype_is_float32_or_float64(dtype, want):
    s, t = logits((2, 3, 5), dtype, seed=1), logits((2, 3, 5), dtype, seed=2)
    for chunk in ("auto", None):
        for case in LOGIT_CASES:
            assert call(*case, s, t, 2.0, chunk_size=chunk).dtype == want
        assert L.cross_entropy(s, torch.zeros(2, 3, dtype=torch.long), chunk_size=chunk).dtype == want
