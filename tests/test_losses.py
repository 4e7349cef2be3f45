"""kdlib.losses against the math contract of design.md §4.

Every loss is checked three ways: against a naive float64 formula written out
here with explicit probabilities, against an independent implementation
(torch.nn.functional, SciPy), and against the identities and bounds the
contract states. Then gradients (gradcheck), low-precision stability, the
chunked path against the dense one (values, gradients, inference-mode
teachers), the chunked path's peak memory, the layer maps, the feature losses
and the error messages for bad input.

Run ``pytest -s tests/test_losses.py`` to see the measured memory figures.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import jensenshannon
from torch import nn
from torch.testing import assert_close

from kdlib.memory import MiB as MIB
from kdlib.memory import peak_cpu_bytes as peak_bytes
from kdlib import losses as L
from kdlib.errors import KdlibError

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
SHAPES = [(7, 11), (2, 3, 13), (2, 4, 5, 17)]
TEMPERATURES = [1.0, 2.0]
# float32 maths against the float64 formula; float64 against it tightly
TOL = {F32: dict(rtol=1e-5, atol=1e-5), F64: dict(rtol=1e-10, atol=1e-12)}
# chunked vs dense: the same row formula, so equal up to float rounding
SAME = dict(rtol=1e-6, atol=1e-7)

# (name, mixing parameter): every divergence, the parametric ones at both ends and inside
DIV_CASES = [("kl", None), ("rkl", None), ("js", None), ("tvd", None),
             ("gjsd", 0.0), ("gjsd", 0.3), ("gjsd", 0.5), ("gjsd", 1.0),
             ("skl", 0.0), ("skl", 0.1), ("skl", 0.7),
             ("srkl", 0.0), ("srkl", 0.1), ("srkl", 0.7)]
LOGIT_CASES = DIV_CASES + [("cos", None)]



def case_id(case) -> str:
    name, param = case
    return name if param is None else f"{name}{param}"


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def call(name, param, s, t, temperature=1.0, mask=None, chunk_size="auto"):
    """The public kdlib function for loss ``name`` (``cos`` takes no temperature)."""
    kw = dict(mask=mask, chunk_size=chunk_size)
    if name == "cos":
        return L.cosine_loss(s, t, **kw)
    named = {"kl": L.kl_divergence, "rkl": L.reverse_kl, "js": L.js_divergence,
             "tvd": L.total_variation}
    if name in named:
        return named[name](s, t, temperature, **kw)
    if name == "gjsd":
        return L.generalized_jsd(s, t, beta=param, temperature=temperature, **kw)
    if name == "skl":
        return L.skew_kl(s, t, alpha=param, temperature=temperature, **kw)
    if name == "srkl":
        return L.skew_reverse_kl(s, t, alpha=param, temperature=temperature, **kw)
    raise AssertionError(name)


def logits(shape, dtype=F32, seed=0, scale=3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)


def random_mask(shape, seed=0) -> torch.Tensor:
    """A boolean mask with at least one True and one False position."""
    g = torch.Generator().manual_seed(1000 + seed)
    m = torch.rand(shape, generator=g) < 0.6
    m.view(-1)[0], m.view(-1)[-1] = True, False
    return m


def extreme_logits(shape, dtype, seed) -> torch.Tensor:
    """randn·1e4 within fp16 range, plus one-hot-ish, uniform and few-hot rows at ±1e4."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 1e4).clamp(-65000.0, 65000.0)
    rows = x.view(-1, shape[-1])  # [N, V]
    rows[0] = -1e4
    rows[0, seed % shape[-1]] = 1e4  # one-hot at a seed-dependent token: disjoint for s and t
    rows[1] = 1e4  # uniform, at the largest magnitude
    rows[2] = -1e4
    rows[2, :3] = 1e4
    return x.to(dtype)


