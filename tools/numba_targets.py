"""The Numba backend's performance targets, measured in one run.

``python tools/numba_targets.py [--quick] [--threads N] [--kernels auto|simd|blas|fused]
[--no-torch] [--no-compile]`` (from a checkout, with selfattn installed: ``pip install -e
'.[numba]'``; PyTorch's CPU wheel, if installed, adds the comparison rows) prints one table
(target, measured, ratio, limit, pass/fail) plus this machine's ``numpy.matmul`` GFLOP/s and the
compile/warm-cache/steady-state times. Ratios are formed from numbers measured side by side in
this process, since machines are shared.

Method: libraries with their own thread pools (OpenBLAS behind ``numpy.matmul``, the Numba
backend's workers, PyTorch's pool) are timed in *blocks* (``selfattn._bench.timing.block_samples``:
a pause, one untimed call, then calls back to back for at least 0.25 s; blocks of the compared
calls alternate), so no runtime's spinning threads tax another's measurement. Each "measured" cell
gives medians of the block medians and, in brackets, the ratio's spread (min-max over blocks).
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

from selfattn._bench.timing import attention_flops, block_samples, interleaved_medians, matmul_call, peak_rss_delta

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
    parser.add_argument(
        "--kernels", default="auto", choices=("auto", "simd", "blas", "fused"), help="the Numba kernel family to time"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison rows")
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
    nbk.kernels = args.kernels
    torch = None
    if not args.no_torch and importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(numba.get_num_threads())  # the same cores for both
    rng = np.random.default_rng(0)
    rows = []  # (target, measured, ratio, limit, ok)
    blocks = 3 if args.quick else 5
    calls = 2 if args.quick else 3

    def add(name, measured, ratio, limit, higher_is_better):
        ok = ratio >= limit if higher_is_better else ratio <= limit
        rows.append((name, measured, ratio, ("≥" if higher_is_better else "≤") + f"{limit:g}", ok))

    def fwd(q, k, v, **kw):
        pb = normalize(q, k, v, **kw)
        return lambda: nbk.forward(pb)

    def timed(*fns):
        """Block medians of each call (see the module docstring)."""
        return block_samples(list(fns), blocks=blocks, calls=calls, min_time=0.05 if args.quick else 0.25)

    def ratio_cell(a, b):
        """Median ratio a/b over blocks and its min-max, as text."""
        r = np.asarray(a) / np.asarray(b)
        return float(np.median(r)), f"[{r.min():.2f}-{r.max():.2f}]"

    mm_n = 1024 if args.quick else 2048
    mm_call, mm_flops = matmul_call(mm_n)
    mm64_call, _ = matmul_call(mm_n, np.float64)
    mm_rates = []  # every matmul timing of the run, for the ceiling quoted in the header

    # -- forward FLOP rate vs matmul (blocks), and vs the NumPy backend --------------
    fshapes = [(1, 8, 1024, 64), (1, 8, 2048, 64), (1, 8, 4096, 64), (4, 8, 1024, 128)]
    if args.quick:
        fshapes = [(1, 8, 512, 64), (1, 4, 1024, 64)]
    for b, h, n, d in fshapes:
        q, k, v = _inputs(rng, b, h, n, n, d)
        tm, t = timed(mm_call, fwd(q, k, v))
        mm_rates.extend(mm_flops / np.asarray(tm) / 1e9)
        flops = attention_flops(b, h, n, n, d)
        ratio, rng_txt = ratio_cell(flops / np.asarray(t), mm_flops / np.asarray(tm))
        gf, mm = flops / float(np.median(t)) / 1e9, mm_flops / float(np.median(tm)) / 1e9
        add(
            f"fwd f32 {b}x{h}x{n}x{d} GFLOP/s vs matmul",
            f"{gf:.1f} / {mm:.1f} GF/s ({float(np.median(t)) * 1e3:.1f} ms) {rng_txt}",
            ratio,
            0.85,
            True,
        )
        pbn = normalize(q, k, v)
        t2, tn = timed(fwd(q, k, v), lambda pbn=pbn: npk.forward(pbn))
        r, rng_txt = ratio_cell(tn, t2)
        add(
            f"fwd f32 {b}x{h}x{n}x{d} speed-up vs numpy backend",
            f"{np.median(tn) * 1e3:.1f} / {np.median(t2) * 1e3:.1f} ms {rng_txt}",
            r,
            3.0,
            True,
        )

    # -- float64 forward vs float64 matmul -----------------------------------
    b, h, n, d = (1, 4, 1024, 64) if args.quick else (1, 8, 2048, 64)
    q, k, v = _inputs(rng, b, h, n, n, d, dtype=np.float64)
    tm, t = timed(mm64_call, fwd(q, k, v))
    flops = attention_flops(b, h, n, n, d)
    ratio, rng_txt = ratio_cell(flops / np.asarray(t), mm_flops / np.asarray(tm))
    add(
        f"fwd f64 {b}x{h}x{n}x{d} GFLOP/s vs f64 matmul",
        f"{flops / np.median(t) / 1e9:.1f} / {mm_flops / np.median(tm) / 1e9:.1f} GF/s {rng_txt}",
        ratio,
        0.8,
        True,
    )

    # -- causal vs non-causal ------------------------------------------------
    for n in (1024,) if args.quick else (1024, 4096):
        q, k, v = _inputs(rng, 1, 8, n, n, 64)
        tf, tc = timed(fwd(q, k, v), fwd(q, k, v, causal=True))
        r, rng_txt = ratio_cell(tc, tf)
        add(
            f"causal 1x8x{n}x64 time / non-causal",
            f"{np.median(tc) * 1e3:.1f} / {np.median(tf) * 1e3:.1f} ms {rng_txt}",
            r,
            0.55,
            False,
        )

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
    td, tn = interleaved_medians([fwd(q, k, v), numpy_decode], rounds=3 * blocks)
    add(f"decode 1x8x1x64, M={m} vs K@q + p@V", f"{td * 1e3:.2f} / {tn * 1e3:.2f} ms", td / tn, 1.5, False)

    # -- backward vs forward -------------------------------------------------
    n = 1024 if args.quick else 2048
    q, k, v = _inputs(rng, 1, 8, n, n, 64)
    pbv = normalize(q, k, v, needs_vjp=True)
    out, lse, _ = nbk.forward(pbv)
    g = rng.standard_normal(out.shape, dtype=np.float32)
    tb, tf = timed(lambda: nbk.backward(pbv, out, lse, g), lambda: nbk.forward(pbv))
    r, rng_txt = ratio_cell(tb, tf)
    add(
        f"backward 1x8x{n}x64 time / forward",
        f"{np.median(tb) * 1e3:.1f} / {np.median(tf) * 1e3:.1f} ms {rng_txt}",
        r,
        2.5,
        False,
    )

    # -- against PyTorch's CPU scaled_dot_product_attention ---------------------
    if torch is not None:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for b, h, n, d in fshapes[:1] if args.quick else fshapes:
            q, k, v = _inputs(rng, b, h, n, n, d)
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
            for causal in (False, True):
                ours, theirs = timed(
                    fwd(q, k, v, causal=causal), lambda c=causal, a=(tq, tk, tv): sdpa(*a, is_causal=c)
                )
                r, rng_txt = ratio_cell(ours, theirs)
                add(
                    f"{'causal' if causal else 'fwd'} f32 {b}x{h}x{n}x{d} time / torch",
                    f"{np.median(ours) * 1e3:.1f} / {np.median(theirs) * 1e3:.1f} ms {rng_txt}",
                    r,
                    0.8,
                    False,
                )
            pbv = normalize(q, k, v, needs_vjp=True)
            g = np.ones((b, h, n, d), np.float32)
            tg = torch.from_numpy(g)
            tq2, tk2, tv2 = (x.clone().requires_grad_() for x in (tq, tk, tv))

            def ours_fb(pbv=pbv, g=g):
                o, ls, _ = nbk.forward(pbv)
                nbk.backward(pbv, o, ls, g)

            def torch_fb(a=(tq2, tk2, tv2), tg=tg):
                sdpa(*a).backward(tg)

            ours, theirs = timed(ours_fb, torch_fb)
            r, rng_txt = ratio_cell(ours, theirs)
            add(
                f"fwd+bwd f32 {b}x{h}x{n}x{d} time / torch",
                f"{np.median(ours) * 1e3:.1f} / {np.median(theirs) * 1e3:.1f} ms {rng_txt}",
                r,
                0.8,
                False,
            )

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
    try:
        from selfattn.backends.numba_ import _simd_isa

        isa = _simd_isa()
    except ImportError:  # a selfattn without the SIMD kernels (e.g. measuring an older commit)
        isa = "n/a"
    print(
        f"selfattn {selfattn.__version__} numba {numba.__version__}, threads={numba.get_num_threads()}, "
        f"cpus={os.cpu_count()}, kernels={args.kernels}, simd: {isa}"
        + (f", torch {torch.__version__}" if torch is not None else "")
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
