"""Host side of the Numba kernels: the one place that turns a Problem into kernel arguments.

Every kernel takes the per-call options as one :class:`KernelParams` named
tuple (Numba types it field by field, so a call site passes one value, not
twenty), plus the arrays it reads and writes. :func:`kernel_params` builds it
from a :class:`~selfattn.backends.Problem`. Importing this module does not
import Numba.

Conventions shared by every kernel (see :mod:`selfattn.backends._numba.tiles`):

* ``q`` ``(B*Hq, N, D)``, ``k`` ``(B*Hkv, M, D)``, ``v`` ``(B*Hkv, M, Dv)``,
  C-contiguous in the compute dtype (float32 or float64); flat batch·head
  ``bh = b*Hq + h`` uses key/value row ``b*Hkv + h // G``.
* The causal/window band is ``[i + off - lo, i + off + up]``; a side without a
  bound gets ``lo``/``up`` larger than ``N + M``.
* Masks are ``(Bm, Hm, Nm, Mm)`` C-contiguous arrays (``uint8`` for boolean
  masks, the compute dtype for additive ones) read with broadcasting, never
  expanded; ``mask_kind`` is 0 (none), 1 (bool) or 2 (float); batch ``b`` uses
  mask entry ``midx[b]``.
* ``softcap`` is 0.0 for none; ``alibi`` is ``(B, Hq)`` slopes in the compute
  dtype when ``has_alibi``.
* Dropout: ``thr`` is the uint32 threshold (0: no dropout), the counters of
  weight ``(b, h, i, j)`` are ``(bidx[b]*htot + h0 + h, row0 + i, col0 + j)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from ..._dropout import split_seed, threshold
from ..._problem import Problem

__all__ = ["KernelParams", "kernel_params", "as3", "band"]


class KernelParams(NamedTuple):
    """Per-call options of every Numba attention kernel (see the module docstring)."""

    Hq: int
    Hkv: int
    lo: int
    up: int
    off: int
    scale: float
    softcap: float
    has_alibi: bool
    alibi: np.ndarray
    mask_kind: int
    mbool: np.ndarray
    mfloat: np.ndarray
    midx: np.ndarray
    thr: int
    seed_lo: int
    seed_hi: int
    dscale: float
    bidx: np.ndarray
    h0: int
    htot: int
    row0: int
    col0: int


def band(pb: Problem) -> tuple[int, int]:
    """``(lo, up)`` of the band, with "unbounded" as a reach longer than ``N + M + 2``."""
    big = pb.n + pb.m + 2 + abs(int(pb.offset or 0))
    lo = big if pb.lower is None else int(pb.lower)
    up = big if pb.upper is None else int(pb.upper)
    return lo, up


def _writable_c(x: np.ndarray, dtype: Any = None) -> np.ndarray:
    """``x`` C-contiguous (in ``dtype``) and writeable: a copy only when it is not already so.

    Read-only arrays are copied because Numba types them differently: passing
    one would compile a second specialisation of every kernel.
    """
    a = np.ascontiguousarray(x, dtype=dtype)
    return a if a.flags.writeable else a.copy()


def as3(x: np.ndarray, cdt: np.dtype) -> np.ndarray:
    """``x`` (4-D) as a C-contiguous, writeable 3-D array in ``cdt`` (no copy when already so)."""
    a = _writable_c(x, cdt)
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


@functools.lru_cache(maxsize=256)  # batch sizes vary without bound; the arrays are cheap to rebuild
def _placeholder(role: str, key: Any) -> np.ndarray:
    """A small constant array the kernels take in place of an absent mask, bias or index (never written).

    Kept per ``(role, key)`` rather than made per call: every call of a plain
    attention needs four of them, and right after a large kernel has run
    (caches cold) each fresh array cost tens of microseconds of host time.
    They stay writeable (Numba types read-only arrays differently: a second
    specialisation of every kernel); the kernels only read them.
    """
    if role == "ones_u8":
        return np.ones((1, 1, 1, 1), np.uint8)
    if role == "zeros4":
        return np.zeros((1, 1, 1, 1), key)
    if role == "zeros2":
        return np.zeros((1, 1), key)
    if role == "zero_index":
        return np.zeros(key, np.int64)
    return np.arange(key, dtype=np.int64)  # "arange"


def kernel_params(pb: Problem) -> KernelParams:
    """The :class:`KernelParams` of ``pb`` (the mask is never expanded; it may be copied to C order)."""
    cdt = pb.compute_dtype
    lo, up = band(pb)
    if pb.mask is None or pb.mask_index is None:
        kind, mb, mf = 0, _placeholder("ones_u8", None), _placeholder("zeros4", cdt)
        midx = _placeholder("zero_index", max(pb.batch, 1))
    else:
        midx = _writable_c(pb.mask_index, np.int64)
        if pb.mask.dtype.kind == "b":
            kind, mb, mf = 1, _writable_c(pb.mask).view(np.uint8), _placeholder("zeros4", cdt)
        else:
            kind, mb, mf = 2, _placeholder("ones_u8", None), _writable_c(pb.mask, cdt)
    if pb.alibi is None:
        has_alibi, alibi = False, _placeholder("zeros2", cdt)
    else:
        has_alibi, alibi = True, _writable_c(pb.alibi, cdt)
    if pb.dropout_p > 0.0:
        assert pb.dropout_seed is not None
        slo, shi = split_seed(pb.dropout_seed)
        thr, dscale = threshold(pb.dropout_p), 1.0 / (1.0 - pb.dropout_p)
    else:
        thr, slo, shi, dscale = 0, 0, 0, 1.0
    c = pb.coords
    # Varlen: packed sequence s draws the dropout pattern of batch entry s.
    nb = pb.num_sequences if pb.is_varlen else max(pb.batch, 1)
    bidx = _placeholder("arange", nb) if c.batch_index is None else _writable_c(c.batch_index, np.int64)
    htot = pb.q_heads if c.total_heads is None else int(c.total_heads)
    softcap = 0.0 if pb.softcap is None else float(pb.softcap)
    assert math.isfinite(softcap)
    return KernelParams(
        Hq=pb.q_heads,
        Hkv=pb.kv_heads,
        lo=lo,
        up=up,
        off=int(pb.offset or 0),
        scale=float(pb.scale),
        softcap=softcap,
        has_alibi=has_alibi,
        alibi=alibi,
        mask_kind=kind,
        mbool=mb,
        mfloat=mf,
        midx=midx,
        thr=int(thr),
        seed_lo=int(slo),
        seed_hi=int(shi),
        dscale=float(dscale),
        bidx=bidx,
        h0=int(c.head_start),
        htot=htot,
        row0=int(c.row_start),
        col0=int(c.col_start),
    )
