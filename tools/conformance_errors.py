"""Measure every backend's error against the oracle on the conformance cases, and print the tables.

Usage (from a checkout, with the test plugins on the path as in the test run)::

    python tools/conformance_errors.py                     # summary per dtype x output x backend
    python tools/conformance_errors.py --per-case          # also one row per case, one column per backend
    python tools/conformance_errors.py --property 2000     # also 2000 draws of the property test
    python tools/conformance_errors.py --backend numpy --backend numba:simd

For each output (out, lse, weights, dq, dk, dv) it reports

* ``abs``: the worst ``|actual - oracle|``;
* ``old``: the worst usage of the previous rule, ``max|a - r| / max(1, max|r|)`` against
  ``10 x`` (large logits) the old per-input-dtype number (lse of float16 inputs at float16's);
* ``new``: the worst usage of the current rule, :func:`selfattn.testing.compare.error_ratio`
  (<= 1 passes; :data:`selfattn.testing.cases.TOLERANCES` documents it);
* ``need``: the smallest ``atol`` with which every element would pass the current rule
  (its ``rtol``, headroom and bound kept) -- the number the table in ``cases.py`` is set from.

``numba:fused``, ``numba:simd`` and ``numba:blas`` force one of the Numba backend's kernel
families (the SIMD and BLAS-tile ones with the small tile sizes tests/test_numba_backend.py
uses, so that small cases cross tile boundaries); plain ``numba`` lets the backend choose, as
users get it.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys
import time
from collections import defaultdict

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "plugins" / "good"))  # loopback and cupy-emulated, as in the test run

import selfattn  # noqa: E402
from selfattn.testing.cases import OUTPUTS, generate_cases, logit_headroom, tolerance  # noqa: E402
from selfattn.testing.check import case_outputs  # noqa: E402
from selfattn.testing.compare import error_ratio, host  # noqa: E402

#: The previous rule (selfattn 0.x before issue 19), for the before/after table.
OLD_TOLERANCES = {
    "float64": {"out": 1e-9, "grad": 1e-8},
    "float32": {"out": 2e-5, "grad": 2e-4},
    "float16": {"out": 4e-3, "grad": 2e-2},
}
#: The Numba BLAS-tile and SIMD kernels' tile sizes under test (as tests/test_numba_backend.py).
SMALL_TILES = (24, 40, 20, 36)
SIMD_SMALL_TILES = (12, 16, 8, 16)


@contextlib.contextmanager
def numba_family(family: str | None):
    """Run one of the Numba backend's kernel families on every call inside the block (None: its choice).

    Sets the registered backend object's ``kernels`` (and, for ``"blas"`` and
    ``"simd"``, small tiles) and restores them afterwards.
    """
    if family is None:
        yield
        return
    from selfattn.backends import numba_

    be = numba_.backend
    saved = (be.kernels, be.blas_tiles, getattr(be, "simd_tiles", None))
    be.kernels = family
    if family == "blas":
        be.blas_tiles = SMALL_TILES
    if family == "simd":
        be.simd_tiles = SIMD_SMALL_TILES
    try:
        yield
    finally:
        be.kernels, be.blas_tiles = saved[:2]
        if saved[2] is not None:
            be.simd_tiles = saved[2]


def old_usage(what: str, actual, expected, dtype: str, large: bool) -> float:
    """Usage of the previous rule (error scaled by max(1, max|ref|), x10 for large logits)."""
    a = np.asarray(host(actual), np.float64)
    e = np.asarray(expected, np.float64)
    fin = np.isfinite(e)
    if not fin.any():
        return 0.0
    err = np.max(np.abs(a[fin] - e[fin])) / max(1.0, float(np.max(np.abs(e[fin]))))
    kind = "grad" if what in ("dq", "dk", "dv") else "out"
    return float(err / (OLD_TOLERANCES[dtype][kind] * (10.0 if large else 1.0)))


def needed_atol(what: str, actual, expected, dtype: str, score_max: float, bound) -> float:
    """The smallest atol with which every finite element passes the current rule."""
    a = np.asarray(host(actual), np.float64)
    e = np.asarray(expected, np.float64)
    fin = np.isfinite(e)
    if not fin.any():
        return 0.0
    _, rtol = tolerance(what, dtype)
    scale = 1.0 if what == "lse" else max(1.0, float(np.max(np.abs(e[fin]))))
    slack = np.abs(a[fin] - e[fin]) - rtol * np.abs(e[fin])
    if bound is not None:
        slack = slack - np.broadcast_to(bound, e.shape)[fin]
    return max(0.0, float(np.max(slack))) / (logit_headroom(score_max) * scale)


def _label(array, input_dtype: str) -> str:
    """The compared array's dtype, noting inputs of another dtype (the lse of float16 inputs)."""
    dt = str(np.dtype(array.dtype))
    return dt if dt == input_dtype else f"{dt} ({input_dtype} in)"


def measure(label: str, backend: str, family: str | None, cases, records: list) -> None:
    """Append one record per (case, output) run on ``backend`` to ``records``."""
    with numba_family(family):
        for case in cases:
            results = case_outputs(backend, case)
            if results is None:
                continue
            smax = case.score_max()
            for what, got, exp, bound in results:
                fin = np.isfinite(exp)
                err = float(np.max(np.abs(np.asarray(host(got), np.float64)[fin] - exp[fin]))) if fin.any() else 0.0
                records.append(
                    dict(
                        backend=label,
                        case=case.id,
                        what=what,
                        dtype=_label(got, case.dtype),
                        abs=err,
                        old=old_usage(what, got, exp, case.dtype, case.logit_scale > 1.0),
                        new=error_ratio(got, exp, what, case.dtype, score_max=smax, bound=bound),
                        need=needed_atol(what, got, exp, case.dtype, smax, bound),
                        source="case",
                    )
                )


