"""Where the Numba backend starts to beat NumPy: the data behind ``numba_.MIN_FLOPS`` and ``FLOPS_PER_THREAD``.

    python tools/crossover.py [--rounds 15]

For a grid of small and mid-sized float32 problems it times, side by side and
in alternation, the NumPy backend, the Numba backend inline (one thread) and
the Numba backend with every thread, each preceded by a NumPy matrix product
as in a layer (the user's experience: OpenBLAS's workers are still spinning
when attention starts). Prints the medians, p10-p90 and the FLOPs of each
problem; the work range the Numba backend declares is the smallest FLOP count
from which it is never slower than NumPy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import selfattn
from selfattn.backends import numba_

SHAPES = [  # (B, H, N, M, D)
    (1, 1, 8, 8, 8),
    (2, 8, 10, 10, 8),
    (1, 2, 16, 16, 16),
    (4, 8, 32, 32, 16),
    (1, 4, 64, 64, 32),
    (2, 8, 64, 64, 32),
    (1, 8, 128, 128, 32),
    (4, 8, 64, 64, 32),
    (8, 8, 128, 128, 32),
    (1, 8, 256, 256, 64),
    (1, 8, 1, 1024, 64),
    (1, 8, 1, 4096, 64),
    (4, 8, 128, 128, 64),
    (1, 8, 512, 512, 64),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    x = rng.standard_normal((512, 256)).astype(np.float32)
    inline = numba_.NumbaBackend()
    print(f"{'shape':<24}{'FLOPs':>10}  {'numpy ms':>14}  {'numba-1 ms':>14}  {'numba ms':>14}  best")
    for b, h, n, m, d in SHAPES:
        q = rng.standard_normal((b, h, n, d)).astype(np.float32)
        k = rng.standard_normal((b, h, m, d)).astype(np.float32)
        pb = selfattn._problem.normalize(q, k, k)
        calls = {
            "numpy": lambda: selfattn.scaled_dot_product_attention(q, k, k, backend="numpy"),
            "numba-1": lambda: _one_thread(inline, pb),
            "numba": lambda: selfattn.scaled_dot_product_attention(q, k, k, backend="numba"),
        }
        for f in calls.values():
            f()
        times = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, f in calls.items():
                x @ w  # a layer's projection just before attention
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
        cells = []
        for name in calls:
            ts = times[name]
            cells.append(
                f"{statistics.median(ts) * 1e3:7.3f} ({np.percentile(ts, 10) * 1e3:.2f}-"
                f"{np.percentile(ts, 90) * 1e3:.2f})"
            )
        best = min(calls, key=lambda nm: statistics.median(times[nm]))
        print(f"{str((b, h, n, m, d)):<24}{pb.flops:>10.3g}  " + "  ".join(f"{c:>14}" for c in cells) + f"  {best}")


def _one_thread(be, pb):
    with numba_.thread_budget(1):
        return be.forward(pb)


if __name__ == "__main__":
    main()
