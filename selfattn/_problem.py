"""Validation and normalization of an attention call.

:func:`normalize` checks every argument of the public API once, before any
backend is chosen, and turns the call into a :class:`Problem`: the same
canonical, validated description that every backend receives. Because no
backend ever sees raw user input, every backend fails the same way on the same
bad input, and compiled kernels can rely on the invariants documented on
:class:`Problem` (shapes consistent, indices in range, sizes that fit in int32).
"""

from __future__ import annotations

import math
import numbers
import secrets
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = ["Problem", "Coordinates", "normalize", "normalize_varlen", "array_library", "MAX_EXTENT"]

#: Largest allowed N, M and flat batch·head count. Kernels index with int32 in
#: places (CUDA grids) and the dropout counters are 32-bit, so larger extents
#: are rejected up front instead of overflowing inside a kernel.
MAX_EXTENT = 2**31 - 1

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def array_library(x: Any) -> str | None:
    """Name of the array library that owns ``x`` (``"numpy"``/``"cupy"``/``"dask"``), or None.

    CuPy and Dask are looked up in ``sys.modules`` and never imported: if a
    library has not been imported, ``x`` cannot be one of its arrays.
    """
    if type(x) is np.ndarray:
        return "numpy"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return "cupy"
    dask_array = sys.modules.get("dask.array.core")
    if dask_array is not None and isinstance(x, dask_array.Array):
        return "dask"
    return None


def _unknown(shape: tuple[Any, ...]) -> bool:
    """True when a Dask shape has a length Dask does not know yet (NaN)."""
    return any(isinstance(s, float) and math.isnan(s) for s in shape)


def _as_dask(x: Any) -> Array:
    """``x`` (a NumPy, CuPy or Dask array) as a Dask array; a lazy wrapper, nothing is computed."""
    da = sys.modules["dask.array"]
    return x if array_library(x) == "dask" else da.from_array(x, chunks=-1)


def _describe(x: Any) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


def _check_array(name: str, x: Any) -> str:
    lib = array_library(x)
    if lib is None:
        if isinstance(x, np.ndarray):
            raise TypeError(
                f"{name} must be a plain numpy.ndarray, got the subclass {_describe(x)}; "
                f"call numpy.asarray({name}) first"
            )
        hint = "numpy.asarray(...)"
        mod = type(x).__module__.split(".")[0]
        if mod == "torch":
            hint = f"{name}.detach().cpu().numpy() (or cupy.asarray for a CUDA tensor)"
        elif mod in ("jax", "jaxlib"):
            hint = f"numpy.asarray({name})"
        raise TypeError(
            f"{name} must be a numpy.ndarray, cupy.ndarray or dask.array.Array, got {_describe(x)}; "
            f"convert it first, e.g. with {hint}"
        )
    if lib == "dask" and _unknown(x.shape):
        raise ValueError(
            f"{name} is a Dask array of unknown shape {tuple(x.shape)}; attention needs known "
            f"chunk sizes: call {name}.compute_chunk_sizes() (or pass lengths to from_delayed) first"
        )
    dt = x.dtype
    if dt not in _FLOAT_DTYPES:
        if dt.kind == "b":
            what = "boolean data"
        elif dt.kind in "iu":
            what = f"integer data ({dt})"
        elif dt.kind == "c":
            what = f"complex data ({dt})"
        else:
            what = f"dtype {dt}"
        raise TypeError(
            f"{name} has {what}; attention needs float16, float32 or float64 arrays: "
            f"convert with {name}.astype(numpy.float32)"
        )
    return lib


def _check_bool(name: str, value: Any) -> bool:
    if value is True or value is False:
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({_describe(value)})")


def _check_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    if allow_none and value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({_describe(value)})")
    return int(value)


def _normalize_window(window: Any, n: int, m: int) -> tuple[int, int] | None:
    if window is None:
        return None
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"window must be an int or a (left, right) pair, got {window!r} with {len(window)} items")
        left, right = window
    else:
        left = right = window
    left = _check_int("window[0] (left)" if isinstance(window, (tuple, list)) else "window", left)
    right = _check_int("window[1] (right)" if isinstance(window, (tuple, list)) else "window", right)
    assert left is not None and right is not None
    if left < 0 or right < 0:
        raise ValueError(f"window sizes must be non-negative, got window={window!r}")
    # Clamp: a reach beyond n + m keys cannot change the mask, and clamping keeps
    # the values inside every kernel's integer type.
    cap = n + m + 1
    return (min(left, cap), min(right, cap))


