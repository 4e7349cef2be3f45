"""Argument checks and the input conventions every loss shares.

Logits ``[..., V]`` become ``[N, V]`` row views, a mask ``[...]`` becomes
``[N]``; the maths runs in float32 (float64 stays float64); masked-out values
are zeroed without a host sync. Every error says what was wrong and what is
expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from ..errors import KdlibError, choices
from ..grid import DIVERGENCES, PARAMETRIC  # the names live with the experiment grammar



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


def _check_divergence(name: str, temperature, param) -> tuple[float, Optional[float]]:
    """(temperature, mixing weight) checked for divergence ``name``; the weight only for ``PARAMETRIC``."""
    if name not in DIVERGENCES:
        raise KdlibError(f"unknown divergence {name!r}; choose one of: {choices(DIVERGENCES)}")
    temperature = check_temperature(temperature)
    if name in PARAMETRIC:
        param = check_unit_interval(param, f"the {name} weight ({'beta' if name == 'gjsd' else 'alpha'})")
    elif param is not None:
        raise KdlibError(f"divergence {name!r} takes no parameter (got {param!r}); "
                         f"only {choices(PARAMETRIC)} do")
    return temperature, param


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _masked(values: Tensor, mask: Optional[Tensor]) -> Tensor:
    # torch.where, not values[mask]: boolean indexing syncs the host with the GPU.
    return values if mask is None else torch.where(mask, values, values.new_zeros(()))


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
        mask = mask.reshape(-1).bool()  # [N]
    return s.reshape(-1, V), (None if t is None else t.reshape(-1, V)), mask


def _check_labels(s: Tensor, labels: Tensor, ignore_index: int):
    """``[N, V]`` logits, ``[N]`` labels and the ``[N]`` mask of counted positions."""
    if labels.shape != s.shape[:-1]:
        raise KdlibError(f"labels shape {tuple(labels.shape)} must equal the logits' shape "
                         f"without the vocabulary dimension, {tuple(s.shape[:-1])}")
    s2, _, m = _flat(s, None, labels != ignore_index)
    return s2, labels.reshape(-1), m
