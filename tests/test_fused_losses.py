"""kdlib.losses.output_losses: CE + one divergence + cosine fused in one chunked pass.

Each fused total and each of its parts must equal the separate public
functions (``cross_entropy``, ``divergence``/``sparse_divergence``,
``cosine_loss``), values and gradients, on the chunked path (a chunk size
that does not divide N) and the dense one. Then gradcheck, repeated backward
passes through one graph (``_RowMean`` makes its gradient in the forward
pass and only rescales it in backward), fp16 gradients under loss scaling,
no-grad calls, inference-mode teachers, the errors, and peak memory.

Run ``pytest -s tests/test_fused_losses.py`` to see the measured memory figures.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from kdlib import losses as L
from kdlib.errors import KdlibError
from kdlib.memory import MiB as MIB
from kdlib.memory import peak_cpu_bytes as peak_bytes

F16, F32, F64 = torch.float16, torch.float32, torch.float64
SHAPE = (2, 5, 11)  # N = 10 positions: chunk 3 leaves a last chunk of one row
CHUNKS = [3, None]
TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64, same formulas: equal up to rounding
W = dict(w_ce=0.7, w_div=1.3, w_cos=0.4)
T = 2.0

# (divergence, param): none (CE / CE + cosine only), every divergence, the parametric ones at
# an endpoint and inside
DIV_CASES = [(None, None), ("kl", None), ("rkl", None), ("js", None), ("tvd", None),
             ("gjsd", 0.0), ("gjsd", 0.3), ("gjsd", 1.0), ("skl", 0.1), ("srkl", 0.7)]


def case_id(case) -> str:
    name, param = case
    return "ce_only" if name is None else (name if param is None else f"{name}{param}")


def chunk_id(chunk) -> str:
    return "dense" if chunk is None else f"chunk{chunk}"


def logits(shape, dtype=F64, seed=0, scale=3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)


def labels_for(shape, V, seed=0, ignore_index=-100) -> torch.Tensor:
    """Random labels with ignored positions (at least one counted, one ignored)."""
    g = torch.Generator().manual_seed(500 + seed)
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < 0.3] = ignore_index
    y.view(-1)[0], y.view(-1)[-1] = 1, ignore_index
    return y


def separate(s, labels, t, name, param, cosine, smoothing, *, w_ce=1.0, w_div=1.0, w_cos=1.0):
    """(total, parts) from the separate public functions (dense reference path)."""
    mask = labels != -100
    parts = {"ce": L.cross_entropy(s, labels, label_smoothing=smoothing, chunk_size=None)}
    total = w_ce * parts["ce"]
    if name is not None:
        parts[name] = L.divergence(name, s, t, T, mask, param=param, chunk_size=None)
        total = total + w_div * parts[name]
    if cosine:
        parts["cos"] = L.cosine_loss(s, t, mask, chunk_size=None)
        total = total + w_cos * parts["cos"]
    return total, parts


def fused(s, labels, t, name, param, cosine, smoothing, chunk, **weights):
    return L.output_losses(s, labels, t, divergence=name, param=param, cosine=cosine, temperature=T,
                           label_smoothing=smoothing, chunk_size=chunk, **weights)


# --------------------------------------------------------------------------
# 1. the fused total and parts equal the separate functions, values and gradients


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["ls0", "ls0.1"])
@pytest.mark.parametrize("cosine", [False, True], ids=["nocos", "cos"])
@pytest.mark.parametrize("case", DIV_CASES, ids=case_id)
def test_fused_equals_sum_of_separate_losses(case, cosine, smoothing, chunk):
    name, param = case
    s0, t0 = logits(SHAPE, seed=1), logits(SHAPE, seed=2)
    labels = labels_for(SHAPE[:-1], SHAPE[-1])
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
    ignored = labels == -100
    assert torch.equal(s.grad[ignored], torch.zeros_like(s.grad[ignored]))
    assert s.grad[~ignored].abs().sum() > 0


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("case", DIV_CASES[1:], ids=case_id)
def test_fused_student_grad_with_a_teacher_that_needs_no_grad(case, chunk):
    name, param = case
    s0, t = logits(SHAPE, seed=3), logits(SHAPE, seed=4)  # t: a plain tensor, no gradient
    labels = labels_for(SHAPE[:-1], SHAPE[-1], seed=1)
    s = s0.clone().requires_grad_()
    total, _ = fused(s, labels, t, name, param, True, 0.1, chunk, **W)
    total.backward()
    s_ref = s0.clone().requires_grad_()
    separate(s_ref, labels, t, name, param, True, 0.1, **W)[0].backward()
    assert_close(s.grad, s_ref.grad, **TIGHT)
    assert t.grad is None


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
def test_teacher_logits_without_a_teacher_term_give_plain_cross_entropy(chunk):
    # Teacher logits given but neither a divergence nor the cosine asked for: CE alone,
    # and the teacher (which no term uses) must not break the gradient.
    s0, t = logits(SHAPE, seed=5), logits(SHAPE, seed=6).requires_grad_()
    labels = labels_for(SHAPE[:-1], SHAPE[-1], seed=2)
    s = s0.clone().requires_grad_()
    total, parts = L.output_losses(s, labels, t, w_ce=0.5, chunk_size=chunk)
    total.backward()
    s_ref = s0.clone().requires_grad_()
    want = 0.5 * L.cross_entropy(s_ref, labels, chunk_size=None)
    want.backward()
    assert list(parts) == ["ce"]
    assert_close(total, want, **TIGHT)
    assert_close(s.grad, s_ref.grad, **TIGHT)
    assert t.grad is None or torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("chunk", [1, 3, 4, "auto"], ids=chunk_id)
def test_chunked_equals_dense(chunk):
    s0, t0 = logits((3, 7, 19), seed=7), logits((3, 7, 19), seed=8)
    labels = labels_for((3, 7), 19, seed=3)

    def run(chunk_size):
        s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        total, parts = L.output_losses(s, labels, t, divergence="js", cosine=True, temperature=T,
                                       label_smoothing=0.1, chunk_size=chunk_size, **W)
        total.backward()
        return total, parts, s.grad, t.grad

    (v, p, gs, gt), (v_d, p_d, gs_d, gt_d) = run(chunk), run(None)
    assert_close(v, v_d, **TIGHT)
    assert_close(p, p_d, **TIGHT)
    assert_close(gs, gs_d, **TIGHT)
    assert_close(gt, gt_d, **TIGHT)


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
def test_other_ignore_index_and_fully_ignored_labels(chunk):
    s0, t = logits(SHAPE, seed=9), logits(SHAPE, seed=10)
    labels = labels_for(SHAPE[:-1], SHAPE[-1], seed=4, ignore_index=-1)
    s = s0.clone().requires_grad_()
    total, _ = L.output_losses(s, labels, t, divergence="kl", ignore_index=-1, chunk_size=chunk)
    total.backward()
    s_ref = s0.clone().requires_grad_()
    mask = labels != -1
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


SPARSE_CASES = [("kl", None), ("rkl", None), ("js", None), ("tvd", None), ("gjsd", 0.3), ("skl", 0.1),
                ("srkl", 0.7)]


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("k", [4, SHAPE[-1]], ids=["k<V", "k=V"])
@pytest.mark.parametrize("case", SPARSE_CASES, ids=case_id)
def test_top_k_teacher_equals_sparse_divergence_plus_cross_entropy(case, k, chunk):
    name, param = case
    V = SHAPE[-1]
    s0, t = logits(SHAPE, seed=11), logits(SHAPE, seed=12)
    labels = labels_for(SHAPE[:-1], V, seed=5)
    mask = labels != -100
    lp, ids, tail = L.teacher_top_k(t, k, T)
    assert (tail is None) == (k == V)

    s = s0.clone().requires_grad_()
    total, parts = L.output_losses(s, labels, L.TopKTargets(lp, ids, tail), divergence=name, param=param,
                                   temperature=T, label_smoothing=0.1, chunk_size=chunk, w_ce=0.7, w_div=1.3)
    total.backward()

    s_ref = s0.clone().requires_grad_()
    ce = L.cross_entropy(s_ref, labels, label_smoothing=0.1, chunk_size=None)
    div = L.sparse_divergence(name, s_ref, lp, ids, tail, T, mask, param=param, chunk_size=None)
    want = 0.7 * ce + 1.3 * div
    want.backward()

    assert list(parts) == ["ce", name]
    assert_close(total, want, **TIGHT)
    assert_close(parts["ce"], ce.detach(), **TIGHT)
    assert_close(parts[name], div.detach(), **TIGHT)
    assert_close(s.grad, s_ref.grad, **TIGHT)
    if k == V:  # k = V: the dense divergence from the teacher's logits
        assert_close(parts[name], L.divergence(name, s0, t, T, mask, param=param), rtol=1e-9, atol=1e-12)


def test_top_k_teacher_with_k_equal_v_ignores_a_given_tail():
    s, t = logits(SHAPE, seed=13), logits(SHAPE, seed=14)
    labels = labels_for(SHAPE[:-1], SHAPE[-1], seed=6)
    lp, ids, _ = L.teacher_top_k(t, SHAPE[-1], T)
    with_tail, _ = L.output_losses(s, labels, L.TopKTargets(lp, ids, torch.zeros(SHAPE[:-1], dtype=F64)),
                                   divergence="kl", temperature=T, chunk_size=3)
    without, _ = L.output_losses(s, labels, L.TopKTargets(lp, ids, None), divergence="kl", temperature=T,
                                 chunk_size=3)
    assert_close(with_tail, without, rtol=0, atol=0)


# --------------------------------------------------------------------------
# 3. errors


def test_cosine_with_a_top_k_cache_is_refused():
    s, t = logits(SHAPE, seed=1), logits(SHAPE, seed=2)
    targets = L.TopKTargets(*L.teacher_top_k(t, 4, T))
    with pytest.raises(KdlibError, match="cosine"):
        L.output_losses(s, labels_for(SHAPE[:-1], SHAPE[-1]), targets, divergence="kl", cosine=True)


@pytest.mark.parametrize("kw", [dict(divergence="kl"), dict(cosine=True), dict(divergence="js", cosine=True)],
                         ids=["div", "cos", "div+cos"])
def test_a_teacher_term_without_a_teacher_is_refused(kw):
    s = logits(SHAPE, seed=1)
    with pytest.raises(KdlibError, match="teacher"):
        L.output_losses(s, labels_for(SHAPE[:-1], SHAPE[-1]), None, **kw)


@pytest.mark.parametrize("bad_shape", [(2, 4), (10,), (2, 5, 1)])
def test_labels_of_the_wrong_shape_are_refused(bad_shape):
    s, t = logits(SHAPE, seed=1), logits(SHAPE, seed=2)
    with pytest.raises(KdlibError, match="labels shape"):
        L.output_losses(s, torch.zeros(bad_shape, dtype=torch.long), t, divergence="kl")


def test_other_bad_arguments_are_refused():
    s, t = logits(SHAPE, seed=1), logits(SHAPE, seed=2)
    y = labels_for(SHAPE[:-1], SHAPE[-1])
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
    with pytest.raises(KdlibError, match="temperature"):
        L.output_losses(s, y, t, divergence="kl", temperature=0.0)
    with pytest.raises(KdlibError, match="chunk_size"):
        L.output_losses(s, y, t, divergence="kl", chunk_size=0)


# --------------------------------------------------------------------------
# 4. gradients: gradcheck and repeated backward passes


GC_SHAPE = (2, 3, 5)
GC_LABELS = torch.tensor([[1, -100, 4], [0, 2, -100]])


@pytest.mark.parametrize("chunk", [2, 4, None], ids=chunk_id)
@pytest.mark.parametrize("case", [("kl", None), ("js", None), ("tvd", None), ("skl", 0.1)], ids=case_id)
def test_gradcheck_wrt_student_and_teacher(case, chunk):
    name, param = case
    s = logits(GC_SHAPE, seed=3, scale=1.5).requires_grad_()
    t = logits(GC_SHAPE, seed=4, scale=1.5).requires_grad_()

    def f(s, t):
        return L.output_losses(s, GC_LABELS, t, divergence=name, param=param, cosine=True, temperature=1.5,
                               label_smoothing=0.1, chunk_size=chunk, **W)[0]

    assert torch.autograd.gradcheck(f, (s, t))


@pytest.mark.parametrize("chunk", [2, None], ids=chunk_id)
def test_gradcheck_wrt_student_with_a_top_k_teacher(chunk):
    s = logits(GC_SHAPE, seed=3, scale=1.5).requires_grad_()
    targets = L.TopKTargets(*L.teacher_top_k(logits(GC_SHAPE, seed=4, scale=2.0), 3, 1.5))

    def f(s):
        return L.output_losses(s, GC_LABELS, targets, divergence="js", temperature=1.5, chunk_size=chunk)[0]

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7)


def _retain_setup(seed=15):
    return logits(SHAPE, seed=seed), logits(SHAPE, seed=seed + 1), labels_for(SHAPE[:-1], SHAPE[-1], seed=seed)


def _fused_kl_cos(s, labels, t, chunk):
    return L.output_losses(s, labels, t, divergence="kl", cosine=True, temperature=T, chunk_size=chunk, **W)[0]


def _reference_grad(s0, labels, t):
    """One fresh graph, one backward, the dense path."""
    s = s0.clone().requires_grad_()
    grad, = torch.autograd.grad(_fused_kl_cos(s, labels, t, None), s)
    return grad.clone()


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("scales", [(1.0, 3.0), (3.0, 1.0), (0.0, 1.0)], ids=["1then3", "3then1", "0then1"])
def test_second_backward_through_one_graph_returns_the_scaled_gradient(scales, chunk):
    """autograd.grad twice through one graph (retain_graph): each call gets scale·gradient, and a
    gradient handed out by the first call is not changed by the second."""
    s0, t, labels = _retain_setup()
    ref = _reference_grad(s0, labels, t)
    a, b = scales
    s = s0.clone().requires_grad_()
    total = _fused_kl_cos(s, labels, t, chunk)
    first, = torch.autograd.grad(a * total, s, retain_graph=True)
    first_value = first.clone()
    second, = torch.autograd.grad(b * total, s, retain_graph=True)
    assert_close(first_value, a * ref, **TIGHT)
    assert_close(second, b * ref, **TIGHT)
    assert_close(first, first_value, rtol=0, atol=0)  # the first result was not overwritten


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("student", ["leaf", "non_leaf"])
def test_retain_graph_backward_accumulates_first_plus_second(student, chunk):
    """total.backward(retain_graph=True); (3·total).backward() leaves 1·g + 3·g = 4·g in .grad."""
    s0, t, labels = _retain_setup()
    ref = _reference_grad(s0, labels, t)
    x = s0.clone().requires_grad_()
    s = x if student == "leaf" else x * 1.0
    total = _fused_kl_cos(s, labels, t, chunk)
    total.backward(retain_graph=True)
    assert_close(x.grad, ref, **TIGHT)
    (3.0 * total).backward()
    assert_close(x.grad, 4.0 * ref, **TIGHT)


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
def test_incoming_gradient_scales_the_result(chunk):
    s0, t, labels = _retain_setup()
    ref = _reference_grad(s0, labels, t)
    for scale in (3.0, -0.5, 1024.0):
        s = s0.clone().requires_grad_()
        (scale * _fused_kl_cos(s, labels, t, chunk)).backward()
        assert_close(s.grad, scale * ref, **TIGHT)


# --------------------------------------------------------------------------
# 5. float16 student logits: the gradient may not underflow


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


@pytest.mark.parametrize("chunk", [64, None], ids=chunk_id)
def test_fp16_gradient_is_finite_and_close_to_fp32(fp16_case, chunk):
    g32 = fp16_case(F32, 64, 1.0)
    _small(g32)
    g16 = fp16_case(F16, chunk, 1.0)
    assert g16.dtype == F16
    assert torch.isfinite(g16).all()
    assert (g16 != 0).any()
    assert ((g16.float() - g32).norm() / g32.norm()).item() < 1e-2


@pytest.mark.parametrize("chunk", [64, None], ids=chunk_id)
@pytest.mark.parametrize("scale", LOSS_SCALES, ids=["scale2^12", "scale2^16"])
def test_fp16_gradient_under_loss_scaling_keeps_the_small_elements(fp16_case, scale, chunk):
    """Under a GradScaler-style loss scale the small elements are representable in
    fp16: unscaled, they must match the fp32 gradient, not underflow to 0.

    Fails if the gradient is rounded to fp16 before the loss scale is applied (the
    small elements then come back as 0 or multiples of 6e-8) or if the scale itself
    is cast to fp16 (2**16 is inf there).
    """
    g32 = fp16_case(F32, 64, 1.0)
    small = _small(g32)
    g16 = fp16_case(F16, chunk, scale)
    assert g16.dtype == F16
    assert torch.isfinite(g16).all()
    unscaled = g16.float() / scale
    representable = small & ((g32 * scale).to(F16) != 0)  # nonzero in fp16 once scaled
    lost = ((unscaled == 0) & representable).float().sum() / representable.float().sum()
    assert lost < 1e-3, f"{lost:.1%} of the small gradient elements underflowed to 0"
    small_error = (unscaled - g32)[small].norm() / g32[small].norm()
    print(f"\n[fp16] chunk={chunk} scale={scale:g}: {lost:.2%} of the small elements lost, "
          f"relative error on them {small_error:.2e}")
    assert small_error < 0.05, f"relative error {small_error:.3f} on the small elements"
    assert ((unscaled - g32).norm() / g32.norm()).item() < 1e-2


# --------------------------------------------------------------------------
# 6. no gradient wanted: values only, no gradient work


@pytest.fixture
def count_grad_calls(monkeypatch):
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


@pytest.mark.parametrize("chunk", [3, "auto", None], ids=chunk_id)
@pytest.mark.parametrize("how", ["no_grad", "inputs_need_no_grad"])
def test_no_gradient_wanted_gives_values_and_no_gradient_work(how, chunk, count_grad_calls):
    s0, t, labels = _retain_setup(seed=20)
    s_ref = s0.clone().requires_grad_()
    want, want_parts = L.output_losses(s_ref, labels, t, divergence="js", cosine=True, temperature=T,
                                       chunk_size=chunk, **W)
    count_grad_calls.clear()
    if how == "no_grad":
        s = s0.clone().requires_grad_()
        with torch.no_grad():
            total, parts = L.output_losses(s, labels, t, divergence="js", cosine=True, temperature=T,
                                           chunk_size=chunk, **W)
    else:
        s = s0.clone()
        total, parts = L.output_losses(s, labels, t, divergence="js", cosine=True, temperature=T,
                                       chunk_size=chunk, **W)
    assert not total.requires_grad and total.grad_fn is None
    assert count_grad_calls == []  # no per-chunk gradient was computed
    assert_close(total, want.detach(), rtol=0, atol=0)
    assert_close(parts, want_parts, rtol=0, atol=0)


def test_no_grad_allocates_no_full_size_gradient_buffer():
    N, V = 256, 2048
    s = logits((N, V), F32, seed=1).requires_grad_()
    t, labels = logits((N, V), F32, seed=2), labels_for((N,), V)

    def run():
        return L.output_losses(s, labels, t, divergence="kl", cosine=True, chunk_size=16)[0]

    with torch.no_grad():
        peak_no_grad = peak_bytes(run)
    peak_grad = peak_bytes(run)  # the forward alone makes the gradient buffer when one is wanted
    full = N * V * 4
    assert peak_no_grad < 0.5 * full
    assert peak_grad >= 0.99 * full


# --------------------------------------------------------------------------
# 7. inference-mode teacher tensors


@pytest.mark.parametrize("chunk", [3, "auto", None], ids=chunk_id)
@pytest.mark.parametrize("teacher", ["logits", "top_k"])
def test_inference_mode_teacher_and_labels(teacher, chunk):
    s0, t0 = logits(SHAPE, seed=21), logits(SHAPE, seed=22)
    labels0 = labels_for(SHAPE[:-1], SHAPE[-1], seed=7)
    with torch.inference_mode():
        t_inf = t0 * 1.0  # as the trainer's teacher forward pass makes them
        labels_inf = labels0 * 1
        targets_inf = L.TopKTargets(*L.teacher_top_k(t_inf, 4, T))
    assert t_inf.is_inference() and labels_inf.is_inference() and targets_inf.ids.is_inference()
    targets_ref = L.TopKTargets(*L.teacher_top_k(t0, 4, T))
    cosine = teacher == "logits"
    results = []
    for t, y in ((t_inf if cosine else targets_inf, labels_inf), (t0 if cosine else targets_ref, labels0)):
        s = s0.clone().requires_grad_()
        total, parts = L.output_losses(s, y, t, divergence="js", cosine=cosine, temperature=T,
                                       label_smoothing=0.1, chunk_size=chunk, **W)
        total.backward()
        results.append((total, parts, s.grad))
    (v_inf, p_inf, g_inf), (v_ref, p_ref, g_ref) = results
    assert_close(v_inf, v_ref, rtol=0, atol=0)
    assert_close(p_inf, p_ref, rtol=0, atol=0)
    assert_close(g_inf, g_ref, rtol=0, atol=0)
    assert g_inf.abs().sum() > 0


# --------------------------------------------------------------------------
# 8. memory: one full-size gradient buffer, not one per term


MEM_N, MEM_V, MEM_CHUNK, MEM_D = 512, 4096, 16, 64
# As in test_losses.py: a chunk's own temporaries, [MEM_CHUNK, V] float32 tensors alive
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
            L.output_losses(s, labels, t, divergence="kl", cosine=True, temperature=T,
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
    torch.testing.assert_close(grads[5], grads[None], rtol=1e-6, atol=1e-9)


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
        results.append((total.detach(), {k: v for k, v in parts.items()}, s.grad.clone()))
    (t0, p0, g0), (t1, p1, g1) = results
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