@dataclass(frozen=True)
class Coordinates:
    """Where a problem's elements sit in a larger call: the dropout counters of a chunk.

    The dropout pattern is a pure function of each weight's *global*
    ``(batch·head, i, j)`` index (:mod:`selfattn._dropout`). A whole call has
    the defaults (its own indices are global). A chunk of a larger call -- a
    block of a Dask graph, one piece of a split-KV schedule -- carries here
    how its local indices map back: local flat batch ``b``, query head ``h``,
    row ``i`` and key ``j`` use the counters

    ``bh = batch_index[b] * total_heads + head_start + h``,
    ``row = row_start + i``, ``col = col_start + j``.

    ``batch_index`` is a host ``int64`` array of length ``B`` (None: ``b``
    itself); ``total_heads`` None means the problem's own ``Hq``.
    """

    batch_index: np.ndarray | None = None
    head_start: int = 0
    total_heads: int | None = None
    row_start: int = 0
    col_start: int = 0

    def is_default(self, q_heads: int) -> bool:
        """True when the local indices are the global ones (a whole call)."""
        return (
            self.batch_index is None
            and self.head_start == 0
            and self.total_heads in (None, q_heads)
            and self.row_start == 0
            and self.col_start == 0
        )

    def batch_heads(self, b0: int, b1: int, q_heads: int) -> np.ndarray:
        """Global flat batch·head counters of local batches ``[b0, b1)`` x every query head, ``int64 (b1-b0)*Hq``."""
        total = q_heads if self.total_heads is None else self.total_heads
        b = np.arange(b0, b1, dtype=np.int64) if self.batch_index is None else self.batch_index[b0:b1]
        return (b[:, None] * total + self.head_start + np.arange(q_heads, dtype=np.int64)[None, :]).reshape(-1)


#: Array of the problem's array library (``numpy.ndarray`` or ``cupy.ndarray``);
#: typed loosely because CuPy is never imported for type checking.
Array = Any


