"""Command line: ``python -m selfattn {info,check,compile,bench,dashboard}``.

* ``info``: backends, availability or the reason not, versions, threads,
  devices; ``--table`` prints the capability support table (Markdown) that the
  README embeds; ``--json`` for machines.
* ``check``: the conformance cases against every available backend, a
  pass/fail table, exit status 1 on any failure.
* ``compile``: compile and cache every Numba kernel family ahead of time
  (``--dtype`` to limit), with a progress bar; later processes load them in
  about a second instead of compiling on their first call.
* ``bench``: a short benchmark over every available backend (see
  ``python -m selfattn bench --help``).
* ``dashboard``: the asv dashboard over recent commits, viewable offline (see
  ``python -m selfattn dashboard --help``; needs a checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np

import selfattn
from selfattn._capabilities import DTYPES, FEATURES


def support_table(builtin_only: bool = False) -> str:
    """Markdown table of every backend's declared capabilities (generated, never hand-written).

    ``builtin_only`` leaves out third-party plugins (the README documents the built-ins).
    """
    cols = [
        (r.name, r.capabilities)
        for r in selfattn.list_backends()
        if r.capabilities is not None and (r.source == "builtin" or not builtin_only)
    ]
    head = "| capability | " + " | ".join(name for name, _ in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    lines.append("| arrays | " + " | ".join(c.array_type for _, c in cols) + " |")
    for dt in DTYPES:
        lines.append(f"| {dt} | " + " | ".join("yes" if dt in c.dtypes else "no" for _, c in cols) + " |")
    for feat, desc in FEATURES.items():
        lines.append(
            f"| {feat} ({desc}) | " + " | ".join("yes" if feat in c.features else "no" for _, c in cols) + " |"
        )
    return "\n".join(lines)


def _info(args) -> int:
    recs = selfattn.list_backends()
    facts = {
        "selfattn": selfattn.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
    }
    rows: list[dict[str, Any]] = []
    for r in recs:
        extra = {}
        if r.available:
            try:
                extra = selfattn.get_backend(r.name).info()
            except Exception as exc:  # info is diagnostics; never crash on it
                extra = {"error": f"{type(exc).__name__}: {exc}"}
        rows.append(
            {
                "name": r.name,
                "available": r.available,
                "reason": r.reason,
                "version": r.version,
                "priority": r.priority,
                "source": r.source,
                "install": r.install,
                "capabilities": r.capabilities.as_dict() if r.capabilities else None,
                "info": extra,
            }
        )
    if args.json:
        print(json.dumps({"environment": facts, "backends": rows}, indent=2, default=str))
        return 0
    if args.table:
        print(support_table(builtin_only=args.builtin))
        return 0
    for k, v in facts.items():
        print(f"{k:>9}: {v}")
    print("\nbackends (automatic-selection order):")
    for row in rows:
        state = "available" if row["available"] else f"unavailable: {row['reason']}"
        print(f"  {row['name']:<10} {row['version'] or '-':<10} {state}  [{row['source']}]")
        for k, v in row["info"].items():
            if isinstance(v, dict):
                print(f"  {'':<10} {k}:")
                for kk, vv in v.items():
                    print(f"  {'':<12} {kk}: {vv}")
            else:
                print(f"  {'':<10} {k}: {v}")
    return 0


def _compile(args) -> int:
    import importlib.util

    if importlib.util.find_spec("numba") is None:
        print("error: numba is not installed; pip install 'selfattn[numba]'", file=sys.stderr)
        return 2
    from selfattn.backends import numba_

    dtypes = args.dtype or ["float32", "float64"]
    jobs = [(fam, dt) for fam in numba_.FAMILIES for dt in dtypes]
    results = []
    total_start = time.perf_counter()
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            disable=not sys.stderr.isatty(),
        )
    except ImportError:  # rich is in the numba extra; without it, one line per family
        progress = None
    if progress is not None:
        with progress:
            task = progress.add_task("compiling", total=len(jobs))
            for fam, dt in jobs:
                progress.update(task, description=f"compiling {fam} {dt}")
                results.append((fam, dt, _compile_one(numba_, fam, dt)))
                progress.advance(task)
    else:
        for i, (fam, dt) in enumerate(jobs, 1):
            print(f"[{i}/{len(jobs)}] compiling {fam} {dt} ...", file=sys.stderr, flush=True)
            results.append((fam, dt, _compile_one(numba_, fam, dt)))
    failed = 0
    for fam, dt, res in results:
        if isinstance(res, float):
            print(f"  {fam:<15} {dt:<8} {res:6.1f} s")
        else:
            failed += not res.startswith("n/a")
            print(f"  {fam:<15} {dt:<8} {res}")
    print(
        f"compiled and cached in {time.perf_counter() - total_start:.1f} s "
        "(NUMBA_CACHE_DIR or the package's __pycache__)"
    )
    return 1 if failed else 0


def _compile_one(numba_, fam: str, dt: str):
    try:
        return numba_.compile_family(fam, dt)
    except RuntimeError as exc:  # e.g. no limitable BLAS for the BLAS-tile family
        return f"n/a ({exc})"
    except Exception as exc:  # report and go on with the other families
        return f"FAILED: {type(exc).__name__}: {exc}"


def _check(args) -> int:
    from selfattn.testing.check import run_check

    failures = run_check(args.backend or None, verbose=args.verbose)
    print(f"\n{'all backends conform' if not failures else f'{failures} failure(s)'}")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfattn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="backends, availability, versions, threads, devices")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    p_info.add_argument("--table", action="store_true", help="print the capability support table (Markdown)")
    p_info.add_argument("--builtin", action="store_true", help="with --table: built-in backends only")
    p_check = sub.add_parser("check", help="run the conformance cases against every available backend")
    p_check.add_argument("--backend", action="append", help="only this backend (repeatable)")
    p_check.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    p_compile = sub.add_parser("compile", help="compile and cache every Numba kernel family ahead of time")
    p_compile.add_argument(
        "--dtype",
        action="append",
        choices=["float32", "float64"],
        help="only this compute dtype (repeatable; float16 runs the float32 kernels)",
    )
    sub.add_parser("bench", help="benchmark every available backend (see 'bench --help')", add_help=False)
    sub.add_parser(
        "dashboard", help="asv dashboard over recent commits, offline (see 'dashboard --help')", add_help=False
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        # The bench command owns its own options; keep its (matplotlib, timing) code out of the others.
        from selfattn._bench.runner import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "dashboard":
        from selfattn._bench.dashboard import main as dashboard_main

        return dashboard_main(argv[1:])
    args = parser.parse_args(argv)
    return {"info": _info, "check": _check, "compile": _compile}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
