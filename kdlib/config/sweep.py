"""Sensitivity sweeps: ``--set KEY=V1,V2,...`` over the numeric fields of the loss and train sections.

A sweep's axes are ``{"loss.temperature": (1.0, 2.0), "train.lr": (3e-4, 6e-4)}``; their product
gives the points, each a ``{key: value}`` dict that ``apply_point`` sets on one run's config and
records in its ``ExperimentConfig.sweep``, so that its config.json, its folder name and the report
all say which point it is. Values keep their field's type (an int field takes whole numbers only)
and are range-checked by the section's own ``validate``.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import KdlibError, choices
from .sections import LossConfig, TrainConfig
from .strict import check_value

SECTIONS = {"loss": LossConfig, "train": TrainConfig}
# A train field that changes how often a run saves, not what it learns: a sweep over it trains the same run.
NOT_SWEPT = ("save_every_s",)


def numeric_fields(section: str) -> dict:
    """{field: int or float} of a section's numeric fields (an Optional number counts; a bool does not)."""
    hints = typing.get_type_hints(SECTIONS[section])
    out = {}
    for f in dataclasses.fields(SECTIONS[section]):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if len(args) == 1 and args[0] in (int, float) and f.name not in NOT_SWEPT:
            out[f.name] = args[0]
    return out


def _field_type(key: str) -> type:
    """The type of a sweepable ``key`` (``loss.temperature``), or KdlibError listing the valid ones."""
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise KdlibError(f"--set {key}: a swept key is SECTION.FIELD with SECTION one of: {choices(SECTIONS)} "
                         "(e.g. loss.temperature, train.lr)")
    numeric = numeric_fields(section)
    if name not in numeric:
        all_fields = [f.name for f in dataclasses.fields(SECTIONS[section])]
        what = ("changes how often a run saves, not what it learns" if name in NOT_SWEPT
                else "is not a number (a sweep sets numbers)" if name in all_fields else "is not a field of it")
        raise KdlibError(f"--set {key}: {section}.{name} {what}; the numeric fields of {section} are: "
                         f"{choices(numeric)}")
    return numeric[name]


def _value(key: str, raw: Any) -> Any:
    """``raw`` (text from the command line, or a number) as a value of ``key``'s type, range-checked."""
    kind = _field_type(key)
    section, _, name = key.partition(".")
    if isinstance(raw, str):
        text = raw.strip()
        try:
            raw = int(text) if kind is int else float(text)
        except ValueError:
            raise KdlibError(f"--set {key}: {text!r} is not a {'whole number' if kind is int else 'number'} "
                             f"({key} is {'an int' if kind is int else 'a float'})") from None
    try:
        value = check_value(raw, kind, key)
        dataclasses.replace(SECTIONS[section](), **{name: value}).validate()
    except KdlibError as e:
        raise KdlibError(f"--set {key}={raw}: {e}") from None
    return value


def sweep_axes(axes: Mapping[str, Sequence]) -> dict:
    """``{key: values}`` checked: every key sweepable, every value of its field's type and in range,
    at least one value and none twice; the values as tuples of that type."""
    out = {}
    for key, values in axes.items():
        if not isinstance(values, (list, tuple)):
            raise KdlibError(f"sweep {key}: give its values as a list ([1, 2]), got {values!r}")
        values = [_value(key, v) for v in values]
        if not values:
            raise KdlibError(f"--set {key}: no values; give one or more, e.g. --set {key}=1,2")
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if twice:
            raise KdlibError(f"--set {key}: the value {format_value(twice[0])} is given twice; give each once")
        out[key] = tuple(values)
    return out


def parse_sets(texts: Sequence[str]) -> dict:
    """``["loss.temperature=1,2", "train.lr=3e-4"]`` (the repeatable ``--set``) -> checked axes."""
    raw = {}
    for text in texts:
        key, eq, values = text.partition("=")
        key = key.strip()
        if not eq or not key:
            raise KdlibError(f"--set {text!r}: expected KEY=V1,V2,... (e.g. --set loss.temperature=1,2)")
        if key in raw:
            raise KdlibError(f"--set {key} is given twice; give all of its values in one --set {key}=V1,V2,...")
        parts = values.split(",")
        if any(not p.strip() for p in parts) and values.strip():
            raise KdlibError(f"--set {text!r}: an empty value between commas; give V1,V2,...")
        raw[key] = [p for p in parts if p.strip()]
    return sweep_axes(raw)


def sweep_points(axes: Mapping[str, Sequence]) -> list[dict]:
    """The product of the axes, one ``{key: value}`` per point, in the order given ([{}] for none)."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def apply_point(cfg, point: Mapping[str, Any]):
    """``cfg`` (an ExperimentConfig) with ``point``'s values set and recorded in ``cfg.sweep`` (in place).

    A swept loss value is removed from the preset's per-divergence ``loss.overrides``: the sweep's
    value is then the one every experiment of the sweep computes (``cfg.loss_terms``).
    """
    for key, value in point.items():
        section, _, name = key.partition(".")
        setattr(getattr(cfg, section), name, value)
        if section == "loss":
            cfg.loss.overrides = {div: {k: v for k, v in values.items() if k != name}
                                  for div, values in cfg.loss.overrides.items()}
            cfg.loss.overrides = {div: values for div, values in cfg.loss.overrides.items() if values}
    cfg.sweep = {**cfg.sweep, **point}
    return cfg


# The loss values that act only with a component of the experiment (its spec's field); the others always act.
ACTS_WITH = {"temperature": "divergence", "w_div": "divergence", "w_feat": "feature_map", "w_cos": "cosine"}


def acts_on(key: str, spec) -> bool:
    """Whether swept ``key`` changes the run of experiment ``spec`` (``loss.temperature`` does not act on
    ``ce``, which has no divergence; every train field acts)."""
    section, _, name = key.partition(".")
    return section != "loss" or name not in ACTS_WITH or bool(getattr(spec, ACTS_WITH[name]))


def check_sweep(cfg) -> None:
    """A config's ``sweep`` record agrees with its values: each key sweepable, each value the one the
    run uses (``loss_terms`` for a loss value: a per-divergence override would hide it)."""
    if not isinstance(cfg.sweep, dict):
        raise KdlibError(f"config.sweep must be an object {{key: value}}, got {cfg.sweep!r}")
    for key, value in cfg.sweep.items():
        value = _value(key, value)
        section, _, name = key.partition(".")
        used = getattr(cfg.loss_terms if section == "loss" else cfg.train, name)
        if used != value:
            raise KdlibError(f"config.sweep records {key} = {format_value(value)}, but the run uses "
                             f"{format_value(used)}" + (" (loss.overrides sets it for this divergence)"
                                                        if section == "loss" else "")
                             + "; set the value with kdlib.config.sweep.apply_point")


def format_value(value) -> str:
    """A swept value as text, canonically: ``1`` for 1.0, ``0.0004`` for 4e-4, never an exponent."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return np.format_float_positional(float(value), trim="-")


def short_names(keys: Sequence[str]) -> dict:
    """{key: its name in labels}: the field's own name, or the whole key where two keys share it."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def point_label(point: Mapping[str, Any], sep: str = ", ") -> str:
    """``temperature=1, w_div=0.5``: a point's values, keys sorted, for the report (``sep="+"``: a run
    folder's name)."""
    names = short_names(list(point))
    return sep.join(f"{names[k]}={format_value(point[k])}" for k in sorted(point))  # one name per point
