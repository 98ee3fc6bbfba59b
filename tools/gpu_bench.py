#!/usr/bin/env python3
"""Time the CuPy backend beside PyTorch's SDPA on this GPU, for the GPU report.

Usage, from a checkout with CuPy, a CUDA GPU and (for the comparison) PyTorch::

    python tools/gpu_bench.py [--jsonl rows.jsonl] [--rounds 5] [--quick]

The cases are those of the asv GPU classes (``benchmarks/_gpu.py``):
(B, H, N, D) = (4, 16, 4096, 64) and (4, 16, 4096, 128), float16 and float32,
causal and not, forward and forward+backward, with ``cupy-cuda-cores`` (float16
on the CUDA-core kernel) beside the tensor-core default; decode (1, 32, 1, 128)
against M = 32768 keys on the chosen path, the fused kernel and PyTorch. For
each point every callable is compiled and warmed up, then timed in ``--rounds``
rounds that alternate the callables (a block of calls each, the device
synchronized before and after the block), so the libraries are measured side by
side under the same conditions; a row gives the median time per call and the
spread (min-max over rounds), TFLOP/s from the median, and the speed relative
to PyTorch (torch median / selfattn median). "extra MiB" is the device memory a
cupy forward takes beyond its output. Each row is appended to ``--jsonl`` as
soon as it is measured (a timeout keeps what came before); the markdown table
is printed at the end. ``--quick`` uses tiny shapes (a dry run of the code,
numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# Run from a checkout: import selfattn and the benchmark cases from it, installed or not.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import _gpu  # noqa: E402

__all__ = ["TARGET", "STRETCH", "measure_point", "run", "markdown", "summarize"]

TARGET, STRETCH = 0.5, 0.8  # float16 forward throughput relative to PyTorch (issue 15)
_PASSES = {
    "cupy": ("fwd", "fwd+bwd"),
    "cupy-cuda-cores": ("fwd (CUDA cores)",),
    "cupy-fused": ("fwd (fused kernel)",),
    "torch": ("fwd", "fwd+bwd"),
}


def _block_time(case, fn, calls: int) -> float:
    """Seconds per call over a block of ``calls`` calls, the device synchronized before and after."""
    case.sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    case.sync()
    return (time.perf_counter() - t0) / calls


def measure_point(
    shape, dtype: str, causal: bool, backends, rounds: int, backward: bool = True, budget_s: float = 0.05
) -> list:
    """Rows for one (shape, dtype, causal) point: every backend's passes, timed in alternating rounds.

    ``backward=False`` times forwards only; a block of calls lasts about ``budget_s`` (1 to 20 calls).
    """
    timed = []  # (backend, pass, case, fn, backward, calls)
    mib = None
    for backend in backends:
        try:
            case = _gpu.make_case(backend, shape, dtype, causal)
        except NotImplementedError as exc:
            print(f"  {backend}: n/a ({exc})", file=sys.stderr, flush=True)
            continue
        fns = [case.forward] + ([case.forward_backward] if backward and case.forward_backward is not None else [])
        for what, fn in zip(_PASSES[backend], fns, strict=False):  # cupy-* variants: forward only
            warm = _block_time(case, fn, 1)  # compiles on the first call
            warm = _block_time(case, fn, 1)
            calls = max(1, min(20, int(budget_s / max(warm, 1e-6))))
            timed.append((backend, what, case, fn, what.endswith("bwd"), calls))
        if backend == "cupy":
            mib = _gpu.extra_mib(case)
    samples = {(b, w): [] for b, w, *_ in timed}
    for _ in range(rounds):
        for backend, what, case, fn, _, calls in timed:
            samples[(backend, what)].append(_block_time(case, fn, calls))
    medians = {key: statistics.median(ts) for key, ts in samples.items()}
    rows = []
    for backend, what, case, _, backward, calls in timed:
        if backend == "torch":
            continue
        t = medians[(backend, what)]
        ref_what = "fwd+bwd" if backward else "fwd"
        tt = medians.get(("torch", ref_what))
        fl = case.flops(backward)
        rows.append(
            dict(
                shape=shape.name,
                dtype=dtype,
                causal=causal,
                pass_=what,
                backend=backend,
                ms=t * 1e3,
                ms_min=min(samples[(backend, what)]) * 1e3,
                ms_max=max(samples[(backend, what)]) * 1e3,
                rounds=rounds,
                calls=calls,
                tflops=fl / t / 1e12,
                torch_ms=None if tt is None else tt * 1e3,
                torch_tflops=None if tt is None else fl / tt / 1e12,
                ratio=None if tt is None else tt / t,
                mib=mib if (backend, what) == ("cupy", "fwd") else None,
            )
        )
    return rows


def run(prefill, decode, rounds: int, jsonl=None) -> list:
    """Every point of ``prefill`` x dtypes x causal, then ``decode``; rows appended to ``jsonl`` as measured."""

    def backends(dtype):  # the CUDA-core variant differs from the default for float16 only
        return tuple(b for b in _gpu.BACKENDS if dtype == "float16" or b != "cupy-cuda-cores")

    points = [(s, dt, c, backends(dt), True) for s in prefill.values() for dt in _gpu.DTYPES for c in (False, True)]
    points += [(s, "float16", False, _gpu.DECODE_BACKENDS, False) for s in decode.values()]
    try:
        _gpu.need_torch()
    except NotImplementedError as exc:
        print(f"torch: n/a, no comparison ({exc})", file=sys.stderr, flush=True)
        points = [(s, dt, c, tuple(b for b in bs if b != "torch"), bw) for s, dt, c, bs, bw in points]
    rows = []
    for shape, dtype, causal, backends, backward in points:
        t0 = time.perf_counter()
        got = measure_point(shape, dtype, causal, backends, rounds, backward)
        print(f"{shape.name} {dtype} causal={causal}: {len(got)} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        rows += got
        if jsonl is not None:
            with open(jsonl, "a") as fh:
                for row in got:
                    fh.write(json.dumps(row) + "\n")
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()  # the next point's inputs
    return rows


def _fmt(x, digits):
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(rows, device: str = "") -> str:
    """The rows as a markdown table (median ms with the min-max spread over rounds)."""
    out = ([f"GPU: {device}", ""] if device else []) + [
        "| shape | dtype | causal | pass | selfattn ms (min-max) | TFLOP/s | torch ms | torch TFLOP/s "
        "| speed vs torch | extra MiB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        spread = f"{_fmt(r['ms'], 3)} ({_fmt(r.get('ms_min'), 3)}-{_fmt(r.get('ms_max'), 3)})"
        out.append(
            f"| {r['shape']} | {r['dtype']} | {r['causal']} | {r['pass_']} | {spread} | {_fmt(r['tflops'], 1)} "
            f"| {_fmt(r['torch_ms'], 3)} | {_fmt(r['torch_tflops'], 1)} | {_fmt(r['ratio'], 2)} "
            f"| {_fmt(r['mib'], 1)} |"
        )
    out += [
        "",
        "speed vs torch = torch median / selfattn median (1.0: as fast as "
        "torch.nn.functional.scaled_dot_product_attention, measured in the same rounds).",
    ]
    return "\n".join(out) + "\n"


def summarize(rows) -> str:
    """The float16 forward (tensor cores, the default) against PyTorch, set against the target."""
    ratios = [
        r["ratio"]
        for r in rows
        if r["dtype"] == "float16"
        and r["pass_"] == "fwd"
        and r["backend"] == "cupy"
        and not r["shape"].startswith("decode")
        and r["ratio"] is not None
    ]
    if not ratios:
        return "No PyTorch timing: the float16 forward could not be compared with the target."
    lo, hi = min(ratios), max(ratios)
    verdict = (
        "met (stretch goal too)"
        if lo >= STRETCH
        else "met"
        if lo >= TARGET
        else f"not met by {sum(r < TARGET for r in ratios)} of {len(ratios)} configurations"
    )
    return (
        f"float16 forward / PyTorch SDPA throughput: {lo:.2f}-{hi:.2f}x over {len(ratios)} configurations; "
        f"target >= {TARGET}x (stretch {STRETCH}x): {verdict}."
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jsonl", help="append each measured row to this file (JSON lines)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per point (default 5)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a dry run of the code, not a measurement")
    args = ap.parse_args(argv)
    try:
        cupy = _gpu.need_gpu()
    except NotImplementedError as exc:
        print(exc, file=sys.stderr)
        return 2
    prefill, decode = (_gpu.QUICK_PREFILL, _gpu.QUICK_DECODE) if args.quick else (_gpu.PREFILL, _gpu.DECODE)
    rows = run(prefill, decode, 1 if args.quick else max(1, args.rounds), args.jsonl)
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    print(markdown(rows, name))
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
