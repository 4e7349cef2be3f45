"""The strict side of configs: range checks that name the field, and the dict -> dataclass loader.

A config file's unknown key, a value of the wrong type or a value out of range
raises ``KdlibError`` naming the field (``train.lr``), so a typo never silently
falls back to a default. Each config dataclass says which section of the file
it is with a ``SECTION`` class attribute.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from typing import Any, Union

from ..errors import KdlibError, choices


def require_positive(obj, name: str) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise KdlibError(f"{obj.SECTION}.{name} must be a whole number >= 1, got {v!r}")


def require_in_range(obj, name: str, low: float, high: float, low_open=False, high_open=False) -> None:
    v = getattr(obj, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        raise KdlibError(f"{obj.SECTION}.{name} must be a finite number in {lo}, {hi}, got {v!r}")


def require_one_of(obj, name: str, valid) -> None:
    v = getattr(obj, name)
    if v not in valid:
        raise KdlibError(f"{obj.SECTION}.{name} is {v!r}; choose one of: {choices(valid)}")


def check_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to type ``hint``, or KdlibError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_value(value, arg, where)
            except KdlibError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    elif hint is dict:
        if isinstance(value, dict):
            return copy.deepcopy(value)
    else:  # pragma: no cover - a field type this loader does not know yet
        raise TypeError(f"config field type {hint!r} is not supported by the loader")
    name = getattr(hint, "__name__", str(hint))
    raise KdlibError(f"{where} must be of type {name}, got {value!r} ({type(value).__name__})")


def check_fields(cls, d: dict, where: str) -> dict:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in d.items():
        if key not in names:
            raise KdlibError(f"{where} has unknown key {key!r}; valid keys: {choices(names)}")
        out[key] = check_value(value, hints[key], f"{where}.{key}")
    return out


def build(cls, d: Any, where: str):
    if not isinstance(d, dict):
        raise KdlibError(f"{where} must be a JSON object, got {type(d).__name__}")
    return cls(**check_fields(cls, d, where))
