"""Fault injection for the resilience tests: kill this process at a named point.

``KDLIB_KILL_AT=point:n`` (for example ``step:5``, ``eval:2``, ``write:3``,
``cache:2``) sends SIGKILL to the process the n-th time execution reaches
``point``. Unset (always, outside tests) it costs one dictionary lookup.
Points: ``step`` (after an optimizer step, before its metrics line),
``eval`` (during an evaluation, before its checkpoint), ``write`` (inside an
atomic write, after the temporary file is complete and before the rename),
``cache`` (after a cache chunk's arrays are written, before its manifest).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_reached: Counter = Counter()


def point(name: str) -> None:
    spec = os.environ.get("KDLIB_KILL_AT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _reached[name] += 1
    if _reached[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
