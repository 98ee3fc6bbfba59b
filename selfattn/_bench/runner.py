"""``python -m selfattn bench``: a short side-by-side comparison of every available backend.

For each available backend and each standard shape (:mod:`selfattn._bench.shapes`)
it checks that the backend agrees with the NumPy backend (max abs difference
within a dtype tolerance), then times the forward pass (median after a warm-up
call, so JIT compilation is excluded and reported separately as "1st call"),
and prints time, achieved GFLOP/s, the ratio to this machine's measured
``numpy.matmul`` GFLOP/s and the peak extra resident memory of one call.

Exit status: 0 on success, 1 if some backend disagrees with NumPy beyond the
tolerance, 2 on a usage error (e.g. ``--plot`` without matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from . import shapes as _shapes
from .timing import matmul_gflops, median_time, peak_rss_delta

__all__ = ["main", "run", "TOLERANCE"]

#: Max abs difference to the NumPy backend accepted per dtype (outputs are O(1)).
TOLERANCE = {"float16": 2e-2, "float32": 2e-4, "float64": 1e-10}


def _progress(enabled):
    """Return ``update(i, total, text)`` drawing a one-line bar on stderr (no dependency)."""
    if not enabled:
        return lambda *a, **k: None
    width = 28

    def update(i, total, text="", done=False):
        frac = i / total if total else 1.0
        fill = int(round(width * frac))
        line = f"\r[{'#' * fill}{'.' * (width - fill)}] {i}/{total} {text}"
        sys.stderr.write(line[:110].ljust(110))
        if done:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return update


def _release_heap():
    """Give freed heap back to the OS so a later peak-RSS reading sees a call's real footprint.

    glibc keeps freed blocks (its mmap threshold grows after large frees), so
    without this a repeated call reuses resident pages and shows ~0 extra.
    """
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _backend_io(record):
    """``(to_backend, to_numpy, sync)`` for a backend's array library."""
    array_type = getattr(record.capabilities, "array_type", "numpy")
    if array_type == "numpy":
        return (lambda a: a), (lambda a: a), (lambda: None)
    if array_type == "cupy":
        import cupy

        def sync():
            cupy.cuda.Device().synchronize()

        return cupy.asarray, cupy.asnumpy, sync
    raise NotImplementedError(f"unknown array type {array_type!r}")


def _select_shapes(args):
    if args.shapes:
        chosen = [_shapes.get(n.strip()) for n in args.shapes.split(",") if n.strip()]
    elif args.tiny:
        chosen = list(_shapes.BENCH_TINY)
    elif args.quick:
        chosen = list(_shapes.BENCH_QUICK)
    else:
        chosen = list(_shapes.BENCH_STANDARD)
    sweep = []
    if args.plot:
        if args.tiny:
            sweep = [_shapes.Shape(f"prefill-{n}", "prefill", 1, 2, n, n, 8) for n in (8, 16, 32)]
        elif args.quick:
            sweep = list(_shapes.SEQLEN_SWEEP[:3])
        else:
            sweep = list(_shapes.SEQLEN_SWEEP)
    names = {s.name for s in chosen}
    return chosen + [s for s in sweep if s.name not in names]


