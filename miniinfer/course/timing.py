"""Wall-clock timing for the chapters' measurement cells (CPU; on a GPU, synchronise inside ``fn``).

One warm-up call (first-call costs: allocation, lazy imports, kernel builds), then ``repeat`` timed
calls. The median is the typical cost; the minimum is the least disturbed run on a shared machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def call_times(fn: Callable[[], object], repeat: int = 7) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn``, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], repeat: int = 7) -> float:
    return statistics.median(call_times(fn, repeat))


def median_ms(fn: Callable[[], object], repeat: int = 7) -> float:
    return 1e3 * median_seconds(fn, repeat)


def best_ms(fn: Callable[[], object], repeat: int = 7) -> float:
    """The fastest of ``repeat`` runs, in ms: on a shared machine, the least disturbed one."""
    return 1e3 * min(call_times(fn, repeat))
