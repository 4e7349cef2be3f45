"""The study grid: experiment names and the loss components they stand for.

An experiment name joins with ``-`` an optional feature layer map, an optional
output divergence and an optional ``cos``; ``ce`` alone is the no-KD baseline.
The study's 14 names are ``EXPERIMENTS``; the same grammar reads names beyond
the grid (``js``, ``kl-cos``, ``rkl``, ``gjsd0.3``, ``last2all-tvd-cos``).
``ce@EXP`` is the no-KD student trained for the compute of the KD experiment
``EXP`` (``ce@kl``): a step of ``EXP`` also pays a teacher forward pass, so at
equal FLOPs the student alone trains on more tokens (``optim.schedule``).
Whether the feature loss uses hidden states or attention maps is not part of
the name: it is ``LossConfig.feature`` (``parse(name, feature=...)``), so the
14 names stay the same across presets.

This module knows names only: it imports nothing of kdlib but its errors, so
``config`` (which checks names against it) and ``losses`` (which computes
them) both build on it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import KdlibError, choices

DIVERGENCES = ("kl", "rkl", "js", "tvd", "gjsd", "skl", "srkl")
# Divergences that take a mixing parameter in [0, 1], written after the name
# in experiment names (``gjsd0.3``, ``skl0.1``).
PARAMETRIC = ("gjsd", "skl", "srkl")
MAPS = ("layerwise", "last2last", "last2all")  # the feature layer maps a name can start with
FEATURES = ("hidden", "attention")  # what the feature loss compares: hidden states or attention maps

EXPERIMENTS = (
    "ce", "kl",
    "layerwise-kl", "layerwise-kl-cos", "layerwise-js", "layerwise-js-cos",
    "last2last-kl", "last2last-kl-cos", "last2last-js", "last2last-js-cos",
    "last2all-kl", "last2all-kl-cos", "last2all-js", "last2all-js-cos",
)

_PARAM_RE = re.compile(r"^(%s)(\d+(?:\.\d+)?|\.\d+)?$" % "|".join(PARAMETRIC))
_DIV_PARTS = tuple(f"{d}<w>" if d in PARAMETRIC else d for d in DIVERGENCES)
_GRAMMAR = (f"an experiment name joins with '-' an optional layer map ({choices(MAPS)}), an optional "
            f"divergence ({choices(_DIV_PARTS)}; <w> a weight in [0, 1], e.g. gjsd0.3) and an optional "
            f"'cos', or is 'ce' alone (no KD), or 'ce@EXP' (no KD, trained for the FLOPs of the KD "
            f"experiment EXP, e.g. ce@kl). The study's 14: {choices(EXPERIMENTS)}")


@dataclass(frozen=True)
class ExperimentSpec:
    """The loss components of one experiment, and what running it needs."""

    name: str  # canonical: map-divergence-cos, or ce@ + EXP's canonical name
    divergence: Optional[str] = None
    divergence_param: Optional[float] = None
    feature_map: Optional[str] = None
    feature: str = "hidden"
    cosine: bool = False
    compute_of: Optional[str] = None  # ce@EXP: the canonical name of the KD experiment whose FLOPs it trains for

    @property
    def in_grid(self) -> bool:
        return self.name in EXPERIMENTS

    @property
    def needs_teacher(self) -> bool:
        return self.divergence is not None or self.feature_map is not None or self.cosine

    @property
    def needs_hidden_states(self) -> bool:
        return self.feature_map is not None and self.feature == "hidden"

    @property
    def needs_attentions(self) -> bool:
        return self.feature_map is not None and self.feature == "attention"

    @property
    def output_only(self) -> bool:
        """Needs only the teacher's output distribution: a top-k cache can stand in for the teacher."""
        return self.divergence is not None and self.feature_map is None and not self.cosine

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _format_weight(w: float) -> str:
    return np.format_float_positional(w, trim="-")


def parse(name: str, feature: str = "hidden") -> ExperimentSpec:
    """Parse an experiment name into its loss components; ``KdlibError`` lists the valid parts."""
    if not isinstance(name, str):
        raise KdlibError(f"an experiment name must be a string, got {type(name).__name__}; {_GRAMMAR}")
    if feature not in FEATURES:
        raise KdlibError(f"unknown feature {feature!r}; choose one of: {choices(FEATURES)}")
    text = name.strip().lower()
    if text == "ce":
        return ExperimentSpec("ce", feature=feature)
    if not text:
        raise KdlibError(f"the experiment name is empty; {_GRAMMAR}")
    if "@" in text:
        return _parse_compute_of(name, text, feature)
    fmap = div = param = None
    cos = False
    for part in text.split("-"):
        if part in MAPS:
            if fmap is not None:
                raise KdlibError(f"experiment name {name!r} has two layer maps ({fmap}, {part}); "
                                 f"use one of: {choices(MAPS)}")
            fmap = part
            continue
        if part == "cos":
            if cos:
                raise KdlibError(f"experiment name {name!r} says 'cos' twice")
            cos = True
            continue
        m = _PARAM_RE.match(part)
        if part in DIVERGENCES or m:
            if div is not None:
                raise KdlibError(f"experiment name {name!r} has two divergences ({div}, {part}); "
                                 f"use one of: {choices(_DIV_PARTS)}")
            if m:
                if m.group(2) is None:
                    raise KdlibError(f"divergence {part!r} in {name!r} needs a weight in [0, 1] after "
                                     f"its name, e.g. {part}0.3")
                param = float(m.group(2))
                if not 0.0 <= param <= 1.0:
                    raise KdlibError(f"the {m.group(1)} weight in {name!r} must be in [0, 1], got {param:g}")
                part = m.group(1)
            div = part
            continue
        if part == "ce":
            raise KdlibError(f"'ce' in {name!r}: 'ce' (no KD) stands alone; every experiment already "
                             "includes the CE term")
        raise KdlibError(f"unknown part {part!r} in experiment name {name!r}; {_GRAMMAR}")
    canonical = "-".join(p for p in (
        fmap, None if div is None else div + ("" if param is None else _format_weight(param)),
        "cos" if cos else None) if p)
    return ExperimentSpec(canonical, div, param, fmap, feature, cos)


def _parse_compute_of(name: str, text: str, feature: str) -> ExperimentSpec:
    """``ce@EXP``: the no-KD student at the FLOPs of the KD experiment ``EXP`` (see ``parse``)."""
    head, _, exp = text.partition("@")
    if "@" in exp:
        raise KdlibError(f"experiment name {name!r} has more than one '@'; write ce@EXP, e.g. ce@kl")
    if head != "ce":
        raise KdlibError(f"experiment name {name!r}: only 'ce' (no KD) can train at another experiment's "
                         f"compute, got {head or 'nothing'!r} before '@'; write ce@EXP, e.g. ce@kl")
    if not exp:
        raise KdlibError(f"experiment name {name!r} names no experiment after '@'; write ce@EXP, e.g. ce@kl")
    try:
        target = parse(exp, feature)
    except KdlibError as e:
        raise KdlibError(f"in experiment name {name!r}, after '@': {e}") from None
    if not target.needs_teacher:
        raise KdlibError(f"experiment name {name!r}: {target.name!r} is not a KD experiment, so ce@{target.name} "
                         "would be 'ce' itself; name a KD experiment after '@', e.g. ce@kl")
    return ExperimentSpec(f"ce@{target.name}", feature=feature, compute_of=target.name)


def specs(feature: str = "hidden") -> list[ExperimentSpec]:
    """The study's 14 experiments, in order."""
    return [parse(n, feature) for n in EXPERIMENTS]
