"""Peak memory of a piece of code: a measurement, not a timing.

On the CPU, PyTorch keeps no allocator statistics, but its profiler records
every allocation and free; replaying them in order gives the most bytes that
were live at once beyond what existed before the code started.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable

from torch.profiler import ProfilerActivity, profile

MiB = 2**20


def peak_cpu_bytes(fn: Callable[[], object]) -> int:
    """Peak extra bytes allocated by PyTorch on the CPU while ``fn()`` runs."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler's C++ side logs its start and stop to stderr
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


@contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for the block (C++ logging bypasses sys.stderr)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (a notebook kernel's is a pipe object)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
