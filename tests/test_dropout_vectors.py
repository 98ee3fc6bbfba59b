"""Known-answer vectors for the dropout hash, checked without the code under test.

The literal table lives in the conformance suite
(``selfattn.testing.test_conformance.DROPOUT_VECTORS``, where every backend's
pattern is checked against it through the public API). It was written out by
a C implementation of the steps documented in :mod:`selfattn._dropout` (the
program is in docs/conformance.md); here a pure-Python implementation of the
same steps, sharing nothing with the package, re-derives every row, and
``selfattn._dropout`` -- which the oracle and the backends all call, so the
conformance comparisons cannot see a change in it -- is checked against the
table, including a planted change of each of its constants.
"""

from __future__ import annotations

import numpy as np
import pytest

from selfattn import _dropout
from selfattn.testing.test_conformance import DROPOUT_VECTORS

MASK32 = 0xFFFFFFFF


def fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser, on Python ints."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def documented_hash(seed: int, bh: int, i: int, j: int) -> int:
    """The uint32 ``u`` of weight ``(bh, i, j)``, step by step as selfattn/_dropout.py documents it."""
    k0, k1 = seed & MASK32, seed >> 32
    head = fmix32(k0 ^ fmix32(k1 ^ ((bh * 0x9E3779B1) & MASK32)))
    row = fmix32(head ^ ((i * 0x85EBCA77) & MASK32))
    return fmix32(row ^ ((j * 0xC2B2AE3D) & MASK32))


def documented_threshold(p: float) -> int:
    return min(int(p * 2**32 // 1), 2**32 - 1)


def test_table_matches_the_documented_steps():
    assert len(DROPOUT_VECTORS) >= 20
    assert {r[6] for r in DROPOUT_VECTORS} == {True, False}  # both outcomes are represented
    for seed, bh, i, j, u, p, kept in DROPOUT_VECTORS:
        assert documented_hash(seed, bh, i, j) == u, (seed, bh, i, j)
        assert (u >= documented_threshold(p)) == kept, (seed, bh, i, j, p)


def check_dropout_module() -> None:
    """``selfattn._dropout`` against the literal table: every step, the threshold and the keep mask."""
    assert [_dropout.threshold(p) for p in (0.1, 0.25, 0.5, 0.75)] == [429496729, 1073741824, 2147483648, 3221225472]
    assert _dropout.threshold(1 - 2**-60) == 2**32 - 1
    for seed, bh, i, j, u, p, kept in DROPOUT_VECTORS:
        head = _dropout.head_hash(seed, np.array([bh]))
        row = _dropout.row_hash(head, np.array([i]))
        got = _dropout.fmix32(row ^ np.uint32((j * _dropout.MUL_COL) & MASK32))
        assert int(got[0]) == u, f"hash of (seed={seed:#x}, bh={bh}, i={i}, j={j}): {int(got[0]):#010x} != {u:#010x}"
        keep = _dropout.keep_mask(seed, np.array([bh]), np.array([i]), np.array([j]), p)
        assert keep.shape == (1, 1, 1) and bool(keep[0, 0, 0]) == kept, (seed, bh, i, j, p)


def test_dropout_module_matches_the_known_answers():
    check_dropout_module()


def test_keep_mask_on_a_grid_matches_the_table():
    """The vectorised keep mask over a whole (bh, i, j) grid agrees with the table at its points."""
    for seed, p in {(r[0], r[5]) for r in DROPOUT_VECTORS if r[1] < 6 and r[2] < 40 and r[3] < 70}:
        grid = _dropout.keep_mask(seed, np.arange(6), np.arange(40), np.arange(70), p)
        for s, bh, i, j, _, q, kept in DROPOUT_VECTORS:
            if (s, q) == (seed, p) and bh < 6 and i < 40 and j < 70:
                assert grid[bh, i, j] == kept


@pytest.mark.parametrize("name", ["MUL_BH", "MUL_ROW", "MUL_COL", "_M1", "_M2"])
def test_a_changed_hash_constant_is_caught(monkeypatch, name):
    """Planted bug: one constant of the shared hash changed (the oracle would follow it; the table does not)."""
    old = getattr(_dropout, name)
    monkeypatch.setattr(_dropout, name, type(old)(int(old) ^ 0x10))
    with pytest.raises(AssertionError):
        check_dropout_module()
