"""Timing and argument boilerplate shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so
this folder is on the path)."""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def parser(doc: str | None, repeats: int | None = 3) -> argparse.ArgumentParser:
    """An argument parser showing the script's docstring, with `--repeats` (timed calls per variant) unless
    `repeats` is None."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats)
    return p


def add_decode_args(p: argparse.ArgumentParser, new_tokens: int) -> None:
    """The decode benchmarks' shared options: batch sizes and generated tokens per row."""
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=new_tokens)


def machine() -> str:
    """jax version, device and the load average, for a result's header line (the CPU here is shared)."""
    return f"jax {jax.__version__} on {jax.devices()[0].device_kind}; load average {os.getloadavg()[0]:.1f}"


def stream_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """GB/s at which a jitted vector-matrix product reads a `megabytes` float32 matrix (best of `repeats`):
    the fastest a decode step that reads every weight once can go here, caches and both cores included."""
    w = jnp.ones((1024, megabytes << 8), jnp.float32)
    x = jnp.ones((1, 1024), jnp.float32)
    product = jax.jit(lambda x, w: x @ w)
    product(x, w).block_until_ready()
    best = min(_seconds(lambda: product(x, w).block_until_ready()) for _ in range(repeats))
    return w.nbytes / best / 1e9


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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


def interleaved(runs: dict[str, Callable[[], object]], rounds: int
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall seconds, process CPU seconds) per call of each (blocking, already compiled) run over `rounds`
    rounds that each call every run once (A B A B ...), so that a shared machine's load slows all variants
    alike. CPU seconds (all threads) move much less with other processes' load than wall time does."""
    wall, cpu = collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(rounds):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu
