"""Comparison helpers shared by the conformance suite and ``python -m selfattn check``.

No pytest dependency: failures raise ``AssertionError`` with a message.
"""

from __future__ import annotations

import numpy as np

from .cases import logit_headroom, output_dtype, tolerance

__all__ = ["assert_close", "error_ratio", "to_backend", "backend_options", "host", "case_group", "dask_chunks"]


def host(x):
    """A NumPy view of ``x`` (copies CuPy arrays to the host; computes Dask arrays on the synchronous scheduler)."""
    if x is not None and type(x).__module__.startswith("dask"):
        x = x.compute(scheduler="synchronous")
    if x is not None and type(x).__module__.startswith("cupy"):
        return x.get()
    return x


def to_backend(array_type: str, *arrays):
    """Convert NumPy arrays for a backend consuming ``array_type`` (None passes through)."""
    if array_type == "cupy":
        import cupy

        return tuple(None if a is None else cupy.asarray(a) for a in arrays)
    if array_type == "dask":
        import dask.array as da

        return tuple(None if a is None else da.from_array(a, chunks=dask_chunks(a.shape)) for a in arrays)
    return arrays


def dask_chunks(shape: tuple) -> tuple:
    """The conformance suite's Dask chunking of an array of ``shape``: one of several, chosen by the shape.

    So that every chunking meets many cases (and query, key and mask of one
    case usually differ): uneven thirds of the sequence axis; single batch
    and head chunks (GQA groups to realign), sequence chunks of 7 and a split
    last axis (to rechunk); or one chunk (the backend's default split).
    """
    variant = sum(shape) % 3
    if variant == 0:
        return tuple(max(1, -(-n // 3)) if i == len(shape) - 2 else -1 for i, n in enumerate(shape))
    if variant == 1:
        last = len(shape) - 1
        return tuple(max(1, -(-n // 2)) if i == last else 7 if i == last - 1 else 1 for i, n in enumerate(shape))
    return tuple(-1 for _ in shape)


def _positions_match(actual, expected, what: str) -> None:
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaN positions differ"
    for sign, name in ((1, "+inf"), (-1, "-inf")):
        assert np.array_equal(actual * sign == np.inf, expected * sign == np.inf), f"{what}: {name} entries differ"


def error_ratio(actual, expected, what: str, dtype, *, score_max: float = 0.0, bound=None) -> float:
    """The largest ``|actual - oracle| / (atol * h * A + rtol * |oracle| + bound)`` over the finite oracle entries.

    ``dtype`` is the inputs' dtype; the rule and its numbers are
    :data:`selfattn.testing.cases.TOLERANCES` for output ``what``'s own dtype.
    ``bound`` (optional, broadcastable to ``expected``) is a per-element error
    the algorithm is allowed on top, e.g.
    :func:`selfattn.testing.reference.rounding_bounds` for out, dq and dk.
    A value <= 1 passes. NaN/inf positions are not compared here (see
    :func:`assert_close`); NaN in ``actual`` where the oracle is finite gives inf.
    """
    actual = np.asarray(host(actual), dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    fin = np.isfinite(expected)
    if not fin.any():
        return 0.0
    atol, rtol = tolerance(what, dtype)
    a, e = actual[fin], expected[fin]
    scale = 1.0 if what == "lse" else max(1.0, float(np.max(np.abs(e))))
    allowed = atol * logit_headroom(score_max) * scale + rtol * np.abs(e)
    if bound is not None:
        allowed = allowed + np.broadcast_to(np.asarray(bound, np.float64), expected.shape)[fin]
    with np.errstate(invalid="ignore"):
        err = np.abs(a - e)
    if np.isnan(err).any():
        return float("inf")
    return float(np.max(err / allowed))


def assert_close(actual, expected, dtype, what: str = "out", *, score_max: float = 0.0, bound=None) -> None:
    """Assert that backend output ``what`` matches the oracle's ``expected``.

    ``dtype`` is the inputs' dtype. Checks, in order: the array's dtype is
    :func:`~selfattn.testing.cases.output_dtype` (so the lse of float16 inputs
    must be float32), the shape, that NaN and +-inf sit exactly where the
    oracle has them, and that every finite entry is within the per-element
    tolerance (:func:`error_ratio` <= 1) for a call whose largest score
    magnitude is ``score_max``, plus the per-element ``bound`` when given.
    """
    want = output_dtype(what, dtype)
    got_dtype = getattr(actual, "dtype", None)
    assert got_dtype == want, f"{what}: dtype {got_dtype} != {want}"
    actual = np.asarray(host(actual), dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    _positions_match(actual, expected, what)
    ratio = error_ratio(actual, expected, what, dtype, score_max=score_max, bound=bound)
    if ratio > 1.0:
        fin = np.isfinite(expected)
        err = np.abs(actual[fin] - expected[fin])
        i = int(np.argmax(err))
        atol, rtol = tolerance(what, dtype)
        plus = "" if bound is None else ", + bound"
        raise AssertionError(
            f"{what}: error {ratio:.3g}x the {want.name} tolerance (atol {atol:g} x headroom "
            f"{logit_headroom(score_max):.3g}, rtol {rtol:g}{plus}); largest error {err[i]:.3g} "
            f"at oracle value {expected[fin][i]:.6g}"
        )


def case_group(case) -> str:
    """The feature group a case belongs to, for summary tables (``mask``, ``causal``, ``gqa``...)."""
    return case.name.split("-")[0]


def backend_options(array_type: str, options: dict) -> dict:
    """A case's keyword options for a backend call: array-valued options (``alibi_slopes``) converted with
    :func:`to_backend`, the rest unchanged (the oracle takes the NumPy originals)."""
    return {k: (to_backend(array_type, v)[0] if isinstance(v, np.ndarray) else v) for k, v in options.items()}
