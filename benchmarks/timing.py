"""Interleaved timing shared by the benchmark scripts."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable


def median_times(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    min_seconds: float,
    clock: Callable[[], float] = time.perf_counter,
    slow_seconds: float | None = None,
) -> dict[str, float]:
    """Seconds per call of each function: the median of ``repeats`` rounds.

    Rounds go round robin over the functions, so a noisy machine slows every
    one alike; within a round each function loops long enough to take about
    ``min_seconds``. A function whose single call takes over ``slow_seconds``
    is timed once (a pathological peer would otherwise stall the run).
    """
    loops, samples = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        fn()  # warm up
        start = clock()
        fn()
        once = clock() - start
        if slow_seconds is not None and once > slow_seconds:
            samples[name].append(once)
        else:
            loops[name] = max(1, math.ceil(min_seconds / max(once, 1e-7)))
    for _ in range(repeats):
        for name, loop in loops.items():
            fn = fns[name]
            start = clock()
            for _ in range(loop):
                fn()
            samples[name].append((clock() - start) / loop)
    return {name: statistics.median(s) for name, s in samples.items()}
