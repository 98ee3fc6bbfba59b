"""Per-thread work arrays the Numba backend reuses from one call to the next.

A fresh NumPy array of a few MiB comes in fresh pages, and every first touch of
a page is a page fault: measured on a 2-core VM, a SIMD backward at
(1, 8, 2048, 64) float32 took ~2000 faults, about 7 ms of its 83 ms, in the
padded operands it prepares. Arrays that never leave a call (the transposed
keys, the backward's padded ``q * scale`` and ``dO``) are therefore kept per
thread and handed out again when a later call on that thread asks for the same
role, shape and dtype. Nothing returned to a caller comes from here; arrays over
:data:`MAX_BYTES` are not kept (they would pin that much memory), and each
thread keeps at most :data:`MAX_ARRAYS` (the least recently used go first), so
a model that alternates a few shapes reuses all of them.
"""

from __future__ import annotations

import math
import threading

import numpy as np

__all__ = ["MAX_ARRAYS", "MAX_BYTES", "scratch", "clear"]

#: Largest array kept for reuse (larger ones are allocated per call).
MAX_BYTES = 64 * 1024 * 1024
#: Arrays kept per thread.
MAX_ARRAYS = 8


class _Kept(threading.local):
    def __init__(self) -> None:
        self.arrays: dict[tuple[str, tuple[int, ...], str], np.ndarray] = {}


_kept = _Kept()


def scratch(role: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` and ``dtype`` for ``role``, reused per thread.

    The same thread gets the same array back for the same ``(role, shape,
    dtype)`` until it is evicted, so the caller must be done with it before
    its next call for that role (every use here is within one backend call).
    """
    dt = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) * dt.itemsize > MAX_BYTES:
        return np.empty(shape, dt)
    key = (role, shape, dt.str)
    arrays = _kept.arrays
    a = arrays.pop(key, None)  # re-inserted below: most recently used last
    if a is None:
        a = np.empty(shape, dt)
        while len(arrays) >= MAX_ARRAYS:
            del arrays[next(iter(arrays))]
    arrays[key] = a
    return a


def clear() -> None:
    """Drop this thread's kept arrays (tests; or to give the memory back)."""
    _kept.arrays.clear()
