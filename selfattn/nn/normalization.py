"""Layer normalisation."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from ._checks import as_activation, bool_arg, compute_dtype, dtype_arg, eps_arg, int_arg
from ._module import Module

__all__ = ["LayerNorm"]


class LayerNorm(Module):
    """Layer normalisation over the last axis, as ``torch.nn.LayerNorm(dim)``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased
    (population) variance. Parameters ``weight`` (ones) and ``bias`` (zeros),
    shape ``(dim,)``, of ``dtype``; none with ``elementwise_affine=False``.

    Input ``(..., dim)`` (any number of leading axes, empty ones included).
    The output has the input's shape and float dtype (integer input: the
    layer's ``dtype``), see the dtype rule in :mod:`selfattn.nn`; statistics
    and the affine map are computed in float64 whatever the dtype, so float16
    and float32 results are correctly rounded. A constant row maps to
    ``bias``; NaN in a row makes that row NaN.

    Raises TypeError/ValueError naming the argument for a non-integer or
    non-positive ``dim``, a non-positive ``eps`` or a non-float ``dtype``.
    """

    def __init__(
        self, dim: int, *, eps: float = 1e-5, elementwise_affine: bool = True, dtype: DTypeLike = np.float32
    ) -> None:
        super().__init__()
        self.dim = int_arg("dim", dim)
        self.eps = eps_arg(eps)
        self.elementwise_affine = bool_arg("elementwise_affine", elementwise_affine)
        self.dtype = dtype_arg(dtype)
        if self.elementwise_affine:
            self._own = {"weight": np.ones(self.dim, self.dtype), "bias": np.zeros(self.dim, self.dtype)}

    def __repr__(self) -> str:
        return f"LayerNorm({self.dim}, eps={self.eps}, dtype={self.dtype})"

    def __call__(self, x: ArrayLike) -> NDArray[np.floating[Any]]:
        """Normalise ``x`` ``(..., dim)``; returns the same shape in ``x``'s float dtype."""
        arr = as_activation("x", x, self.dim, ndims=range(1, 64))
        out_dtype = compute_dtype((arr,), self.dtype)
        xf = arr.astype(np.float64)
        mu = xf.mean(axis=-1, keepdims=True)
        var = ((xf - mu) ** 2).mean(axis=-1, keepdims=True)
        y: NDArray[np.float64] = (xf - mu) / np.sqrt(var + self.eps)
        if self._own:
            y = y * self._own["weight"] + self._own["bias"]
        return y.astype(out_dtype, copy=False)
