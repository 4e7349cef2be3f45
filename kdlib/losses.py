"""Knowledge-distillation losses: pure functions of tensors, no state, no I/O.

Conventions (design.md §4), shared by every function here:

- student logits ``s`` and teacher logits ``t`` have shape ``[..., V]``;
  ``mask`` has shape ``[...]`` (True = position counts), ``None`` = all count;
- each loss is summed over the vocabulary, then averaged over the counted
  positions; with no counted position the loss is 0 (not NaN);
- the maths runs in float32 (float64 stays float64) in log space
  (``log_softmax``/``logaddexp``), whatever the input dtype, with no ``+ eps``
  inside a log, so bf16/fp16 logits of magnitude 1e4 give finite values;
- divergences are scaled by T² (Hinton et al.), so their gradients keep the
  same size when the temperature changes.

Memory: over V = 50,257 and thousands of positions, each ``[N, V]`` float32
temporary is hundreds of MB. The vocabulary-sized losses therefore run through
``_RowMean``, which processes ``chunk_size`` positions at a time and computes
each chunk's gradient as soon as its forward is done. Its only full-size
allocation is the gradient itself (one ``[N, V]`` tensor in the input's
dtype; float32 for float16 input), and nothing is recomputed.
``output_losses`` runs an experiment's CE, divergence and cosine in one such
pass. ``chunk_size=None`` runs the same row
formulas densely through plain autograd: the reference the chunked path is
tested against.
"""

from __future__ import annotations

import functools
import math
import numbers
import weakref
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .errors import KdlibError, choices
from .grid import DIVERGENCES, PARAMETRIC

ChunkSize = Union[int, str, None]
AUTO = "auto"
# Elements in one [rows, V] temporary of a chunk: 2**22 float32 = 16 MiB (83
# rows at V = 50,257). A chunk keeps up to ~10 such temporaries alive (JS), so
# they add under 10% to the one [8192, V] gradient buffer that must be held.
_CHUNK_ELEMENTS = 2**22
_LN2 = math.log(2.0)

LAYER_MAPS = ("layerwise", "last2last", "last2all", "study")
NORMS = ("layer", "none")


# --------------------------------------------------------------------------
# argument checks


def check_temperature(temperature) -> float:
    """Return ``temperature`` as a float, or raise if it is not finite and > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise KdlibError(f"temperature must be a number > 0, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise KdlibError(f"temperature must be finite and > 0, got {temperature!r}; "
                         "1.0 leaves the distributions as they are, the study used 2.0")
    return float(temperature)


def check_unit_interval(value, what: str) -> float:
    """Return ``value`` as a float in [0, 1], or raise naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise KdlibError(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _flat(s: Tensor, t: Optional[Tensor], mask: Optional[Tensor]):
    """``[..., V]`` logits and ``[...]`` mask -> ``[N, V]`` and ``[N]`` views.

    Non-contiguous logits (``logits[:, :-1]``) cannot be viewed and are copied
    whole: shift the labels, not the logits.
    """
    if s.dim() < 1:
        raise KdlibError(f"logits need a vocabulary dimension, got shape {tuple(s.shape)}")
    if t is not None and t.shape != s.shape:
        raise KdlibError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} "
                         "must have the same shape; a vocabulary mismatch means the student "
                         "was not built with the teacher's tokenizer")
    V = s.shape[-1]
    if mask is not None:
        if mask.shape != s.shape[:-1]:
            raise KdlibError(f"mask shape {tuple(mask.shape)} must equal the logits' shape "
                             f"without the vocabulary dimension, {tuple(s.shape[:-1])}")
        mask = mask.reshape(-1).bool()
    return s.reshape(-1, V), (None if t is None else t.reshape(-1, V)), mask


