"""Sparse divergences: the teacher's top-k cache in place of its logits (design.md §7).

The cache keeps, per position, the teacher's top-k log-probabilities at the
run's temperature τ, their token ids and the log of the remaining mass. The
divergences then compare k+1 buckets: the teacher's top-k tokens and
"everything else", the student's distribution bucketed the same way. With
k = V this is the dense divergence; for k < V merging buckets can only lose
information, so sparse KL <= dense KL (and likewise for JS).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..errors import KdlibError
from .checks import _check_divergence, _compute_dtype, _flat, check_temperature
from .chunked import AUTO, ChunkSize, _row_mean
from .divergences import _divergence_from_log_probs, _log_probs


class TopKTargets(NamedTuple):
    """The teacher's output as a top-k cache stores it, in place of its logits."""

    log_probs: Tensor  # [..., k] at the run's temperature
    ids: Tensor  # [..., k]
    log_tail: Tensor  # [...]


def teacher_top_k(t: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """What the cache stores for teacher logits t [..., V]: top-k log-probs at τ [..., k] (float32),
    their ids [..., k], and the log tail mass [...] (None when k = V)."""
    temperature = check_temperature(temperature)
    if not 1 <= k <= t.shape[-1]:
        raise KdlibError(f"top-k must be in [1, V={t.shape[-1]}], got {k}")
    log_p = _log_probs(t, temperature, _compute_dtype(t))  # [..., V]
    values, ids = log_p.topk(k, dim=-1)  # [..., k]
    if k == t.shape[-1]:
        return values, ids, None
    tail = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), dim=-1)  # [...]
    return values, ids, tail


def _sparse_tensors(s: Tensor, topk_log_probs: Tensor, topk_ids: Tensor,
                    log_tail: Optional[Tensor]) -> list[Tensor]:
    """The cache's tensors as rows next to ``[N, V]`` logits: [lp [N, k], ids [N, k]] (+ tail [N] when k < V)."""
    V, k = s.shape[-1], topk_ids.shape[-1]
    if topk_log_probs.shape != topk_ids.shape or topk_ids.shape[:-1] != s.shape[:-1]:
        raise KdlibError(f"cache tensors {tuple(topk_log_probs.shape)} / {tuple(topk_ids.shape)} do not fit "
                         f"student logits {tuple(s.shape)}: expected [..., k] with the logits' leading dims")
    if k > V:
        raise KdlibError(f"top-k of {k} exceeds the student's vocabulary of {V}")
    tensors = [topk_log_probs.reshape(-1, k), topk_ids.reshape(-1, k)]
    if k < V:
        if log_tail is None or log_tail.shape != s.shape[:-1]:
            raise KdlibError(f"k = {k} < V = {V} needs the teacher's log tail mass of shape {tuple(s.shape[:-1])}")
        tensors.append(log_tail.reshape(-1))
    return tensors


def _sparse_rows(name: str, temperature: float, param: Optional[float]):
    """Per-row divergence on the k+1 buckets of a top-k cache (k buckets when the tail is absent)."""

    def rows(s: Tensor, lp_k: Tensor, ids: Tensor, tail: Optional[Tensor] = None) -> Tensor:
        dtype = _compute_dtype(s)
        log_q = _log_probs(s, temperature, dtype)  # [n, V]
        ids = ids.to(torch.long, copy=True)  # gather saves it for backward: not an inference tensor
        log_q_k = log_q.gather(-1, ids)  # [n, k]
        # exp(-1e4) is exactly 0 in float32 and float64: an empty teacher bucket
        # (log mass -inf) then contributes 0, where -inf would give 0·inf = NaN.
        log_p = lp_k.to(dtype).clamp_min(-1e4)
        if tail is None:
            return _divergence_from_log_probs(name, log_p, log_q_k, param)
        # The student's mass outside the teacher's top-k, summed over the rest of the
        # vocabulary. (1 − Σ_k q_k would skip that pass, but cancels: a tail of 1e-5 would keep
        # ~10% error in float32, and confident students at τ = 1 have such tails.)
        log_q_tail = torch.logsumexp(log_q.scatter(-1, ids, float("-inf")), dim=-1)  # [n]
        log_p = torch.cat([log_p, tail.to(dtype).clamp_min(-1e4)[:, None]], dim=-1)  # [n, k+1]
        log_q = torch.cat([log_q_k, log_q_tail[:, None]], dim=-1)  # [n, k+1]
        return _divergence_from_log_probs(name, log_p, log_q, param)

    return rows


def sparse_divergence(name: str, s: Tensor, topk_log_probs: Tensor, topk_ids: Tensor,
                      log_tail: Optional[Tensor], temperature: float = 1.0, mask: Optional[Tensor] = None,
                      param: Optional[float] = None, chunk_size: ChunkSize = AUTO) -> Tensor:
    """τ² · D(P‖Q) over k+1 buckets: the teacher's top-k tokens and "everything else".

    Args:
        name: one of ``DIVERGENCES``.
        s: student logits [..., V].
        topk_log_probs: [..., k], the teacher's log-probabilities at temperature τ of its top-k tokens.
        topk_ids: [..., k], those tokens.
        log_tail: [...], the log of the teacher's remaining mass; None when k = V.
        temperature, mask, param, chunk_size: as ``divergence``.
    """
    temperature, param = _check_divergence(name, temperature, param)
    tensors = _sparse_tensors(s, topk_log_probs, topk_ids, log_tail)
    s2, _, m = _flat(s, None, mask)  # [N, V], [N]
    rows = _sparse_rows(name, temperature, param)
    return (temperature * temperature) * _row_mean(rows, [s2, *tensors], m, chunk_size)


def sparse_kl(s, topk_log_probs, topk_ids, log_tail, temperature=1.0, mask=None, chunk_size=AUTO):
    """Forward KL on the k+1 buckets of a top-k cache; see ``sparse_divergence``."""
    return sparse_divergence("kl", s, topk_log_probs, topk_ids, log_tail, temperature, mask,
                             chunk_size=chunk_size)


def sparse_js(s, topk_log_probs, topk_ids, log_tail, temperature=1.0, mask=None, chunk_size=AUTO):
    """Jensen–Shannon on the k+1 buckets of a top-k cache; see ``sparse_divergence``."""
    return sparse_divergence("js", s, topk_log_probs, topk_ids, log_tail, temperature, mask,
                             chunk_size=chunk_size)


def sparse_generalized_jsd(s, topk_log_probs, topk_ids, log_tail, beta=0.5, temperature=1.0, mask=None,
                           chunk_size=AUTO):
    """Generalized JSD on the k+1 buckets of a top-k cache; see ``sparse_divergence``."""
    return sparse_divergence("gjsd", s, topk_log_probs, topk_ids, log_tail, temperature, mask,
                             param=beta, chunk_size=chunk_size)
