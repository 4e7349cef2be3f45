"""Inputs, the public-function dispatcher and the naive float64 references shared by tests/losses."""

from __future__ import annotations

import numpy as np
import torch

from kdlib import losses as L

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# float32 maths against the float64 formula; float64 against it tightly
TOL = {F32: dict(rtol=1e-5, atol=1e-5), F64: dict(rtol=1e-10, atol=1e-12)}
# chunked vs dense, fused vs separate: the same row formulas, so equal up to float rounding
SAME = dict(rtol=1e-6, atol=1e-7)
TIGHT = dict(rtol=1e-10, atol=1e-12)  # the same, in float64

# (name, mixing parameter), one per code path of the formulas: the study's kl and js, the other
# divergences, the parametric ones at each endpoint their formula special-cases and inside.
DIV_CASES = [("kl", None), ("js", None), ("rkl", None), ("tvd", None),
             ("gjsd", 0.0), ("gjsd", 0.3), ("gjsd", 1.0),
             ("skl", 0.0), ("skl", 0.1), ("srkl", 0.0), ("srkl", 0.7)]
LOGIT_CASES = DIV_CASES + [("cos", None)]
CE_CASES = [("ce", 0.0), ("ce", 0.1)]  # no label smoothing (plain NLL) and smoothing: two formulas


def case_id(case) -> str:
    name, param = case
    return name if param is None else f"{name}{param}"


def chunk_id(chunk) -> str:
    return "dense" if chunk is None else f"chunk{chunk}"


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


def random_labels(shape, V, seed=0, ignore_index=-100) -> torch.Tensor:
    """Random labels, ``ignore_index`` where ``random_mask`` is False (at least one counted, one ignored)."""
    g = torch.Generator().manual_seed(2000 + seed)
    y = torch.randint(0, V, shape, generator=g)
    y[~random_mask(shape, seed)] = ignore_index
    return y


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


def to_np(x: torch.Tensor) -> np.ndarray:
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


def _np_divergence_rows(name, param, p, q) -> np.ndarray:
    if name == "kl":
        return np_kl(p, q)
    if name == "rkl":
        return np_kl(q, p)
    if name == "js":
        m = 0.5 * (p + q)
        return 0.5 * np_kl(p, m) + 0.5 * np_kl(q, m)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "gjsd":  # β = 0 and 1 are the two KLs by definition (TRL's GKD)
        if param == 0.0:
            return np_kl(p, q)
        if param == 1.0:
            return np_kl(q, p)
        m = param * p + (1 - param) * q
        return param * np_kl(p, m) + (1 - param) * np_kl(q, m)
    if name == "skl":
        return np_kl(p, param * p + (1 - param) * q)
    if name == "srkl":
        return np_kl(q, param * q + (1 - param) * p)
    raise AssertionError(name)


def reference(name, param, s, t, temperature=1.0, mask=None) -> float:
    """The loss ``name`` in float64 numpy: τ²·D(p‖q) for a divergence, 1 − cos for ``cos``."""
    s, t = to_np(s), to_np(t)
    if name == "cos":
        rows = 1.0 - (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
        return masked_mean(rows, mask)
    p, q = np_softmax(t / temperature), np_softmax(s / temperature)  # teacher, student
    return masked_mean(temperature * temperature * _np_divergence_rows(name, param, p, q), mask)


def reference_ce(s, labels, smoothing, ignore_index=-100) -> float:
    s, y = to_np(s), labels.numpy()
    log_q = np.log(np_softmax(s))  # [..., V]
    keep = y != ignore_index
    log_q, y = log_q[keep], y[keep]  # [M, V], [M]
    nll = -log_q[np.arange(len(y)), y]
    rows = (1 - smoothing) * nll - smoothing * log_q.mean(-1)
    return float(rows.mean()) if rows.size else 0.0


def ce_or_loss(case, s, t, temperature, mask_or_labels, chunk_size):
    """Cross-entropy for a ``CE_CASES`` case (``mask_or_labels``: labels), else ``call`` (a mask)."""
    name, param = case
    if name == "ce":
        return L.cross_entropy(s, mask_or_labels, label_smoothing=param, chunk_size=chunk_size)
    return call(name, param, s, t, temperature, mask_or_labels, chunk_size)
