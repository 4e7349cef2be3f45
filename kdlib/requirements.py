"""Which of kdlib's requirements this Python lacks: what the notebooks' install cell installs.

The install cell installs kdlib alone (``pip install --no-deps``), so that
Colab's torch, transformers, datasets and ipywidgets are never replaced, and
then installs only what ``missing()`` names (on Colab: nothing). The list is
pyproject.toml's ``[project] dependencies`` (the only one), read from the
installed package's metadata. Standard library only: it runs before kdlib's
requirements are known to be there.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Optional

_SPEC = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*$")
_NAME = re.compile(r"^\s*([A-Za-z0-9_.-]+)")


def _release(version: str) -> tuple[tuple, bool]:
    """(the numeric release, whether a pre-release, dev or rc part follows it) of a version string:
    "2.6.0+cu124" -> ((2, 6, 0), False); "4.53.0.dev0" -> ((4, 53, 0), True); "0.19.1rc1" ->
    ((0, 19, 1), True). A local part (+cu124) is not a pre-release."""
    public = version.split("+", 1)[0]
    m = re.match(r"^v?(\d+(?:\.\d+)*)(.*)$", public.strip())
    if not m:
        return (), True
    release = tuple(int(p) for p in m.group(1).split("."))
    rest = m.group(2).lower()
    return release, bool(rest) and not rest.startswith((".post", "post", "-post"))


def _at_least(installed: str, minimum: str) -> bool:
    """pip's rule without pip: a release >= the minimum; a pre-release or dev build of the minimum
    itself (4.53.0.dev0 for >= 4.53) is older than it."""
    try:
        from packaging.version import InvalidVersion, Version

        try:
            return Version(installed) >= Version(minimum)
        except InvalidVersion:
            pass
    except ImportError:
        pass
    (have, pre), (need, _) = _release(installed), _release(minimum)
    width = max(len(have), len(need))
    have, need = have + (0,) * (width - len(have)), need + (0,) * (width - len(need))
    return have > need or (have == need and not pre)


def requirements(dist: str = "kdlib") -> list[tuple[str, Optional[str], str]]:
    """(name, minimum version or None, the requirement as written) for each of ``dist``'s
    unconditional requirements. A spec other than ``name`` or ``name>=X`` (kdlib writes none) keeps
    its name, so that at least its absence is seen, and no minimum."""
    found = []
    for req in metadata.requires(dist) or []:
        if ";" in req:  # an extra's requirement (`; extra == "test"`) or a marker: not needed to run
            continue
        m = _SPEC.match(req) or _NAME.match(req)
        if m:
            found.append((m.group(1), m.group(2) if m.re is _SPEC else None, req.strip()))
    return found


def missing(dist: str = "kdlib") -> list[str]:
    """The requirements of ``dist`` that are not installed, or older than it needs, as pip specs."""
    out = []
    for name, minimum, spec in requirements(dist):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(spec)
            continue
        if minimum and not _at_least(installed, minimum):
            out.append(spec)
    return out