@dataclass(frozen=True)
class Problem:
    """A validated, normalized attention call, as every backend receives it.

    This is the backend contract (exported as :class:`selfattn.backends.Problem`).
    Arrays keep the caller's array library, dtype and memory (views, never
    copies):

    * ``query``: ``(B, Hq, N, D)``, ``key``: ``(B, Hkv, M, D)``, ``value``:
      ``(B, Hkv, M, Dv)``, where ``B`` is the product of the caller's batch axes
      (``batch_shape``). Possibly non-contiguous, possibly read-only; backends
      must not write to them.
    * ``mask``: None, or a bool/float array ``(Bm, Hm, Nm, Mm)`` with
      ``Hm in (1, Hq)``, ``Nm in (1, N)``, ``Mm in (1, M)``; batch entry ``b``
      uses ``mask[mask_index[b]]`` (``mask_index`` is a host int64 array of
      length ``B``). Size-1 axes broadcast; the mask is never expanded.
    * The causal/window band: query ``i`` may attend key ``j`` iff
      ``i + offset - lower <= j <= i + offset + upper`` (``lower``/``upper``
      None: unbounded on that side). ``offset`` is ``M - N`` for a whole call
      (bottom-right alignment); a chunk of a larger call carries its own.
    * ``softcap``: None or a positive float; scaled scores ``s`` become
      ``softcap * tanh(s / softcap)`` before any bias or mask is added.
    * ``alibi``: None or an array ``(B, Hq)`` (float32/float64, the inputs'
      array library) of ALiBi slopes: ``-alibi[b, h] * |i + offset - j|`` is
      added to the (soft-capped) scores.
    * ``dropout_seed`` is an int in ``[0, 2**64)`` whenever ``dropout_p > 0``;
      ``coords`` maps local indices to the pattern's global counters.
    * Packed variable-length batches (:func:`selfattn.scaled_dot_product_attention_varlen`):
      ``cu_seqlens_q``/``cu_seqlens_k`` are host int64 arrays of length
      ``S + 1`` (``S`` sequences); ``query`` is ``(1, Hq, total_q, D)`` and
      sequence ``s`` has rows ``[cu_q[s], cu_q[s+1])`` and keys
      ``[cu_k[s], cu_k[s+1])``. Band, ALiBi and dropout positions are local to
      each sequence (bottom-right aligned per sequence, dropout counters as
      batch entry ``s``); ``alibi`` is ``(S, Hq)``; there is no mask.
      :meth:`sequence` gives one sequence as an ordinary problem.

    Order of operations: scale, softcap, + alibi, + float mask / bool mask,
    causal/window band, softmax, dropout.

    Invariants: ``Hq % Hkv == 0``, ``D >= 1``, ``N, M, B*Hq <= MAX_EXTENT``,
    ``scale`` finite and positive. The dataclass is frozen: derive variants
    with :func:`dataclasses.replace` or :meth:`chunk`.
    """

    array_type: str
    query: Array
    key: Array
    value: Array
    batch_shape: tuple[int, ...]
    two_d: bool = False
    mask: Array | None = None
    mask_index: np.ndarray | None = None
    causal: bool = False
    window: tuple[int, int] | None = None
    scale: float = 1.0
    softcap: float | None = None
    alibi: Array | None = None
    dropout_p: float = 0.0
    dropout_seed: int | None = None
    return_lse: bool = False
    return_weights: bool = False
    needs_vjp: bool = False
    offset: int | None = None
    coords: Coordinates = field(default_factory=Coordinates)
    cu_seqlens_q: np.ndarray | None = None
    cu_seqlens_k: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.offset is None:
            object.__setattr__(self, "offset", int(self.key.shape[2]) - int(self.query.shape[2]))

    # -- derived sizes -------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        """The input dtype (also the dtype of the output, weights and gradients)."""
        return self.query.dtype

    @property
    def compute_dtype(self) -> np.dtype:
        """Accumulation dtype: float32 for float16 inputs, else the input dtype."""
        return np.dtype(np.float32) if self.query.dtype == np.float16 else np.dtype(self.query.dtype)

    @property
    def lse_dtype(self) -> np.dtype:
        """dtype of the returned log-sum-exp (float32 for float16 inputs, as in FlashAttention)."""
        return self.compute_dtype

    @property
    def batch(self) -> int:
        """Flat batch size B."""
        return int(self.query.shape[0])

    @property
    def q_heads(self) -> int:
        """Query heads Hq."""
        return int(self.query.shape[1])

    @property
    def kv_heads(self) -> int:
        """Key/value heads Hkv."""
        return int(self.key.shape[1])

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.q_heads // self.kv_heads

    @property
    def n(self) -> int:
        """Query length N."""
        return int(self.query.shape[2])

    @property
    def m(self) -> int:
        """Key length M."""
        return int(self.key.shape[2])

    @property
    def d(self) -> int:
        """Query/key head size D."""
        return int(self.query.shape[3])

    @property
    def dv(self) -> int:
        """Value head size Dv."""
        return int(self.value.shape[3])

    @property
    def flops(self) -> float:
        """Forward work in floating-point operations, ``2·B·Hq·N·M·(D + Dv)`` (``Σ Nₛ·Mₛ`` for varlen).

        Counted before band skipping.
        """
        qs, vs = self.query.shape, self.value.shape  # shapes read once: this runs on every automatic call
        if self.cu_seqlens_q is not None and self.cu_seqlens_k is not None:
            nm = float(np.dot(np.diff(self.cu_seqlens_q).astype(np.float64), np.diff(self.cu_seqlens_k)))
            return 2.0 * qs[1] * nm * (qs[3] + vs[3])
        return 2.0 * qs[0] * qs[1] * qs[2] * vs[2] * (qs[3] + vs[3])

    @property
    def is_varlen(self) -> bool:
        """True for a packed variable-length batch (see the class docstring)."""
        return self.cu_seqlens_q is not None

    @property
    def num_sequences(self) -> int:
        """Number of packed sequences (1 for an ordinary problem)."""
        return 1 if self.cu_seqlens_q is None else len(self.cu_seqlens_q) - 1

    def sequence(self, s: int) -> Problem:
        """Packed sequence ``s`` as an ordinary problem (views; batch 1, its own band offset).

        Its dropout counters are those of batch entry ``s`` of the equivalent
        padded call, with positions local to the sequence.
        """
        assert self.cu_seqlens_q is not None and self.cu_seqlens_k is not None
        q0, q1 = int(self.cu_seqlens_q[s]), int(self.cu_seqlens_q[s + 1])
        k0, k1 = int(self.cu_seqlens_k[s]), int(self.cu_seqlens_k[s + 1])
        return replace(
            self,
            query=self.query[:, :, q0:q1],
            key=self.key[:, :, k0:k1],
            value=self.value[:, :, k0:k1],
            batch_shape=(1,),
            alibi=None if self.alibi is None else self.alibi[s : s + 1],
            offset=(k1 - k0) - (q1 - q0),
            cu_seqlens_q=None,
            cu_seqlens_k=None,
            coords=Coordinates(batch_index=np.array([s], np.int64), total_heads=self.q_heads),
        )

    @property
    def lower(self) -> int | None:
        """How many keys left of the aligned diagonal a query may reach (None: unbounded)."""
        return None if self.window is None else self.window[0]

    @property
    def upper(self) -> int | None:
        """How many keys right of the aligned diagonal a query may reach (None: unbounded)."""
        ups = [
            u for u in ((0 if self.causal else None), None if self.window is None else self.window[1]) if u is not None
        ]
        return min(ups) if ups else None

    @property
    def want_lse(self) -> bool:
        """Whether the forward must produce the log-sum-exp (asked for, or kept for the VJP)."""
        return self.return_lse or self.needs_vjp

    @property
    def is_chunk(self) -> bool:
        """True when this problem is a chunk of a larger call (non-default offset or counters)."""
        if self.cu_seqlens_q is not None:
            return False
        return self.offset != self.m - self.n or not self.coords.is_default(self.q_heads)

    def key_range(self, i0: int, i1: int) -> tuple[int, int]:
        """Half-open range ``[j0, j1)`` of keys that any query row in ``[i0, i1)`` may attend.

        Keys outside it are masked for every row of the block by causal/window
        masking, so a backend may skip them entirely. Empty ranges have ``j0 >= j1``.
        """
        m, off = self.m, int(self.offset)  # type: ignore[arg-type]
        j0 = 0 if self.lower is None else max(0, i0 + off - self.lower)
        j1 = m if self.upper is None else min(m, i1 - 1 + off + self.upper + 1)
        return j0, max(j0, j1)

    def band(self, i0: int, i1: int, j0: int, j1: int, xp: Any = np) -> Array | None:
        """Boolean ``(i1-i0, j1-j0)`` array, True where causal/window allow attending (None if no band)."""
        if self.lower is None and self.upper is None:
            return None
        rel = self.distance(i0, i1, j0, j1, xp)
        ok = xp.ones(rel.shape, dtype=bool)
        if self.lower is not None:
            ok &= rel >= -self.lower
        if self.upper is not None:
            ok &= rel <= self.upper
        return ok

    def distance(self, i0: int, i1: int, j0: int, j1: int, xp: Any = np) -> Array:
        """Signed ``j - (i + offset)`` for rows ``[i0, i1)`` and keys ``[j0, j1)`` (int64)."""
        return xp.arange(j0, j1, dtype=xp.int64)[None, :] - (xp.arange(i0, i1, dtype=xp.int64)[:, None] + self.offset)

    def mask_block(self, b0: int, b1: int, i0: int, i1: int, j0: int, j1: int, xp: Any = np) -> Array:
        """The mask restricted to flat batches ``[b0,b1)``, rows ``[i0,i1)``, keys ``[j0,j1)``.

        Shape ``(b1-b0 or 1, Hm, i1-i0 or 1, j1-j0 or 1)``: broadcast axes stay size 1.
        ``xp`` is the mask's array module; a gathered batch index is moved to it.
        """
        mk = self.mask
        assert mk is not None and self.mask_index is not None
        rows = slice(i0, i1) if mk.shape[2] > 1 else slice(None)
        cols = slice(j0, j1) if mk.shape[3] > 1 else slice(None)
        if mk.shape[0] == 1:
            return mk[:, :, rows, cols]
        idx = self.mask_index[b0:b1]
        if idx.size and idx[0] == b0 and np.array_equal(idx, np.arange(b0, b1)):
            return mk[b0:b1, :, rows, cols]
        return mk[xp.asarray(idx)][:, :, rows, cols]

    def dropout_keep(self, b0: int, b1: int, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        """The dropout keep-mask of batches ``[b0,b1)``, rows ``[i0,i1)``, keys ``[j0,j1)``.

        A host bool array ``(b1-b0, Hq, i1-i0, j1-j0)``.

        True = kept (then scaled by ``1/(1-dropout_p)``). Drawn from the
        documented counter hash (:mod:`selfattn._dropout`) at the problem's
        global counters (:attr:`coords`), so every backend, the backward pass
        and every chunk of a split call draw the same pattern.
        """
        from ._dropout import keep_mask

        assert self.dropout_seed is not None, "dropout_keep needs dropout_p > 0"
        c = self.coords
        keep = keep_mask(
            self.dropout_seed,
            c.batch_heads(b0, b1, self.q_heads),
            np.arange(i0, i1) + c.row_start,
            np.arange(j0, j1) + c.col_start,
            self.dropout_p,
        )
        return keep.reshape(b1 - b0, self.q_heads, i1 - i0, j1 - j0)

    def chunk(
        self,
        batches: tuple[int, int] | None = None,
        heads: tuple[int, int] | None = None,
        rows: tuple[int, int] | None = None,
        keys: tuple[int, int] | None = None,
    ) -> Problem:
        """The sub-problem of flat batches, query heads, query rows and keys ``[start, stop)`` each.

        Its result is exactly the corresponding piece of this problem's partial
        result over those keys: the band, ALiBi distances and the dropout
        counters keep their global positions (``offset`` and ``coords`` are
        adjusted), the mask is sliced (never expanded), and GQA stays aligned:
        ``heads`` must cover whole key/value groups (multiples of ``group``).
        The chunk never asks for weights; whether it returns lse is unchanged.
        Merging the partial ``(out, lse)`` of chunks over disjoint key ranges
        with :func:`selfattn.merge_attention` gives the whole call's result.
        """
        b0, b1 = batches if batches is not None else (0, self.batch)
        h0, h1 = heads if heads is not None else (0, self.q_heads)
        i0, i1 = rows if rows is not None else (0, self.n)
        j0, j1 = keys if keys is not None else (0, self.m)
        g = self.group
        if h0 % g or h1 % g:
            raise ValueError(f"heads=({h0}, {h1}) must cover whole key/value groups of {g} query heads")
        q = self.query[b0:b1, h0:h1, i0:i1]
        k = self.key[b0:b1, h0 // g : h1 // g, j0:j1]
        v = self.value[b0:b1, h0 // g : h1 // g, j0:j1]
        mask = mask_index = None
        if self.mask is not None:
            assert self.mask_index is not None
            mk = self.mask
            mask = mk[
                :,
                slice(h0, h1) if mk.shape[1] > 1 else slice(None),
                slice(i0, i1) if mk.shape[2] > 1 else slice(None),
                slice(j0, j1) if mk.shape[3] > 1 else slice(None),
            ]
            mask_index = self.mask_index[b0:b1]
        alibi = None if self.alibi is None else self.alibi[b0:b1, h0:h1]
        c = self.coords
        bidx = np.arange(b0, b1, dtype=np.int64) if c.batch_index is None else c.batch_index[b0:b1]
        coords = Coordinates(
            batch_index=bidx,
            head_start=c.head_start + h0,
            total_heads=self.q_heads if c.total_heads is None else c.total_heads,
            row_start=c.row_start + i0,
            col_start=c.col_start + j0,
        )
        return replace(
            self,
            query=q,
            key=k,
            value=v,
            batch_shape=(b1 - b0,),
            two_d=False,
            mask=mask,
            mask_index=mask_index,
            alibi=alibi,
            return_weights=False,
            offset=self.m - self.n if self.offset is None else self.offset + i0 - j0,
            coords=coords,
        )

    def out_shape(self, last: int) -> tuple[int, ...]:
        """The caller-facing shape of an array laid out ``(B, Hq, N, last)``."""
        if self.two_d:
            return (self.n, last)
        return tuple(self.batch_shape) + (self.q_heads, self.n, last)

    def lse_shape(self) -> tuple[int, ...]:
        """The caller-facing shape of the log-sum-exp ``(..., Hq, N)``."""
        if self.two_d:
            return (self.n,)
        return tuple(self.batch_shape) + (self.q_heads, self.n)

    def output_bytes(self) -> int:
        """Bytes of the arrays the forward returns (output, lse, weights) -- allocated before any work."""
        b, hq, n, _ = self.query.shape
        bhn = b * hq * n
        total = bhn * self.value.shape[3] * self.query.dtype.itemsize
        if self.return_lse or self.needs_vjp:
            total += bhn * (4 if self.query.dtype.itemsize == 2 else self.query.dtype.itemsize)
        if self.return_weights:
            total += bhn * self.key.shape[2] * self.query.dtype.itemsize
        return int(total)


def _normalize_mask(
    mask: Any, lib: str, full_shape: tuple[int, ...], batch_shape: tuple[int, ...]
) -> tuple[Array, np.ndarray]:
    mlib = array_library(mask)
    if mlib is None:
        raise TypeError(
            f"mask must be a numpy.ndarray, cupy.ndarray or dask.array.Array of bool or float values, got "
            f"{_describe(mask)}; convert it first, e.g. with numpy.asarray(mask)"
        )
    if mlib == "dask" and _unknown(mask.shape):
        raise ValueError(
            f"mask is a Dask array of unknown shape {tuple(mask.shape)}; call mask.compute_chunk_sizes() first"
        )
    if lib == "dask":
        # Dask inputs take a mask of any array library the chunks can use; it joins the graph lazily.
        mask = _as_dask(mask)
    elif mlib != lib:
        raise TypeError(f"mask is a {mlib} array but query is a {lib} array; pass all arrays from one library")
    if mask.dtype.kind != "b" and mask.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"mask has dtype {mask.dtype}; it must be bool (True = attend) or float16/32/64 (added to the scores). "
            "For a 0/1 integer mask use mask.astype(bool)"
        )
    pairs = zip(mask.shape[::-1], full_shape[::-1], strict=False)
    if mask.ndim > len(full_shape) or any(s not in (1, t) for s, t in pairs):
        raise ValueError(
            f"mask with shape {tuple(mask.shape)} is not broadcastable to the scores' shape {tuple(full_shape)}; "
            "each mask axis must be 1 or match, counting from the right"
        )
    # Left-pad to (*batch, Hq, N, M): adding size-1 axes is a view.
    ndim_full = len(batch_shape) + 3
    mk = mask.reshape((1,) * (ndim_full - mask.ndim) + tuple(mask.shape))
    mbatch = mk.shape[: len(batch_shape)]
    nb = int(np.prod(batch_shape, dtype=np.int64))
    nmb = int(np.prod(mbatch, dtype=np.int64))
    tail = mk.shape[len(batch_shape) :]
    # Reshaping the caller's own batch axes into one costs at most a copy of the
    # caller's mask (never of the broadcast result); an index map then tells each
    # flat batch entry which mask entry it uses.
    mk4 = mk.reshape((nmb,) + tuple(tail))
    if nmb == nb:
        mask_index = np.arange(nb, dtype=np.int64)
    elif nmb == 1:
        mask_index = np.zeros(nb, dtype=np.int64)
    else:
        mask_index = np.broadcast_to(np.arange(nmb, dtype=np.int64).reshape(mbatch), batch_shape).reshape(-1).copy()
    return mk4, mask_index


def _dask_holds_numpy(*arrays: Any) -> bool:
    """Whether every Dask array among ``arrays`` has NumPy chunks (its ``_meta`` is a NumPy array)."""
    return all(isinstance(getattr(x, "_meta", None), np.ndarray) for x in arrays if not isinstance(x, np.ndarray))


def normalize(
    query: Any,
    key: Any,
    value: Any,
    *,
    mask: Any = None,
    causal: bool = False,
    window: Any = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    return_lse: bool = False,
    return_weights: bool = False,
    needs_vjp: bool = False,
) -> Problem:
    """Validate a call of the public API and build its :class:`Problem`.

    Raises ``TypeError`` for wrong kinds of values and ``ValueError`` for wrong
    values, each naming the argument, what was received and what to do. Never
    copies or modifies ``query``, ``key`` or ``value``.
    """
    libs = {name: _check_array(name, x) for name, x in (("query", query), ("key", key), ("value", value))}
    if set(libs.values()) == {"dask", "numpy"} and _dask_holds_numpy(query, key, value):
        # As Dask's own operations do: a NumPy array beside Dask arrays becomes a one-chunk Dask
        # array (a view, never a copy); the Dask backend rechunks it to its pair grid.
        query, key, value = (_as_dask(x) for x in (query, key, value))
        libs = dict.fromkeys(libs, "dask")
    if len(set(libs.values())) > 1:
        hint = (
            "wrap the others with dask.array.from_array(...) (NumPy arrays beside NumPy-backed Dask arrays are "
            "wrapped automatically)"
            if "dask" in libs.values()
            else "convert them all with numpy.asarray or cupy.asarray"
        )
        raise TypeError(
            "query, key and value must come from one array library, got "
            + ", ".join(f"{k}={v}" for k, v in libs.items())
            + f"; {hint}"
        )
    lib = libs["query"]
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share one dtype, got {query.dtype}, {key.dtype} and {value.dtype}; "
            "cast them with .astype(...) to one of float16, float32, float64"
        )
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., N, D), got shape {tuple(x.shape)}")
    if not (query.ndim == key.ndim == value.ndim):
        raise ValueError(
            f"query, key and value must have the same number of dimensions, got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
        )
    two_d = query.ndim == 2
    if two_d:
        q4, k4, v4 = (x[None, None] for x in (query, key, value))
        batch_shape = ()
    else:
        batch_shape = tuple(query.shape[:-3])
        for name, x in (("key", key), ("value", value)):
            if tuple(x.shape[:-3]) != batch_shape:
                raise ValueError(
                    f"{name} has batch shape {tuple(x.shape[:-3])} but query has {batch_shape}; "
                    "batch axes (all axes before the head axis -3) must match exactly"
                )
        nb = math.prod(batch_shape)
        q4, k4, v4 = (x.reshape((nb,) + tuple(x.shape[-3:])) for x in (query, key, value))
    _, hq, n, d = q4.shape
    _, hkv, m, dk = k4.shape
    _, hv, mv, dv = v4.shape
    if dk != d:
        raise ValueError(
            f"key's last axis ({dk}) must equal query's last axis D ({d}); got shapes {tuple(query.shape)} "
            f"and {tuple(key.shape)}"
        )
    if d < 1:
        raise ValueError(f"the head size D (query's last axis) must be at least 1, got shape {tuple(query.shape)}")
    if (hv, mv) != (hkv, m):
        raise ValueError(
            f"value must have the same head count and length as key: key {tuple(key.shape)} vs value "
            f"{tuple(value.shape)}"
        )
    if hkv < 1 or hq % hkv:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for grouped-query attention; "
            f"got query {tuple(query.shape)} and key {tuple(key.shape)}"
        )
    for what, size in (("query length N", n), ("key length M", m), ("batch*heads", q4.shape[0] * hq)):
        if size > MAX_EXTENT:
            raise ValueError(f"{what} = {size} exceeds the supported maximum {MAX_EXTENT}; split the call")

    causal = _check_bool("causal", causal)
    return_lse = _check_bool("return_lse", return_lse)
    return_weights = _check_bool("return_weights", return_weights)
    window = _normalize_window(window, n, m)

    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif type(scale) is float and math.isfinite(scale) and scale > 0:
        pass  # fast path for the common case
    else:
        if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float, got {scale!r} ({_describe(scale)})")
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be finite and positive, got {scale!r}; omit it for 1/sqrt(D)")

    if type(dropout_p) is float or type(dropout_p) is int:
        pass  # fast path; range checked below
    elif isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {dropout_p!r} ({_describe(dropout_p)})")
    dropout_p = float(dropout_p)
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    seed = _check_int("dropout_seed", dropout_seed, allow_none=True)
    if seed is not None and not (0 <= seed < 2**64):
        raise ValueError(f"dropout_seed must be in [0, 2**64), got {seed}")
    if dropout_p > 0.0 and seed is None:
        seed = secrets.randbits(64)

    if softcap is not None:
        if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
            raise TypeError(f"softcap must be None or a positive float, got {softcap!r} ({_describe(softcap)})")
        softcap = float(softcap)
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(
                f"softcap must be finite and positive (e.g. 50.0), got {softcap!r}; pass None to disable soft-capping"
            )

    mk = mask_index = None
    if mask is not None:
        full = (n, m) if two_d else batch_shape + (hq, n, m)
        mk, mask_index = _normalize_mask(mask, lib, full, batch_shape)
        if two_d:
            mk = mk.reshape((1, 1) + tuple(mk.shape[-2:]))
            mask_index = np.zeros(1, dtype=np.int64)

    alibi = None
    if alibi_slopes is not None:
        alibi = _normalize_alibi(alibi_slopes, lib, batch_shape, hq)

    return Problem(
        array_type=lib,
        query=q4,
        key=k4,
        value=v4,
        batch_shape=batch_shape,
        two_d=two_d,
        mask=mk,
        mask_index=mask_index,
        causal=causal,
        window=window,
        scale=scale,
        softcap=softcap,
        alibi=alibi,
        dropout_p=dropout_p,
        dropout_seed=seed if dropout_p > 0.0 else None,
        return_lse=return_lse,
        return_weights=return_weights,
        needs_vjp=bool(needs_vjp),
    )


