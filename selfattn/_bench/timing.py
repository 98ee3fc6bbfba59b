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
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "median_time",
    "interleaved_samples",
    "interleaved_medians",
    "block_samples",
    "spread",
    "matmul_call",
    "matmul_gflops",
    "attention_flops",
    "peak_rss_delta",
]


def median_time(fn, *, repeat: int = 5, min_time: float = 0.0, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn()`` over ``repeat`` runs (after ``warmup`` calls).

    With ``min_time > 0`` keeps repeating until that much time was spent (for
    very short calls), still reporting the median of single calls.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_samples(
    fns: Sequence[Callable[[], object]],
    *,
    rounds: int = 5,
    warmup: int = 1,
    pause: float = 0.2,
    wake: bool = False,
    after_round: Callable[[int], object] | None = None,
) -> list[list[float]]:
    """Wall times in seconds of each callable in ``fns``, timed in alternation: one list per callable.

    Each round calls every function once, in order, so a slow spell on a
    shared machine hits all of them alike and ratios of the medians stay
    meaningful even when absolute times drift. ``pause`` seconds pass before
    each timed call: OpenBLAS's worker threads keep spinning for a while after
    a call (about 0.1 s by default), and without the pause they would steal
    cores from whatever is timed next (a Numba kernel right after
    ``numpy.matmul`` ran up to 2x slower in a test). ``pause=0`` times the
    calls back to back, as a user's loop runs them. ``warmup`` untimed calls
    of each function come first (JIT compilation, first-touch page faults).
    ``wake=True`` makes one untimed call of the same function between the
    pause and the timed call: after a pause a backend's own thread pool is
    parked and the core may have been given away, which on a 2-core machine
    made a tiny call 3-6x slower than in a loop (87 us back to back, 574 us
    right after a 0.15 s sleep, 170 us with a wake-up call first); the wake-up
    call measures the steady state of a loop without the previous function's
    threads in the way. ``after_round(i)``, if given, runs (untimed) after round ``i`` (a progress bar).
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for fn, ts in zip(fns, times, strict=True):
            if pause > 0:
                time.sleep(pause)
            if wake:
                fn()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        if after_round is not None:
            after_round(r)
    return times


def interleaved_medians(
    fns: Sequence[Callable[[], object]], *, rounds: int = 5, warmup: int = 1, pause: float = 0.2
) -> list[float]:
    """Median wall time in seconds of each callable in ``fns``, timed as :func:`interleaved_samples` does."""
    return [statistics.median(ts) for ts in interleaved_samples(fns, rounds=rounds, warmup=warmup, pause=pause)]


def block_samples(
    fns: Sequence[Callable[[], object]],
    *,
    blocks: int = 5,
    calls: int = 3,
    pause: float = 0.3,
    warmup: int = 1,
    min_time: float = 0.0,
) -> list[list[float]]:
    """Per-call wall times of each callable in ``fns``, timed in blocks: one list of block medians per callable.

    A round gives every function one block, in order: ``pause`` seconds of
    sleep (so the previous library's spinning threads -- OpenBLAS, OpenMP,
    PyTorch's pool -- have gone quiet), one untimed call (wakes this library's
    own threads), then ``calls`` calls back to back; the block's median call
    time is one sample. Libraries with their own thread pools are compared
    this way (each measured as a loop of its own calls runs) rather than
    alternating call by call, where one runtime's threads tax the next's.
    ``blocks`` rounds; ``warmup`` untimed calls of each function first. With
    ``min_time > 0`` a block keeps calling until that many seconds passed
    (at least ``calls`` calls): on a VM a core that idled through the pause
    runs the first few milliseconds slowly, which dominates short calls.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(blocks):
        for fn, ts in zip(fns, out, strict=True):
            if pause > 0:
                time.sleep(pause)
            fn()
            per: list[float] = []
            start = time.perf_counter()
            while len(per) < calls or time.perf_counter() - start < min_time:
                t0 = time.perf_counter()
                fn()
                per.append(time.perf_counter() - t0)
            ts.append(statistics.median(per))
    return out


def spread(samples: Sequence[float]) -> dict[str, float]:
    """``{"median", "p25", "p75", "min", "max"}`` of timing samples (linear-interpolated quartiles).

    With one sample every statistic is that sample; an empty sequence raises ValueError.
    """
    if not samples:
        raise ValueError("spread() needs at least one sample")
    xs = np.sort(np.asarray(samples, dtype=np.float64))
    p25, med, p75 = np.percentile(xs, [25, 50, 75])
    return {"median": float(med), "p25": float(p25), "p75": float(p75), "min": float(xs[0]), "max": float(xs[-1])}


def matmul_call(n: int = 2048, dtype=np.float32):
    """A zero-argument call of ``numpy.matmul`` on two n x n matrices, and its FLOP count."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    return (lambda: np.matmul(a, b)), 2.0 * n**3


def matmul_gflops(n: int = 2048, dtype=np.float32, repeat: int = 7) -> float:
    """This machine's practical ceiling: GFLOP/s of ``numpy.matmul`` on two n x n matrices."""
    call, flops = matmul_call(n, dtype)
    return flops / median_time(call, repeat=repeat) / 1e9


def attention_flops(
    batch: int, heads: int, n: int, m: int, d: int, dv: int | None = None, causal: bool = False
) -> float:
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


if os.name != "posix" and peak_rss_delta.__doc__:  # pragma: no cover - documented limitation
    peak_rss_delta.__doc__ += "\n\n(Not available on this platform.)"
