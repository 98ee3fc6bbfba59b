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
from .compare import assert_close, case_group, host, to_backend

__all__ = ["check_case", "run_check"]


def check_case(backend: str, case) -> None:
    """Run one case on ``backend``; raise ``AssertionError`` (or the backend's error) on failure."""
    caps = selfattn.get_backend(backend).capabilities
    q, k, v, mask = case.arrays()
    bq, bk, bv, bm = to_backend(caps.array_type, q, k, v, mask)
    need = set(case.features()) | {"lse", "weights"}
    if caps.missing(caps.array_type, case.dtype, need):
        try:
            selfattn.scaled_dot_product_attention(bq, bk, bv, mask=bm, return_lse=True, return_weights=True,
                                                  backend=backend, **case.options)
        except selfattn.UnsupportedFeatureError:
            return
        raise AssertionError("expected UnsupportedFeatureError outside the declared capabilities")
    out, lse, w = selfattn.scaled_dot_product_attention(bq, bk, bv, mask=bm, return_lse=True, return_weights=True,
                                                        backend=backend, **case.options)
    ref_out, ref_lse, ref_w = reference.forward(q, k, v, mask=mask, **case.options)
    assert_close(out, ref_out, case.dtype, factor=case.tol_factor)
    assert_close(lse, ref_lse, case.dtype, what="lse", factor=case.tol_factor)
    assert_close(w, ref_w, case.dtype, what="weights", factor=case.tol_factor)
    if "vjp" in caps.features:
        o, backward = selfattn.scaled_dot_product_attention_vjp(bq, bk, bv, mask=bm, backend=backend, **case.options)
        g = np.random.default_rng(case.seed + 1).standard_normal(o.shape).astype(q.dtype)
        grads = backward(to_backend(caps.array_type, g)[0])
        for name, got, exp in zip(("dq", "dk", "dv"), grads, reference.vjp(q, k, v, g, mask=mask, **case.options)):
            assert_close(host(got), exp, case.dtype, kind="grad", what=name, factor=case.tol_factor)


def run_check(backends=None, verbose=False, out=None) -> int:
    """Check every available backend (or those named); print the table to ``out`` (default stdout).

    Returns the number of failed cases.
    """
    out = sys.stdout if out is None else out
    records = [r for r in selfattn.list_backends() if backends is None or r.name in backends]
    cases = generate_cases()
    failures = 0
    for rec in records:
        if not rec.available:
            print(f"{rec.name}: skipped ({rec.reason})", file=out)
            continue
        table = defaultdict(lambda: [0, 0])
        failed = []
        for case in cases:
            row = table[case_group(case)]
            row[1] += 1
            try:
                check_case(rec.name, case)
                row[0] += 1
            except Exception as exc:  # report every failure, keep going
                failed.append((case.id, exc))
        failures += len(failed)
        passed = sum(r[0] for r in table.values())
        print(f"\n{rec.name} {rec.version}: {passed}/{len(cases)} cases passed "
              f"({'PASS' if not failed else 'FAIL'})", file=out)
        print(f"  {'group':<14}{'passed':>8}{'total':>7}", file=out)
        for group, (ok, total) in table.items():
            print(f"  {group:<14}{ok:>8}{total:>7}{'' if ok == total else '  <-- FAIL'}", file=out)
        for cid, exc in failed:
            print(f"  FAILED {cid}: {type(exc).__name__}: {exc}", file=out)
            if verbose:
                traceback.print_exception(exc, file=out)
    return failures
