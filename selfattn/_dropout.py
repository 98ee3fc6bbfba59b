"""The counter-based dropout pattern shared by every backend.

The keep/drop decision for attention weight ``(bh, i, j)`` -- flat batch·head
index ``bh = b * Hq + h`` (``b`` the row-major flat index over the batch axes,
``h`` the query head), query row ``i``, key column ``j`` -- is a pure function of
``(seed, bh, i, j)``. No random state is carried between calls, so the forward
pass, the backward pass and every backend (NumPy, Numba, CUDA) draw exactly the
same pattern, however each one tiles the work. This mirrors what FlashAttention
does with Philox counters; the hash below is smaller and easy to re-implement.

All arithmetic is on unsigned 32-bit integers, wrapping modulo 2**32::

    fmix32(h):               # MurmurHash3's finaliser, a bijection on uint32
        h ^= h >> 16; h *= 0x85EBCA6B
        h ^= h >> 13; h *= 0xC2B2AE35
        h ^= h >> 16

    k0, k1 = seed & 0xFFFFFFFF, seed >> 32          # seed is a uint64
    head   = fmix32(k0 ^ fmix32(k1 ^ (bh * 0x9E3779B1)))
    row    = fmix32(head ^ (i * 0x85EBCA77))
    u      = fmix32(row ^ (j * 0xC2B2AE3D))
    drop   = u < threshold(p),  threshold(p) = min(floor(p * 2**32), 2**32 - 1)

Kept weights are multiplied by ``1 / (1 - p)``. Each step is a bijection of its
counter, so for a fixed ``(seed, bh, i)`` distinct ``j`` give distinct ``u``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "MUL_BH",
    "MUL_ROW",
    "MUL_COL",
    "FMIX_1",
    "FMIX_2",
    "threshold",
    "fmix32",
    "head_hash",
    "row_hash",
    "keep_mask",
    "split_seed",
]

#: Multipliers of the batch·head, row and column counters.
MUL_BH = 0x9E3779B1
MUL_ROW = 0x85EBCA77
MUL_COL = 0xC2B2AE3D
#: The two multipliers of MurmurHash3's 32-bit finaliser.
FMIX_1 = 0x85EBCA6B
FMIX_2 = 0xC2B2AE35
_M1 = np.uint32(FMIX_1)
_M2 = np.uint32(FMIX_2)


def threshold(p: float) -> int:
    """The uint32 threshold below which a weight is dropped, for drop probability ``p`` in [0, 1)."""
    return min(int(np.floor(p * 4294967296.0)), 4294967295)


def split_seed(seed: int) -> tuple[int, int]:
    """Split a uint64 seed into its low and high 32-bit words ``(k0, k1)``."""
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 finaliser on a ``uint32`` array (returns a new array; wraps mod 2**32)."""
    h = np.asarray(h, dtype=np.uint32).copy()
    h ^= h >> np.uint32(16)
    h *= _M1
    h ^= h >> np.uint32(13)
    h *= _M2
    h ^= h >> np.uint32(16)
    return h


def _times(counter, mul: int) -> np.ndarray:
    # Multiply in uint64 and keep the low word: the same result as wrapping uint32
    # arithmetic, without relying on NumPy's overflow behaviour for scalars.
    c = np.asarray(counter, dtype=np.uint64)
    return ((c * np.uint64(mul)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def head_hash(seed: int, bh) -> np.ndarray:
    """Per batch·head hash ``head`` (uint32) for an array of flat batch·head indices."""
    k0, k1 = split_seed(seed)
    inner = fmix32(np.uint32(k1) ^ _times(bh, MUL_BH))
    return fmix32(np.uint32(k0) ^ inner)


def row_hash(head: np.ndarray, rows) -> np.ndarray:
    """Per row hash, broadcasting ``head`` against the query-row indices ``rows``."""
    return fmix32(np.asarray(head, dtype=np.uint32) ^ _times(rows, MUL_ROW))


def keep_mask(seed: int, bh, rows, cols, p: float) -> np.ndarray:
    """Boolean keep-mask of shape ``(len(bh), len(rows), len(cols))``.

    ``bh``, ``rows`` and ``cols`` are 1-D integer arrays of counters. True means
    the weight is kept (and later scaled by ``1/(1-p)``).
    """
    head = head_hash(seed, np.asarray(bh).reshape(-1))
    row = row_hash(head[:, None], np.asarray(rows).reshape(1, -1))
    u = fmix32(row[:, :, None] ^ _times(np.asarray(cols).reshape(1, 1, -1), MUL_COL))
    return u >= np.uint32(threshold(p))
