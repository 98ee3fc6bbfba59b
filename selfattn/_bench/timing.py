"""Timing and memory helpers for benchmarks (not used by the library itself).

All timings are wall-clock medians of repeated calls after a warm-up call, so
JIT compilation and first-touch costs are excluded. Ratios should be formed
from numbers measured in the same process, side by side, because the machines
are shared and noisy.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

__all__ = ["median_time", "matmul_gflops", "attention_flops", "peak_rss_delta"]


def median_time(fn, *, repeat: int = 5, min_time: float = 0.0, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn()`` over ``repeat`` runs (after ``warmup`` calls).

    With ``min_time > 0`` keeps repeating until that much time was spent (for
    very short calls), still reporting the median of single calls.
    """
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(n: int = 2048, dtype=np.float32, repeat: int = 7) -> float:
    """This machine's practical ceiling: GFLOP/s of ``numpy.matmul`` on two n x n matrices."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    t = median_time(lambda: np.matmul(a, b), repeat=repeat)
    return 2.0 * n ** 3 / t / 1e9


def attention_flops(batch: int, heads: int, n: int, m: int, d: int, dv: int | None = None, causal: bool = False) -> float:
    """Forward FLOPs of attention: ``2·B·H·N·M·(D + Dv)`` (= 4·B·H·N·M·D), halved for causal."""
    dv = d if dv is None else dv
    flops = 2.0 * batch * heads * n * m * (d + dv)
    return flops / 2.0 if causal else flops


def _read_status_kib(field: str) -> int | None:
    """A ``VmHWM``/``VmRSS``-style field of /proc/self/status in KiB (None where unavailable)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_delta(fn) -> float | None:
    """Peak resident memory (bytes) that ``fn()`` adds above the current RSS, or None if unmeasurable.

    Resets the kernel's high-water mark through ``/proc/self/clear_refs`` (Linux)
    so allocations made by compiled code (Numba's runtime, BLAS) are counted
    too, which ``tracemalloc`` would miss. Returns None on other systems.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    base = _read_status_kib("VmRSS")
    result = fn()
    peak = _read_status_kib("VmHWM")
    del result
    if base is None or peak is None:
        return None
    return max(0, peak - base) * 1024.0


if os.name != "posix":  # pragma: no cover - documented limitation
    peak_rss_delta.__doc__ += "\n\n(Not available on this platform.)"
