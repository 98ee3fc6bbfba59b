"""Command line: ``python -m selfattn {info,check,bench}``.

* ``info``: backends, availability or the reason not, versions, threads,
  devices; ``--table`` prints the capability support table (Markdown) that the
  README embeds; ``--json`` for machines.
* ``check``: the conformance cases against every available backend, a
  pass/fail table, exit status 1 on any failure.
* ``bench``: a short benchmark over every available backend (see
  ``python -m selfattn bench --help``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

import selfattn
from selfattn._capabilities import DTYPES, FEATURES


def support_table(builtin_only: bool = False) -> str:
    """Markdown table of every backend's declared capabilities (generated, never hand-written).

    ``builtin_only`` leaves out third-party plugins (the README documents the built-ins).
    """
    recs = [r for r in selfattn.list_backends()
            if r.capabilities is not None and (r.source == "builtin" or not builtin_only)]
    head = "| capability | " + " | ".join(r.name for r in recs) + " |"
    lines = [head, "|" + "---|" * (len(recs) + 1)]
    lines.append("| arrays | " + " | ".join(r.capabilities.array_type for r in recs) + " |")
    for dt in DTYPES:
        lines.append(f"| {dt} | " + " | ".join("yes" if dt in r.capabilities.dtypes else "no" for r in recs) + " |")
    for feat, desc in FEATURES.items():
        lines.append(f"| {feat} ({desc}) | " + " | ".join("yes" if feat in r.capabilities.features else "no" for r in recs) + " |")
    return "\n".join(lines)


def _info(args) -> int:
    recs = selfattn.list_backends()
    facts = {
        "selfattn": selfattn.__version__, "python": platform.python_version(), "numpy": np.__version__,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
    }
    rows = []
    for r in recs:
        extra = {}
        if r.available:
            try:
                extra = selfattn.get_backend(r.name).info()
            except Exception as exc:  # info is diagnostics; never crash on it
                extra = {"error": f"{type(exc).__name__}: {exc}"}
        rows.append({"name": r.name, "available": r.available, "reason": r.reason, "version": r.version,
                     "priority": r.priority, "source": r.source, "install": r.install,
                     "capabilities": r.capabilities.as_dict() if r.capabilities else None, "info": extra})
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
            print(f"  {'':<10} {k}: {v}")
    return 0


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
    sub.add_parser("bench", help="benchmark every available backend (see 'bench --help')", add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        # The bench command owns its own options; keep its (matplotlib, timing) code out of the others.
        from selfattn._bench.runner import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    return {"info": _info, "check": _check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
