"""What the Dask backend's tasks run: one chunk pair's partial attention, and the merges and sums after it.

These functions run on the workers (any Dask scheduler: synchronous, threads,
processes, ``distributed``), on the chunks' own arrays (NumPy or CuPy). The
graph that calls them is planned in :mod:`selfattn.backends.dask_`.

A *pair* is one (batch·head chunk, query chunk, key chunk). Its task builds
the pair's :class:`~selfattn.backends.Problem` directly from the blocks, with
the band offset and the dropout counters of its global position
(:class:`~selfattn.backends.Coordinates`), so the causal/window band, ALiBi
distances and the dropout pattern are exactly those of the whole call, and
hands it to the backend that automatic selection picks for the chunks' array
type (NumPy chunks: numba or numpy; CuPy chunks: cupy), under the task's
thread budget (:func:`selfattn.backends.numba_.thread_budget`).

float16 blocks are widened to float32 before the inner call: the kernels
compute float16 in float32 anyway, so the numbers are the same, and partial
results stay in the accumulation dtype until the last merge.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._dispatch import select
from .._merge import merge_attention
from .._problem import Array, Coordinates, Problem, array_library
from ._base import Backend

__all__ = [
    "Options",
    "Pair",
    "inner_backend",
    "pair_forward",
    "pair_weights",
    "pair_backward",
    "merge",
    "total",
    "cast",
    "full",
]


@dataclass(frozen=True)
class Options:
    """The call-wide options every pair task of one call shares (picklable, no arrays)."""

    scale: float
    causal: bool
    window: tuple[int, int] | None
    softcap: float | None
    dropout_p: float
    dropout_seed: int | None
    #: Inner backend name (``selfattn.inner-backend``), None for automatic selection per pair.
    inner: str | None
    #: Numba threads a task may use (``selfattn.threads-per-task``), None for no limit.
    threads: int | None
    #: True when the mask blocks carry the batch axis (else it broadcasts over the batch).
    mask_batched: bool


@dataclass(frozen=True)
class Pair:
    """Where one pair's blocks sit in the whole call: the band offset and the dropout counters."""

    options: Options
    offset: int
    coords: Coordinates


def _module(lib: str) -> Any:
    # A task that makes a block from nothing (``full``) may be the first CuPy user in its worker process.
    return np if lib == "numpy" else importlib.import_module(lib)


def _to_library(x: Array | None, lib: str) -> Array | None:
    """``x`` as an array of ``lib`` (a NumPy mask with CuPy chunks, say); None stays None."""
    if x is None or array_library(x) == lib:
        return x
    if lib == "numpy":
        return x.get()  # a CuPy block for NumPy chunks
    import cupy

    return cupy.asarray(x)


def _block(x: Array) -> Array:
    """``x`` C-contiguous and aligned, float16 widened to float32 (copies only when needed).

    Blocks arrive as strided views (local schedulers) or as unpickled buffers
    that need not even be itemsize-aligned (``distributed``); NumPy's matmul
    takes a different, differently-rounded loop for such memory. The same
    layout everywhere gives the same numbers, bit for bit, on every scheduler.
    """
    if x.dtype == np.float16:
        return x.astype(np.float32)
    if isinstance(x, np.ndarray):
        return np.require(x, requirements=("C", "A"))
    return _module("cupy").ascontiguousarray(x)


def problem(
    pair: Pair,
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None,
    alibi: Array | None,
    *,
    weights: bool = False,
    vjp: bool = False,
) -> Problem:
    """The pair's :class:`Problem` from its blocks (float16 widened to float32; lse always wanted)."""
    o = pair.options
    lib = array_library(query)
    if lib is None:
        raise TypeError(f"the Dask backend's chunks must be NumPy or CuPy arrays, got {type(query).__name__}")
    bb = int(query.shape[0])
    mask_index = None
    if mask is not None:
        mask = _to_library(mask, lib)
        mask_index = np.arange(bb, dtype=np.int64) if o.mask_batched else np.zeros(bb, dtype=np.int64)
    return Problem(
        array_type=lib,
        query=_block(query),
        key=_block(key),
        value=_block(value),
        batch_shape=(bb,),
        mask=mask,
        mask_index=mask_index,
        causal=o.causal,
        window=o.window,
        scale=o.scale,
        softcap=o.softcap,
        alibi=_to_library(alibi, lib),
        dropout_p=o.dropout_p,
        dropout_seed=o.dropout_seed,
        return_lse=True,
        return_weights=weights,
        needs_vjp=vjp,
        offset=pair.offset,
        coords=pair.coords,
    )


