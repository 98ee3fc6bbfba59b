"""Comparison helpers shared by the conformance suite and ``python -m selfattn check``.

No pytest dependency: failures raise ``AssertionError`` with a message.
"""

from __future__ import annotations

import numpy as np

from .cases import tolerance

__all__ = ["assert_close", "to_backend", "host", "case_group"]


def host(x):
    """A NumPy view of ``x`` (copies CuPy arrays to the host)."""
    if x is not None and type(x).__module__.startswith("cupy"):
        return x.get()
    return x


def to_backend(array_type: str, *arrays):
    """Convert NumPy arrays for a backend consuming ``array_type`` (None passes through)."""
    if array_type == "cupy":
        import cupy

        return tuple(None if a is None else cupy.asarray(a) for a in arrays)
    return arrays


def assert_close(actual, expected, dtype, kind: str = "out", what: str = "output", factor: float = 1.0) -> None:
    """Check ``max|a-b| / max(1, max|b|)`` against ``factor`` × :func:`tolerance`; NaN and ±inf positions must match."""
    actual = np.asarray(host(actual), dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaN positions differ"
    for sign in (1, -1):
        assert np.array_equal(actual * sign == np.inf, expected * sign == np.inf), f"{what}: infinite entries differ"
    fin = np.isfinite(expected)
    if fin.any():
        err = np.max(np.abs(actual[fin] - expected[fin])) / max(1.0, float(np.max(np.abs(expected[fin]))))
        tol = tolerance(dtype, kind) * factor
        assert err <= tol, f"{what}: scaled error {err:.3g} > {tol:.3g}"


def case_group(case) -> str:
    """The feature group a case belongs to, for summary tables (``mask``, ``causal``, ``gqa``...)."""
    return case.name.split("-")[0]
