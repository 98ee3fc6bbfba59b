"""Benchmark the CuPy backend against PyTorch's scaled_dot_product_attention on one GPU.

Usage (on a machine with an NVIDIA GPU, cupy and torch with CUDA)::

    python -m selfattn.backends._cuda.bench_gpu [--out gpu-bench.md] [--repeat 20]

Shapes (B, H, N, D) = (4, 16, 4096, 64) and (4, 16, 4096, 128), float16 and
float32, causal and not, forward and forward+backward. TFLOP/s count the
matmul FLOPs of exact attention (4·B·H·N·M·D forward, 2.5x that for the
backward; halved for causal). float16 forwards are timed twice: on the
tensor-core kernel (the default on sm_80+) and on the CUDA-core kernel
(``CupyBackend.tensor_cores = False``), to show what the tensor cores give.
"extra MiB" is the device memory the forward allocates beyond its output
(O(N) means it stays small as N grows). A float16 decode shape (one query row,
M = 32768 keys) times the path the backend picks beside the fused kernel.
Writes a markdown table and prints it.
"""

from __future__ import annotations

import argparse
import sys


def _flops(b, h, n, d, causal, bwd):
    f = 4.0 * b * h * n * n * d
    if bwd:
        f *= 3.5  # forward (1) + backward (2.5)
    return f / 2 if causal else f


def _time_cupy(cupy, fn, repeat):
    fn()
    cupy.cuda.Device().synchronize()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeat):
        fn()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / repeat


def _time_torch(torch, fn, repeat):
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1e3 / repeat


def _extra_mib(cupy, fn):
    """Device memory a call takes from CuPy's pool beyond what its result keeps, in MiB."""
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    before = pool.used_bytes()
    res = fn()
    cupy.cuda.Device().synchronize()
    kept = sum(x.nbytes for x in (res if isinstance(res, tuple) else (res,)) if hasattr(x, "nbytes"))
    return (pool.total_bytes() - before - kept) / 2**20


