"""Stateless functions the layers are built from: ``linear``, ``erf``, ``gelu``, ``relu``.

All take and return NumPy arrays and never modify their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from ._checks import accumulation_dtype

__all__ = ["ACTIVATIONS", "dropout", "erf", "gelu", "linear", "relu"]


def linear(
    x: NDArray[Any], weight: NDArray[Any], bias: NDArray[Any] | None = None, *, dtype: DTypeLike | None = None
) -> NDArray[Any]:
    """``x @ weight.T + bias`` (PyTorch's weight layout), in ``dtype``.

    ``x`` ``(..., in)``, ``weight`` ``(out, in)``, ``bias`` ``(out,)`` or None;
    returns ``(..., out)``. ``dtype`` defaults to
    ``numpy.result_type(x, weight, bias)``; the operands are cast to it for
    the product, except that float16 is computed in float32 and rounded once
    at the end (NumPy has no float16 BLAS, and summing in float16 loses digits).
    """
    out = np.dtype(dtype) if dtype is not None else np.result_type(x, weight, *(() if bias is None else (bias,)))
    acc = accumulation_dtype(out)
    # Casts only where needed: layers call this at sizes where each no-op call still costs.
    w = weight if weight.dtype == acc else weight.astype(acc)
    y: NDArray[Any] = (x if x.dtype == acc else x.astype(acc)) @ w.T
    if bias is not None:
        y += bias if bias.dtype == acc else bias.astype(acc)
    return y if y.dtype == out else y.astype(out)


def dropout(x: NDArray[Any], p: float, rng: np.random.Generator) -> NDArray[Any]:
    """Inverted dropout: zero each element with probability ``p``, scale the others by ``1/(1-p)``.

    Returns a new array of ``x``'s shape and dtype (``x`` itself when ``p == 0``);
    the pattern is drawn from ``rng`` (a ``numpy.random.Generator``).
    """
    if p == 0.0:
        return x
    keep = rng.random(x.shape) >= p
    return np.where(keep, x / (1.0 - p), 0).astype(x.dtype, copy=False)


def erf(x: ArrayLike) -> NDArray[np.floating[Any]]:
    """The error function, elementwise, for real arrays (NumPy has none).

    Computed in float64 from the everywhere-positive series
    ``erf(z) = 2/sqrt(pi) * exp(-z^2) * sum_n 2^n z^(2n+1) / (1*3*...*(2n+1))``
    (no cancellation) for ``|z| < 6`` and ``sign(z)`` beyond (where erf rounds
    to ±1 in float64). Agrees with :func:`math.erf` to a few ulps. Returns
    float64 for integer input, else ``x``'s dtype; NaN propagates; any shape,
    including empty.
    """
    x = np.asarray(x)
    out_dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
    z = np.abs(x.astype(np.float64))
    small = z < 6.0
    zs = np.where(small, z, 0.0)
    z2 = zs * zs
    term = zs.copy()
    total = zs.copy()
    k = 0
    while True:
        term = term * (2.0 * z2) / (2 * k + 3)
        total = total + term
        k += 1
        if k > 400 or not np.any(term > 1e-17 * total):
            break
    r = 2.0 / math.sqrt(math.pi) * np.exp(-z2) * total
    r = np.where(small, r, 1.0)
    r = np.where(np.isnan(z), np.nan, r)
    result: NDArray[np.floating[Any]] = (np.sign(x) * r).astype(out_dtype, copy=False)
    return result


def gelu(x: ArrayLike) -> NDArray[np.floating[Any]]:
    """Exact GELU ``x * (1 + erf(x / sqrt(2))) / 2`` (PyTorch's default ``approximate='none'``).

    Computed in float64 and returned in ``x``'s float dtype (float64 for integer input).
    """
    arr = np.asarray(x)
    xf = arr.astype(np.float64)
    out_dtype = arr.dtype if arr.dtype.kind == "f" else np.dtype(np.float64)
    return (0.5 * xf * (1.0 + erf(xf / math.sqrt(2.0)))).astype(out_dtype, copy=False)


def relu(x: ArrayLike) -> NDArray[Any]:
    """``max(x, 0)`` elementwise, in ``x``'s dtype (NaN propagates)."""
    return np.maximum(x, 0)


#: The activations :class:`~selfattn.nn.FeedForward` accepts, by name.
ACTIVATIONS: dict[str, Callable[[NDArray[Any]], NDArray[Any]]] = {"relu": relu, "gelu": gelu}
