"""The output losses' formulas: the divergences, the cosine loss and cross-entropy.

Read top to bottom: the formulas on log-probabilities, then the per-row
functions of logits, then the public losses. Every public loss takes student
logits ``s`` and teacher logits ``t`` of shape ``[..., V]`` and a ``mask`` of
shape ``[...]`` (True = the position counts; None = all count), sums over the
vocabulary and averages over the counted positions (0, not NaN, when none
counts). The maths runs in float32 (float64 stays float64) in log space, with
no ``+ eps`` inside a log, so bf16/fp16 logits of magnitude 1e4 give finite
values. With p = softmax(t/τ) the teacher and q = softmax(s/τ) the student,
the divergences are scaled by τ² (Hinton et al.), so their gradients keep the
same size when the temperature τ changes. ``chunk_size`` is the chunk engine's
(``chunked.py``): ``"auto"``, a number of rows, or None for the dense
reference.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import _check_divergence, _check_labels, _compute_dtype, _flat, check_unit_interval
from .chunked import AUTO, ChunkSize, _row_mean

_LN2 = math.log(2.0)


# --------------------------------------------------------------------------
# formulas on log-probabilities (inputs: [n, K]; output: [n])


def _log_probs(x: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    return F.log_softmax(x.to(dtype) / temperature, dim=-1)  # [n, V]


def _kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a‖b) per row from log-probabilities. exp(log_a) underflows to 0, never NaN."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1−w)·b) in log space; the endpoints return an input exactly."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _divergence_from_log_probs(name: str, log_p: Tensor, log_q: Tensor, param: Optional[float]) -> Tensor:
    """Per-row divergence ``name`` between teacher log-probs ``log_p`` and student ``log_q`` [n, K]."""
    if name == "kl":
        return _kl_rows(log_p, log_q)
    if name == "rkl":
        return _kl_rows(log_q, log_p)
    if name == "js":
        log_m = torch.logaddexp(log_p, log_q) - _LN2
        return 0.5 * _kl_rows(log_p, log_m) + 0.5 * _kl_rows(log_q, log_m)
    if name == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if name == "gjsd":
        if param == 0.0:  # TRL's GKD convention: the endpoints are the two KLs
            return _kl_rows(log_p, log_q)
        if param == 1.0:
            return _kl_rows(log_q, log_p)
        log_m = _log_mix(log_p, log_q, param)
        return param * _kl_rows(log_p, log_m) + (1.0 - param) * _kl_rows(log_q, log_m)
    if name == "skl":
        return _kl_rows(log_p, _log_mix(log_p, log_q, param))
    if name == "srkl":
        return _kl_rows(log_q, _log_mix(log_q, log_p, param))
    raise AssertionError(name)


# --------------------------------------------------------------------------
# per-row formulas of logits (inputs: [n, V] slices; output: [n])


def _divergence_rows(name: str, temperature: float, param: Optional[float]):
    """The per-row formula of divergence ``name`` between teacher p and student q, from logits."""

    def rows(s: Tensor, t: Tensor) -> Tensor:
        dtype = _compute_dtype(s, t)
        return _divergence_from_log_probs(name, _log_probs(t, temperature, dtype),
                                          _log_probs(s, temperature, dtype), param)

    return rows


def _cosine_rows(s: Tensor, t: Tensor) -> Tensor:
    dtype = _compute_dtype(s, t)
    return 1.0 - F.cosine_similarity(s.to(dtype), t.to(dtype), dim=-1)


def _ce_rows(smoothing: float):
    def rows(s: Tensor, y: Tensor) -> Tensor:
        log_q = F.log_softmax(s.to(_compute_dtype(s)), dim=-1)  # [n, V]
        nll = -log_q.gather(-1, y.clamp_min(0)[:, None]).squeeze(-1)  # ignored rows: any index, zeroed later
        if smoothing == 0.0:
            return nll
        return (1.0 - smoothing) * nll - smoothing * log_q.mean(-1)

    return rows


# --------------------------------------------------------------------------
# the public losses


def divergence(name: str, s: Tensor, t: Tensor, temperature: float = 1.0,
               mask: Optional[Tensor] = None, param: Optional[float] = None,
               chunk_size: ChunkSize = AUTO) -> Tensor:
    """τ² · D(p‖q) for divergence ``name``, masked mean over positions.

    Args:
        name: one of ``DIVERGENCES`` (kl, rkl, js, tvd, gjsd, skl, srkl).
        s: student logits [..., V].
        t: teacher logits [..., V].
        temperature: τ > 0; p = softmax(t/τ), q = softmax(s/τ).
        mask: [...] bool, True = the position counts; None = all count.
        param: the mixing weight in [0, 1] of ``gjsd`` (β), ``skl`` and ``srkl`` (α); None for the others.
        chunk_size: rows per chunk, ``"auto"``, or None (dense).

    Returns a float32 scalar (float64 for float64 input).
    """
    temperature, param = _check_divergence(name, temperature, param)
    s2, t2, m = _flat(s, t, mask)  # [N, V], [N, V], [N]
    rows = _divergence_rows(name, temperature, param)
    return (temperature * temperature) * _row_mean(rows, [s2, t2], m, chunk_size)


def kl_divergence(s: Tensor, t: Tensor, temperature: float = 1.0, mask: Optional[Tensor] = None,
                  chunk_size: ChunkSize = AUTO) -> Tensor:
    """Forward KL, τ² · KL(p‖q), p = softmax(t/τ) teacher, q = softmax(s/τ) student.

    s, t: [..., V]; mask: [...] or None. Returns a float32 scalar (float64 for float64 input).
    """
    return divergence("kl", s, t, temperature, mask, chunk_size=chunk_size)


def reverse_kl(s: Tensor, t: Tensor, temperature: float = 1.0, mask: Optional[Tensor] = None,
               chunk_size: ChunkSize = AUTO) -> Tensor:
    """Reverse KL, τ² · KL(q‖p) (mode-seeking). Shapes as ``kl_divergence``."""
    return divergence("rkl", s, t, temperature, mask, chunk_size=chunk_size)


def js_divergence(s: Tensor, t: Tensor, temperature: float = 1.0, mask: Optional[Tensor] = None,
                  chunk_size: ChunkSize = AUTO) -> Tensor:
    """Jensen–Shannon, τ² · [½KL(p‖m) + ½KL(q‖m)], m = ½(p+q); at most τ²·ln 2."""
    return divergence("js", s, t, temperature, mask, chunk_size=chunk_size)


def generalized_jsd(s: Tensor, t: Tensor, beta: float = 0.5, temperature: float = 1.0,
                    mask: Optional[Tensor] = None, chunk_size: ChunkSize = AUTO) -> Tensor:
    """τ² · [β·KL(p‖m) + (1−β)·KL(q‖m)], m = β·p + (1−β)·q (TRL's GKD convention).

    β = ½ is ``js_divergence``. At the endpoints the mixture formula degenerates
    to 0, so, as in TRL, β = 0 is defined as forward KL(p‖q) and β = 1 as KL(q‖p).
    """
    return divergence("gjsd", s, t, temperature, mask, param=beta, chunk_size=chunk_size)


def skew_kl(s: Tensor, t: Tensor, alpha: float = 0.1, temperature: float = 1.0,
            mask: Optional[Tensor] = None, chunk_size: ChunkSize = AUTO) -> Tensor:
    """Skew KL (DistiLLM), τ² · KL(p ‖ α·p + (1−α)·q); α = 0 is forward KL."""
    return divergence("skl", s, t, temperature, mask, param=alpha, chunk_size=chunk_size)


def skew_reverse_kl(s: Tensor, t: Tensor, alpha: float = 0.1, temperature: float = 1.0,
                    mask: Optional[Tensor] = None, chunk_size: ChunkSize = AUTO) -> Tensor:
    """Skew reverse KL (DistiLLM), τ² · KL(q ‖ α·q + (1−α)·p); α = 0 is reverse KL."""
    return divergence("srkl", s, t, temperature, mask, param=alpha, chunk_size=chunk_size)


def total_variation(s: Tensor, t: Tensor, temperature: float = 1.0, mask: Optional[Tensor] = None,
                    chunk_size: ChunkSize = AUTO) -> Tensor:
    """Total variation distance, τ² · ½Σ|p − q| (scaled like the other divergences)."""
    return divergence("tvd", s, t, temperature, mask, chunk_size=chunk_size)


def cosine_loss(s: Tensor, t: Tensor, mask: Optional[Tensor] = None,
                chunk_size: ChunkSize = AUTO) -> Tensor:
    """1 − cos(s, t) over the vocabulary on raw logits (no temperature), masked mean.

    s, t: [..., V]; mask: [...] or None.
    """
    s2, t2, m = _flat(s, t, mask)  # [N, V], [N, V], [N]
    return _row_mean(_cosine_rows, [s2, t2], m, chunk_size)


def cross_entropy(s: Tensor, labels: Tensor, label_smoothing: float = 0.0,
                  ignore_index: int = -100, chunk_size: ChunkSize = AUTO) -> Tensor:
    """Cross-entropy of logits ``s`` [..., V] against ``labels`` [...] (``ignore_index`` skipped).

    Same definition as ``torch.nn.functional.cross_entropy`` (label smoothing
    mixes in the uniform distribution), computed in float32 chunk by chunk.
    """
    smoothing = check_unit_interval(label_smoothing, "label_smoothing")
    s2, y, m = _check_labels(s, labels, ignore_index)  # [N, V], [N], [N]
    return _row_mean(_ce_rows(smoothing), [s2, y], m, chunk_size)
