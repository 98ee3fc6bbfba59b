"""``python -m selfattn check``: the conformance cases against every available backend.

What a user runs to trust a new install or a GPU box, without pytest: for each
available backend and each case of :func:`selfattn.testing.cases.generate_cases`
it checks the forward pass (with lse and weights) and the VJP against the
float64 oracle -- or, outside the backend's declared capabilities, that
:class:`selfattn.UnsupportedFeatureError` is raised -- and prints a pass/fail
table per feature group.
"""

from __future__ import annotations

import sys
import traceback
from collections import defaultdict

import numpy as np

import selfattn

from . import reference
from .cases import generate_cases
from .compare import assert_close, backend_options, case_group, to_backend

__all__ = ["case_outputs", "check_case", "run_check"]


def case_outputs(backend: str, case) -> list[tuple] | None:
    """Run one case on ``backend``: ``[(what, backend's array, oracle's float64 array, bound), ...]``.

    ``what`` runs over out, lse and weights, then dq, dk and dv when the backend
    declares ``"vjp"``; ``bound`` is None, or for out, dq and dk the per-element
    allowance of :func:`selfattn.testing.reference.rounding_bounds`. Returns
    None when the case is outside the backend's declared capabilities and the
    backend raised :class:`selfattn.UnsupportedFeatureError` as it must; raises
    ``AssertionError`` if it did not.
    """
    caps = selfattn.get_backend(backend).capabilities
    q, k, v, mask = case.arrays()
    bq, bk, bv, bm = to_backend(caps.array_type, q, k, v, mask)
    opts = backend_options(caps.array_type, case.options)
    need = set(case.features()) | {"lse", "weights"}
    if caps.missing(caps.array_type, case.dtype, need):
        try:
            selfattn.scaled_dot_product_attention(
                bq, bk, bv, mask=bm, return_lse=True, return_weights=True, backend=backend, **opts
            )
        except selfattn.UnsupportedFeatureError:
            return None
        raise AssertionError("expected UnsupportedFeatureError outside the declared capabilities")
    got = selfattn.scaled_dot_product_attention(
        bq, bk, bv, mask=bm, return_lse=True, return_weights=True, backend=backend, **opts
    )
    bounds = reference.rounding_bounds(q, k, v, mask=mask, **case.options)
    results = [
        (what, a, e, bounds.get(what))
        for what, a, e in zip(
            ("out", "lse", "weights"), got, reference.forward(q, k, v, mask=mask, **case.options), strict=True
        )
    ]
    if "vjp" in caps.features:
        o, backward = selfattn.scaled_dot_product_attention_vjp(bq, bk, bv, mask=bm, backend=backend, **opts)
        g = np.random.default_rng(case.seed + 1).standard_normal(o.shape).astype(q.dtype)
        grads = backward(to_backend(caps.array_type, g)[0])
        bounds = reference.rounding_bounds(q, k, v, g, mask=mask, **case.options)
        results += [
            (what, a, e, bounds.get(what))
            for what, a, e in zip(
                ("dq", "dk", "dv"), grads, reference.vjp(q, k, v, g, mask=mask, **case.options), strict=True
            )
        ]
    return results


def check_case(backend: str, case) -> None:
    """Run one case on ``backend``; raise ``AssertionError`` (or the backend's error) on failure."""
    results = case_outputs(backend, case)
    if results is None:
        return
    smax = case.score_max()
    for what, got, exp, bound in results:
        assert_close(got, exp, case.dtype, what, score_max=smax, bound=bound)


def run_check(backends=None, verbose=False, out=None) -> int:
    """Check every available backend (or those named); print the table to ``out`` (default stdout).

    Returns the number of failed cases; a backend named in ``backends`` that is
    not registered or not available here counts as one failure (an automatic
    run, ``backends=None``, lists unavailable backends as skipped with the reason).
    """
    out = sys.stdout if out is None else out
    records = [r for r in selfattn.list_backends() if backends is None or r.name in backends]
    cases = generate_cases()
    failures = 0
    for name in sorted(set(backends or ()) - {r.name for r in records}):
        # Asked for by name but not registered: a failure, never a silent omission.
        print(
            f"{name}: FAIL (not a registered backend; registered: "
            f"{', '.join(r.name for r in selfattn.list_backends())})",
            file=out,
        )
        failures += 1
    for rec in records:
        if not rec.available:
            if backends is not None:  # asked for explicitly: an unusable backend fails the check
                print(f"{rec.name}: FAIL (unavailable: {rec.reason})", file=out)
                failures += 1
            else:
                print(f"{rec.name}: skipped ({rec.reason})", file=out)
            continue
        table: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
        failed: list[tuple[str, Exception]] = []
        for case in cases:
            row = table[case_group(case)]
            row[1] += 1
            try:
                check_case(rec.name, case)
                row[0] += 1
            except Exception as err:  # report every failure, keep going
                failed.append((case.id, err))
        failures += len(failed)
        passed = sum(r[0] for r in table.values())
        print(
            f"\n{rec.name} {rec.version}: {passed}/{len(cases)} cases passed ({'PASS' if not failed else 'FAIL'})",
            file=out,
        )
        print(f"  {'group':<14}{'passed':>8}{'total':>7}", file=out)
        for group, (ok, total) in table.items():
            print(f"  {group:<14}{ok:>8}{total:>7}{'' if ok == total else '  <-- FAIL'}", file=out)
        for cid, exc in failed:
            print(f"  FAILED {cid}: {type(exc).__name__}: {exc}", file=out)
            if verbose:
                traceback.print_exception(exc, file=out)
    return failures
