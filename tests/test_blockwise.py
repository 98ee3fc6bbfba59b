"""The blockwise row-block rule with a cache target (the NumPy backend's default) and its results."""

import numpy as np
import pytest

import selfattn
from selfattn.backends import numpy_
from selfattn.backends._blockwise import BANDED_ROWS, GEMM_ROWS, row_block

MiB = 2**20


def test_cache_target_groups_small_sequences_into_cache_sized_tiles():
    # (8, 8, 128, 128) float32: the whole call is a 4 MiB score tile; a 2 MiB target splits it by batch
    assert row_block(8, 8, 128, 128, 4, 32 * MiB, False) == (8, 128)
    bb, rows = row_block(8, 8, 128, 128, 4, 32 * MiB, False, cache_bytes=2 * MiB)
    assert rows == 128 and bb == 4 and bb * 8 * rows * 128 * 4 <= 2 * MiB


def test_cache_target_keeps_enough_rows_for_the_products():
    # long keys: the target alone would give 16 rows; blocks keep GEMM_ROWS while the budget allows
    bb, rows = row_block(1, 8, 4096, 4096, 4, 32 * MiB, False, cache_bytes=2 * MiB)
    assert (bb, rows) == (1, GEMM_ROWS)
    # ... but never above the hard budget
    bb, rows = row_block(1, 8, 4096, 1 << 20, 4, 32 * MiB, False, cache_bytes=2 * MiB)
    assert rows * 8 * (1 << 20) * 4 <= 32 * MiB and rows >= 1
    # banded calls still cap the rows, and N < GEMM_ROWS takes the whole sequence
    assert row_block(1, 8, 4096, 4096, 4, 32 * MiB, True, cache_bytes=64 * MiB)[1] == BANDED_ROWS
    assert row_block(1, 8, 100, 4096, 4, 32 * MiB, False, cache_bytes=MiB) == (1, 100)


@pytest.mark.parametrize("cache", [None, 64 * 1024, 2 * MiB])
def test_numpy_results_do_not_depend_on_the_blocking(cache, monkeypatch):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 4, 300, 16))
    k = rng.standard_normal((3, 2, 280, 16))
    v = rng.standard_normal((3, 2, 280, 8))
    ref, ref_lse = selfattn.scaled_dot_product_attention(q, k, v, causal=True, return_lse=True, backend="numpy")
    _, bw = selfattn.scaled_dot_product_attention_vjp(q, k, v, causal=True, backend="numpy")
    grads = bw(np.ones_like(ref))
    monkeypatch.setattr(numpy_.backend, "cache_bytes", cache)
    monkeypatch.setattr(numpy_.backend, "block_bytes", 256 * 1024)  # many blocks
    out, lse = selfattn.scaled_dot_product_attention(q, k, v, causal=True, return_lse=True, backend="numpy")
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)
    _, bw = selfattn.scaled_dot_product_attention_vjp(q, k, v, causal=True, backend="numpy")
    for g, r in zip(bw(np.ones_like(ref)), grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-10)