def run(args, out=sys.stdout):
    """Run the comparison described by parsed ``args``; return the JSON-able report dict."""
    import selfattn

    records = selfattn.list_backends()
    wanted = None
    if args.backends:
        wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
        known = {r.name for r in records}
        unknown = [b for b in wanted if b not in known]
        if unknown:
            raise SystemExit(f"unknown backend(s) {unknown}; known: {sorted(known)}")
    backends, skipped = [], []
    for r in records:
        if wanted is not None and r.name not in wanted:
            continue
        if not r.available:
            skipped.append({"backend": r.name, "reason": r.reason})
        elif args.dtype not in r.capabilities.dtypes:
            skipped.append({"backend": r.name, "reason": f"no {args.dtype} support"})
        else:
            backends.append(r)
    # numpy first: it is the reference every other backend is compared with
    backends.sort(key=lambda r: (r.name != "numpy", r.priority))

    shape_list = _select_shapes(args)
    n_mm = 256 if args.tiny else (1024 if args.quick else 2048)
    ceiling = matmul_gflops(n=n_mm, dtype=np.dtype(args.dtype) if args.dtype != "float16" else np.float32,
                            repeat=3 if (args.tiny or args.quick) else 7)

    total = len(backends) * len(shape_list)
    bar = _progress(args.progress if args.progress is not None else sys.stderr.isatty())
    refs, rows, step = {}, [], 0
    tol = TOLERANCE[args.dtype]
    for shape in shape_list:
        q, k, v = _shapes.make_inputs(shape, args.dtype)
        for rec in backends:
            bar(step, total, f"{rec.name} {shape.name}")
            row = {"backend": rec.name, "shape": shape.name, "kind": shape.kind, "dims": shape.label,
                   "batch": shape.batch, "heads": shape.heads, "kv_heads": shape.hkv, "n": shape.n,
                   "m": shape.m, "d": shape.d, "dtype": args.dtype, "causal": args.causal}
            try:
                to_b, to_np, sync = _backend_io(rec)
                qb, kb, vb = to_b(q), to_b(k), to_b(v)

                def call():
                    res = selfattn.scaled_dot_product_attention(qb, kb, vb, causal=args.causal, backend=rec.name)
                    sync()
                    return res

                t0 = time.perf_counter()
                result = to_np(call())
                row["first_call_s"] = time.perf_counter() - t0  # includes JIT compilation
                if rec.name == "numpy":
                    refs[shape.name] = result
                ref = refs.get(shape.name)
                if ref is not None:
                    diff = float(np.max(np.abs(result.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
                    row["max_abs_diff"] = diff
                    row["agrees"] = bool(diff <= tol)
                else:
                    row["max_abs_diff"] = None
                    row["agrees"] = None
                t = median_time(call, repeat=args.repeat, warmup=1)
                row["median_s"] = t
                row["gflops"] = shape.flops(args.causal) / t / 1e9
                row["ratio_to_matmul"] = row["gflops"] / ceiling
                _release_heap()
                extra = peak_rss_delta(call) if getattr(rec.capabilities, "array_type", "numpy") == "numpy" else None
                row["peak_extra_bytes"] = extra
            except Exception as exc:  # keep going; report the failure in the table
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["agrees"] = False
            rows.append(row)
            step += 1
    bar(total, total, "done", done=True)

    report = {
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "numpy": np.__version__, "matmul_gflops": ceiling, "matmul_n": n_mm,
        },
        "selfattn": getattr(selfattn, "__version__", "?"),
        "dtype": args.dtype, "causal": args.causal, "tolerance": tol,
        "backends": [r.name for r in backends], "skipped": skipped,
        "results": rows,
        "agreement_ok": all(r.get("agrees") is not False for r in rows),
    }
    return report


def _fmt_bytes(b):
    if b is None:
        return "n/a"
    return f"{b / 2**20:.1f} MiB"


def format_table(report) -> str:
    head = ("backend", "shape", "median", "GFLOP/s", "x matmul", "peak extra", "1st call", "max|diff|")
    lines = []
    rows = []
    for r in report["results"]:
        if "error" in r:
            rows.append((r["backend"], r["dims"], "ERROR", "", "", "", "", r["error"][:60]))
            continue
        diff = "ref" if r["backend"] == "numpy" else (
            "n/a" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}" + ("" if r["agrees"] else " FAIL"))
        rows.append((r["backend"], r["dims"], f"{r['median_s'] * 1e3:.3f} ms", f"{r['gflops']:.2f}",
                     f"{r['ratio_to_matmul']:.3f}", _fmt_bytes(r["peak_extra_bytes"]),
                     f"{r['first_call_s'] * 1e3:.1f} ms", diff))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    m = report["machine"]
    lines.append(f"selfattn {report['selfattn']} bench: dtype={report['dtype']} causal={report['causal']}; "
                 f"numpy.matmul ({m['matmul_n']}^2) = {m['matmul_gflops']:.1f} GFLOP/s on {m['cpus']} CPU(s)")
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    for s in report["skipped"]:
        lines.append(f"skipped {s['backend']}: {s['reason']}")
    verdict = "all backends agree with numpy" if report["agreement_ok"] else "DISAGREEMENT with numpy"
    lines.append(f"{verdict} (tolerance max|diff| <= {report['tolerance']:g} for {report['dtype']})")
    return "\n".join(lines)


def plot(report, path):
    """GFLOP/s vs sequence length (prefill rows, N = M) per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_backend = {}
    for r in report["results"]:
        if r.get("kind") == "prefill" and "gflops" in r and r["batch"] == 1:
            by_backend.setdefault(r["backend"], {})[r["n"]] = r["gflops"]
    for name, pts in sorted(by_backend.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
    ax.axhline(report["machine"]["matmul_gflops"], color="gray", ls="--", lw=1, label="numpy.matmul")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length N = M (prefill)")
    ax.set_ylabel("GFLOP/s (forward)")
    ax.set_title(f"selfattn forward, {report['dtype']}, causal={report['causal']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m selfattn bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (< 1 minute)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for tests (a second or two)")
    p.add_argument("--backends", help="comma-separated backend names (default: all available)")
    p.add_argument("--shapes", help="comma-separated standard shape names (see selfattn._bench.shapes)")
    p.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    p.add_argument("--causal", action="store_true", help="causal attention")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per measurement (median)")
    p.add_argument("--json", metavar="FILE", help="write machine-readable results here")
    p.add_argument("--plot", metavar="FILE.png", help="GFLOP/s vs sequence length per backend (needs matplotlib)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="always draw the bar")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="never draw the bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeat is None:
        args.repeat = 3 if (args.quick or args.tiny) else 7
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib; install it with: pip install 'selfattn[bench]' "
                  "(or pip install matplotlib)", file=sys.stderr)
            return 2
    try:
        report = run(args)
    except SystemExit as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0 if report["agreement_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
