"""Position encodings: fixed sinusoids, rotary embeddings (RoPE) and ALiBi slopes."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

__all__ = ["alibi_slopes", "apply_rotary", "sinusoidal_positions"]


def _positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    result = int(value)
    if result < 0 or (result == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {result}")
    return result


def sinusoidal_positions(
    length: int, dim: int, *, base: float = 10000.0, dtype: DTypeLike = np.float32
) -> NDArray[np.floating[Any]]:
    """The fixed sinusoidal position table of "Attention Is All You Need".

    Returns an array ``(length, dim)`` of ``dtype`` (default float32) with
    ``P[p, 2i] = sin(p / base**(2i/dim))`` and ``P[p, 2i+1] = cos(p / base**(2i/dim))``.
    It is computed in float64 and cast once. ``length = 0`` gives an empty
    ``(0, dim)`` table; an odd ``dim`` is allowed (the last column is a sine).
    Add it to token embeddings ``(B, N, dim)`` as ``x + P[:N]``.

    Raises TypeError for non-integer ``length``/``dim`` and ValueError for
    ``length < 0``, ``dim < 1`` or a non-positive ``base``.
    """
    length = _positive_int("length", length, allow_zero=True)
    dim = _positive_int("dim", dim)
    base = float(base)
    if not base > 0 or not np.isfinite(base):
        raise ValueError(f"base must be a finite positive number, got {base}")
    pos = np.arange(length, dtype=np.float64)[:, None]
    inv = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    ang = pos * inv[None, :]
    table = np.empty((length, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(ang)
    table[:, 1::2] = np.cos(ang[:, : dim // 2])
    return table.astype(dtype, copy=False)


def apply_rotary(
    x: NDArray[np.floating[Any]], positions: ArrayLike, *, base: float = 10000.0, interleaved: bool = False
) -> NDArray[np.floating[Any]]:
    """Rotary position embedding (RoPE) of queries or keys.

    Parameters
    ----------
    x : float array ``(..., N, D)``, D even
        Typically ``(B, H, N, D)`` queries or keys. float16/32/64.
    positions : int or float array broadcastable to ``x.shape[:-1]``
        The position of each row; usually ``numpy.arange(N)`` (shape ``(N,)``),
        or ``offset + numpy.arange(N)`` for a continued (KV-cache) sequence.
    base : float
        Frequency base; pair ``i`` rotates by ``position * base**(-2i/D)``.
    interleaved : bool
        False (default, GPT-NeoX / Llama "rotate half" layout): feature ``i``
        is paired with feature ``i + D/2``. True (GPT-J / RoFormer layout):
        feature ``2i`` is paired with ``2i + 1``.

    Returns
    -------
    array of ``x``'s shape and dtype (angles and the rotation are computed in
    float64, so float16/float32 results are correctly rounded rotations).
    Rotating queries and keys by their positions makes ``q_m . k_n`` depend on
    the positions only through ``m - n``; norms are preserved. ``N = 0`` is
    allowed. ``x`` is not modified.

    Raises TypeError for a non-float ``x`` or non-numeric ``positions``,
    ValueError for odd ``D``, a 0-d/1-d ``x``, or shapes that do not broadcast.
    """
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(
            f"x must be a float16/float32/float64 numpy.ndarray, got "
            f"{type(x).__name__}{' of dtype ' + str(x.dtype) if hasattr(x, 'dtype') else ''}"
        )
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., N, D), got shape {x.shape}")
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"x's last axis (D = {d}) must be even for rotary embeddings")
    pos = np.asarray(positions)
    if pos.dtype.kind not in "iuf" or pos.dtype.kind == "b":
        raise TypeError(f"positions must be an int or float array, got dtype {pos.dtype}")
    try:
        ok = np.broadcast_shapes(pos.shape, x.shape[:-1]) == x.shape[:-1]
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"positions with shape {pos.shape} does not broadcast to x.shape[:-1] = {x.shape[:-1]}")
    base = float(base)
    if not base > 0 or not np.isfinite(base):
        raise ValueError(f"base must be a finite positive number, got {base}")
    half = d // 2
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # (D/2,)
    ang = pos.astype(np.float64)[..., None] * inv  # (..., D/2)
    cos, sin = np.cos(ang), np.sin(ang)
    xf = x.astype(np.float64)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf[..., :half], xf[..., half:]
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    out = np.empty(np.broadcast_shapes((*r1.shape[:-1], d), x.shape), dtype=np.float64)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = r1, r2
    else:
        out[..., :half], out[..., half:] = r1, r2
    return out.astype(x.dtype, copy=False)


def _alibi_power_of_two(n: int) -> list[float]:
    # 2**(-8 i / n) for i = 1..n, each computed directly (exact for n dividing 8, correctly rounded otherwise).
    return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]


def alibi_slopes(num_heads: int, *, dtype: DTypeLike = np.float64) -> NDArray[np.floating[Any]]:
    """The standard ALiBi slopes for ``num_heads`` heads (Press et al., "Train Short, Test Long").

    For ``n`` a power of two the slopes are the geometric sequence
    ``2**(-8 i / n)`` for ``i = 1..n`` (8 heads: 1/2, 1/4, ..., 1/256).
    Otherwise, with ``p`` the largest power of two below ``n``, they are the
    ``p`` slopes of ``p`` heads followed by the first ``n - p`` of every other
    slope of ``2p`` heads (``2**(-8 i / (2p))`` for ``i = 1, 3, 5, ...``),
    exactly as the reference ``get_slopes`` of the ALiBi repository,
    Hugging Face's ``build_alibi_tensor`` and FlashAttention's tests compute
    them. 12 heads: ``2**-1 ... 2**-8`` then ``2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5``.

    Returns a ``(num_heads,)`` array of ``dtype`` (float32 or float64, what
    :func:`selfattn.scaled_dot_product_attention`'s ``alibi_slopes`` takes),
    computed in float64. Raises TypeError for a non-integer ``num_heads`` or
    another dtype, ValueError for ``num_heads < 1``.
    """
    n = _positive_int("num_heads", num_heads)
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64 (the dtypes alibi_slopes accepts), got {dt}")
    p = 2 ** math.floor(math.log2(n))
    slopes = _alibi_power_of_two(p)
    if p != n:
        slopes += _alibi_power_of_two(2 * p)[0::2][: n - p]
    return np.array(slopes, dtype=np.float64).astype(dt)