# --------------------------------------------------------------------------
# naive float64 references: the textbook formulas with explicit probabilities


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(F64).numpy()


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KL(a‖b) per row: Σ_v a·log(a/b)."""
    return np.sum(a * np.log(a / b), axis=-1)


def masked_mean(rows: np.ndarray, mask) -> float:
    if mask is not None:
        rows = rows[mask.numpy()]
    return float(rows.mean()) if rows.size else 0.0


def reference(name, param, s, t, temperature=1.0, mask=None) -> float:
    s, t, T = _np(s), _np(t), temperature
    if name == "cos":
        rows = 1.0 - (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
        return masked_mean(rows, mask)
    p, q = np_softmax(t / T), np_softmax(s / T)  # teacher, student
    if name == "kl":
        r = np_kl(p, q)
    elif name == "rkl":
        r = np_kl(q, p)
    elif name == "js":
        m = 0.5 * (p + q)
        r = 0.5 * np_kl(p, m) + 0.5 * np_kl(q, m)
    elif name == "tvd":
        r = 0.5 * np.abs(p - q).sum(-1)
    elif name == "gjsd":  # β = 0 and 1 are the two KLs by definition (TRL's GKD)
        b = param
        if b == 0.0:
            r = np_kl(p, q)
        elif b == 1.0:
            r = np_kl(q, p)
        else:
            m = b * p + (1 - b) * q
            r = b * np_kl(p, m) + (1 - b) * np_kl(q, m)
    elif name == "skl":
        r = np_kl(p, param * p + (1 - param) * q)
    elif name == "srkl":
        r = np_kl(q, param * q + (1 - param) * p)
    else:
        raise AssertionError(name)
    return masked_mean(T * T * r, mask)


def reference_ce(s, labels, smoothing, ignore_index=-100) -> float:
    s, y = _np(s), labels.numpy()
    log_q = np.log(np_softmax(s))  # [..., V]
    keep = y != ignore_index
    log_q, y = log_q[keep], y[keep]  # [M, V], [M]
    nll = -log_q[np.arange(len(y)), y]
    rows = (1 - smoothing) * nll - smoothing * log_q.mean(-1)
    return float(rows.mean()) if rows.size else 0.0


def random_labels(shape, V, seed=0, ignore_index=-100) -> torch.Tensor:
    g = torch.Generator().manual_seed(2000 + seed)
    y = torch.randint(0, V, shape, generator=g)
    y[~random_mask(shape, seed)] = ignore_index
    return y


# --------------------------------------------------------------------------
# 1. against the naive float64 formula


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("temperature", TEMPERATURES, ids=["T1", "T2"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("case", DIV_CASES, ids=case_id)
def test_divergence_matches_float64_reference(case, shape, temperature, masked, dtype):
    s, t = logits(shape, dtype, seed=1), logits(shape, dtype, seed=2)
    mask = random_mask(shape[:-1]) if masked else None
    want = torch.tensor(reference(*case, s, t, temperature, mask), dtype=F64)
    assert want > 0.01  # the inputs really differ, so a wrong formula cannot pass
    for chunk in ("auto", 2, None):
        got = call(*case, s, t, temperature, mask, chunk)
        assert got.dtype == dtype and got.shape == ()
        assert_close(got.to(F64), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cosine_matches_float64_reference(shape, masked, dtype):
    s, t = logits(shape, dtype, seed=1), logits(shape, dtype, seed=2)
    mask = random_mask(shape[:-1]) if masked else None
    want = torch.tensor(reference("cos", None, s, t, mask=mask), dtype=F64)
    for chunk in ("auto", 2, None):
        got = L.cosine_loss(s, t, mask, chunk_size=chunk)
        assert got.dtype == dtype
        assert_close(got.to(F64), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cross_entropy_matches_float64_reference(shape, smoothing, dtype):
    s = logits(shape, dtype, seed=1)
    labels = random_labels(shape[:-1], shape[-1])
    want = torch.tensor(reference_ce(s, labels, smoothing), dtype=F64)
    for chunk in ("auto", 2, None):
        got = L.cross_entropy(s, labels, label_smoothing=smoothing, chunk_size=chunk)
        assert got.dtype == dtype
        assert_close(got.to(F64), want, **TOL[dtype])


@pytest.mark.parametrize("case", DIV_CASES, ids=case_id)
def test_divergence_by_name_matches_named_function(case):
    name, param = case
    s, t, mask = logits((3, 4, 9), seed=1), logits((3, 4, 9), seed=2), random_mask((3, 4))
    assert_close(L.divergence(name, s, t, 2.0, mask, param=param), call(name, param, s, t, 2.0, mask),
                 rtol=0, atol=0)


# --------------------------------------------------------------------------
# 2. against independent implementations


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("temperature", TEMPERATURES, ids=["T1", "T2"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_kl_and_reverse_kl_match_torch_kl_div(shape, temperature, masked, dtype):
    T, V = temperature, shape[-1]
    s, t = logits(shape, dtype, seed=1), logits(shape, dtype, seed=2)
    mask = random_mask(shape[:-1]) if masked else None
    keep = mask.reshape(-1) if masked else slice(None)
    log_q = F.log_softmax(s.to(F64).reshape(-1, V)[keep] / T, dim=-1)  # [n, V]
    log_p = F.log_softmax(t.to(F64).reshape(-1, V)[keep] / T, dim=-1)
    n = log_q.shape[0]
    want_kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / n * T * T
    want_rkl = F.kl_div(log_p, log_q, log_target=True, reduction="sum") / n * T * T
    for chunk in ("auto", 2, None):
        assert_close(L.kl_divergence(s, t, T, mask, chunk_size=chunk).to(F64), want_kl, **TOL[dtype])
        assert_close(L.reverse_kl(s, t, T, mask, chunk_size=chunk).to(F64), want_rkl, **TOL[dtype])


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("temperature", TEMPERATURES, ids=["T1", "T2"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_js_matches_scipy_jensenshannon(shape, temperature, masked, dtype):
    T, V = temperature, shape[-1]
    s, t = logits(shape, dtype, seed=1), logits(shape, dtype, seed=2)
    mask = random_mask(shape[:-1]) if masked else None
    keep = mask.reshape(-1).numpy() if masked else slice(None)
    p = np_softmax(_np(t).reshape(-1, V) / T)[keep]  # [n, V]
    q = np_softmax(_np(s).reshape(-1, V) / T)[keep]
    per_row = jensenshannon(p, q, base=math.e, axis=-1) ** 2  # SciPy returns the distance, √JS
    want = torch.tensor(T * T * per_row.mean(), dtype=F64)
    for chunk in ("auto", 2, None):
        assert_close(L.js_divergence(s, t, T, mask, chunk_size=chunk).to(F64), want, **TOL[dtype])
        assert_close(L.generalized_jsd(s, t, 0.5, T, mask, chunk_size=chunk).to(F64), want, **TOL[dtype])


@pytest.mark.parametrize("ignore_index", [-100, 0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cross_entropy_matches_torch(shape, smoothing, ignore_index):
    V = shape[-1]
    labels = random_labels(shape[:-1], V, ignore_index=ignore_index)
    s_ref = logits(shape, F32, seed=1).requires_grad_()
    want = F.cross_entropy(s_ref.reshape(-1, V), labels.reshape(-1), label_smoothing=smoothing,
                           ignore_index=ignore_index)
    want.backward()
    for chunk in ("auto", 2, None):
        s = s_ref.detach().clone().requires_grad_()
        got = L.cross_entropy(s, labels, label_smoothing=smoothing, ignore_index=ignore_index,
                              chunk_size=chunk)
        got.backward()
        assert_close(got, want.detach())
        assert_close(s.grad, s_ref.grad)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cosine_matches_torch_cosine_similarity(shape, masked):
    s_ref, t_ref = logits(shape, seed=1).requires_grad_(), logits(shape, seed=2).requires_grad_()
    mask = random_mask(shape[:-1]) if masked else torch.ones(shape[:-1], dtype=torch.bool)
    want = (1.0 - F.cosine_similarity(s_ref, t_ref, dim=-1))[mask].mean()
    want.backward()
    for chunk in ("auto", 2, None):
        s, t = s_ref.detach().clone().requires_grad_(), t_ref.detach().clone().requires_grad_()
        got = L.cosine_loss(s, t, mask if masked else None, chunk_size=chunk)
        got.backward()
        assert_close(got, want.detach())
        assert_close(s.grad, s_ref.grad)
        assert_close(t.grad, t_ref.grad)


# --------------------------------------------------------------------------
# 3. identities and bounds


@pytest.mark.parametrize("chunk", ["auto", 2, None])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_gjsd_endpoints_are_the_two_kls_and_midpoint_is_js(temperature, chunk):
    s, t, mask = logits((3, 4, 9), seed=1), logits((3, 4, 9), seed=2), random_mask((3, 4))
    kw = dict(temperature=temperature, mask=mask, chunk_size=chunk)
    kl, rkl, js = L.kl_divergence(s, t, **kw), L.reverse_kl(s, t, **kw), L.js_divergence(s, t, **kw)
    assert not torch.allclose(kl, rkl)  # the two endpoints are told apart
    assert_close(L.generalized_jsd(s, t, beta=0.0, **kw), kl)
    assert_close(L.generalized_jsd(s, t, beta=1.0, **kw), rkl)
    assert_close(L.generalized_jsd(s, t, beta=0.5, **kw), js)


@pytest.mark.parametrize("chunk", ["auto", 2, None])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_skew_kls_at_zero_are_the_kls_and_at_one_vanish(temperature, chunk):
    s, t, mask = logits((3, 4, 9), seed=1), logits((3, 4, 9), seed=2), random_mask((3, 4))
    kw = dict(temperature=temperature, mask=mask, chunk_size=chunk)
    assert_close(L.skew_kl(s, t, alpha=0.0, **kw), L.kl_divergence(s, t, **kw))
    assert_close(L.skew_reverse_kl(s, t, alpha=0.0, **kw), L.reverse_kl(s, t, **kw))
    zero = torch.tensor(0.0)
    assert_close(L.skew_kl(s, t, alpha=1.0, **kw), zero)  # KL(p‖p)
    assert_close(L.skew_reverse_kl(s, t, alpha=1.0, **kw), zero)
    # skewing towards the target shrinks the divergence
    assert L.skew_kl(s, t, alpha=0.5, **kw) < L.skew_kl(s, t, alpha=0.1, **kw) < L.kl_divergence(s, t, **kw)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("temperature", TEMPERATURES, ids=["T1", "T2"])
def test_js_is_bounded_by_T2_ln2_even_for_extreme_logits(temperature, dtype):
    bound = temperature**2 * math.log(2.0)
    s, t = extreme_logits((3, 5, 32), dtype, 1), extreme_logits((3, 5, 32), dtype, 2)
    for chunk in ("auto", 2, None):
        js = L.js_divergence(s, t, temperature, chunk_size=chunk)
        assert torch.isfinite(js) and 0.0 < js.item() <= bound * (1 + 1e-6)
    # disjoint one-hots reach the bound: teacher all on token 0, student all on token 1
    s = torch.full((4, 32), -1e4, dtype=dtype)
    t = s.clone()
    s[:, 1] = 1e4
    t[:, 0] = 1e4
    for chunk in ("auto", 2, None):
        js = L.js_divergence(s, t, temperature, chunk_size=chunk)
        assert_close(js, torch.tensor(bound), rtol=1e-5, atol=0.0)


def _entropy(w: float) -> float:
    return -sum(x * math.log(x) for x in (w, 1 - w) if x > 0)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(pair=arrays(np.float64, (2, 3, 6), elements=st.floats(-1e4, 1e4)),
       temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_divergences_stay_in_their_ranges_for_any_logits(pair, temperature):
    s, t = torch.from_numpy(pair[0]), torch.from_numpy(pair[1])  # [3, 6] float64
    T2 = temperature**2
    upper = {"js": T2 * math.log(2), "tvd": T2}
    for name, param in DIV_CASES:
        v = call(name, param, s, t, temperature, chunk_size=2).item()
        assert math.isfinite(v) and v >= -1e-9, (name, param, v)
        if name in upper:
            assert v <= upper[name] * (1 + 1e-9), (name, v)
        if name == "gjsd" and 0 < param < 1:  # a weighted JS is at most the weights' entropy
            assert v <= T2 * _entropy(param) * (1 + 1e-9), (name, param, v)
        if name in ("skl", "srkl") and param > 0:  # the mixture holds ≥ α of the first argument
            assert v <= T2 * -math.log(param) * (1 + 1e-9), (name, param, v)
    cos = L.cosine_loss(s, t, chunk_size=2).item()
    assert -1e-9 <= cos <= 2 + 1e-9


@pytest.mark.parametrize("chunk", ["auto", None])
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("case", LOGIT_CASES, ids=case_id)
def test_identical_logits_give_zero(case, dtype, chunk):
    s = logits((3, 5, 23), dtype, seed=1, scale=5.0)
    s.view(-1, 23)[0] = -1e4
    s.view(-1, 23)[0, 4] = 1e4
    for T in TEMPERATURES:
        v = call(*case, s, s.clone(), T, chunk_size=chunk)
        assert_close(v, torch.zeros((), dtype=v.dtype), rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("chunk", ["auto", 2, None])
@pytest.mark.parametrize("case", LOGIT_CASES + [("ce", 0.1)], ids=case_id)
def test_fully_false_mask_gives_exact_zero_and_zero_grad(case, chunk):
    s, t = logits((2, 3, 7), seed=1).requires_grad_(), logits((2, 3, 7), seed=2).requires_grad_()
    if case[0] == "ce":
        labels = torch.full((2, 3), -100)
        v = L.cross_entropy(s, labels, label_smoothing=case[1], chunk_size=chunk)
    else:
        v = call(*case, s, t, 2.0, torch.zeros(2, 3, dtype=torch.bool), chunk)
    assert v.item() == 0.0  # exactly zero, not NaN
    v.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    if case[0] != "ce":
        assert torch.equal(t.grad, torch.zeros_like(t))


# --------------------------------------------------------------------------
# 4. gradients


GC_MASK = torch.tensor([[True, False, True], [True, True, False]])  # [2, 3]


@pytest.mark.parametrize("chunk", [2, None], ids=["chunk2", "dense"])
@pytest.mark.parametrize("case", LOGIT_CASES, ids=case_id)
def test_gradcheck_logit_losses_wrt_student_and_teacher(case, chunk):
    s = logits((2, 3, 5), F64, seed=3).requires_grad_()
    t = logits((2, 3, 5), F64, seed=4).requires_grad_()
    for mask in (None, GC_MASK):
        assert torch.autograd.gradcheck(lambda s, t: call(*case, s, t, 1.5, mask, chunk), (s, t))


@pytest.mark.parametrize("chunk", [2, None], ids=["chunk2", "dense"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_gradcheck_cross_entropy(smoothing, chunk):
    s = logits((2, 3, 5), F64, seed=3).requires_grad_()
    labels = torch.tensor([[1, -100, 4], [0, 2, -100]])
    assert torch.autograd.gradcheck(
        lambda s: L.cross_entropy(s, labels, label_smoothing=smoothing, chunk_size=chunk), (s,))


class TensorLinear(nn.Module):
    """A projector whose weight and bias are given tensors, so gradcheck can perturb them."""

    def __init__(self, weight, bias):
        super().__init__()
        self.w, self.b = weight, bias

    def forward(self, x):
        return F.linear(x, self.w, self.b)


@pytest.mark.parametrize("projected", [False, True], ids=["identity", "projector"])
@pytest.mark.parametrize("norm", ["layer", "none"])
def test_gradcheck_hidden_mse(norm, projected):
    Ds, Dt = 3, (4 if projected else 3)
    g = torch.Generator().manual_seed(5)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=F64).requires_grad_()  # noqa: E731
    hs1, hs2, ht2, ht3 = rnd(2, 3, Ds), rnd(2, 3, Ds), rnd(2, 3, Dt), rnd(2, 3, Dt)
    w0, b0, w1, b1 = rnd(Dt, Ds), rnd(Dt), rnd(Dt, Ds), rnd(Dt)
    decoy_s, decoy_t = torch.zeros(2, 3, Ds, dtype=F64), torch.zeros(2, 3, Dt, dtype=F64)
    mask = torch.tensor([[True, True, False], [False, True, True]])

    def f(hs1, hs2, ht2, ht3, w0, b0, w1, b1):
        proj = [TensorLinear(w0, b0), TensorLinear(w1, b1)] if projected else None
        return L.hidden_mse([decoy_s, hs1, hs2], [decoy_t, decoy_t, ht2, ht3], [(0, 1), (1, 2)],
                            proj, mask, norm=norm)

    assert torch.autograd.gradcheck(f, (hs1, hs2, ht2, ht3, w0, b0, w1, b1))


def test_hidden_mse_trains_make_projectors():
    pairs = L.layer_pairs("layerwise", 2, 4)
    proj = L.make_projectors(pairs, 3, 5)
    assert len(proj) == 2 and all(p.in_features == 3 and p.out_features == 5 for p in proj)
    hs = [torch.randn(2, 4, 3, requires_grad=True) for _ in range(3)]
    ht = [torch.randn(2, 4, 5) for _ in range(5)]
    L.hidden_mse(hs, ht, pairs, proj).backward()
    for p in proj.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert hs[0].grad is None  # the embeddings (states[0]) are no pair's input
    assert all(h.grad.abs().sum() > 0 for h in hs[1:])


def test_gradcheck_attention_mse():
    g = torch.Generator().manual_seed(6)
    a_s0, a_s1 = (torch.rand(2, 2, 3, 3, generator=g, dtype=F64).requires_grad_() for _ in range(2))
    a_t0, a_t1, a_t2 = (torch.rand(2, 3, 3, 3, generator=g, dtype=F64).requires_grad_() for _ in range(3))
    mask = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.autograd.gradcheck(
        lambda a, b, c, d, e: L.attention_mse([a, b], [c, d, e], [(0, 1), (1, 2)], mask),
        (a_s0, a_s1, a_t0, a_t1, a_t2))


# --------------------------------------------------------------------------
# 5. low-precision stability


@pytest.mark.parametrize("chunk", ["auto", 3, None])
@pytest.mark.parametrize("temperature", TEMPERATURES, ids=["T1", "T2"])
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", LOGIT_CASES, ids=case_id)
def test_low_precision_extreme_logits_give_finite_loss_and_grads(case, dtype, temperature, chunk):
    s = extreme_logits((2, 4, 64), dtype, 1).requires_grad_()
    t = extreme_logits((2, 4, 64), dtype, 2).requires_grad_()
    assert s.abs().max() >= 1e4 and torch.isfinite(s).all()
    v = call(*case, s, t, temperature, random_mask((2, 4)), chunk)
    assert v.dtype == F32 and torch.isfinite(v), v
    v.backward()
    for x in (s, t):
        assert x.grad.dtype == dtype
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("chunk", ["auto", 3, None])
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_low_precision_extreme_logits_cross_entropy(dtype, chunk):
    s = extreme_logits((2, 4, 64), dtype, 1).requires_grad_()
    labels = random_labels((2, 4), 64)
    v = L.cross_entropy(s, labels, label_smoothing=0.1, chunk_size=chunk)
    assert v.dtype == F32 and torch.isfinite(v)
    v.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("chunk", ["auto", None])
@pytest.mark.parametrize("dtype,want", [(F64, F64), (F32, F32), (BF16, F32), (F16, F32)],
                         ids=["f64", "f32", "bf16", "f16"])
def test_output_dtype_is_float32_or_float64(dtype, want, chunk):
    s, t = logits((2, 3, 5), dtype, seed=1), logits((2, 3, 5), dtype, seed=2)
    for case in LOGIT_CASES:
        assert call(*case, s, t, 2.0, chunk_size=chunk).dtype == want
    assert L.cross_entropy(s, torch.zeros(2, 3, dtype=torch.long), chunk_size=chunk).dtype == want


@pytest.mark.parametrize("chunk", ["auto", 2, None])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_empty_input_gives_zero_in_the_input_precision(dtype, chunk):
    s = torch.zeros(0, 5, dtype=dtype, requires_grad=True)
    for case in LOGIT_CASES:
        v = call(*case, s, torch.zeros(0, 5, dtype=dtype), 2.0, chunk_size=chunk)
        assert v.item() == 0.0
        assert v.dtype == dtype, (case, chunk, v.dtype)


# --------------------------------------------------------------------------
# 6. chunked path = dense path


CHUNK_SHAPE = (3, 7, 19)  # N = 21 positions


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("chunk", [1, 3, 21, 50, "auto"])
@pytest.mark.parametrize("case", LOGIT_CASES + [("ce", 0.0), ("ce", 0.1)], ids=case_id)
def test_chunked_matches_dense_values_and_grads(case, chunk, masked):
    s0, t0 = logits(CHUNK_SHAPE, seed=1), logits(CHUNK_SHAPE, seed=2)
    mask = random_mask(CHUNK_SHAPE[:-1]) if masked else None
    labels = torch.randint(0, CHUNK_SHAPE[-1], CHUNK_SHAPE[:-1], generator=torch.Generator().manual_seed(3))
    if masked:
        labels[~mask] = -100

    def run(chunk_size):
        s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        if case[0] == "ce":
            v = L.cross_entropy(s, labels, label_smoothing=case[1], chunk_size=chunk_size)
        else:
            v = call(*case, s, t, 2.0, mask, chunk_size)
        v.backward()
        return v, s.grad, t.grad

    (v_c, gs_c, gt_c), (v_d, gs_d, gt_d) = run(chunk), run(None)
    assert_close(v_c, v_d, **SAME)
    assert_close(gs_c, gs_d, **SAME)
    if case[0] == "ce":
        assert gt_c is None and gt_d is None
    else:
        assert_close(gt_c, gt_d, **SAME)
    if masked:  # positions outside the mask get exactly zero gradient
        assert torch.equal(gs_c[~mask], torch.zeros_like(gs_c[~mask]))


def _teacher_head(seed=7):
    torch.manual_seed(seed)
    return nn.Linear(6, CHUNK_SHAPE[-1])


@pytest.mark.parametrize("chunk", [2, "auto", None])
@pytest.mark.parametrize("case", LOGIT_CASES, ids=case_id)
def test_inference_mode_teacher_logits(case, chunk):
    head = _teacher_head()
    h = torch.randn(*CHUNK_SHAPE[:-1], 6)
    with torch.inference_mode():
        t_inf = head(h)  # a teacher forward pass as the trainer runs it
    assert t_inf.is_inference()
    with torch.no_grad():
        t_ref = head(h)
    mask = random_mask(CHUNK_SHAPE[:-1])
    s_inf, s_ref = (logits(CHUNK_SHAPE, seed=1).requires_grad_() for _ in range(2))
    v_inf = call(*case, s_inf, t_inf, 2.0, mask, chunk)
    v_inf.backward()
    v_ref = call(*case, s_ref, t_ref, 2.0, mask, chunk)
    v_ref.backward()
    assert_close(v_inf, v_ref, rtol=0, atol=0)
    assert_close(s_inf.grad, s_ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [2, None])
def test_inference_mode_labels_cross_entropy(chunk):
    s = logits(CHUNK_SHAPE, seed=1).requires_grad_()
    with torch.inference_mode():
        labels = random_labels(CHUNK_SHAPE[:-1], CHUNK_SHAPE[-1]) * 1
    assert labels.is_inference()
    v = L.cross_entropy(s, labels, label_smoothing=0.1, chunk_size=chunk)
    v.backward()
    assert_close(v, torch.tensor(reference_ce(s, labels, 0.1), dtype=F32))
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("projected", [False, True], ids=["identity", "projector"])
@pytest.mark.parametrize("norm", ["layer", "none"])
def test_hidden_mse_with_inference_mode_teacher_states(norm, projected):
    Ds, Dt = 4, (6 if projected else 4)
    torch.manual_seed(8)
    teacher_blocks = nn.ModuleList(nn.Linear(Dt, Dt) for _ in range(3))
    x = torch.randn(2, 5, Dt)
    with torch.inference_mode():
        ht_inf = [x * 1] + [blk(x) for blk in teacher_blocks]
    assert all(h.is_inference() for h in ht_inf)
    ht_ref = [h.clone() for h in ht_inf]  # normal tensors with the same values
    assert not ht_ref[1].is_inference()
    pairs = [(0, 1), (1, 2)]
    mask = random_mask((2, 5))
    hs_base = [torch.randn(2, 5, Ds) for _ in range(3)]
    proj = L.make_projectors(pairs, Ds, Dt) if projected else None
    results = []
    for ht in (ht_inf, ht_ref):
        hs = [h.clone().requires_grad_() for h in hs_base]
        if proj is not None:
            proj.zero_grad()
        v = L.hidden_mse(hs, ht, pairs, proj, mask, norm=norm)
        v.backward()
        results.append((v, [h.grad for h in hs[1:]],
                        [p.grad.clone() for p in proj.parameters()] if proj is not None else []))
    (v1, g1, p1), (v2, g2, p2) = results
    assert_close(v1, v2)
    assert_close(g1, g2)
    assert_close(p1, p2)


def test_attention_mse_with_inference_mode_teacher_maps():
    a_s = [torch.softmax(torch.randn(2, 2, 4, 4), -1).requires_grad_() for _ in range(2)]
    base = torch.randn(3, 2, 3, 4, 4)
    with torch.inference_mode():
        a_t = [torch.softmax(b, -1) for b in base]
    assert a_t[0].is_inference()
    v = L.attention_mse(a_s, a_t, [(0, 1), (1, 2)], random_mask((2, 4)))
    v.backward()
    assert torch.isfinite(v) and all(a.grad.abs().sum() > 0 for a in a_s)


# --------------------------------------------------------------------------
# 7. memory: the chunked path keeps one full-size tensor, the dense path several


MEM_N, MEM_V, MEM_CHUNK = 512, 50257, 32
# A chunk's own temporaries: [MEM_CHUNK, V] float32 tensors alive at once while it
# is recomputed in backward (log-probs, mixture, exps, their gradients). JS, the
# largest formula here, measured 9; the bound leaves room without letting a second
# [N, V] tensor through (12 · 32 rows = 0.75 · N rows).
MEM_CHUNK_TEMPORARIES = 12


@pytest.fixture(scope="module")
def big_logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(MEM_N, MEM_V, generator=g), torch.randn(MEM_N, MEM_V, generator=g)


@pytest.mark.parametrize("fn", [L.kl_divergence, L.js_divergence, L.cosine_loss],
                         ids=["kl", "js", "cos"])
def test_chunked_path_keeps_at_most_one_full_size_tensor(fn, big_logits):
    s0, t = big_logits
    s = s0.detach().requires_grad_()  # a leaf sharing s0's storage: nothing allocated here

    def measure(chunk_size):
        s.grad = None  # freed outside the measured window

        def step():
            fn(s, t, chunk_size=chunk_size).backward()

        peak = peak_bytes(step)
        assert s.grad is not None and s.grad.shape == s.shape
        s.grad = None
        return peak

    chunked, dense = measure(MEM_CHUNK), measure(None)
    full = MEM_N * MEM_V * 4  # one [N, V] float32 tensor
    allowance = MEM_CHUNK_TEMPORARIES * MEM_CHUNK * MEM_V * 4
    print(f"\n[memory] {fn.__name__} N={MEM_N} V={MEM_V} chunk={MEM_CHUNK}: "
          f"chunked {chunked / MIB:.1f} MiB ({chunked / full:.3f} x [N,V]), "
          f"dense {dense / MIB:.1f} MiB ({dense / full:.3f} x [N,V]), "
          f"chunked/dense {chunked / dense:.3f}")
    assert chunked >= 0.99 * full  # the gradient itself: the measurement sees allocations
    assert chunked <= full + allowance
    assert dense >= 3 * full
    assert chunked / dense <= 0.5


# --------------------------------------------------------------------------
# 8. layer maps


@pytest.mark.parametrize("n_student,n_teacher,blocks", [
    (4, 12, [2, 5, 8, 11]),
    (8, 12, [1, 2, 4, 5, 7, 8, 10, 11]),
    (12, 12, list(range(12))),
    (1, 12, [11]),
    (6, 12, [1, 3, 5, 7, 9, 11]),
    (12, 4, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]),
])
def test_layerwise_map(n_student, n_teacher, blocks):
    assert L.layer_pairs("layerwise", n_student, n_teacher) == list(enumerate(blocks))


def test_layerwise_map_is_monotone_and_ends_on_both_last_blocks():
    for ls in range(1, 17):
        for lt in range(1, 17):
            pairs = L.layer_pairs("layerwise", ls, lt)
            assert [i for i, _ in pairs] == list(range(ls))
            js = [j for _, j in pairs]
            assert js == sorted(js) and 0 <= js[0] and js[-1] == lt - 1, (ls, lt, pairs)
            assert all(j == math.ceil((i + 1) * lt / ls) - 1 for i, j in pairs)


def test_study_map():
    assert L.layer_pairs("study", 8, 12) == list(enumerate([1, 3, 5, 7, 8, 9, 10, 11]))


def test_last2last_and_last2all_maps():
    assert L.layer_pairs("last2last", 8, 12) == [(7, 11)]
    assert L.layer_pairs("last2last", 1, 1) == [(0, 0)]
    assert L.layer_pairs("last2all", 8, 12) == [(i, 11) for i in range(8)]
    assert L.layer_pairs("last2all", 3, 5) == [(0, 4), (1, 4), (2, 4)]


def test_layer_map_unknown_name():
    with pytest.raises(KdlibError, match=r"unknown layer map 'layer_wise'.*layerwise, last2last, last2all, study"):
        L.layer_pairs("layer_wise", 8, 12)


@pytest.mark.parametrize("n_student,n_teacher", [(4, 12), (8, 24), (12, 8)])
def test_study_map_rejects_other_shapes(n_student, n_teacher):
    with pytest.raises(KdlibError, match=rf"'study'.*{n_student} -> {n_teacher}.*layerwise"):
        L.layer_pairs("study", n_student, n_teacher)


@pytest.mark.parametrize("name", L.LAYER_MAPS)
@pytest.mark.parametrize("n_student,n_teacher,bad", [
    (0, 12, "n_student.*got 0"), (-1, 12, "n_student.*got -1"), (8, 0, "n_teacher.*got 0"),
    (8, -3, "n_teacher.*got -3"), (2.5, 12, "n_student.*got 2.5"), (True, 12, "n_student.*got True"),
])
def test_layer_map_rejects_non_positive_block_counts(name, n_student, n_teacher, bad):
    with pytest.raises(KdlibError, match=bad):
        L.layer_pairs(name, n_student, n_teacher)


# --------------------------------------------------------------------------
# 9. feature losses


def _t(x):
    return torch.tensor(x, dtype=F64)


def _states_for_hand_check():
    """Student states [emb, block0, block1], teacher [emb, block0, block1, block2]: [1, 2, 2] each.

    The embeddings and teacher block 0 hold large decoy values, so a pair that
    reads the wrong index gives a very different loss.
    """
    decoy = _t([[[100.0, -100.0], [50.0, 7.0]]])
    hs = [decoy, _t([[[1.0, 2.0], [3.0, 4.0]]]), _t([[[0.0, 0.0], [0.0, 0.0]]])]
    ht = [decoy * 3, decoy * 2, _t([[[1.0, 1.0], [1.0, 1.0]]]), _t([[[1.0, -1.0], [2.0, 0.0]]])]
    return hs, ht


def test_hidden_mse_by_hand_uses_hf_state_indices():
    hs, ht = _states_for_hand_check()
    pairs = [(0, 1), (1, 2)]  # student block 0 ↔ teacher block 1, student block 1 ↔ teacher block 2
    # pair (0, 1): hs[1] − ht[2] = [[0, 1], [2, 3]] → (0 + 1 + 4 + 9) / 4 = 3.5
    # pair (1, 2): hs[2] − ht[3] = [[−1, 1], [−2, 0]] → (1 + 1 + 4 + 0) / 4 = 1.5
    assert_close(L.hidden_mse(hs, ht, pairs, None, norm="none"), _t((3.5 + 1.5) / 2))
    # masked to the first position: (0 + 1) / 2 = 0.5 and (1 + 1) / 2 = 1.0
    mask = torch.tensor([[True, False]])
    assert_close(L.hidden_mse(hs, ht, pairs, None, mask, norm="none"), _t(0.75))
    assert_close(L.hidden_mse(hs, ht, [(1, 2)], None, norm="none"), _t(1.5))


def test_hidden_mse_by_hand_with_layer_norm():
    eps = 1e-5  # F.layer_norm's default
    hs = [_t([[[9.0] * 4] * 2]), _t([[[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 2.0]]])]
    ht = [_t([[[7.0] * 4] * 2]), _t([[[4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 2.0]]])]
    # position 0: ln([1,2,3,4]) = (x − 2.5)/√(1.25 + eps), the teacher's is its negative, so the
    # squared difference sums to 4 · Σ(x − 2.5)² / (1.25 + eps) = 20 / (1.25 + eps); position 1: 0
    want = 20 / (1.25 + eps) / 8
    assert_close(L.hidden_mse(hs, ht, [(0, 0)], None), _t(want))
    assert_close(L.hidden_mse(hs, ht, [(0, 0)], None, torch.tensor([[True, False]])), _t(20 / (1.25 + eps) / 4))
    assert_close(L.hidden_mse(hs, ht, [(0, 0)], None, torch.tensor([[False, True]])), _t(0.0))
    # without the norm the raw values count: (9 + 1 + 1 + 9) / 8
    assert_close(L.hidden_mse(hs, ht, [(0, 0)], None, norm="none"), _t(20 / 8))


def test_hidden_mse_layer_norm_ignores_the_teachers_scale():
    torch.manual_seed(9)
    hs = [torch.randn(2, 3, 8) for _ in range(2)]
    ht = [torch.randn(2, 3, 8) for _ in range(2)]
    ht_scaled = [h * 300.0 + 5.0 for h in ht]  # a residual stream with huge dimensions
    base = L.hidden_mse(hs, ht, [(0, 0)])
    assert_close(L.hidden_mse(hs, ht_scaled, [(0, 0)]), base, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(L.hidden_mse(hs, ht_scaled, [(0, 0)], norm="none"),
                              L.hidden_mse(hs, ht, [(0, 0)], norm="none"))


def test_hidden_mse_by_hand_with_projector():
    pairs = [(0, 0)]
    proj = L.make_projectors(pairs, 2, 3)
    with torch.no_grad():
        proj[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        proj[0].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    hs = [torch.zeros(1, 1, 2), torch.tensor([[[1.0, 2.0]]])]  # projected: [1, 2, 4]
    ht = [torch.zeros(1, 1, 3), torch.tensor([[[1.0, 2.0, 3.0]]])]
    assert_close(L.hidden_mse(hs, ht, pairs, proj, norm="none"), torch.tensor(1.0 / 3))


def test_hidden_mse_rejects_a_teacher_block_that_does_not_exist():
    hs, ht = _states_for_hand_check()  # teacher: 3 blocks (0..2)
    with pytest.raises(KdlibError, match=r"teacher block 3.*3 blocks \(0\.\.2\)"):
        L.hidden_mse(hs, ht, [(0, 3)], None, norm="none")
    with pytest.raises(KdlibError, match=r"student block 2.*2 blocks \(0\.\.1\)"):
        L.hidden_mse(hs, ht, [(2, 0)], None, norm="none")
    # the 4 → 12 layerwise map against a 6-block teacher asks for blocks up to 11
    hs6 = [torch.zeros(1, 2, 3)] * 5
    ht6 = [torch.zeros(1, 2, 3)] * 7
    with pytest.raises(KdlibError, match=r"teacher block 8"):
        L.hidden_mse(hs6, ht6, L.layer_pairs("layerwise", 4, 12))


def test_hidden_mse_rejects_width_mismatch_without_projectors():
    hs = [torch.zeros(1, 2, 3)] * 2
    ht = [torch.zeros(1, 2, 5)] * 2
    with pytest.raises(KdlibError, match=r"\(1, 2, 3\).*\(1, 2, 5\).*projectors"):
        L.hidden_mse(hs, ht, [(0, 0)])


def test_hidden_mse_rejects_wrong_number_of_projectors():
    pairs = [(0, 0), (1, 1)]
    hs, ht = [torch.zeros(1, 2, 3)] * 3, [torch.zeros(1, 2, 5)] * 3
    with pytest.raises(KdlibError, match=r"1 projectors for 2 layer pairs.*make_projectors"):
        L.hidden_mse(hs, ht, pairs, L.make_projectors(pairs[:1], 3, 5))


def test_hidden_mse_rejects_unknown_norm_and_empty_pairs():
    hs = [torch.zeros(1, 2, 3)] * 2
    with pytest.raises(KdlibError, match=r"unknown feature norm 'rms'.*layer, none"):
        L.hidden_mse(hs, hs, [(0, 0)], norm="rms")
    with pytest.raises(KdlibError, match="at least one layer pair"):
        L.hidden_mse(hs, hs, [])
    with pytest.raises(KdlibError, match="at least one layer pair"):
        L.attention_mse(hs, hs, [])


def _attention_for_hand_check():
    """Student maps: 2 blocks × [1, 2 heads, 2, 2]; teacher: 2 blocks × [1, 3 heads, 2, 2]."""
    s1 = _t([[[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]]])  # head mean [[.5, .5], [.5, .5]]
    t1 = _t([[[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]],
              [[1.0, 0.0], [0.2, 0.8]]]])  # head mean [[1, 0], [.4, .6]]
    decoy_s, decoy_t = torch.zeros(1, 2, 2, 2, dtype=F64), torch.ones(1, 3, 2, 2, dtype=F64) * 5
    return [s1, decoy_s], [decoy_t, t1]


def test_attention_mse_by_hand_with_head_averaging():
    a_s, a_t = _attention_for_hand_check()
    # diff of head means: row 0 [−.5, .5] → .5; row 1 [.1, −.1] → .02; mean over 4 entries
    assert_close(L.attention_mse(a_s, a_t, [(0, 1)]), _t(0.52 / 4))
    # the mask selects query rows: row 1 only → .02 / 2, row 0 only → .5 / 2
    assert_close(L.attention_mse(a_s, a_t, [(0, 1)], torch.tensor([[False, True]])), _t(0.01))
    assert_close(L.attention_mse(a_s, a_t, [(0, 1)], torch.tensor([[True, False]])), _t(0.25))
    # averaged over pairs: (1, 0) compares zeros with fives: 25
    assert_close(L.attention_mse(a_s, a_t, [(0, 1), (1, 0)]), _t((0.13 + 25.0) / 2))


def test_attention_mse_rejects_missing_blocks_and_shape_mismatch():
    a_s, a_t = _attention_for_hand_check()
    with pytest.raises(KdlibError, match=r"teacher block 2.*2 blocks"):
        L.attention_mse(a_s, a_t, [(0, 2)])
    with pytest.raises(KdlibError, match=r"differ in batch or sequence length"):
        L.attention_mse([torch.zeros(1, 2, 3, 3)], [torch.zeros(1, 2, 2, 2)], [(0, 0)])


# --------------------------------------------------------------------------
# 10. bad input


S5, T5 = logits((2, 3, 5), seed=1), logits((2, 3, 5), seed=2)


def test_kdlib_error_is_a_value_error():
    assert issubclass(KdlibError, ValueError)


def test_unknown_divergence_names_the_choices():
    with pytest.raises(KdlibError, match=r"unknown divergence 'jsd'; choose one of: kl, rkl, js, tvd, gjsd, skl, srkl"):
        L.divergence("jsd", S5, T5)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("case", DIV_CASES[:5], ids=case_id)
def test_bad_temperature(case, bad):
    with pytest.raises(KdlibError, match=rf"temperature must be finite and > 0, got {re.escape(repr(bad))}"):
        call(*case, S5, T5, bad)


@pytest.mark.parametrize("bad", ["2.0", True, None, torch.tensor(2.0)])
def test_temperature_must_be_a_number(bad):
    with pytest.raises(KdlibError, match=r"temperature must be a number > 0"):
        L.kl_divergence(S5, T5, bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), None, "0.5", True])
@pytest.mark.parametrize("name", L.PARAMETRIC)
def test_mixing_weight_outside_unit_interval(name, bad):
    what = "beta" if name == "gjsd" else "alpha"
    with pytest.raises(KdlibError, match=rf"{name} weight \({what}\) must be a number in \[0, 1\], got {re.escape(repr(bad))}"):
        L.divergence(name, S5, T5, param=bad)
    if name == "gjsd":
        with pytest.raises(KdlibError, match=re.escape(repr(bad))):
            L.generalized_jsd(S5, T5, beta=bad)


def test_parameter_for_a_divergence_without_one():
    with pytest.raises(KdlibError, match=r"divergence 'kl' takes no parameter \(got 0.3\).*gjsd, skl, srkl"):
        L.divergence("kl", S5, T5, param=0.3)


@pytest.mark.parametrize("case", LOGIT_CASES, ids=case_id)
def test_mask_of_the_wrong_shape(case):
    for bad in (torch.ones(2, 4, dtype=torch.bool), torch.ones(6, dtype=torch.bool),
                torch.ones(2, 3, 5, dtype=torch.bool)):
        with pytest.raises(KdlibError, match=rf"mask shape {re.escape(str(tuple(bad.shape)))} .*\(2, 3\)"):
            call(*case, S5, T5, 1.0, bad)


@pytest.mark.parametrize("case", LOGIT_CASES, ids=case_id)
def test_student_and_teacher_shapes_must_match(case):
    with pytest.raises(KdlibError, match=r"\(2, 3, 5\).*\(2, 3, 6\).*tokenizer"):
        call(*case, S5, logits((2, 3, 6)))
    with pytest.raises(KdlibError, match=r"\(2, 3, 5\).*\(3, 2, 5\)"):
        call(*case, S5, logits((3, 2, 5)))


@pytest.mark.parametrize("bad", [-0.1, 1.1, float("nan"), None])
def test_label_smoothing_outside_unit_interval(bad):
    with pytest.raises(KdlibError, match=rf"label_smoothing must be a number in \[0, 1\], got {re.escape(repr(bad))}"):
        L.cross_entropy(S5, torch.zeros(2, 3, dtype=torch.long), label_smoothing=bad)


def test_cross_entropy_labels_of_the_wrong_shape():
    with pytest.raises(KdlibError, match=r"labels shape \(3, 2\).*\(2, 3\)"):
        L.cross_entropy(S5, torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.parametrize("bad", [0, -2, 1.5, "big", True, "Auto"])
@pytest.mark.parametrize("case", LOGIT_CASES + [("ce", 0.0)], ids=case_id)
def test_bad_chunk_size(case, bad):
    with pytest.raises(KdlibError, match=rf"chunk_size must be 'auto', None \(dense\) or an integer >= 1, got {re.escape(repr(bad))}"):
        if case[0] == "ce":
            L.cross_entropy(S5, torch.zeros(2, 3, dtype=torch.long), chunk_size=bad)
        else:
            call(*case, S5, T5, chunk_size=bad)


def test_logits_without_a_vocabulary_dimension():
    with pytest.raises(KdlibError, match=r"vocabulary dimension, got shape \(\)"):
        L.kl_divergence(torch.tensor(1.0), torch.tensor(1.0))