def _torch():
    """``(torch, torch.nn.functional)`` when PyTorch with CUDA is installed, else ``(None, None)``."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None, None
    return (torch, F) if torch.cuda.is_available() else (None, None)


def run(shapes, dtypes, repeat):
    """Rows of the table for ``shapes`` ``(B, H, N, D)`` x ``dtypes`` x causal or not (see the module docstring)."""
    import cupy
    import selfattn
    from selfattn.backends.cupy_ import backend as cupy_backend

    torch, F = _torch()
    has_torch = torch is not None
    rows = []
    for (b, h, n, d) in shapes:
        for dt in dtypes:
            for causal in (False, True):
                rng = cupy.random.default_rng(0)
                q, k, v = (rng.standard_normal((b, h, n, d), dtype=cupy.float32).astype(dt) for _ in range(3))
                g = rng.standard_normal((b, h, n, d), dtype=cupy.float32).astype(dt)

                def fwd():
                    return selfattn.scaled_dot_product_attention(q, k, v, causal=causal, backend="cupy")

                def fwdbwd():
                    _, back = selfattn.scaled_dot_product_attention_vjp(q, k, v, causal=causal, backend="cupy")
                    return back(g)

                t_f = _time_cupy(cupy, fwd, repeat)
                t_fb = _time_cupy(cupy, fwdbwd, max(1, repeat // 2))
                mem = _extra_mib(cupy, fwd)
                t_core = None
                if cupy.dtype(dt) == cupy.float16:
                    cupy_backend.tensor_cores = False
                    try:
                        t_core = _time_cupy(cupy, fwd, repeat)
                    finally:
                        cupy_backend.tensor_cores = True
                tt_f = tt_fb = None
                if has_torch:
                    tq, tk, tv, tg = (torch.as_tensor(x, device="cuda") for x in (q, k, v, g))
                    tq.requires_grad_(); tk.requires_grad_(); tv.requires_grad_()

                    def tfwd():
                        with torch.no_grad():
                            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

                    def tfwdbwd():
                        o = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                        return torch.autograd.grad(o, (tq, tk, tv), tg)

                    tt_f = _time_torch(torch, tfwd, repeat)
                    tt_fb = _time_torch(torch, tfwdbwd, max(1, repeat // 2))
                passes = [("fwd", t_f, tt_f, False), ("fwd+bwd", t_fb, tt_fb, True)]
                if t_core is not None:
                    passes.insert(1, ("fwd (CUDA cores)", t_core, tt_f, False))
                for what, t, tt, bwd in passes:
                    fl = _flops(b, h, n, d, causal, bwd)
                    rows.append(dict(shape=f"({b},{h},{n},{d})", dtype=cupy.dtype(dt).name, causal=causal, pass_=what,
                                     ms=t * 1e3, tflops=fl / t / 1e12,
                                     torch_ms=None if tt is None else tt * 1e3,
                                     torch_tflops=None if tt is None else fl / tt / 1e12,
                                     ratio=None if tt is None else tt / t,
                                     mib=mem if what == "fwd" else None))
                q = k = v = g = None  # free the inputs before the next shape
                cupy.get_default_memory_pool().free_all_blocks()
    return rows


def run_decode(shapes, repeat):
    """float16 decode (one query row against M keys): the chosen path, the fused kernel, and torch.

    Rows ``(B, H, M, D)``. ``launch.forward_path`` sends these calls to the
    blockwise cuBLAS path on an estimate; timing the fused kernel beside it
    (``launch.DECODE_MAX_ROWS = 0`` for that call) checks the estimate.
    """
    import cupy
    import selfattn
    from . import launch

    torch, F = _torch()
    has_torch = torch is not None
    rows = []
    for (b, h, m, d) in shapes:
        rng = cupy.random.default_rng(0)
        q = rng.standard_normal((b, h, 1, d), dtype=cupy.float32).astype(cupy.float16)
        k, v = (rng.standard_normal((b, h, m, d), dtype=cupy.float32).astype(cupy.float16) for _ in range(2))

        def fwd():
            return selfattn.scaled_dot_product_attention(q, k, v, backend="cupy")

        t = _time_cupy(cupy, fwd, repeat)
        saved = launch.DECODE_MAX_ROWS
        launch.DECODE_MAX_ROWS = 0
        try:
            t_fused = _time_cupy(cupy, fwd, repeat)
        finally:
            launch.DECODE_MAX_ROWS = saved
        tt = None
        if has_torch:
            tq, tk, tv = (torch.as_tensor(x, device="cuda") for x in (q, k, v))

            def tfwd():
                with torch.no_grad():
                    return F.scaled_dot_product_attention(tq, tk, tv)

            tt = _time_torch(torch, tfwd, repeat)
        fl = 4.0 * b * h * m * d
        for what, tm in (("decode fwd", t), ("decode fwd (fused kernel)", t_fused)):
            rows.append(dict(shape=f"({b},{h},1,{d}), M={m}", dtype="float16", causal=False, pass_=what,
                             ms=tm * 1e3, tflops=fl / tm / 1e12, torch_ms=None if tt is None else tt * 1e3,
                             torch_tflops=None if tt is None else fl / tt / 1e12,
                             ratio=None if tt is None else tt / tm, mib=None))
    return rows


def markdown(rows, device):
    out = [f"GPU: {device}", "",
           "| shape (B,H,N,D) | dtype | causal | pass | selfattn ms | selfattn TFLOP/s | torch ms | torch TFLOP/s "
           "| speed vs torch | extra MiB |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    f = lambda x, p: "n/a" if x is None else f"{x:.{p}f}"
    for r in rows:
        out.append(f"| {r['shape']} | {r['dtype']} | {r['causal']} | {r['pass_']} | {f(r['ms'], 2)} | "
                   f"{f(r['tflops'], 2)} | {f(r['torch_ms'], 2)} | {f(r['torch_tflops'], 2)} | {f(r['ratio'], 3)} | "
                   f"{f(r['mib'], 1)} |")
    out.append("")
    out.append("speed vs torch = torch time / selfattn time (1.0 = as fast as torch.nn.functional.scaled_dot_product_attention).")
    return "\n".join(out) + "\n"


def main(argv=None):
    """Command line: run the benchmark on the current GPU, write and print the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-bench.md", help="markdown file to write")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="N=1024 instead of 4096 (smoke test)")
    args = ap.parse_args(argv)
    import cupy
    import selfattn

    try:
        selfattn.get_backend("cupy")
    except Exception as exc:  # BackendUnavailableError, with the reason
        print(exc, file=sys.stderr)
        return 2
    n = 1024 if args.quick else 4096
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    rows = run([(4, 16, n, 64), (4, 16, n, 128)], [cupy.float16, cupy.float32], args.repeat)
    rows += run_decode([(8, 32, 8 * n, 128)], args.repeat)
    md = markdown(rows, name)
    with open(args.out, "w") as fh:
        fh.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