def inner_backend(pb: Problem, name: str | None) -> Backend:
    """The backend that runs a pair: ``name`` if given (checked like ``backend=``), else automatic.

    Automatic selection is the dispatcher's rule for the pair's own array type
    (priority order, available, every capability the pair needs, the declared
    work range by ``Problem.flops``), without the caller's ``use_backend`` /
    ``set_backend`` / ``SELFATTN_BACKEND`` choice: that choice named the Dask
    backend (or a backend for other arrays) and is not seen the same way by
    every worker process.
    """
    if name is not None:
        return select(pb, name)
    return select(pb, automatic=True)


def _budget(pair: Pair) -> Any:
    from .numba_ import thread_budget  # a context variable only: numba itself is not imported here

    return thread_budget(pair.options.threads)


def pair_forward(
    pair: Pair, query: Array, key: Array, value: Array, mask: Array | None, alibi: Array | None
) -> tuple[Array, Array]:
    """Partial ``(out, lse)`` of one pair over its keys, in the accumulation dtype."""
    pb = problem(pair, query, key, value, mask, alibi)
    impl = inner_backend(pb, pair.options.inner)
    with _budget(pair):
        out, lse, _ = impl.forward(pb)
    return out, lse


def pair_weights(
    pair: Pair, query: Array, key: Array, value: Array, mask: Array | None, alibi: Array | None, lse: Array, dtype: str
) -> Array:
    """The whole call's attention probabilities on one pair's block, ``(bb, hh, rows, cols)`` in ``dtype``.

    The pair's own probabilities ``exp(s - lse_pair)`` are rescaled by
    ``exp(lse_pair - lse)`` with the whole row's ``lse``; rows the pair does not
    reach (``lse_pair = -inf``) are 0, never NaN.
    """
    pb = problem(pair, query, key, value, mask, alibi, weights=True)
    impl = inner_backend(pb, pair.options.inner)
    with _budget(pair):
        _, lse_pair, w = impl.forward(pb)
    xp = _module(pb.array_type)
    cdt = pb.compute_dtype
    row_lse = xp.asarray(_to_library(lse, pb.array_type), dtype=cdt)
    with np.errstate(invalid="ignore", over="ignore"):
        factor = xp.where(lse_pair == -np.inf, cdt.type(0), xp.exp(lse_pair - row_lse))
    return (w * factor[..., None]).astype(dtype, copy=False)


def pair_backward(
    pair: Pair,
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None,
    alibi: Array | None,
    out: Array,
    lse: Array,
    grad_out: Array,
) -> tuple[Array, Array, Array]:
    """One pair's pieces ``(dq, dk, dv)`` in the accumulation dtype.

    ``out``, ``lse`` and ``grad_out`` are the whole call's rows of the pair's
    query chunk, so the inner backward recomputes the pair's probabilities with
    the global ``lse`` and takes ``rowsum(dO * O)`` of the whole row: its
    ``dq`` is the pair's share of the query gradient, its ``dk``/``dv`` the
    query chunk's share of the key chunk's gradients (GQA heads already summed).
    """
    pb = problem(pair, query, key, value, mask, alibi, vjp=True)
    impl = inner_backend(pb, pair.options.inner)
    with _budget(pair):
        return impl.backward(pb, _block(out), _block(lse), _block(grad_out))


def merge(parts: list[tuple[Array, Array]]) -> tuple[Array, Array]:
    """Log-sum-exp merge of partial ``(out, lse)`` over disjoint key chunks (one node of the merge tree)."""
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    return out, lse


def total(parts: list[Any], field: int) -> Array:
    """Sum of gradient pieces (one node of a sum tree): field ``field`` of a pair's tuple, or a partial sum."""
    arrays = [p[field] if isinstance(p, tuple) else p for p in parts]
    acc = arrays[0] + arrays[1] if len(arrays) > 1 else arrays[0].copy()  # never write to a task's input
    for a in arrays[2:]:
        acc += a
    return acc


def cast(part: Any, field: int, dtype: str) -> Array:
    """Field ``field`` of a tuple result (or the array itself) in ``dtype``: an output block."""
    x = part[field] if isinstance(part, tuple) else part
    return x.astype(dtype, copy=False)


def full(shape: tuple[int, ...], value: float, dtype: str, lib: str) -> Array:
    """A block of ``value`` in array library ``lib``: output blocks no pair reaches (out 0, lse -inf)."""
    return _module(lib).full(shape, value, dtype=dtype)
