"""The position-wise feed-forward block of a Transformer layer."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from ._checks import as_activation, bool_arg, compute_dtype, dropout_arg, dtype_arg, int_arg
from ._module import Module, torch_linear_init
from .functional import ACTIVATIONS, dropout, linear

__all__ = ["FeedForward"]


def _activation_arg(activation: Any) -> str:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return activation


class FeedForward(Module):
    """Position-wise feed-forward block ``linear2(dropout(act(linear1(x))))``.

    Parameters ``linear1_weight (ff_dim, embed_dim)``, ``linear2_weight
    (embed_dim, ff_dim)`` and, with ``bias=True``, ``linear1_bias (ff_dim,)``,
    ``linear2_bias (embed_dim,)``, of ``dtype``, with PyTorch's default Linear
    init ``U(±1/sqrt(fan_in))`` (``seed`` seeds ``numpy.random.default_rng``).
    ``activation`` is ``"relu"`` or ``"gelu"`` (exact erf GELU, PyTorch's
    default). ``dropout_p`` drops hidden activations, only in calls with
    ``training=True``.

    Input ``(..., embed_dim)``; the output has the same shape and the input's
    float dtype (integer input: the layer's ``dtype``), see the dtype rule in
    :mod:`selfattn.nn`: the parameters are cast to it for the call; float16
    products are computed in float32.
    """

    def __init__(
        self,
        embed_dim: int,
        ff_dim: int,
        *,
        activation: str = "relu",
        dropout_p: float = 0.0,
        bias: bool = True,
        dtype: DTypeLike = np.float32,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = int_arg("embed_dim", embed_dim)
        self.ff_dim = int_arg("ff_dim", ff_dim)
        self.activation = _activation_arg(activation)
        self.dropout_p = dropout_arg(dropout_p)
        self.bias = bool_arg("bias", bias)
        self.dtype = dtype_arg(dtype)
        rng = np.random.default_rng(seed)
        w1, b1 = torch_linear_init(rng, self.ff_dim, self.embed_dim, self.dtype, self.bias)
        w2, b2 = torch_linear_init(rng, self.embed_dim, self.ff_dim, self.dtype, self.bias)
        self._own = {"linear1_weight": w1, "linear2_weight": w2}
        if b1 is not None and b2 is not None:
            self._own.update(linear1_bias=b1, linear2_bias=b2)

    def __repr__(self) -> str:
        return f"FeedForward({self.embed_dim}, {self.ff_dim}, activation={self.activation!r}, dtype={self.dtype})"

    def __call__(
        self, x: ArrayLike, *, training: bool = False, rng: np.random.Generator | None = None
    ) -> NDArray[np.floating[Any]]:
        """Apply to ``x`` ``(..., embed_dim)``; ``rng`` (a numpy Generator) drives dropout when ``training``."""
        arr = as_activation("x", x, self.embed_dim, ndims=range(1, 64))
        training = bool_arg("training", training)
        dt = compute_dtype((arr,), self.dtype)
        p = self._own
        hid = ACTIVATIONS[self.activation](linear(arr, p["linear1_weight"], p.get("linear1_bias"), dtype=dt))
        if training and self.dropout_p > 0:
            hid = dropout(hid, self.dropout_p, np.random.default_rng() if rng is None else rng)
        return linear(hid, p["linear2_weight"], p.get("linear2_bias"), dtype=dt)
