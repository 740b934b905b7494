"""Timing shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so this folder is on the path)."""

from __future__ import annotations

import statistics
import time


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, compilation included; median seconds of `repeats` later calls). `fn` must block
    on its result."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)