def _chunk_rows(chunk_size: ChunkSize, V: int) -> Optional[int]:
    if chunk_size is None:
        return None
    if chunk_size == AUTO:
        return max(1, _CHUNK_ELEMENTS // max(V, 1))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise KdlibError(f"chunk_size must be 'auto', None (dense) or an integer >= 1, got {chunk_size!r}")
    return chunk_size


# --------------------------------------------------------------------------
# masked mean of a per-row quantity, chunked over rows


def _masked(values: Tensor, mask: Optional[Tensor]) -> Tensor:
    # torch.where, not values[mask]: boolean indexing syncs the host with the GPU.
    return values if mask is None else torch.where(mask, values, values.new_zeros(()))


def _count(mask: Optional[Tensor], n: int, dtype: torch.dtype) -> Union[Tensor, float]:
    """Counted positions (>= 1, so no position gives 0, not NaN): a device tensor from the mask, or
    a Python number (a tensor made from a number would be a host-to-device copy: a sync)."""
    if mask is None:
        return float(max(n, 1))
    return mask.sum().clamp_min(1).to(dtype)


def _weighted(values: Tensor, weights: Sequence[float]) -> Tensor:
    """Σ_k weights[k] · values[..., k], with Python-number weights: no host-to-device copy, and
    no matmul (which autocast would run in bf16/fp16)."""
    return sum(w * values[..., k] for k, w in enumerate(weights))


class _RowMean(torch.autograd.Function):
    """Weighted sum of masked row means of ``rows_fn(*tensors)``, chunked; its gradient made in forward.

    ``tensors`` all have N rows; ``rows_fn`` maps row-slices of them to ``[n, k]``
    (k terms, weighted by ``weights``). Returns ``(total, means)``: the weighted
    sum (differentiable) and the k unweighted means (not differentiable). Every
    row is computed and the masked-out ones are zeroed, which keeps shapes
    static and the GPU free of host syncs.

    When a gradient is wanted, each chunk's gradient is computed right after its
    forward (its temporaries freed at once) into one full-size buffer per input;
    the first backward scales that buffer in place by the incoming gradient and
    hands it over. So the buffers are the only full-size allocation and nothing
    is recomputed (the scheme of Liger's fused losses). A later backward through
    the same graph (``retain_graph``, gradcheck) recomputes chunk by chunk.
    float16 slices are differentiated in float32 into a float32 buffer: their
    per-element gradients (~1e-9 before loss scaling) would underflow in fp16.
    Tensors that need no gradient (teacher outputs, labels) may be
    inference-mode tensors. First derivatives only.
    """

    @staticmethod
    def forward(ctx, rows_fn, weights, chunk, mask, want_grad, *tensors):
        needs = [want_grad and need for need in ctx.needs_input_grad[5:]]
        count = _count(mask, tensors[0].shape[0], _compute_dtype(*tensors))
        grads, sums = _RowMean.run(rows_fn, weights, chunk, mask, count, needs, tensors)
        # Weak references to the inputs that get a gradient: holding the logits
        # until backward would cost a full-size tensor; they are needed only by a
        # second backward, when the caller still holds them anyway.
        ctx.inputs = [_WeakRows(x) if need else x for x, need in zip(tensors, needs)]
        ctx.dtypes = [x.dtype for x in tensors]
        ctx.grads, ctx.args = grads, (rows_fn, weights, chunk, mask, count, needs)
        means = sums / count
        ctx.mark_non_differentiable(means)
        return _weighted(means, weights), means

    @staticmethod
    def run(rows_fn, weights, chunk, mask, count, needs, tensors):
        """(gradient buffers of Σ weights·means, or None per input; the [k] masked row sums)."""
        grads = [torch.empty_like(x, dtype=torch.float32 if x.dtype == torch.float16 else x.dtype)
                 if need else None for x, need in zip(tensors, needs)]
        sums = 0.0
        for a in range(0, tensors[0].shape[0], chunk):
            keep = None if mask is None else mask[a:a + chunk, None]  # [c, 1]
            with torch.enable_grad() if any(needs) else torch.no_grad():
                parts = [_grad_slice(x[a:a + chunk]) if need else x[a:a + chunk] for x, need in zip(tensors, needs)]
                values = _masked(rows_fn(*parts), keep)  # [c, k]
                if any(needs):
                    wanted = [p for p, need in zip(parts, needs) if need]
                    got = torch.autograd.grad(_weighted(values, weights).sum() / count, wanted, allow_unused=True)
                    for g_full, g in zip([g for g in grads if g is not None], got):
                        g_full[a:a + chunk] = 0 if g is None else g
            sums += values.detach().sum(0)
        return grads, sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_means):
        if ctx.grads is not None:  # the first backward: in place, then handed over
            grads, ctx.grads = ctx.grads, None
        else:
            tensors = [x() if isinstance(x, _WeakRows) else x for x in ctx.inputs]
            if any(x is None for x in tensors):
                raise KdlibError("a second backward through a chunked loss needs its inputs, which are gone; "
                                 "compute the loss again (or use chunk_size=None)")
            grads, _ = _RowMean.run(*ctx.args, tensors)
        grads = [None if g is None else g.mul_(grad_total.to(g.dtype)).to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (None, None, None, None, None, *grads)


class _WeakRows:
    """A weak reference to a tensor that is usually a view (``logits.reshape(-1, V)``): it refers
    to the view's base, which the caller may hold, and rebuilds the view from it."""

    def __init__(self, x: Tensor):
        base = x._base if x._base is not None else x
        self.ref, self.view = weakref.ref(base), (x.size(), x.stride(), x.storage_offset())

    def __call__(self) -> Optional[Tensor]:
        base = self.ref()
        return None if base is None else base.detach().as_strided(*self.view)


def _grad_slice(x: Tensor) -> Tensor:
    """A leaf copy of rows of ``x`` to differentiate, float16 widened to float32 (see ``_RowMean``)."""
    return (x.float() if x.dtype == torch.float16 else x.detach()).detach().requires_grad_(True)


def _row_means(rows_fn: Callable[..., Tensor], weights: Sequence[float], tensors: Sequence[Tensor],
               mask: Optional[Tensor], chunk_size: ChunkSize) -> tuple[Tensor, Tensor]:
    """(Σ_k weights[k]·mean_k, [mean_1..mean_k]) over the masked rows of ``rows_fn`` ([n, k])."""
    chunk = _chunk_rows(chunk_size, tensors[0].shape[-1])
    dtype = _compute_dtype(*tensors)
    if chunk is None:  # dense reference: one autograd graph over all rows
        values = _masked(rows_fn(*tensors), None if mask is None else mask[:, None])  # [N, k]
        means = values.sum(0) / _count(mask, tensors[0].shape[0], values.dtype)
        return _weighted(means, weights), means.detach()
    if tensors[0].shape[0] == 0:  # no rows: 0, still connected to the graph (backward works)
        zero = tensors[0].sum().to(dtype) * 0.0 if tensors[0].is_floating_point() \
            else tensors[0].new_zeros((), dtype=dtype)
        return zero, zero.detach().new_zeros(len(weights))
    return _RowMean.apply(rows_fn, tuple(weights), chunk, mask, torch.is_grad_enabled(), *tensors)


def _row_mean(rows_fn: Callable[..., Tensor], tensors: Sequence[Tensor], mask: Optional[Tensor],
              chunk_size: ChunkSize) -> Tensor:
    """Masked mean over rows of one per-row quantity (``rows_fn`` returns ``[n]``)."""
    return _row_means(lambda *xs: rows_fn(*xs)[:, None], (1.0,), tensors, mask, chunk_size)[0]


# --------------------------------------------------------------------------
# row formulas (inputs: [n, V] logits slices; output: [n])


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


def _divergence_rows(name: str, temperature: float, param: Optional[float]):
    """The per-row formula of divergence ``name`` between teacher p and student q, from logits."""

    def rows(s: Tensor, t: Tensor) -> Tensor:
        dtype = _compute_dtype(s, t)
        return _divergence_from_log_probs(name, _log_probs(t, temperature, dtype),
                                          _log_probs(s, temperature, dtype), param)

    return rows


def _check_divergence(name: str, temperature, param) -> tuple[float, Optional[float]]:
    if name not in DIVERGENCES:
        raise KdlibError(f"unknown divergence {name!r}; choose one of: {choices(DIVERGENCES)}")
    T = check_temperature(temperature)
    if name in PARAMETRIC:
        param = check_unit_interval(param, f"the {name} weight ({'beta' if name == 'gjsd' else 'alpha'})")
    elif param is not None:
        raise KdlibError(f"divergence {name!r} takes no parameter (got {param!r}); "
                         f"only {choices(PARAMETRIC)} do")
    return T, param


def divergence(name: str, s: Tensor, t: Tensor, temperature: float = 1.0,
               mask: Optional[Tensor] = None, param: Optional[float] = None,
               chunk_size: ChunkSize = AUTO) -> Tensor:
    """T² · D(p‖q) for divergence ``name`` (one of ``DIVERGENCES``), masked mean over positions.

    ``param`` is the mixing weight of ``gjsd`` (β), ``skl`` and ``srkl`` (α), in [0, 1].
    """
    T, param = _check_divergence(name, temperature, param)
    s2, t2, m = _flat(s, t, mask)
    return (T * T) * _row_mean(_divergence_rows(name, T, param), [s2, t2], m, chunk_size)


def kl_divergence(s: Tensor, t: Tensor, temperature: float = 1.0, mask: Optional[Tensor] = None,
                  chunk_size: ChunkSize = AUTO) -> Tensor:
    """Forward KL, T² · KL(p‖q), p = softmax(t/T) teacher, q = softmax(s/T) student.

    s, t: [..., V]; mask: [...] or None. Returns a float32 scalar (float64 for float64 input).
    """
    return divergence("kl", s, t, temperature, mask, chunk_size=chunk_size)


def reverse_kl(s: Tensor, t: Tensor, temperature: float = 1.0, mask: Optional[Tensor] = None,
               chunk_size: ChunkSize = AUTO) -> Tensor:
    """Reverse KL, T² · KL(q‖p) (mode-seeking). Shapes as ``kl_divergence``."""
    return divergence("rkl", s, t, temperature, mask, chunk_size=chunk_size)


def js_divergence(s: Tensor, t: Tensor, temperature: float = 1.0, mask: Optional[Tensor] = None,
                  chunk_size: ChunkSize = AUTO) -> Tensor:
    """Jensen–Shannon, T² · [½KL(p‖m) + ½KL(q‖m)], m = ½(p+q); at most T²·ln 2."""
    return divergence("js", s, t, temperature, mask, chunk_size=chunk_size)


def generalized_jsd(s: Tensor, t: Tensor, beta: float = 0.5, temperature: float = 1.0,
                    mask: Optional[Tensor] = None, chunk_size: ChunkSize = AUTO) -> Tensor:
    """T² · [β·KL(p‖m) + (1−β)·KL(q‖m)], m = β·p + (1−β)·q (TRL's GKD convention).

    β = ½ is ``js_divergence``. At the endpoints the mixture formula degenerates
    to 0, so, as in TRL, β = 0 is defined as forward KL(p‖q) and β = 1 as KL(q‖p).
    """
    return divergence("gjsd", s, t, temperature, mask, param=beta, chunk_size=chunk_size)


def skew_kl(s: Tensor, t: Tensor, alpha: float = 0.1, temperature: float = 1.0,
            mask: Optional[Tensor] = None, chunk_size: ChunkSize = AUTO) -> Tensor:
    """Skew KL (DistiLLM), T² · KL(p ‖ α·p + (1−α)·q); α = 0 is forward KL."""
    return divergence("skl", s, t, temperature, mask, param=alpha, chunk_size=chunk_size)


def skew_reverse_kl(s: Tensor, t: Tensor, alpha: float = 0.1, temperature: float = 1.0,
                    mask: Optional[Tensor] = None, chunk_size: ChunkSize = AUTO) -> Tensor:
    """Skew reverse KL (DistiLLM), T² · KL(q ‖ α·q + (1−α)·p); α = 0 is reverse KL."""
    return divergence("srkl", s, t, temperature, mask, param=alpha, chunk_size=chunk_size)


def total_variation(s: Tensor, t: Tensor, temperature: float = 1.0, mask: Optional[Tensor] = None,
                    chunk_size: ChunkSize = AUTO) -> Tensor:
    """Total variation distance, T² · ½Σ|p − q| (scaled like the other divergences)."""
    return divergence("tvd", s, t, temperature, mask, chunk_size=chunk_size)


def _cosine_rows(s: Tensor, t: Tensor) -> Tensor:
    dtype = _compute_dtype(s, t)
    return 1.0 - F.cosine_similarity(s.to(dtype), t.to(dtype), dim=-1)


def cosine_loss(s: Tensor, t: Tensor, mask: Optional[Tensor] = None,
                chunk_size: ChunkSize = AUTO) -> Tensor:
    """1 − cos(s, t) over the vocabulary on raw logits (no temperature), masked mean."""
    s2, t2, m = _flat(s, t, mask)
    return _row_mean(_cosine_rows, [s2, t2], m, chunk_size)


def _ce_rows(smoothing: float):
    def rows(s: Tensor, y: Tensor) -> Tensor:
        log_q = F.log_softmax(s.to(_compute_dtype(s)), dim=-1)  # [n, V]
        nll = -log_q.gather(-1, y.clamp_min(0)[:, None]).squeeze(-1)  # ignored rows: any index, zeroed later
        if smoothing == 0.0:
            return nll
        return (1.0 - smoothing) * nll - smoothing * log_q.mean(-1)

    return rows


def _check_labels(s: Tensor, labels: Tensor, ignore_index: int):
    """``[N, V]`` logits, ``[N]`` labels and the ``[N]`` mask of counted positions."""
    if labels.shape != s.shape[:-1]:
        raise KdlibError(f"labels shape {tuple(labels.shape)} must equal the logits' shape "
                         f"without the vocabulary dimension, {tuple(s.shape[:-1])}")
    s2, _, m = _flat(s, None, labels != ignore_index)
    return s2, labels.reshape(-1), m


def cross_entropy(s: Tensor, labels: Tensor, label_smoothing: float = 0.0,
                  ignore_index: int = -100, chunk_size: ChunkSize = AUTO) -> Tensor:
    """Cross-entropy of logits ``s`` [..., V] against ``labels`` [...] (``ignore_index`` skipped).

    Same definition as ``torch.nn.functional.cross_entropy`` (label smoothing
    mixes in the uniform distribution), computed in float32 chunk by chunk.
    """
    smoothing = check_unit_interval(label_smoothing, "label_smoothing")
    s2, y, m = _check_labels(s, labels, ignore_index)
    return _row_mean(_ce_rows(smoothing), [s2, y], m, chunk_size)


# --------------------------------------------------------------------------
# sparse divergences: the teacher's top-k cache (design.md §7)


class TopKTargets(NamedTuple):
    """The teacher's output as a top-k cache stores it, in place of its logits."""

    log_probs: Tensor  # [..., k] at the run's temperature
    ids: Tensor  # [..., k]
    log_tail: Tensor  # [...]


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
        # ~10% error in float32, and confident students at T = 1 have such tails.)
        log_q_tail = torch.logsumexp(log_q.scatter(-1, ids, float("-inf")), dim=-1)  # [n]
        log_p = torch.cat([log_p, tail.to(dtype).clamp_min(-1e4)[:, None]], dim=-1)  # [n, k+1]
        log_q = torch.cat([log_q_k, log_q_tail[:, None]], dim=-1)  # [n, k+1]
        return _divergence_from_log_probs(name, log_p, log_q, param)

    return rows


def sparse_divergence(name: str, s: Tensor, topk_log_probs: Tensor, topk_ids: Tensor,
                      log_tail: Optional[Tensor], temperature: float = 1.0, mask: Optional[Tensor] = None,
                      param: Optional[float] = None, chunk_size: ChunkSize = AUTO) -> Tensor:
    """T² · D(P‖Q) over k+1 buckets: the teacher's top-k tokens and "everything else".

    s: student logits [..., V]. topk_log_probs [..., k]: the teacher's
    log-probabilities at temperature T of its top-k tokens ``topk_ids``
    [..., k]; log_tail [...]: the log of the teacher's remaining mass (None
    when k = V). The student's distribution is bucketed the same way. With
    k = V this equals the dense divergence; for k < V merging buckets can only
    lose information, so sparse KL <= dense KL (and likewise for JS).
    """
    T, param = _check_divergence(name, temperature, param)
    tensors = _sparse_tensors(s, topk_log_probs, topk_ids, log_tail)
    s2, _, m = _flat(s, None, mask)
    return (T * T) * _row_mean(_sparse_rows(name, T, param), [s2, *tensors], m, chunk_size)


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


# --------------------------------------------------------------------------
# CE + divergence + cosine in one pass (what an experiment's objective runs)


def output_losses(s: Tensor, labels: Tensor, teacher: Union[Tensor, TopKTargets, None] = None, *,
                  w_ce: float = 1.0, divergence: Optional[str] = None, w_div: float = 1.0,
                  temperature: float = 1.0, param: Optional[float] = None, cosine: bool = False,
                  w_cos: float = 1.0, label_smoothing: float = 0.0, ignore_index: int = -100,
                  chunk_size: ChunkSize = AUTO, compile: bool = False) -> tuple[Tensor, dict]:
    """The vocabulary-sized losses of one experiment, fused: one chunked pass, one gradient buffer.

    s: student logits [..., V]; labels [...] (``ignore_index`` = not counted,
    for every term); teacher: its logits [..., V], a ``TopKTargets`` (the
    cache; sparse divergence, no cosine) or None (CE only). Returns
    ``(total, parts)``: ``w_ce·CE + w_div·T²·D + w_cos·(1 − cos)`` with a
    gradient, and the unweighted terms, detached, named ``ce``, the divergence's
    name and ``cos``. Each term equals its own function (``cross_entropy``,
    ``divergence``/``sparse_divergence``, ``cosine_loss``); run together they
    share one chunk loop and one ``[N, V]`` gradient instead of one per term.
    ``compile=True`` runs the per-chunk formulas through ``torch.compile``,
    which fuses their passes over the vocabulary (compiled once per formula).
    """
    smoothing = check_unit_interval(label_smoothing, "label_smoothing")
    s2, y, m = _check_labels(s, labels, ignore_index)
    if (divergence is not None or cosine) and teacher is None:
        raise KdlibError("a divergence or the cosine loss needs the teacher's outputs; none were given")
    sparse = isinstance(teacher, TopKTargets)
    if sparse:
        if cosine:
            raise KdlibError("the cosine loss needs the teacher's logits; a top-k cache has only its top-k")
        teacher_tensors = _sparse_tensors(s, teacher.log_probs, teacher.ids,
                                          teacher.log_tail if teacher.ids.shape[-1] < s.shape[-1] else None)
    elif teacher is not None:
        teacher_tensors = [_flat(s, teacher, None)[1]]
    else:
        teacher_tensors = []
    names, weights = ["ce"], [w_ce]
    T = None
    if divergence is not None:
        T, param = _check_divergence(divergence, temperature, param)
        names.append(divergence)
        weights.append(w_div)
    if cosine:
        names.append("cos")
        weights.append(w_cos)
    key = (smoothing, divergence, T, param, sparse, len(teacher_tensors), cosine)
    # Compiled on the chunked path only: the dense one is the plain-autograd reference.
    rows_fn = _compiled_output_rows(*key) if compile and chunk_size is not None else _output_rows(*key)
    total, means = _row_means(rows_fn, weights, [s2, y, *teacher_tensors], m, chunk_size)
    return total, dict(zip(names, means.unbind()))


def _output_rows(smoothing, divergence, T, param, sparse, n_teacher, cosine):
    """The per-row [n, terms] formula of ``output_losses``; its tensors: s, labels, then the teacher's."""
    where = list(range(2, 2 + n_teacher))
    fns = [(_ce_rows(smoothing), [0, 1])]
    if divergence is not None:
        rows = (_sparse_rows if sparse else _divergence_rows)(divergence, T, param)
        fns.append((lambda *xs, rows=rows, T2=T * T: T2 * rows(*xs), [0, *where]))
    if cosine:
        fns.append((_cosine_rows, [0, 2]))

    def rows_fn(*xs: Tensor) -> Tensor:
        return torch.stack([fn(*[xs[i] for i in idx]) for fn, idx in fns], dim=-1)  # [n, terms]

    return rows_fn


# Every configuration compiles the same code object (``_output_rows``' inner function), and
# torch.compile keeps at most ``recompile_limit`` (8 by default) versions per code object
# before it falls back to eager: a sweep over the 14 experiments needs more.
_RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=None)
def _compiled_output_rows(*key):
    # One compiled wrapper per configuration, kept for the process. Dynamic shapes: the last
    # chunk of a batch is shorter.
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, and torch < 2.7's
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), _RECOMPILE_LIMIT))
    compiled = torch.compile(_output_rows(*key), dynamic=True)

    def rows_fn(*xs: Tensor) -> Tensor:
        # A compiled graph saves its inputs for backward, which inference-mode tensors (an
        # online teacher's logits) refuse: their chunk is copied (a [chunk, V] copy).
        return compiled(*[x.clone() if x.is_inference() else x for x in xs])

    return rows_fn


