"""Where the Numba backend beats NumPy: the data behind ``numba_.WORK_RANGE`` and the thread thresholds.

    python tools/crossover.py [--rounds 15] [--layer] [--quick]

For a grid of float32 problems (tiny to large prefill, few and many heads,
decode-like calls with short and long key caches) it times, side by side and
in alternation, the NumPy backend, the Numba backend (its own thread rule) and
the automatic choice. Each round calls the three once, each after a pause
(0.15 s, longer than OpenBLAS's ~0.1 s spin after a call) and one untimed
call, as ``python -m selfattn bench`` does; with ``--layer`` each timed call
is instead preceded by a NumPy matrix product, as inside a layer. It prints
medians with the interquartile range, the faster backend, numba / numpy, the
automatic choice's time over the faster one and what it picked. The declared
work range should make the last two columns read "<= 1.05" and the faster
backend on every row -- within the noise of a shared machine (re-run a row
whose IQRs overlap).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

import selfattn
from selfattn._bench.timing import interleaved_samples, spread

SHAPES = [  # (B, Hq, Hkv, N, M, D)
    (1, 1, 1, 8, 8, 8),
    (2, 8, 8, 10, 10, 8),
    (4, 8, 8, 32, 32, 16),
    (1, 4, 4, 64, 64, 32),
    (2, 8, 8, 64, 64, 32),
    (4, 8, 8, 64, 64, 32),
    (1, 8, 8, 128, 128, 32),
    (4, 8, 8, 128, 128, 32),
    (8, 8, 8, 128, 128, 32),
    (1, 8, 8, 128, 128, 64),
    (4, 8, 8, 128, 128, 64),
    (1, 4, 4, 256, 256, 64),
    (1, 8, 2, 256, 256, 64),
    (1, 8, 8, 256, 256, 64),
    (2, 8, 8, 256, 256, 64),
    (1, 4, 4, 512, 512, 64),
    (1, 8, 2, 512, 512, 64),
    (1, 8, 8, 512, 512, 64),
    (1, 2, 2, 1024, 1024, 64),
    (1, 8, 8, 1024, 1024, 64),
    (1, 2, 2, 2048, 2048, 64),
    (1, 8, 8, 2048, 2048, 64),
    (1, 8, 8, 1, 1024, 64),
    (1, 8, 8, 1, 2048, 64),
    (1, 8, 8, 1, 4096, 64),
    (8, 8, 8, 1, 1024, 64),
    (1, 8, 8, 1, 32768, 64),
    (1, 8, 8, 4, 4096, 64),
    (1, 8, 8, 16, 4096, 64),
    (1, 8, 8, 64, 4096, 64),
]
QUICK = [(2, 8, 8, 10, 10, 8), (4, 8, 8, 64, 64, 32), (1, 4, 4, 256, 256, 64), (1, 8, 8, 1, 2048, 64)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="timed calls per backend and shape")
    ap.add_argument("--layer", action="store_true", help="precede each timed call by a NumPy matmul, no pause")
    ap.add_argument("--quick", action="store_true", help="four shapes, 3 rounds (a smoke test)")
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    x = rng.standard_normal((512, 256)).astype(np.float32)
    names = ["numpy", "numba", "auto"]
    print(
        f"{'(B, Hq, Hkv, N, M, D)':<28}{'FLOPs':>10}  "
        + "  ".join(f"{n + ' ms (IQR)':>22}" for n in names)
        + "  faster  numba/numpy  auto/faster  auto picks"
    )
    for b, hq, hkv, n, m, d in QUICK if args.quick else SHAPES:
        q = rng.standard_normal((b, hq, n, d)).astype(np.float32)
        k = rng.standard_normal((b, hkv, m, d)).astype(np.float32)
        v = rng.standard_normal((b, hkv, m, d)).astype(np.float32)

        def call(name: str | None, q=q, k=k, v=v) -> Callable[[], object]:
            def run() -> object:
                if args.layer:
                    x @ w  # a layer's projection just before attention
                return selfattn.scaled_dot_product_attention(q, k, v, backend=name)

            return run

        fns = [call("numpy"), call("numba"), call(None)]
        for f in fns:  # compile / warm up
            f()
        if args.layer:
            samples: list[list[float]] = [[] for _ in fns]
            for _ in range(rounds):
                for f, ts in zip(fns, samples, strict=True):
                    t0 = time.perf_counter()
                    f()
                    ts.append(time.perf_counter() - t0)
        else:
            samples = interleaved_samples(fns, rounds=rounds, pause=0.15, wake=True)
        med = [statistics.median(ts) * 1e3 for ts in samples]
        cells = []
        for mm, ts in zip(med, samples, strict=True):
            st = spread(ts)
            cells.append(f"{mm:8.3f} ({st['p25'] * 1e3:.2f}-{st['p75'] * 1e3:.2f})")
        faster = names[int(np.argmin(med[:2]))]
        pick = selfattn.explain(q, k, v).backend
        flops = 4.0 * b * hq * n * m * d
        print(
            f"{str((b, hq, hkv, n, m, d)):<28}{flops:>10.3g}  "
            + "  ".join(f"{c:>22}" for c in cells)
            + f"  {faster:<6}  {med[1] / med[0]:11.2f}  {med[2] / min(med[:2]):11.2f}  {pick}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
