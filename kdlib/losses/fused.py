"""CE + divergence + cosine in one chunked pass: what an experiment's objective runs.

Each term equals its own function (``cross_entropy``, ``divergence`` or
``sparse_divergence``, ``cosine_loss``); run together they share one chunk
loop and one ``[N, V]`` gradient buffer instead of one per term. With
``compile=True`` the per-chunk formulas go through ``torch.compile``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from ..errors import KdlibError
from .checks import _check_divergence, _check_labels, _flat, check_unit_interval
from .chunked import AUTO, ChunkSize, _row_means
from .divergences import _ce_rows, _cosine_rows, _divergence_rows
from .sparse import TopKTargets, _sparse_rows, _sparse_tensors


def output_losses(s: Tensor, labels: Tensor, teacher: Union[Tensor, TopKTargets, None] = None, *,
                  w_ce: float = 1.0, divergence: Optional[str] = None, w_div: float = 1.0,
                  temperature: float = 1.0, param: Optional[float] = None, cosine: bool = False,
                  w_cos: float = 1.0, label_smoothing: float = 0.0, ignore_index: int = -100,
                  chunk_size: ChunkSize = AUTO, compile: bool = False) -> tuple[Tensor, dict]:
    """The vocabulary-sized losses of one experiment, fused: one chunked pass, one gradient buffer.

    Args:
        s: student logits [..., V].
        labels: [...]; ``ignore_index`` = not counted, for every term.
        teacher: its logits [..., V], a ``TopKTargets`` (the cache; sparse divergence, no cosine)
            or None (CE only).
        w_ce, w_div, w_cos: the terms' weights.
        divergence, temperature, param: as ``divergence``; None = no divergence term.
        cosine: add the cosine term (needs the teacher's logits).
        label_smoothing, ignore_index: as ``cross_entropy``.
        chunk_size: rows per chunk, ``"auto"``, or None (dense).
        compile: run the per-chunk formulas through ``torch.compile``, which fuses their passes
            over the vocabulary (compiled once per configuration; chunked path only).

    Returns ``(total, parts)``: ``w_ce·CE + w_div·τ²·D + w_cos·(1 − cos)`` with a gradient, and
    the unweighted terms, detached, named ``ce``, the divergence's name and ``cos``.
    """
    smoothing = check_unit_interval(label_smoothing, "label_smoothing")
    s2, y, m = _check_labels(s, labels, ignore_index)  # [N, V], [N], [N]
    if (divergence is not None or cosine) and teacher is None:
        raise KdlibError("a divergence or the cosine loss needs the teacher's outputs; none were given")
    sparse = isinstance(teacher, TopKTargets)
    if sparse and cosine:
        raise KdlibError("the cosine loss needs the teacher's logits; a top-k cache has only its top-k")
    teacher_tensors = _teacher_rows(s, teacher)
    names, weights = ["ce"], [w_ce]
    if divergence is None:
        temperature = None  # no divergence term: the temperature is unused (and not checked)
    else:
        temperature, param = _check_divergence(divergence, temperature, param)
        names.append(divergence)
        weights.append(w_div)
    if cosine:
        names.append("cos")
        weights.append(w_cos)
    terms = _Terms(smoothing, divergence, temperature, param, sparse, len(teacher_tensors), cosine)
    # Compiled on the chunked path only: the dense one is the plain-autograd reference.
    rows_fn = _compiled_output_rows(terms) if compile and chunk_size is not None else _output_rows(terms)
    total, means = _row_means(rows_fn, weights, [s2, y, *teacher_tensors], m, chunk_size)
    return total, dict(zip(names, means.unbind()))


def _teacher_rows(s: Tensor, teacher: Union[Tensor, TopKTargets, None]) -> list[Tensor]:
    """The teacher's tensors as rows next to ``[N, V]`` student logits: [t [N, V]], the cache's, or []."""
    if isinstance(teacher, TopKTargets):
        return _sparse_tensors(s, teacher.log_probs, teacher.ids, teacher.log_tail)
    if teacher is not None:
        return [_flat(s, teacher, None)[1]]
    return []


class _Terms(NamedTuple):
    """One configuration of ``output_losses``' terms (checked), the key of its compiled formula."""

    smoothing: float
    divergence: Optional[str]
    temperature: Optional[float]  # None without a divergence
    param: Optional[float]
    sparse: bool  # the teacher is a top-k cache
    n_teacher: int  # teacher tensors per row: 1 (logits), 2 or 3 (cache), 0 (none)
    cosine: bool


def _output_rows(terms: _Terms):
    """The per-row [n, terms] formula of ``output_losses``; its tensors: s, labels, then the teacher's."""
    where = list(range(2, 2 + terms.n_teacher))
    fns = [(_ce_rows(terms.smoothing), [0, 1])]
    if terms.divergence is not None:
        formula = _sparse_rows if terms.sparse else _divergence_rows
        rows = formula(terms.divergence, terms.temperature, terms.param)
        scale = terms.temperature * terms.temperature
        fns.append((lambda *xs, rows=rows, scale=scale: scale * rows(*xs), [0, *where]))
    if terms.cosine:
        fns.append((_cosine_rows, [0, 2]))

    def rows_fn(*xs: Tensor) -> Tensor:
        return torch.stack([fn(*[xs[i] for i in idx]) for fn, idx in fns], dim=-1)  # [n, terms]

    return rows_fn


# Every configuration compiles the same code object (``_output_rows``' inner function), and
# torch.compile keeps at most ``recompile_limit`` (8 by default) versions per code object
# before it falls back to eager: a sweep over the 14 experiments needs more.
_RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=None)
def _compiled_output_rows(terms: _Terms):
    # One compiled wrapper per configuration, kept for the process. Dynamic shapes: the last
    # chunk of a batch is shorter.
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, and torch < 2.7's
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), _RECOMPILE_LIMIT))
    compiled = torch.compile(_output_rows(terms), dynamic=True)

    def rows_fn(*xs: Tensor) -> Tensor:
        # A compiled graph saves its inputs for backward, which inference-mode tensors (an
        # online teacher's logits) refuse: their chunk is copied (a [chunk, V] copy).
        return compiled(*[x.clone() if x.is_inference() else x for x in xs])

    return rows_fn
