"""Feature losses: hidden states and attention maps, student layer against teacher layer.

A layer map (``layer_pairs``) says which student block is compared with which
teacher block; ``hidden_mse`` compares hidden states through learned
projectors (``make_projectors``), ``attention_mse`` head-averaged attention
maps. Shapes: ``[B, T, D]`` for states, ``[B, H, T, T]`` for attention maps
(T = sequence length), masks ``[B, T]``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KdlibError, choices
from .checks import _compute_dtype, _masked

LAYER_MAPS = ("layerwise", "last2last", "last2all", "study")
NORMS = ("layer", "none")


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
