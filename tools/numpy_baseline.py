"""The NumPy backend against the two matrix products alone.

``python tools/numpy_baseline.py`` (from a checkout, with selfattn installed)
times, side by side in one process, the NumPy backend's forward pass and the
bare ``Q @ K.T`` plus ``P @ V`` products it cannot avoid (per head, on the same
arrays, materialized), and prints the ratio. The core issue's target is a ratio of at most 2 on a long sequence.
"""

from __future__ import annotations

import argparse

import numpy as np

import selfattn
from selfattn._bench.timing import interleaved_medians


def measure(batch=1, heads=8, n=4096, d=64, dtype="float32", causal=False, repeat=5):
    """Return ``(backend_seconds, two_matmul_seconds)`` medians for one shape."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((batch, heads, n, d)).astype(dtype) for _ in range(3))

    def matmuls():
        # One head at a time, like the blocked backend, so both see the same cache behaviour.
        for b in range(batch):
            for h in range(heads):
                s = q[b, h] @ k[b, h].T
                s @ v[b, h]

    def backend():
        selfattn.scaled_dot_product_attention(q, k, v, causal=causal, backend="numpy")

    # Interleaved so that load from other processes hits both alike.
    t_mm, t_be = interleaved_medians([matmuls, backend], rounds=repeat, warmup=0)
    return t_be, t_mm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/numpy_baseline.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    t_be, t_mm = measure(heads=args.heads, n=args.n, d=args.d, repeat=args.repeat)
    print(
        f"shape (1,{args.heads},{args.n},{args.d}) float32: numpy backend {t_be * 1e3:.4g} ms, "
        f"QK^T + PV alone {t_mm * 1e3:.4g} ms, ratio {t_be / t_mm:.2f} (target <= 2)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