def _normalize_alibi(slopes: Any, lib: str, batch_shape: tuple[int, ...], q_heads: int) -> Array:
    """ALiBi slopes ``(Hq,)`` or ``(..., Hq)`` (batch axes broadcastable) as a ``(B, Hq)`` array."""
    slib = array_library(slopes)
    if slib is None:
        raise TypeError(
            f"alibi_slopes must be a numpy.ndarray, cupy.ndarray or dask.array.Array of float32/float64 "
            f"slopes, got {_describe(slopes)}; convert it first, e.g. with numpy.asarray(alibi_slopes, "
            "dtype=numpy.float32)"
        )
    if slib == "dask" and _unknown(slopes.shape):
        raise ValueError(
            f"alibi_slopes is a Dask array of unknown shape {tuple(slopes.shape)}; call "
            "alibi_slopes.compute_chunk_sizes() first"
        )
    if lib == "dask":
        slopes = _as_dask(slopes)  # Dask inputs take slopes of any array library, lazily
    elif slib != lib:
        raise TypeError(f"alibi_slopes is a {slib} array but query is a {lib} array; pass all arrays from one library")
    if slopes.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(
            f"alibi_slopes has dtype {slopes.dtype}; it must be float32 or float64: convert with "
            "alibi_slopes.astype(numpy.float32)"
        )
    full = tuple(batch_shape) + (q_heads,)
    if (
        slopes.ndim < 1
        or slopes.ndim > len(full)
        or slopes.shape[-1] != q_heads
        or any(s not in (1, t) for s, t in zip(slopes.shape[::-1], full[::-1], strict=False))
    ):
        raise ValueError(
            f"alibi_slopes with shape {tuple(slopes.shape)} does not fit the query heads: it must be "
            f"(Hq,) = ({q_heads},) or (..., Hq) with batch axes broadcastable to {tuple(batch_shape)}"
        )
    nb = math.prod(batch_shape)
    if lib == "dask":
        return sys.modules["dask.array"].broadcast_to(slopes, full).reshape(nb, q_heads)
    xp = np if lib == "numpy" else sys.modules["cupy"]
    return xp.ascontiguousarray(xp.broadcast_to(slopes, full).reshape(nb, q_heads))


