"""``merge_attention``: combine partial attention results over disjoint key sets."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._problem import Array, array_library

__all__ = ["merge_attention"]


def merge_attention(outputs: Sequence[Array], lses: Sequence[Array]) -> tuple[Array, Array]:
    """Combine attention results computed over disjoint sets of keys into the result over their union.

    Split-KV / flash-decoding, chunked prefill and Dask or ring schedules
    compute attention of the same queries against pieces of the keys; with
    each piece's output ``out_i`` and log-sum-exp ``lse_i``
    (``return_lse=True``)::

        lse = logsumexp_i(lse_i)
        out = sum_i exp(lse_i - lse) * out_i

    Parameters
    ----------
    outputs : sequence of arrays ``(..., N, Dv)``
        One dtype (float16/32/64) and one array library (NumPy, CuPy or Dask), one shape.
        Dask arrays give a lazy result, merged block by block.
    lses : sequence of arrays ``(..., N)``
        The matching log-sum-exps: float32 for float16 outputs, else the
        outputs' dtype (as :func:`scaled_dot_product_attention` returns them).

    Returns
    -------
    ``(out, lse)`` in the outputs' and lses' dtypes. Computed in the
    accumulation dtype (float32 for float16). Rows whose every ``lse_i`` is
    ``-inf`` (nothing attended in any piece) give output 0 and lse ``-inf``,
    never NaN; NaN in a piece propagates to its rows. Dropout needs no special
    care: each piece's output already carries its own dropped, rescaled weights.

    Raises
    ------
    TypeError, ValueError
        Mismatched lengths, shapes, dtypes or array libraries, named.
    """
    if isinstance(outputs, (str, bytes)) or not isinstance(outputs, Sequence):
        raise TypeError(f"outputs must be a list or tuple of arrays, got {type(outputs).__name__}")
    if isinstance(lses, (str, bytes)) or not isinstance(lses, Sequence):
        raise TypeError(f"lses must be a list or tuple of arrays, got {type(lses).__name__}")
    if len(outputs) == 0:
        raise ValueError("outputs is empty: pass at least one partial result")
    if len(outputs) != len(lses):
        raise ValueError(f"outputs and lses must have the same length, got {len(outputs)} and {len(lses)}")
    libs = set()
    for name, seq in (("outputs", outputs), ("lses", lses)):
        for i, x in enumerate(seq):
            lib = array_library(x)
            if lib is None:
                raise TypeError(
                    f"{name}[{i}] must be a numpy.ndarray, cupy.ndarray or dask.array.Array, got "
                    f"{type(x).__name__}; convert it first, e.g. with numpy.asarray"
                )
            libs.add(lib)
    if len(libs) > 1:
        raise TypeError(f"outputs and lses must come from one array library, got {sorted(libs)}")
    lib = libs.pop()
    o0 = outputs[0]
    if o0.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"outputs[0] has dtype {o0.dtype}; attention outputs are float16, float32 or float64")
    lse_dtype = np.dtype(np.float32) if o0.dtype == np.float16 else o0.dtype
    if o0.ndim < 1:
        raise ValueError(f"outputs[0] must have shape (..., N, Dv), got shape {tuple(o0.shape)}")
    for i, (o, lse) in enumerate(zip(outputs, lses, strict=True)):
        if o.dtype != o0.dtype:
            raise TypeError(f"outputs[{i}] has dtype {o.dtype} but outputs[0] has {o0.dtype}; use one dtype")
        if tuple(o.shape) != tuple(o0.shape):
            raise ValueError(f"outputs[{i}] has shape {tuple(o.shape)} but outputs[0] has {tuple(o0.shape)}")
        if lse.dtype != lse_dtype:
            raise TypeError(
                f"lses[{i}] has dtype {lse.dtype}; for {o0.dtype} outputs it must be {lse_dtype} "
                "(as return_lse=True gives it)"
            )
        if tuple(lse.shape) != tuple(o0.shape[:-1]):
            raise ValueError(
                f"lses[{i}] has shape {tuple(lse.shape)}, expected {tuple(o0.shape[:-1])} "
                "(the outputs' shape without the last axis)"
            )
    if lib == "dask":
        return _merge_dask(outputs, lses, lse_dtype)
    xp: Any = np if lib == "numpy" else sys.modules["cupy"]
    cdt = lse_dtype
    ls = xp.stack([xp.asarray(x, dtype=cdt) for x in lses])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mx = ls.max(axis=0)
        shift = xp.where(mx == -np.inf, cdt.type(0), mx)
        w = xp.exp(ls - shift)
        total = w.sum(axis=0)
        lse = (shift + xp.log(total)).astype(lse_dtype, copy=False)
        inv = xp.where(total == 0, cdt.type(0), 1.0 / total).astype(cdt, copy=False)
        out = xp.zeros(o0.shape, dtype=cdt)
        for wi, oi in zip(w, outputs, strict=True):
            out += (wi * inv)[..., None] * oi.astype(cdt, copy=False)
    return out.astype(o0.dtype, copy=False), lse


def _merge_blocks(count: int, *blocks: Array) -> tuple[Array, Array]:
    return merge_attention(list(blocks[:count]), list(blocks[count:]))


def _merge_dask(outputs: Sequence[Array], lses: Sequence[Array], lse_dtype: np.dtype) -> tuple[Array, Array]:
    """:func:`merge_attention` of (validated) Dask arrays: lazy, each block merged on its own chunks."""
    import functools

    da = sys.modules["dask.array"]
    k = len(outputs)
    signature = ",".join(["(v)"] * k + ["()"] * k) + "->(v),()"
    out, lse = da.apply_gufunc(
        functools.partial(_merge_blocks, k),
        signature,
        *outputs,
        *lses,
        output_dtypes=(outputs[0].dtype, lse_dtype),
        allow_rechunk=True,
    )
    return out, lse
