"""kdlib.losses.fused.output_losses: CE + one divergence + cosine fused in one chunked pass.

Each fused total and each of its parts must equal the separate public
functions (``cross_entropy``, ``divergence``/``sparse_divergence``,
``cosine_loss``), values and gradients, on the chunked path (a chunk size
that does not divide N) and the dense one. Then gradcheck, inference-mode
teachers, the errors, peak memory, bf16 autocast and ``torch.compile``. The
divergences: none, the study's kl and js, and a parametric one; the fused pass
treats every divergence alike (test_divergences.py and test_sparse.py check
each one's formula).

Run ``pytest -s tests/losses/test_fused.py`` to see the measured memory figures.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from kdlib import losses as L
from kdlib.errors import KdlibError
from kdlib.memory import MiB as MIB
from kdlib.memory import peak_cpu_bytes as peak_bytes
from loss_helpers import DIV_CASES as EVERY_DIVERGENCE
from loss_helpers import F32, F64, TIGHT, case_id, chunk_id, logits, random_labels

SHAPE = (2, 5, 11)  # N = 10 positions: chunk 3 leaves a last chunk of one row
CHUNKS = [3, None]
W = dict(w_ce=0.7, w_div=1.3, w_cos=0.4)
TAU = 2.0

# (divergence, param): none (CE / CE + cosine only), the study's two, a parametric one
TERM_CASES = [(None, None), ("kl", None), ("js", None), ("gjsd", 0.3)]


def fused_case_id(case) -> str:
    return "ce_only" if case[0] is None else case_id(case)


def separate(s, labels, t, name, param, cosine, smoothing, *, w_ce=1.0, w_div=1.0, w_cos=1.0):
    """(total, parts) from the separate public functions (dense reference path)."""
    mask = labels != -100
    parts = {"ce": L.cross_entropy(s, labels, label_smoothing=smoothing, chunk_size=None)}
    total = w_ce * parts["ce"]
    if name is not None:
        parts[name] = L.divergence(name, s, t, TAU, mask, param=param, chunk_size=None)
        total = total + w_div * parts[name]
    if cosine:
        parts["cos"] = L.cosine_loss(s, t, mask, chunk_size=None)
        total = total + w_cos * parts["cos"]
    return total, parts


def fused(s, labels, t, name, param, cosine, smoothing, chunk, **weights):
    return L.output_losses(s, labels, t, divergence=name, param=param, cosine=cosine, temperature=TAU,
                           label_smoothing=smoothing, chunk_size=chunk, **weights)


# --------------------------------------------------------------------------
# 1. the fused total and parts equal the separate functions, values and gradients


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("case", TERM_CASES, ids=fused_case_id)
def test_fused_equals_sum_of_separate_losses(case, chunk):
    name, param = case
    s0, t0 = logits(SHAPE, F64, seed=1), logits(SHAPE, F64, seed=2)
    labels = random_labels(SHAPE[:-1], SHAPE[-1])
    ignored = labels == -100
    for cosine, smoothing in [(False, 0.0), (True, 0.1), (True, 0.0), (False, 0.1)]:
        teacher_used = name is not None or cosine
        s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        total, parts = fused(s, labels, t if teacher_used else None, name, param, cosine, smoothing, chunk, **W)
        total.backward()

        s_ref, t_ref = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        want_total, want_parts = separate(s_ref, labels, t_ref, name, param, cosine, smoothing, **W)
        want_total.backward()

        assert total.dtype == F64 and total.requires_grad
        assert_close(total, want_total, **TIGHT)
        assert list(parts) == list(want_parts)  # "ce", then the divergence's name, then "cos"
        for key, value in parts.items():
            assert value.dim() == 0 and not value.requires_grad, key
            assert_close(value, want_parts[key].detach(), **TIGHT)
        assert_close(s.grad, s_ref.grad, **TIGHT)
        if teacher_used:
            assert_close(t.grad, t_ref.grad, **TIGHT)
        # ignored positions get exactly zero gradient from every term
        assert torch.equal(s.grad[ignored], torch.zeros_like(s.grad[ignored]))
        assert s.grad[~ignored].abs().sum() > 0


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
def test_fused_student_grad_with_a_teacher_that_needs_no_grad(chunk):
    # Every divergence, as the trainer runs them (the teacher needs no gradient).
    s0, t = logits(SHAPE, F64, seed=3), logits(SHAPE, F64, seed=4)  # t: a plain tensor, no gradient
    labels = random_labels(SHAPE[:-1], SHAPE[-1], seed=1)
    for name, param in EVERY_DIVERGENCE:
        s = s0.clone().requires_grad_()
        total, _ = fused(s, labels, t, name, param, True, 0.1, chunk, **W)
        total.backward()
        s_ref = s0.clone().requires_grad_()
        want, _ = separate(s_ref, labels, t, name, param, True, 0.1, **W)
        want.backward()
        assert_close(total, want, **TIGHT, msg=name)
        assert_close(s.grad, s_ref.grad, **TIGHT, msg=name)
        assert t.grad is None


def test_teacher_logits_without_a_teacher_term_give_plain_cross_entropy():
    # Teacher logits given but neither a divergence nor the cosine asked for: CE alone,
    # and the teacher (which no term uses) must not break the gradient.
    s0, t = logits(SHAPE, F64, seed=5), logits(SHAPE, F64, seed=6).requires_grad_()
    labels = random_labels(SHAPE[:-1], SHAPE[-1], seed=2)
    s_ref = s0.clone().requires_grad_()
    want = 0.5 * L.cross_entropy(s_ref, labels, chunk_size=None)
    want.backward()
    for chunk in CHUNKS:
        s = s0.clone().requires_grad_()
        total, parts = L.output_losses(s, labels, t, w_ce=0.5, chunk_size=chunk)
        total.backward()
        assert list(parts) == ["ce"]
        assert_close(total, want, **TIGHT)
        assert_close(s.grad, s_ref.grad, **TIGHT)
        assert t.grad is None or torch.equal(t.grad, torch.zeros_like(t))


def test_chunked_equals_dense():
    s0, t0 = logits((3, 7, 19), F64, seed=7), logits((3, 7, 19), F64, seed=8)
    labels = random_labels((3, 7), 19, seed=3)

    def run(chunk_size):
        s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        total, parts = L.output_losses(s, labels, t, divergence="js", cosine=True, temperature=TAU,
                                       label_smoothing=0.1, chunk_size=chunk_size, **W)
        total.backward()
        return total, parts, s.grad, t.grad

    v_d, p_d, gs_d, gt_d = run(None)
    for chunk in (1, 3, 4, "auto"):
        v, p, gs, gt = run(chunk)
        assert_close(v, v_d, **TIGHT)
        assert_close(p, p_d, **TIGHT)
        assert_close(gs, gs_d, **TIGHT)
        assert_close(gt, gt_d, **TIGHT)


def test_other_ignore_index_and_fully_ignored_labels():
    s0, t = logits(SHAPE, F64, seed=9), logits(SHAPE, F64, seed=10)
    labels = random_labels(SHAPE[:-1], SHAPE[-1], seed=4, ignore_index=-1)
    mask = labels != -1
    for chunk in CHUNKS:
        s = s0.clone().requires_grad_()
        total, _ = L.output_losses(s, labels, t, divergence="kl", ignore_index=-1, chunk_size=chunk)
        total.backward()
        s_ref = s0.clone().requires_grad_()
        want = (L.cross_entropy(s_ref, labels, ignore_index=-1, chunk_size=None)
                + L.kl_divergence(s_ref, t, mask=mask, chunk_size=None))
        want.backward()
        assert_close(total, want, **TIGHT)
        assert_close(s.grad, s_ref.grad, **TIGHT)

        # nothing counted: exactly 0 (not NaN), and exactly zero gradient
        s = s0.clone().requires_grad_()
        none = torch.full(SHAPE[:-1], -100)
        total, parts = L.output_losses(s, none, t, divergence="kl", cosine=True, chunk_size=chunk)
        total.backward()
        assert total.item() == 0.0 and all(v.item() == 0.0 for v in parts.values())
        assert torch.equal(s.grad, torch.zeros_like(s))


# --------------------------------------------------------------------------
# 2. sparse teacher: a top-k cache


@pytest.mark.parametrize("k", [4, SHAPE[-1]], ids=["k<V", "k=V"])
@pytest.mark.parametrize("case", TERM_CASES[1:], ids=case_id)
def test_top_k_teacher_equals_sparse_divergence_plus_cross_entropy(case, k):
    name, param = case
    V = SHAPE[-1]
    s0, t = logits(SHAPE, F64, seed=11), logits(SHAPE, F64, seed=12)
    labels = random_labels(SHAPE[:-1], V, seed=5)
    mask = labels != -100
    lp, ids, tail = L.teacher_top_k(t, k, TAU)
    assert (tail is None) == (k == V)

    s_ref = s0.clone().requires_grad_()
    ce = L.cross_entropy(s_ref, labels, label_smoothing=0.1, chunk_size=None)
    div = L.sparse_divergence(name, s_ref, lp, ids, tail, TAU, mask, param=param, chunk_size=None)
    want = 0.7 * ce + 1.3 * div
    want.backward()
    for chunk in CHUNKS:
        s = s0.clone().requires_grad_()
        total, parts = L.output_losses(s, labels, L.TopKTargets(lp, ids, tail), divergence=name, param=param,
                                       temperature=TAU, label_smoothing=0.1, chunk_size=chunk, w_ce=0.7, w_div=1.3)
        total.backward()
        assert list(parts) == ["ce", name]
        assert_close(total, want, **TIGHT)
        assert_close(parts["ce"], ce.detach(), **TIGHT)
        assert_close(parts[name], div.detach(), **TIGHT)
        assert_close(s.grad, s_ref.grad, **TIGHT)
        if k == V:  # k = V: the dense divergence from the teacher's logits
            assert_close(parts[name], L.divergence(name, s0, t, TAU, mask, param=param), rtol=1e-9, atol=1e-12)


def test_top_k_teacher_with_k_equal_v_ignores_a_given_tail():
    s, t = logits(SHAPE, F64, seed=13), logits(SHAPE, F64, seed=14)
    labels = random_labels(SHAPE[:-1], SHAPE[-1], seed=6)
    lp, ids, _ = L.teacher_top_k(t, SHAPE[-1], TAU)
    with_tail, _ = L.output_losses(s, labels, L.TopKTargets(lp, ids, torch.zeros(SHAPE[:-1], dtype=F64)),
                                   divergence="kl", temperature=TAU, chunk_size=3)
    without, _ = L.output_losses(s, labels, L.TopKTargets(lp, ids, None), divergence="kl", temperature=TAU,
                                 chunk_size=3)
    assert_close(with_tail, without, rtol=0, atol=0)


# --------------------------------------------------------------------------
# 3. errors (the shared checks: test_checks.py)


def test_cosine_with_a_top_k_cache_is_refused():
    s, t = logits(SHAPE, F64, seed=1), logits(SHAPE, F64, seed=2)
    targets = L.TopKTargets(*L.teacher_top_k(t, 4, TAU))
    with pytest.raises(KdlibError, match="cosine"):
        L.output_losses(s, random_labels(SHAPE[:-1], SHAPE[-1]), targets, divergence="kl", cosine=True)


def test_a_teacher_term_without_a_teacher_is_refused():
    s = logits(SHAPE, F64, seed=1)
    for kw in (dict(divergence="kl"), dict(cosine=True), dict(divergence="js", cosine=True)):
        with pytest.raises(KdlibError, match="teacher"):
            L.output_losses(s, random_labels(SHAPE[:-1], SHAPE[-1]), None, **kw)


def test_labels_of_the_wrong_shape_are_refused():
    s, t = logits(SHAPE, F64, seed=1), logits(SHAPE, F64, seed=2)
    for bad_shape in ((2, 4), (10,), (2, 5, 1)):
        with pytest.raises(KdlibError, match="labels shape"):
            L.output_losses(s, torch.zeros(bad_shape, dtype=torch.long), t, divergence="kl")


def test_other_bad_arguments_are_refused():
    s, t = logits(SHAPE, F64, seed=1), logits(SHAPE, F64, seed=2)
    y = random_labels(SHAPE[:-1], SHAPE[-1])
    with pytest.raises(KdlibError, match="same shape"):
        L.output_losses(s, y, t[..., :-1], divergence="kl")
    with pytest.raises(KdlibError, match="unknown divergence"):
        L.output_losses(s, y, t, divergence="kld")
    with pytest.raises(KdlibError, match="takes no parameter"):
        L.output_losses(s, y, t, divergence="kl", param=0.5)
    with pytest.raises(KdlibError, match="in \\[0, 1\\]"):
        L.output_losses(s, y, t, divergence="gjsd", param=1.5)
    with pytest.raises(KdlibError, match="label_smoothing"):
        L.output_losses(s, y, label_smoothing=1.5)


# --------------------------------------------------------------------------
# 4. gradcheck


GC_SHAPE = (2, 3, 5)
GC_LABELS = torch.tensor([[1, -100, 4], [0, 2, -100]])


@pytest.mark.parametrize("case,chunk", [(("kl", None), 4), (("js", None), 2), (("skl", 0.1), None)],
                         ids=["kl-chunk4", "js-chunk2", "skl0.1-dense"])
def test_gradcheck_wrt_student_and_teacher(case, chunk):
    name, param = case
    s = logits(GC_SHAPE, F64, seed=3, scale=1.5).requires_grad_()
    t = logits(GC_SHAPE, F64, seed=4, scale=1.5).requires_grad_()

    def f(s, t):
        return L.output_losses(s, GC_LABELS, t, divergence=name, param=param, cosine=True, temperature=1.5,
                               label_smoothing=0.1, chunk_size=chunk, **W)[0]

    assert torch.autograd.gradcheck(f, (s, t))


def test_gradcheck_wrt_student_with_a_top_k_teacher():
    s = logits(GC_SHAPE, F64, seed=3, scale=1.5).requires_grad_()
    targets = L.TopKTargets(*L.teacher_top_k(logits(GC_SHAPE, F64, seed=4, scale=2.0), 3, 1.5))

    def f(s):
        return L.output_losses(s, GC_LABELS, targets, divergence="js", temperature=1.5, chunk_size=2)[0]

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# 5. inference-mode teacher tensors


@pytest.mark.parametrize("teacher", ["logits", "top_k"])
def test_inference_mode_teacher_and_labels(teacher):
    s0, t0 = logits(SHAPE, F64, seed=21), logits(SHAPE, F64, seed=22)
    labels0 = random_labels(SHAPE[:-1], SHAPE[-1], seed=7)
    with torch.inference_mode():
        t_inf = t0 * 1.0  # as the trainer's teacher forward pass makes them
        labels_inf = labels0 * 1
        targets_inf = L.TopKTargets(*L.teacher_top_k(t_inf, 4, TAU))
    assert t_inf.is_inference() and labels_inf.is_inference() and targets_inf.ids.is_inference()
    targets_ref = L.TopKTargets(*L.teacher_top_k(t0, 4, TAU))
    cosine = teacher == "logits"
    for chunk in CHUNKS:
        results = []
        for t, y in ((t_inf if cosine else targets_inf, labels_inf), (t0 if cosine else targets_ref, labels0)):
            s = s0.clone().requires_grad_()
            total, parts = L.output_losses(s, y, t, divergence="js", cosine=cosine, temperature=TAU,
                                           label_smoothing=0.1, chunk_size=chunk, **W)
            total.backward()
            results.append((total, parts, s.grad))
        (v_inf, p_inf, g_inf), (v_ref, p_ref, g_ref) = results
        assert_close(v_inf, v_ref, rtol=0, atol=0)
        assert_close(p_inf, p_ref, rtol=0, atol=0)
        assert_close(g_inf, g_ref, rtol=0, atol=0)
        assert g_inf.abs().sum() > 0


# --------------------------------------------------------------------------
# 6. memory: one full-size gradient buffer, not one per term


MEM_N, MEM_V, MEM_CHUNK, MEM_D = 512, 4096, 16, 64
# As in test_chunked.py: a chunk's own temporaries, [MEM_CHUNK, V] float32 tensors alive
# at once (CE + KL + cosine and their gradients, for student and teacher log-probs);
# 9 were measured. The bound leaves room without letting a second [N, V] tensor
# through (12 · 16 rows = 0.375 · N rows).
MEM_CHUNK_TEMPORARIES = 12


@pytest.fixture(scope="module")
def mem_case():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(MEM_N, MEM_V, generator=g), torch.randn(MEM_N, MEM_V, generator=g),
            torch.randint(0, MEM_V, (MEM_N,), generator=g), torch.randn(MEM_N, MEM_D, generator=g),
            torch.randn(MEM_D, MEM_V, generator=g) / MEM_D**0.5)


@pytest.mark.parametrize("student", ["leaf", "lm_head"])
def test_fused_path_keeps_one_full_size_gradient(student, mem_case):
    """Forward + backward of CE + KL + cosine: one [N, V] gradient for the student, not one per term.

    ``lm_head``: the student logits are a non-leaf ``h @ W`` (made before the measured
    window), so the gradient is handed on to ``h`` and ``W`` (small) instead of being
    kept as ``.grad``; a copy of it on the way would show up as a second [N, V].
    """
    s_leaf, t, labels, h, w = mem_case

    def measure(chunk_size):
        w_param = w.detach().requires_grad_()
        s = s_leaf.detach().requires_grad_() if student == "leaf" else h @ w_param

        def step():
            L.output_losses(s, labels, t, divergence="kl", cosine=True, temperature=TAU,
                            chunk_size=chunk_size)[0].backward()

        peak = peak_bytes(step)
        if student == "leaf":
            assert s.grad is not None and s.grad.shape == s.shape
        else:
            assert w_param.grad is not None and w_param.grad.abs().sum() > 0
        return peak

    chunked, dense = measure(MEM_CHUNK), measure(None)
    full = MEM_N * MEM_V * 4  # one [N, V] float32 tensor
    allowance = MEM_CHUNK_TEMPORARIES * MEM_CHUNK * MEM_V * 4 + MEM_D * MEM_V * 4  # + W's gradient
    print(f"\n[memory] output_losses kl+cos ({student}) N={MEM_N} V={MEM_V} chunk={MEM_CHUNK}: "
          f"chunked {chunked / MIB:.1f} MiB ({chunked / full:.3f} x [N,V]), "
          f"dense {dense / MIB:.1f} MiB ({dense / full:.3f} x [N,V])")
    assert chunked >= 0.99 * full  # the gradient itself: the measurement sees allocations
    assert chunked <= full + allowance
    assert dense >= 3 * full
    assert chunked / dense <= 0.5


# --------------------------------------------------------------------------
# 7. bf16 autocast and torch.compile


def test_weights_stay_in_float32_under_autocast():
    # Under bf16 autocast a matmul of the terms with their weights would round the weights (and
    # the 1/count scale) to bf16; the chunked gradient must match the dense one as in float32.
    torch.manual_seed(0)
    s = torch.randn(37, 64, requires_grad=True)
    t = torch.randn(37, 64)
    y = torch.randint(0, 64, (37,))
    grads = {}
    for chunk in (5, None):
        s.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, _ = L.output_losses(s, y, t, w_ce=0.3, divergence="kl", w_div=0.7, temperature=2.0,
                                       cosine=True, w_cos=0.05, chunk_size=chunk)
        total.backward()
        grads[chunk] = s.grad.clone()
    assert_close(grads[5], grads[None], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("teacher_kind", ["logits", "top-k"])
def test_compiled_formulas_equal_the_eager_ones(teacher_kind):
    # compile=True runs the per-chunk formulas through torch.compile (inductor; a C++ compiler on
    # the CPU): same values and gradients, an inference-mode teacher included, a short last chunk
    # (dynamic shapes) included.
    torch.manual_seed(0)
    N, V = 45, 96
    s = torch.randn(N, V, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[::7] = -100
    with torch.inference_mode():
        t = torch.randn(N, V) * 2
    if teacher_kind == "top-k":
        teacher, cosine = L.TopKTargets(*L.teacher_top_k(t.clone(), 8, 2.0)), False
    else:
        teacher, cosine = t, True
    results = []
    for compile in (False, True):
        s.grad = None
        total, parts = L.output_losses(s, y, teacher, w_ce=0.5, divergence="kl", w_div=0.5, temperature=2.0,
                                       cosine=cosine, w_cos=0.05, label_smoothing=0.1, chunk_size=10,
                                       compile=compile)
        total.backward()
        results.append((total.detach(), dict(parts), s.grad.clone()))
    (t0, p0, g0), (t1, p1, g1) = results
    assert t0.dtype == F32
    assert_close(t1, t0, rtol=1e-5, atol=1e-6)
    assert p1.keys() == p0.keys()
    for k in p0:
        assert_close(p1[k], p0[k], rtol=1e-5, atol=1e-6)
    assert_close(g1, g0, rtol=1e-4, atol=1e-7)


def test_compile_is_for_the_chunked_path_and_allows_every_configuration():
    # The dense path stays plain autograd (a retained graph works); compiling raises torch's
    # per-code-object recompile limit, which all configurations share, above the grid's needs.
    import torch._dynamo

    s = torch.randn(6, 16, requires_grad=True)
    y = torch.randint(0, 16, (6,))
    total, _ = L.output_losses(s, y, chunk_size=None, compile=True)
    total.backward(retain_graph=True)
    total.backward()
    L.output_losses(s, y, chunk_size=4, compile=True)
    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 0))
    assert limit >= 64