def _check_cu_seqlens(name: str, cu: Any, total: int, total_name: str) -> np.ndarray:
    """``cu_seqlens`` as a host int64 array, validated (TypeError/ValueError naming ``name``)."""
    lib = array_library(cu)
    if lib is None:
        raise TypeError(
            f"{name} must be a numpy (or cupy) integer array of cumulative sequence lengths, got "
            f"{_describe(cu)}; convert it with numpy.asarray({name}, dtype=numpy.int32)"
        )
    if cu.dtype.kind not in "iu":
        raise TypeError(
            f"{name} has dtype {cu.dtype}; it must be an integer array (int32 or int64), e.g. "
            f"numpy.asarray({name}, dtype=numpy.int32)"
        )
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of length B + 1 (B sequences), got shape {tuple(cu.shape)}")
    host = np.asarray(cu.get() if lib == "cupy" else cu).astype(np.int64)
    if host[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {int(host[0])}")
    if np.any(np.diff(host) < 0):
        at = int(np.argmax(np.diff(host) < 0))
        raise ValueError(
            f"{name} must be non-decreasing, but {name}[{at + 1}] = {int(host[at + 1])} < "
            f"{name}[{at}] = {int(host[at])}"
        )
    if host[-1] != total:
        raise ValueError(f"{name} must end at {total_name} = {total}, got {name}[-1] = {int(host[-1])}")
    return host


def normalize_varlen(
    query: Any,
    key: Any,
    value: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    causal: bool = False,
    window: Any = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    return_lse: bool = False,
    needs_vjp: bool = False,
) -> Problem:
    """Validate a packed variable-length call and build its :class:`Problem` (before any kernel runs).

    ``query (Hq, total_q, D)``, ``key (Hkv, total_k, D)``, ``value (Hkv, total_k, Dv)``;
    ``cu_seqlens_*`` integer arrays of length ``S + 1``, non-decreasing, from
    0 to ``total_*``; ``alibi_slopes`` ``(Hq,)`` or ``(S, Hq)``.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        lib = array_library(x)
        if lib is not None and x.ndim != 3:
            raise ValueError(
                f"{name} must be 3-D (heads, total tokens, head size) for a packed varlen call, got "
                f"shape {tuple(x.shape)}"
            )
    pb = normalize(
        query,
        key,
        value,
        causal=causal,
        window=window,
        scale=scale,
        softcap=softcap,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        return_lse=return_lse,
        needs_vjp=needs_vjp,
    )
    cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, pb.n, "total_q (query.shape[1])")
    ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, pb.m, "total_k (key.shape[1])")
    if len(cq) != len(ck):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (B + 1), got {len(cq)} and {len(ck)}"
        )
    nseq = len(cq) - 1
    alibi = None
    if alibi_slopes is not None:
        lib = pb.array_type
        slib = array_library(alibi_slopes)
        if slib is not None and alibi_slopes.ndim == 2 and alibi_slopes.shape[0] not in (1, nseq):
            raise ValueError(
                f"alibi_slopes with shape {tuple(alibi_slopes.shape)} must be (Hq,) or (B, Hq) = "
                f"({nseq}, {pb.q_heads}) for {nseq} packed sequences"
            )
        alibi = _normalize_alibi(alibi_slopes, lib, (nseq,), pb.q_heads)
    window = pb.window
    if window is not None:  # clamp to the longest sequence rather than the totals (same meaning, smaller ints)
        longest = int(max(np.diff(cq).max(initial=0), np.diff(ck).max(initial=0)))
        window = (min(window[0], 2 * longest + 1), min(window[1], 2 * longest + 1))
    return replace(pb, alibi=alibi, window=window, cu_seqlens_q=cq, cu_seqlens_k=ck, offset=0)
