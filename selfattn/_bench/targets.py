"""The Numba backend's performance targets, measured in one run.

``python -m selfattn._bench.targets [--quick] [--threads N]`` prints one table
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
import time

import numpy as np

from .timing import attention_flops, matmul_gflops, median_time, peak_rss_delta

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
    parser = argparse.ArgumentParser(prog="python -m selfattn._bench.targets", description=__doc__.split("\n\n")[0])
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
    rep = 2 if args.quick else 3
    rng = np.random.default_rng(0)
    rows = []  # (target, measured, ratio, limit, ok, kind) ; kind '>=' or '<='

    def add(name, measured, ratio, limit, higher_is_better):
        ok = ratio >= limit if higher_is_better else ratio <= limit
        rows.append((name, measured, ratio, ("≥" if higher_is_better else "≤") + f"{limit:g}", ok))

    def fwd(q, k, v, **kw):
        pb = normalize(q, k, v, **kw)
        return lambda: nbk.forward(pb)

    def matmul_now():
        return matmul_gflops(1024 if args.quick else 2048, repeat=3 if args.quick else 5)

    # -- forward FLOP rate vs matmul, and vs the NumPy backend --------------
    gf_all = []
    fshapes = [(1, 8, 1024, 64), (1, 8, 2048, 64), (1, 8, 4096, 64), (4, 8, 1024, 128)]
    if args.quick:
        fshapes = [(1, 8, 512, 64), (1, 4, 1024, 64)]
    for (b, h, n, d) in fshapes:
        q, k, v = _inputs(rng, b, h, n, n, d)
        f = fwd(q, k, v)
        f()  # compile / warm
        mm = matmul_now()
        t = median_time(f, repeat=rep)
        mm = (mm + matmul_now()) / 2
        gf = attention_flops(b, h, n, n, d) / t / 1e9
        gf_all.append(mm)
        add(f"fwd f32 {b}x{h}x{n}x{d} GFLOP/s vs matmul", f"{gf:.1f} GF/s ({t * 1e3:.1f} ms)", gf / mm, 0.75, True)
        if n <= 2048 or not args.quick:
            pbn = normalize(q, k, v)
            tn = median_time(lambda: npk.forward(pbn), repeat=2, warmup=0)
            t2 = median_time(f, repeat=rep)
            add(f"fwd f32 {b}x{h}x{n}x{d} speed-up vs numpy backend", f"{tn * 1e3:.1f} / {t2 * 1e3:.1f} ms", tn / t2, 3.0, True)

    # -- causal vs non-causal ------------------------------------------------
    n = 1024 if args.quick else 4096
    q, k, v = _inputs(rng, 1, 8, n, n, 64)
    f_full, f_causal = fwd(q, k, v), fwd(q, k, v, causal=True)
    f_causal()
    tf = median_time(f_full, repeat=rep)
    tc = median_time(f_causal, repeat=rep)
    add(f"causal 1x8x{n}x64 time / non-causal", f"{tc * 1e3:.1f} / {tf * 1e3:.1f} ms", tc / tf, 0.6, False)

    # -- decode vs two numpy matvecs ----------------------------------------
    m = 32768
    q, k, v = _inputs(rng, 1, 8, 1, m, 64)
    f_dec = fwd(q, k, v)
    f_dec()
    k2, v2 = k[0], v[0]
    q2 = q[0, :, 0, :]
    p = np.ones((8, m), np.float32) / m

    def numpy_decode():
        s = np.matmul(k2, q2[:, :, None])  # (8, M, 1): K @ q per head
        return np.matmul(p[:, None, :], v2)  # p @ V per head

    tn = median_time(numpy_decode, repeat=rep * 4, min_time=0.2)
    td = median_time(f_dec, repeat=rep * 4, min_time=0.2)
    add(f"decode 1x8x1x64, M={m} vs K@q + p@V", f"{td * 1e3:.2f} / {tn * 1e3:.2f} ms", td / tn, 1.5, False)

    # -- backward vs forward -------------------------------------------------
    n = 1024 if args.quick else 2048
    q, k, v = _inputs(rng, 1, 8, n, n, 64)
    pbv = normalize(q, k, v, needs_vjp=True)
    out, lse, _ = nbk.forward(pbv)
    g = rng.standard_normal(out.shape, dtype=np.float32)
    nbk.backward(pbv, out, lse, g)
    tb = median_time(lambda: nbk.backward(pbv, out, lse, g), repeat=rep)
    tf = median_time(lambda: nbk.forward(pbv), repeat=rep)
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
                    f"steady-state call (same tiny problem, 1x2x64x32):               {min(cold_again, warm_again) * 1e3:.3f} ms",
                ]
            except Exception as exc:  # pragma: no cover - reporting only
                compile_lines = [f"compile probe failed: {exc}"]

    mm = float(np.median(gf_all))
    print(f"selfattn {selfattn.__version__} numba {numba.__version__}, threads={numba.get_num_threads()}, "
          f"cpus={os.cpu_count()}")
    print(f"numpy.matmul {'1024' if args.quick else '2048'}² float32: {mm:.1f} GFLOP/s (median of the side-by-side runs)")
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
