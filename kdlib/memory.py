"""Peak memory of a piece of code: a measurement, not a timing.

On the CPU, PyTorch keeps no allocator statistics, but its profiler records
every allocation and free; replaying them in order gives the most bytes that
were live at once beyond what existed before the code started.
"""

from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile

MiB = 2**20


def peak_cpu_bytes(fn: Callable[[], object]) -> int:
    """Peak extra bytes allocated by PyTorch on the CPU while ``fn()`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak
