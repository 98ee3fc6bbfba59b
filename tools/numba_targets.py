"""The Numba backend's performance targets, measured in one run.

``python tools/numba_targets.py [--quick] [--threads N]`` (from a checkout, with
selfattn installed: ``pip install -e '.[numba]'``) prints one table
(target, measured, ratio, pass/fail) plus this machine's ``numpy.matmul``
GFLOP/s and the compile/warm-cache/steady-state times. Ratios are formed from
numbers measured side by side in this process, since machines are shared.
Returns 0 when every target passes, 1 otherwise (2 when numba is missing).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

import numpy as np

from selfattn._bench.timing import attention_flops, interleaved_medians, matmul_call, peak_rss_delta

__all__ = ["main"]

_PROBE = r"""
import time, numpy as np
t0 = time.perf_counter()
import selfattn
from selfattn.backends.numba_ import backend
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 2, 64, 32)).astype(np.float32) for _ in range(3))
t1 = time.perf_counter()
out = selfattn.scaled_dot_product_attention(q, k, v, backend="numba")
t2 = time.perf_counter()
out = selfattn.scaled_dot_product_attention(q, k, v, backend="numba")
t3 = time.perf_counter()
print(f"{t2 - t1:.6f} {t3 - t2:.6f}")
"""


def _probe(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    res = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr else "probe failed")
    first, again = (float(x) for x in res.stdout.split()[-2:])
    return first, again


def _inputs(rng, b, h, n, m, d, dtype=np.float32, hkv=None):
    hkv = h if hkv is None else hkv
    q = rng.standard_normal((b, h, n, d), dtype=np.float32).astype(dtype)
    k = rng.standard_normal((b, hkv, m, d), dtype=np.float32).astype(dtype)
    v = rng.standard_normal((b, hkv, m, d), dtype=np.float32).astype(dtype)
    return q, k, v


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/numba_targets.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller shapes (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="numba thread count (default: numba's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the cold/warm compile probes")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("numba") is None:
        print("numba is not installed; pip install 'selfattn[numba]'")
        return 2
    import numba

    import selfattn
    from selfattn._problem import normalize
    from selfattn.backends.numba_ import backend as nbk
    from selfattn.backends.numpy_ import backend as npk

    if args.threads:
        numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []  # (target, measured, ratio, limit, ok, kind) ; kind '>=' or '<='

    def add(name, measured, ratio, limit, higher_is_better):
        ok = ratio >= limit if higher_is_better else ratio <= limit
        rows.append((name, measured, ratio, ("≥" if higher_is_better else "≤") + f"{limit:g}", ok))

    def fwd(q, k, v, **kw):
        pb = normalize(q, k, v, **kw)
        return lambda: nbk.forward(pb)

    mm_call, mm_flops = matmul_call(1024 if args.quick else 2048)
    mm_rates = []  # every matmul timing of the run, for the ceiling quoted in the header
    rounds = 3 if args.quick else 5

    def with_matmul(*fns):
        """Interleaved medians of ``fns``, with numpy.matmul timed in the same rounds."""
        tm, *ts = interleaved_medians([mm_call, *fns], rounds=rounds)
        mm_rates.append(mm_flops / tm / 1e9)
        return mm_flops / tm / 1e9, ts

    # -- forward FLOP rate vs matmul, and vs the NumPy backend --------------
    fshapes = [(1, 8, 1024, 64), (1, 8, 2048, 64), (1, 8, 4096, 64), (4, 8, 1024, 128)]
    if args.quick:
        fshapes = [(1, 8, 512, 64), (1, 4, 1024, 64)]
    for b, h, n, d in fshapes:
        q, k, v = _inputs(rng, b, h, n, n, d)
        f = fwd(q, k, v)
        pbn = normalize(q, k, v)
        mm, (t, tn) = with_matmul(f, lambda pbn=pbn: npk.forward(pbn))
        gf = attention_flops(b, h, n, n, d) / t / 1e9
        add(
            f"fwd f32 {b}x{h}x{n}x{d} GFLOP/s vs matmul",
            f"{gf:.1f} / {mm:.1f} GF/s ({t * 1e3:.1f} ms)",
            gf / mm,
            0.75,
            True,
        )
        add(
            f"fwd f32 {b}x{h}x{n}x{d} speed-up vs numpy backend",
            f"{tn * 1e3:.1f} / {t * 1e3:.1f} ms",
            tn / t,
            3.0,
            True,
        )

    # -- causal vs non-causal ------------------------------------------------
    n = 1024 if args.quick else 4096
    q, k, v = _inputs(rng, 1, 8, n, n, 64)
    tf, tc = interleaved_medians([fwd(q, k, v), fwd(q, k, v, causal=True)], rounds=rounds)
    add(f"causal 1x8x{n}x64 time / non-causal", f"{tc * 1e3:.1f} / {tf * 1e3:.1f} ms", tc / tf, 0.6, False)

    # -- decode vs two numpy matvecs ----------------------------------------
    m = 32768
    q, k, v = _inputs(rng, 1, 8, 1, m, 64)
    k2, v2 = k[0], v[0]
    q2 = q[0, :, 0, :]
    p = np.ones((8, m), np.float32) / m

    def numpy_decode():
        s = np.matmul(k2, q2[:, :, None])  # (8, M, 1): K @ q per head
        return s, np.matmul(p[:, None, :], v2)  # p @ V per head

    # The default pause (longer than OpenBLAS's spin) matters here too: numpy's batched
    # matmul leaves BLAS threads spinning that would halve the speed of the kernel timed next.
    td, tn = interleaved_medians([fwd(q, k, v), numpy_decode], rounds=3 * rounds)
    add(f"decode 1x8x1x64, M={m} vs K@q + p@V", f"{td * 1e3:.2f} / {tn * 1e3:.2f} ms", td / tn, 1.5, False)

    # -- backward vs forward -------------------------------------------------
    n = 1024 if args.quick else 2048
    q, k, v = _inputs(rng, 1, 8, n, n, 64)
    pbv = normalize(q, k, v, needs_vjp=True)
    out, lse, _ = nbk.forward(pbv)
    g = rng.standard_normal(out.shape, dtype=np.float32)
    tb, tf = interleaved_medians([lambda: nbk.backward(pbv, out, lse, g), lambda: nbk.forward(pbv)], rounds=rounds)
    add(f"backward 1x8x{n}x64 time / forward", f"{tb * 1e3:.1f} / {tf * 1e3:.1f} ms", tb / tf, 3.0, False)

    # -- peak memory -----------------------------------------------------------
    n = 4096 if args.quick else 16384
    q, k, v = _inputs(rng, 1, 8, n, n, 64)
    f_mem = fwd(q, k, v)
    small = fwd(*_inputs(rng, 1, 8, 64, 64, 64))
    small()
    out_bytes = q.nbytes
    peak = peak_rss_delta(f_mem)
    if peak is not None:
        extra = (peak - out_bytes) / 2**20
        add(f"forward 1x8x{n}x64 peak memory above inputs+output", f"{extra:.1f} MiB", extra, 64, False)

    # -- compile times -------------------------------------------------------
    compile_lines = []
    if not args.no_compile:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                cold, cold_again = _probe(tmp)
                warm, warm_again = _probe(tmp)
                compile_lines = [
                    f"cold compile (fresh NUMBA_CACHE_DIR, first call, new process): {cold:.2f} s",
                    f"warm cache first call (new process):                            {warm:.3f} s",
                    "steady-state call (same tiny problem, 1x2x64x32):               "
                    f"{min(cold_again, warm_again) * 1e3:.3f} ms",
                ]
            except Exception as exc:  # pragma: no cover - reporting only
                compile_lines = [f"compile probe failed: {exc}"]

    mm = float(np.median(mm_rates))
    print(
        f"selfattn {selfattn.__version__} numba {numba.__version__}, threads={numba.get_num_threads()}, "
        f"cpus={os.cpu_count()}"
    )
    print(
        f"numpy.matmul {'1024' if args.quick else '2048'}² float32: {mm:.1f} GFLOP/s "
        "(median over the run; each ratio uses the matmul timed in its own rounds)"
    )
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'target':<{w0}}  {'measured':<{w1}}  {'ratio':>7}  {'limit':>6}  result")
    for name, meas, ratio, lim, ok in rows:
        print(f"{name:<{w0}}  {meas:<{w1}}  {ratio:7.2f}  {lim:>6}  {'PASS' if ok else 'FAIL'}")
    for line in compile_lines:
        print(line)
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
