"""Which of kdlib's requirements this Python lacks: what the notebooks' install cell installs.

The install cell installs kdlib alone (``pip install --no-deps``), so that
Colab's torch, transformers, datasets and ipywidgets are never replaced, and
then installs only what ``missing()`` names (on Colab: nothing). Standard
library only: it runs before kdlib's requirements are known to be there.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Optional

_SPEC = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*$")


def _release(version: str) -> tuple:
    """The numeric release of a version string: "2.6.0+cu124" -> (2, 6, 0); "4.53.0.dev0" -> (4, 53, 0)."""
    parts = []
    for piece in re.split(r"[.+-]", version):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def _at_least(installed: str, minimum: str) -> bool:
    try:
        from packaging.version import Version

        return Version(installed) >= Version(minimum)
    except Exception:  # no packaging, or a version it cannot read: compare the numeric releases
        return _release(installed) >= _release(minimum)


def requirements(dist: str = "kdlib") -> list[tuple[str, Optional[str]]]:
    """(name, minimum version or None) for each of ``dist``'s unconditional requirements."""
    found = []
    for req in metadata.requires(dist) or []:
        if ";" in req:  # an extra's requirement (`; extra == "test"`) or a marker: not needed to run
            continue
        m = _SPEC.match(req)
        if m:
            found.append((m.group(1), m.group(2)))
    return found


def missing(dist: str = "kdlib") -> list[str]:
    """The requirements of ``dist`` that are not installed, or older than it needs, as pip specs."""
    out = []
    for name, minimum in requirements(dist):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(f"{name}>={minimum}" if minimum else name)
            continue
        if minimum and not _at_least(installed, minimum):
            out.append(f"{name}>={minimum}")
    return out