def teacher_top_k(t: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """What the cache stores for teacher logits t [..., V]: top-k log-probs at T [..., k] (float32),
    their ids [..., k], and the log tail mass [...] (None when k = V)."""
    T = check_temperature(temperature)
    if not 1 <= k <= t.shape[-1]:
        raise KdlibError(f"top-k must be in [1, V={t.shape[-1]}], got {k}")
    log_p = _log_probs(t, T, _compute_dtype(t))  # [..., V]
    values, ids = log_p.topk(k, dim=-1)  # [..., k]
    if k == t.shape[-1]:
        return values, ids, None
    tail = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), dim=-1)  # [...]
    return values, ids, tail


# --------------------------------------------------------------------------
# feature losses


def layer_pairs(name: str, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs, 0-based, for layer map ``name``.

    - ``layerwise``: student block i ↔ teacher block ceil((i+1)·Lt/Ls) − 1,
      spreading the student evenly over the teacher and ending on both last blocks;
    - ``last2last``: the last student block ↔ the last teacher block;
    - ``last2all``: every student block ↔ the last teacher block;
    - ``study``: the original study's hand-picked map, 8 student blocks ↔
      teacher blocks 1, 3, 5, 7, 8, 9, 10, 11 (defined for 8 → 12 only).
    """
    for what, n in (("n_student", n_student), ("n_teacher", n_teacher)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise KdlibError(f"{what} must be a whole number of blocks >= 1, got {n!r}")
    if name == "layerwise":
        return [(i, -(-(i + 1) * n_teacher // n_student) - 1) for i in range(n_student)]
    if name == "last2last":
        return [(n_student - 1, n_teacher - 1)]
    if name == "last2all":
        return [(i, n_teacher - 1) for i in range(n_student)]
    if name == "study":
        if (n_student, n_teacher) != (8, 12):
            raise KdlibError(f"layer map 'study' is the original study's 8 -> 12 map; this pair of "
                             f"models has {n_student} -> {n_teacher} blocks: use 'layerwise'")
        return list(enumerate([1, 3, 5, 7, 8, 9, 10, 11]))
    raise KdlibError(f"unknown layer map {name!r}; choose one of: {choices(LAYER_MAPS)}")


def make_projectors(pairs: Sequence[tuple[int, int]], d_student: int, d_teacher: int) -> nn.ModuleList:
    """One learned ``Linear(d_student, d_teacher)`` per layer pair, trained with the student."""
    return nn.ModuleList(nn.Linear(d_student, d_teacher) for _ in pairs)


def _check_layers(pairs, n_student_states: int, n_teacher_states: int, what: str) -> None:
    for i, j in pairs:
        if not 0 <= i < n_student_states:
            raise KdlibError(f"layer pair ({i}, {j}) asks for student block {i}, but the student "
                             f"returned {what} for {n_student_states} blocks (0..{n_student_states - 1})")
        if not 0 <= j < n_teacher_states:
            raise KdlibError(f"layer pair ({i}, {j}) asks for teacher block {j}, but the teacher "
                             f"returned {what} for {n_teacher_states} blocks (0..{n_teacher_states - 1}); "
                             "choose a layer map that fits the teacher")


def _masked_sq_mean(diff: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean of diff² over masked positions and the trailing dims; diff: [B, T, ...], mask: [B, T]."""
    sq = diff.pow(2).flatten(2).sum(-1)  # [B, T]
    per_position = math.prod(diff.shape[2:])
    if mask is None:
        return sq.sum() / max(sq.numel() * per_position, 1)
    if mask.shape != sq.shape:
        raise KdlibError(f"mask shape {tuple(mask.shape)} must be [batch, time] = {tuple(sq.shape)}")
    return _masked(sq, mask.bool()).sum() / (mask.sum().clamp_min(1) * per_position)


def hidden_mse(student_states: Sequence[Tensor], teacher_states: Sequence[Tensor],
               pairs: Sequence[tuple[int, int]], projectors: Optional[Sequence[nn.Module]] = None,
               mask: Optional[Tensor] = None, norm: str = "layer") -> Tensor:
    """Mean over layer pairs of MSE(norm(P_ij(h_s[i])), norm(h_t[j])).

    States follow Hugging Face's convention: ``states[k]`` for k = 1..L is the
    output of block k−1 (the last one after the final layer norm), so pair
    (i, j) compares ``student_states[i+1]`` [B, T, Ds] with ``teacher_states[j+1]``
    [B, T, Dt]. ``norm="layer"`` applies a parameter-free layer norm to both
    sides: GPT-2's residual stream has a few dimensions hundreds of times larger
    than the rest, which would otherwise dominate the MSE. ``projectors=None``
    compares the states directly (Ds must equal Dt). Mean over masked positions
    and feature dims, then over pairs.
    """
    if norm not in NORMS:
        raise KdlibError(f"unknown feature norm {norm!r}; choose one of: {choices(NORMS)}")
    if not pairs:
        raise KdlibError("hidden_mse needs at least one layer pair")
    if projectors is not None and len(projectors) != len(pairs):
        raise KdlibError(f"{len(projectors)} projectors for {len(pairs)} layer pairs; build them "
                         "with make_projectors(pairs, d_student, d_teacher)")
    _check_layers(pairs, len(student_states) - 1, len(teacher_states) - 1, "hidden states")
    losses = []
    for k, (i, j) in enumerate(pairs):
        h_s, h_t = student_states[i + 1], teacher_states[j + 1]  # [B, T, Ds], [B, T, Dt]
        if projectors is not None:
            h_s = projectors[k](h_s)  # [B, T, Dt]
        if h_s.shape != h_t.shape:
            raise KdlibError(f"student features {tuple(h_s.shape)} and teacher features "
                             f"{tuple(h_t.shape)} differ for layer pair ({i}, {j}); pass projectors "
                             "that map the student's width to the teacher's")
        dtype = _compute_dtype(h_s, h_t)
        h_s, h_t = h_s.to(dtype), h_t.to(dtype)
        if norm == "layer":
            h_s, h_t = F.layer_norm(h_s, h_s.shape[-1:]), F.layer_norm(h_t, h_t.shape[-1:])
        # Written out rather than F.mse_loss: that saves the teacher tensor for
        # backward, which inference-mode teacher outputs do not allow.
        losses.append(_masked_sq_mean(h_s - h_t, mask))
    return torch.stack(losses).mean()


def attention_mse(student_attn: Sequence[Tensor], teacher_attn: Sequence[Tensor],
                  pairs: Sequence[tuple[int, int]], mask: Optional[Tensor] = None) -> Tensor:
    """Mean over layer pairs of MSE between head-averaged attention maps.

    ``attn[k]`` is block k's attention probabilities [B, H, T, T] (Hugging Face's
    ``attentions``); heads are averaged to [B, T, T], so student and teacher may
    have different head counts. ``mask`` [B, T] selects query positions. This is
    what the original study's notebook computed under the name "hidden MSE".
    """
    if not pairs:
        raise KdlibError("attention_mse needs at least one layer pair")
    _check_layers(pairs, len(student_attn), len(teacher_attn), "attention maps")
    losses = []
    for i, j in pairs:
        a_s, a_t = student_attn[i], teacher_attn[j]  # [B, Hs, T, T], [B, Ht, T, T]
        if a_s.shape[-2:] != a_t.shape[-2:] or a_s.shape[0] != a_t.shape[0]:
            raise KdlibError(f"attention maps {tuple(a_s.shape)} and {tuple(a_t.shape)} differ in "
                             f"batch or sequence length for layer pair ({i}, {j})")
        dtype = _compute_dtype(a_s, a_t)
        diff = a_s.to(dtype).mean(1) - a_t.to(dtype).mean(1)  # [B, T, T]
        losses.append(_masked_sq_mean(diff, mask))
    return torch.stack(losses).mean()
