"""The chunk engine: a masked mean over rows, ``chunk_size`` rows at a time, its gradient made in forward.

Over V = 50,257 and thousands of positions, each ``[N, V]`` float32 temporary
is hundreds of MB. ``_RowMean`` processes a chunk of positions at a time and
computes each chunk's gradient as soon as its forward is done. Its only
full-size allocation is the gradient itself (one ``[N, V]`` tensor in the
input's dtype; float32 for float16 input), and nothing is recomputed.
``chunk_size=None`` runs the same row formulas densely through plain
autograd: the reference the chunked path is tested against.

The engine knows nothing about the formulas: a loss hands it ``rows_fn``, a
function of row-slices of its tensors that returns ``[n, k]`` per-row terms.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..errors import KdlibError
from .checks import _compute_dtype, _masked

ChunkSize = Union[int, str, None]
AUTO = "auto"
# Elements in one [rows, V] temporary of a chunk: 2**22 float32 = 16 MiB (83
# rows at V = 50,257). A chunk keeps up to ~10 such temporaries alive (JS), so
# they add under 10% to the one [8192, V] gradient buffer that must be held.
_CHUNK_ELEMENTS = 2**22


def _chunk_rows(chunk_size: ChunkSize, V: int) -> Optional[int]:
    """Rows per chunk: None (dense), ``2**22 // V`` for ``"auto"``, or the given integer."""
    if chunk_size is None:
        return None
    if chunk_size == AUTO:
        return max(1, _CHUNK_ELEMENTS // max(V, 1))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise KdlibError(f"chunk_size must be 'auto', None (dense) or an integer >= 1, got {chunk_size!r}")
    return chunk_size


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