def measure_property(label: str, backend: str, family: str | None, draws: int, records: list) -> None:
    """Append records for ``draws`` examples of the suite's property test (hypothesis, generate phase only)."""
    from hypothesis import Phase, given, settings

    from selfattn.testing import test_conformance as suite

    def run(problem):
        ran = suite.property_outputs(backend, problem)
        if ran is None:
            return
        results, smax = ran
        for what, got, exp, bound in results:
            fin = np.isfinite(exp)
            err = float(np.max(np.abs(np.asarray(host(got), np.float64)[fin] - exp[fin]))) if fin.any() else 0.0
            records.append(
                dict(
                    backend=label,
                    case="property",
                    what=what,
                    dtype=_label(got, problem["dtype"]),
                    abs=err,
                    old=float("nan"),
                    new=error_ratio(got, exp, what, problem["dtype"], score_max=smax, bound=bound),
                    need=needed_atol(what, got, exp, problem["dtype"], smax, bound),
                    source="property",
                )
            )

    with numba_family(family):
        settings(max_examples=draws, deadline=None, phases=[Phase.generate], database=None)(
            given(suite._problems())(run)
        )()


def _backends(requested: list[str]) -> list[tuple[str, str, str | None]]:
    """``(label, backend name, numba family)`` for each backend to measure."""
    if requested:
        specs = requested
    else:
        specs = []
        for rec in selfattn.list_backends():
            if not rec.available:
                print(f"# {rec.name}: not measured ({rec.reason})", file=sys.stderr)
            elif rec.name == "numba":
                specs += ["numba:fused", "numba:simd", "numba:blas"]
            else:
                specs.append(rec.name)
    out = []
    for spec in specs:
        name, _, family = spec.partition(":")
        out.append((spec, name, family or None))
    return out


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.2g}"


def summary(records: list, labels: list[str], source: str) -> str:
    """Markdown table: one row per (dtype, output), one column group per backend."""
    worst: dict = defaultdict(lambda: {"abs": 0.0, "old": 0.0, "new": 0.0, "need": 0.0, "at": ""})
    for r in records:
        if r["source"] != source:
            continue
        w = worst[(r["dtype"], r["what"], r["backend"])]
        for key in ("abs", "old", "need"):
            if r[key] == r[key]:
                w[key] = max(w[key], r[key])
        if r["new"] >= w["new"]:
            w["new"], w["at"] = r["new"], r["case"]
    rows = sorted({(d, w) for d, w, _ in worst}, key=lambda k: (k[0], OUTPUTS.index(k[1])))
    columns = " | ".join(f"{lb} abs · old · new" for lb in labels)
    head = f"| dtype | output | atol / rtol | {columns} | worst need |"
    lines = [head, "|" + "---|" * (4 + len(labels))]
    for dtype, what in rows:
        tol = tolerance(what, dtype.split()[0])  # the compared array's own dtype
        cells = []
        need = 0.0
        for lb in labels:
            w = worst.get((dtype, what, lb))
            if w is None:
                cells.append("n/a")
                continue
            need = max(need, w["need"])
            old = "-" if source == "property" else _fmt(w["old"])  # the old rule had no property draws to compare
            cells.append(f"{_fmt(w['abs'])} · {old} · {_fmt(w['new'])}")
        lines.append(f"| {dtype} | {what} | {tol.atol:g} / {tol.rtol:.2g} | " + " | ".join(cells) + f" | {need:.2g} |")
    return "\n".join(lines)


def per_case(records: list, labels: list[str]) -> str:
    """One row per case, one column per backend: the worst new-rule usage over the outputs, and which output."""
    worst: dict = {}
    for r in records:
        if r["source"] != "case":
            continue
        key = (r["case"], r["backend"])
        if key not in worst or r["new"] > worst[key]["new"]:
            worst[key] = r
    cases = list(dict.fromkeys(r["case"] for r in records if r["source"] == "case"))
    lines = ["| case | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for case in cases:
        cells = []
        for lb in labels:
            r = worst.get((case, lb))
            cells.append("n/a" if r is None else f"{r['new']:.2f} {r['what']}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", action="append", default=[], help="NAME or numba:fused / numba:simd / numba:blas (repeatable)"
    )
    parser.add_argument("--per-case", action="store_true", help="also print one row per case (a column per backend)")
    parser.add_argument("--property", type=int, default=0, metavar="N", help="also measure N property-test draws")
    args = parser.parse_args(argv)
    cases = generate_cases()
    records: list = []
    backends = _backends(args.backend)
    for label, name, family in backends:
        t0 = time.perf_counter()
        measure(label, name, family, cases, records)
        if args.property:
            measure_property(label, name, family, args.property, records)
        print(f"# {label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    labels = [b[0] for b in backends]
    print("Conformance cases: worst absolute error · old-rule usage · new-rule usage (<= 1 passes)\n")
    print(summary(records, labels, "case"))
    if args.property:
        print(f"\nProperty test, {args.property} draws per backend: worst absolute error · - · new-rule usage\n")
        print(summary(records, labels, "property"))
    if args.per_case:
        print("\nPer case and backend: the worst new-rule usage over the outputs, and which output\n")
        print(per_case(records, labels))
    failed = [r for r in records if r["new"] > 1.0]
    for r in failed:
        print(f"FAIL {r['backend']} {r['case']} {r['what']}: {r['new']:.3g}x the tolerance", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
