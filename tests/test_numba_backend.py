"""The Numba backend against the float64 oracle (skipped where numba is missing)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import selfattn
import selfattn._problem
from selfattn import _dropout
from selfattn.testing import reference as ref

numba = pytest.importorskip("numba", reason="numba is not installed (pip install 'selfattn[numba]')")

BACKEND = "numba"


@pytest.fixture(autouse=True, params=["fused", "blas", "simd"])
def kernel_path(request, monkeypatch):
    """Run every test on every kernel family: the fused loop kernels, the BLAS-tile ones and the SIMD ones.

    The BLAS-tile and SIMD kernels run with tiny, odd tile sizes here (as stumpy's
    GPU tests shrink threads-per-block), so that the small inputs of these
    tests cross many query-tile and key-block boundaries; their default tile
    sizes are exercised by ``test_blas_default_tiles``. The thread thresholds
    are lowered so that these small inputs run on every thread (the worker
    pool's hand-off is under test too). The knobs are the registered backend
    instance's attributes (monkeypatch restores them).
    """
    from selfattn.backends import numba_

    monkeypatch.setattr(numba_.backend, "flops_per_thread", 1e3)
    monkeypatch.setattr(numba_.backend, "bytes_per_thread", 1e3)

    if request.param == "blas":
        if numba_._blas.probe()[0] is None:
            pytest.skip("the BLAS-tile kernels need scipy and threadpoolctl (pip install 'selfattn[numba]')")
        monkeypatch.setattr(numba_.backend, "blas_tiles", SMALL_TILES)
    if request.param == "simd":
        monkeypatch.setattr(numba_.backend, "simd_tiles", SIMD_SMALL_TILES)
    monkeypatch.setattr(numba_.backend, "kernels", request.param)
    return request.param


#: Tile sizes of the BLAS-tile kernels under test (forward rows, keys; backward rows, keys):
#: small and not multiples of each other.
SMALL_TILES = (24, 40, 20, 36)
#: The SIMD kernels' (rows a multiple of the micro-kernel's 4, keys rounded up to the vector width).
SIMD_SMALL_TILES = (12, 16, 8, 16)
TOL = {np.float16: (3e-3, 3e-3), np.float32: (2e-5, 2e-5), np.float64: (1e-11, 1e-11)}


def _inputs(rng, b, hq, hkv, n, m, d, dv=None, dtype=np.float32):
    dv = d if dv is None else dv
    q = rng.standard_normal((b, hq, n, d)).astype(dtype)
    k = rng.standard_normal((b, hkv, m, d)).astype(dtype)
    v = rng.standard_normal((b, hkv, m, dv)).astype(dtype)
    return q, k, v


def _close(a, b, dtype, what=""):
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol, err_msg=what)


def _check_forward(q, k, v, **kw):
    dtype = q.dtype.type
    out, lse, w = selfattn.scaled_dot_product_attention(
        q, k, v, return_lse=True, return_weights=True, backend=BACKEND, **kw
    )
    ro, rl, rw = ref.forward(q, k, v, **kw)
    assert out.dtype == q.dtype and w.dtype == q.dtype
    assert lse.dtype == (np.float32 if dtype == np.float16 else dtype)
    assert out.shape == ro.shape and lse.shape == rl.shape and w.shape == rw.shape
    _close(out, ro, dtype, "out")
    _close(w, rw, dtype, "weights")
    fin = np.isfinite(rl)
    # Non-finite entries must match exactly: -inf (nothing to attend) and NaN where the oracle has them.
    assert np.array_equal(np.isneginf(lse), np.isneginf(rl)) and np.array_equal(np.isnan(lse), np.isnan(rl))
    assert not np.isposinf(lse).any()
    _close(lse[fin], rl[fin], dtype, "lse")
    return out, lse, w


def _check_vjp(q, k, v, **kw):
    dtype = q.dtype.type
    rng = np.random.default_rng(7)
    out, bwd = selfattn.scaled_dot_product_attention_vjp(q, k, v, backend=BACKEND, **kw)
    g = rng.standard_normal(out.shape).astype(q.dtype)
    dq, dk, dv = bwd(g)
    rq, rk, rv = ref.vjp(q, k, v, g, **kw)
    for name, a, r, x in (("dq", dq, rq, q), ("dk", dk, rk, k), ("dv", dv, rv, v)):
        assert a.shape == x.shape and a.dtype == x.dtype, name
        _close(a, r, dtype, name)
    return dq, dk, dv


SHAPES = [
    # b, hq, hkv, n, m, d, dv
    (1, 1, 1, 1, 1, 1, 1),
    (1, 2, 1, 70, 130, 16, 8),
    (2, 4, 2, 100, 37, 5, 3),
    (1, 8, 1, 1, 300, 64, 64),
    (1, 4, 4, 129, 129, 32, 32),
    (2, 8, 2, 65, 200, 24, 40),
    (1, 8, 8, 3, 700, 8, 8),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_forward_and_vjp_plain(shape, dtype):
    q, k, v = _inputs(np.random.default_rng(0), *shape, dtype=dtype)
    _check_forward(q, k, v)
    _check_vjp(q, k, v)


@pytest.mark.parametrize("n,m", [(50, 50), (30, 90), (90, 30), (1, 200), (200, 1), (130, 131)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_causal_alignment(n, m, dtype):
    q, k, v = _inputs(np.random.default_rng(1), 2, 4, 2, n, m, 16, dtype=dtype)
    _check_forward(q, k, v, causal=True)
    _check_vjp(q, k, v, causal=True)


@pytest.mark.parametrize("window", [0, 5, (0, 7), (13, 0), (3, 100), (200, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_windows(window, causal):
    q, k, v = _inputs(np.random.default_rng(2), 1, 2, 1, 150, 170, 8)
    _check_forward(q, k, v, window=window, causal=causal)
    _check_vjp(q, k, v, window=window, causal=causal)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa(group):
    q, k, v = _inputs(np.random.default_rng(3), 2, 8, 8 // group, 67, 91, 12, 20)
    _check_forward(q, k, v)
    _check_vjp(q, k, v, causal=True)


MASK_SHAPES = [
    (91,),
    (1, 91),
    (67, 1),
    (67, 91),
    (8, 1, 91),
    (8, 67, 91),
    (2, 1, 1, 91),
    (2, 8, 67, 91),
    (1, 1, 67, 1),
    (2, 1, 1, 1),
    (1,),
    (1, 1),
]


@pytest.mark.parametrize("mshape", MASK_SHAPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_broadcast(mshape, kind):
    rng = np.random.default_rng(4)
    q, k, v = _inputs(rng, 2, 8, 2, 67, 91, 8)
    if kind == "bool":
        mask = rng.random(mshape) > 0.3
        if mask.size == 1:
            mask[...] = True
    else:
        mask = rng.standard_normal(mshape)
        mask[rng.random(mshape) < 0.2] = -np.inf
        mask = mask.astype(np.float32)
    _check_forward(q, k, v, mask=mask)
    _check_vjp(q, k, v, mask=mask)


def test_mask_not_expanded_and_non_contiguous_mask():
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, 3, 2, 2, 40, 60, 8)
    big = rng.random((3, 1, 60, 80)) > 0.5
    mask = big[:, :, ::-1][:, :, :40, 5:65]  # a strided view
    _check_forward(q, k, v, mask=mask)
    _check_vjp(q, k, v, mask=mask, causal=True)


def test_fully_masked_rows():
    rng = np.random.default_rng(6)
    q, k, v = _inputs(rng, 1, 2, 1, 20, 30, 8)
    mask = np.ones((20, 30), bool)
    mask[[0, 5, 19]] = False
    out, lse, w = _check_forward(q, k, v, mask=mask)
    assert np.all(out[:, :, [0, 5, 19]] == 0) and np.all(np.isneginf(lse[:, :, [0, 5, 19]]))
    assert np.all(w[:, :, [0, 5, 19]] == 0)
    dq, dk, dv = _check_vjp(q, k, v, mask=mask)
    assert np.all(dq[:, :, [0, 5, 19]] == 0)
    for arr in (out, lse[np.isfinite(lse)], w, dq, dk, dv):
        assert not np.isnan(arr).any()
    # float -inf mask and a window that leaves early rows nothing (N > M causal)
    fm = np.where(mask, 0.0, -np.inf)
    _check_forward(q, k, v, mask=fm)
    q2, k2, v2 = _inputs(rng, 1, 2, 2, 40, 10, 8)
    out2, lse2, _ = _check_forward(q2, k2, v2, causal=True)
    assert np.all(out2[:, :, :30] == 0) and np.all(np.isneginf(lse2[:, :, :30]))
    _check_vjp(q2, k2, v2, causal=True)


@pytest.mark.parametrize("n,m", [(0, 5), (5, 0), (0, 0)])
def test_empty(n, m):
    q, k, v = _inputs(np.random.default_rng(0), 2, 2, 1, n, m, 4, 3)
    out, lse, w = selfattn.scaled_dot_product_attention(q, k, v, return_lse=True, return_weights=True, backend=BACKEND)
    assert out.shape == (2, 2, n, 3) and lse.shape == (2, 2, n) and w.shape == (2, 2, n, m)
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    o, bwd = selfattn.scaled_dot_product_attention_vjp(q, k, v, backend=BACKEND)
    dq, dk, dv = bwd(np.ones_like(o))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not dq.any() and not dk.any() and not dv.any()


def test_two_d_inputs():
    q, k, v = (x[0, 0] for x in _inputs(np.random.default_rng(8), 1, 1, 1, 33, 45, 7, 9))
    _check_forward(q, k, v, causal=True)
    _check_vjp(q, k, v, causal=True)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 90, 8), (1, 8, 8, 1, 1000, 16)])
def test_dropout_bit_identical_pattern(p, shape):
    q, k, v = _inputs(np.random.default_rng(9), *shape)
    seed = 2**63 + 12345
    kw = dict(dropout_p=p, dropout_seed=seed)
    _check_forward(q, k, v, **kw)
    _check_vjp(q, k, v, **kw)
    # Recover the pattern exactly: with V = I (one-hot columns) the output is P*Z.
    b, hq, hkv, n, m, d = shape
    m = min(m, 64)
    k = k[:, :, :m]
    v = np.broadcast_to(np.eye(m, dtype=np.float64), (b, hkv, m, m)).copy()
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    out = selfattn.scaled_dot_product_attention(q64, k64, v, backend=BACKEND, **kw)
    keep = _dropout.keep_mask(seed, np.arange(b * hq), np.arange(n), np.arange(m), p).reshape(b, hq, n, m)
    assert np.array_equal(out != 0, keep)
    out_np = selfattn.scaled_dot_product_attention(q64, k64, v, backend="numpy", **kw)
    np.testing.assert_allclose(out, out_np, rtol=1e-12, atol=1e-14)


def test_nan_propagates_in_query_rows_only():
    rng = np.random.default_rng(10)
    q, k, v = _inputs(rng, 1, 2, 2, 30, 40, 8)
    q[0, 1, 7, 3] = np.nan
    out, lse, w = selfattn.scaled_dot_product_attention(q, k, v, return_lse=True, return_weights=True, backend=BACKEND)
    assert np.isnan(out[0, 1, 7]).all() and np.isnan(lse[0, 1, 7])
    bad = np.zeros(out.shape[:-1], bool)
    bad[0, 1, 7] = True
    assert not np.isnan(out[~bad]).any() and not np.isnan(lse[~bad]).any()
    assert not np.isnan(w[~bad]).any()


def test_nan_query_row_reaches_only_its_gradients():
    # One NaN query: its own dq row and its head's dk/dv are NaN (every key's gradient sums over
    # that row); other rows and heads stay finite (tiles without it may take the base-2 path).
    rng = np.random.default_rng(11)
    q, k, v = _inputs(rng, 1, 2, 2, 30, 40, 8)
    q[0, 1, 7, 3] = np.nan
    out, bwd = selfattn.scaled_dot_product_attention_vjp(q, k, v, backend=BACKEND)
    dq, dk, dv = bwd(np.ones_like(out))
    assert np.isnan(dq[0, 1, 7]).all()
    rows = np.ones(30, bool)
    rows[7] = False
    assert np.isfinite(dq[0, 1, rows]).all() and np.isfinite(dq[0, 0]).all()
    assert np.isnan(dk[0, 1]).all() and np.isnan(dv[0, 1]).all()
    assert np.isfinite(dk[0, 0]).all() and np.isfinite(dv[0, 0]).all()


def test_inputs_untouched_noncontiguous_readonly():
    rng = np.random.default_rng(11)
    base = rng.standard_normal((2, 4, 80, 24)).astype(np.float32)
    q = base[:, :, ::2, :16]  # strided view
    k = np.asfortranarray(rng.standard_normal((2, 2, 60, 16)).astype(np.float32))
    v = rng.standard_normal((2, 2, 60, 10)).astype(np.float32)
    for x in (base, k, v):
        x.setflags(write=False)
    copies = [x.copy() for x in (base, k, v)]
    _check_forward(q, k, v, causal=True)
    _check_vjp(q, k, v, window=(5, 9))
    for x, c in zip((base, k, v), copies, strict=True):
        assert np.array_equal(x, c)


def test_decode_split_path():
    # one query row, long keys, few heads: the key range is split and merged by lse
    rng = np.random.default_rng(12)
    q, k, v = _inputs(rng, 1, 2, 1, 1, 5000, 32)
    from selfattn.backends.numba_ import backend

    pb = selfattn._problem.normalize(q, k, v)
    assert backend._nsplit(pb, max(2, numba.get_num_threads())) > 1
    _check_forward(q, k, v)
    _check_forward(q, k, v, mask=rng.random(5000) > 0.5, dropout_p=0.2, dropout_seed=3)
    _check_vjp(q, k, v)
    # a mask that leaves a whole split empty
    mask = np.zeros(5000, bool)
    mask[10] = True
    _check_forward(q, k, v, mask=mask)


def test_threads_honoured_and_restored():
    rng = np.random.default_rng(13)
    q, k, v = _inputs(rng, 1, 4, 2, 130, 140, 16)
    before = numba.get_num_threads()
    ref_out = selfattn.scaled_dot_product_attention(q, k, v, backend=BACKEND)
    assert numba.get_num_threads() == before
    numba.set_num_threads(1)
    try:
        one = selfattn.scaled_dot_product_attention(q, k, v, backend=BACKEND)
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)
    np.testing.assert_allclose(one, ref_out, rtol=1e-6, atol=1e-6)


def test_import_does_not_import_numba():
    code = (
        "import sys, selfattn, selfattn.backends.numba_ as m; "
        "assert 'numba' not in sys.modules, 'numba imported'; "
        "print(m.backend.capabilities.features == selfattn.Capabilities('numpy').features)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True"


def test_automatic_selection_prefers_numba_above_its_work_range():
    from selfattn.backends import numba_

    rng = np.random.default_rng(14)
    # large prefill, many small heads, long decode: inside the declared work range
    big = _inputs(rng, 1, 8, 8, 1024, 1024, 64)
    assert selfattn._problem.normalize(*big).flops >= numba_.MIN_FLOPS
    mid = _inputs(rng, 1, 4, 4, 256, 256, 64)  # 6.7e7 FLOPs: the SIMD kernels beat NumPy here
    many = _inputs(rng, 4, 8, 8, 32, 32, 16)  # 32 small heads, 2.1e6 FLOPs
    decode = (_inputs(rng, 1, 8, 8, 1, 1, 64)[0], *_inputs(rng, 1, 8, 8, 16384, 16384, 64)[1:])
    for call in (big, mid, many, decode):
        assert selfattn.explain(*call).backend == "numba"
    # a toy call, a few-head small call and a short decode are outside: NumPy runs them
    for call in (
        _inputs(rng, 1, 2, 2, 8, 8, 4),
        _inputs(rng, 1, 4, 4, 64, 64, 32),
        (_inputs(rng, 1, 8, 8, 1, 1, 64)[0], *_inputs(rng, 1, 8, 8, 2048, 2048, 64)[1:]),
    ):
        ex = selfattn.explain(*call)
        assert ex.backend == "numpy" and any("small problem" in line for line in ex.trail)


def test_concurrent_python_threads():
    import threading

    rng = np.random.default_rng(15)
    q, k, v = _inputs(rng, 1, 2, 1, 70, 90, 8)
    expect = selfattn.scaled_dot_product_attention(q, k, v, backend=BACKEND)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(selfattn.scaled_dot_product_attention(q, k, v, backend=BACKEND))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 15 and all(np.array_equal(r, expect) for r in results)


def _blas_threads():
    from threadpoolctl import threadpool_info

    return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas")


def test_automatic_kernel_choice(kernel_path, monkeypatch):
    from selfattn.backends import numba_

    be = numba_.NumbaBackend()  # kernels="auto"
    rng = np.random.default_rng(16)
    big = selfattn._problem.normalize(*_inputs(rng, 1, 4, 4, 256, 256, 64))
    small = selfattn._problem.normalize(*_inputs(rng, 1, 2, 2, 8, 8, 4))
    assert be._family(big) == "simd"
    assert be._family(small) == "fused"
    few_rows = selfattn._problem.normalize(*_inputs(rng, 8, 8, 8, numba_.SIMD_MIN_ROWS - 1, 4096, 64))
    assert be._family(few_rows) == "fused"  # enough work, but thin products
    assert be._family(big, nsplit=4) == "fused"  # decode-like: the key split wins
    assert "simd (" in be.plan(big) and "fused kernels" in be.plan(small)
    monkeypatch.setattr(numba_._blas, "_state", (None, "scipy not installed"))  # as without scipy
    assert be._family(big) == "simd"  # the SIMD kernels need no BLAS
    assert numba_.NumbaBackend(kernels="blas")._family(big) == "fused"  # nothing to hand products to
    q, k, v = _inputs(rng, 1, 4, 4, 256, 256, 64)
    _check_forward(q, k, v)


def test_blas_threads_single_inside_and_restored(kernel_path):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from selfattn.backends import numba_

    if numba_._blas.probe()[0] is None:
        pytest.skip("no BLAS-tile kernels here")
    rng = np.random.default_rng(17)
    q, k, v = _inputs(rng, 1, 2, 2, 200, 300, 32)
    before = _blas_threads()
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        inside = _blas_threads()
        _check_forward(q, k, v, causal=True)
        _check_vjp(q, k, v)
        assert _blas_threads() == inside  # the user's setting is back after each call
    assert _blas_threads() == before


def test_blas_limit_leaves_numpys_blas_alone():
    """Only SciPy's BLAS (the one Numba's np.dot calls) is limited during a BLAS-tile call."""
    pytest.importorskip("threadpoolctl")
    from selfattn.backends import numba_

    libs, _ = numba_._blas.probe()
    if libs is None:
        pytest.skip("no BLAS-tile kernels here")
    limited = {c.filepath for c in libs}
    seen = {}
    with numba_._blas.single_threaded():
        for path, n in _blas_threads():
            seen[path] = n
        with numba_._blas.single_threaded():  # nested/concurrent calls restore once
            pass
        assert all(seen[p] == 1 for p in limited)
    after = dict(_blas_threads())
    others = [p for p in after if p not in limited]
    if any("numpy" in p for p in others):
        assert all(after[p] == seen[p] for p in others)  # NumPy's own OpenBLAS was never touched


def test_large_logits_take_the_max_shift_path(kernel_path):
    # |q||k| far above the exp range: the no-shift shortcut must not be taken
    rng = np.random.default_rng(18)
    q, k, v = _inputs(rng, 1, 2, 1, 40, 300, 16)
    q *= 40
    from selfattn.testing.compare import assert_close

    for dtype in (np.float32, np.float64):
        qd, kd, vd = (x.astype(dtype) for x in (q, k, v))
        out, lse = selfattn.scaled_dot_product_attention(qd, kd, vd, return_lse=True, backend=BACKEND)
        ro, rl, _ = ref.forward(qd, kd, vd)
        smax = ref.score_max(qd, kd)
        assert smax > 100  # exp(186) overflows float32: only the max-shift path gets this right
        assert_close(out, ro, dtype, "out", score_max=smax)  # each dtype at its own tolerance
        assert_close(lse, rl, dtype, "lse", score_max=smax)
        assert np.all(np.isfinite(out))


def test_default_tiles(kernel_path, monkeypatch):
    # The production tile sizes, on shapes that still cross a few tiles and blocks.
    from selfattn.backends import numba_

    if kernel_path == "fused":
        pytest.skip("BLAS-tile and SIMD kernels only")
    attr = f"{kernel_path}_tiles"
    monkeypatch.setattr(numba_.backend, attr, getattr(numba_.NumbaBackend(), attr))
    gq, gk, _, gkb = getattr(numba_.backend, attr)
    rng = np.random.default_rng(19)
    n = gq + 37
    m = gk + gkb + 11
    # D = 128 also takes the SIMD forward's shorter key blocks (simd.key_block).
    for d in (16, 128):
        q, k, v = _inputs(rng, 1, 4, 2, n, m, d)
        for kw in ({}, {"causal": True}, {"window": (300, 5)}, {"dropout_p": 0.25, "dropout_seed": 3}):
            _check_forward(q, k, v, **kw)
            _check_vjp(q, k, v, **kw)


def test_tile_kernel_conformance_cases(kernel_path):
    # Every conformance case through the BLAS-tile and SIMD kernels with tiny tiles
    # (the conformance suite itself runs whichever path the shapes select).
    from selfattn.testing.cases import generate_cases
    from selfattn.testing.check import check_case

    if kernel_path == "fused":
        pytest.skip("BLAS-tile and SIMD kernels only (test_conformance.py covers the default choice)")
    cases = generate_cases()
    assert len(cases) > 100
    for case in cases:
        check_case(BACKEND, case)


def test_shift_free_bound():
    from selfattn.backends._numba.tiles import shift_free_room, value_room

    assert shift_free_room(1.0, 100, 4) == 30.0
    assert shift_free_room(1.0, 100, 8) == 300.0
    assert 0.0 < shift_free_room(1e24, 100, 4) < 30.0  # room shrinks with max|v|
    assert shift_free_room(1e36, 100, 4) == 0.0
    assert shift_free_room(np.nan, 100, 4) == 0.0 and shift_free_room(np.inf, 100, 8) == 0.0
    v = np.ones((100, 8), np.float32)
    assert value_room(v, 100, 4) == 30.0
    assert value_room(-3e24 * v, 100, 4) == shift_free_room(float(np.float32(3e24)), 100, 4)
    for bad in (np.nan, np.inf, -np.inf):
        w = v.copy()
        w[5, 3] = bad
        assert value_room(w, 100, 4) == 0.0


def test_huge_values_take_the_general_path(kernel_path):
    # Values near float32's limit: the shift-free shortcut must not overflow.
    rng = np.random.default_rng(20)
    q, k, v = _inputs(rng, 1, 2, 2, 70, 90, 8)
    v *= np.float32(1e33)
    out = selfattn.scaled_dot_product_attention(q, k, v, backend=BACKEND)
    ro = ref.forward(q, k, v)[0]
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out / 1e33, ro / 1e33, rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="checks x86 assembly")
def test_float32_exp_vectorizes():
    # The softmax's exp is the CPU bottleneck once the products go to BLAS: its loop must compile
    # to packed (SIMD) instructions, not one scalar exp per score.
    import re

    from selfattn.backends._numba.tiles import FASTMATH, exp_shift_row

    @numba.njit(fastmath=FASTMATH)
    def row(a, mu):
        return exp_shift_row(a, a.shape[0], mu)

    a = np.linspace(-100, 50, 64).astype(np.float32)
    expect = np.exp((a - np.float32(3)).astype(np.float64))  # the shift is a float32 subtraction
    total = row(a, np.float32(3))
    np.testing.assert_allclose(a, expect, rtol=3e-7, atol=1e-38)
    assert abs(total - expect.sum()) <= 1e-6 * expect.sum()
    asm = "\n".join(row.inspect_asm().values())
    packed = set(re.findall(r"\b(v?(?:roundps|rndscaleps|cvttps2dq|cvtps2dq|scalefps|fmadd\d+ps))\b", asm))
    # 2**n on whole vectors: from exponent bits (a packed convert) or AVX-512's vscalefps
    assert {"cvttps2dq", "scalefps"} & {p.lstrip("v") for p in packed}, sorted(packed)
    assert any("fmadd" in p or "roundps" in p for p in packed), sorted(packed)


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="checks x86 assembly")
def test_float64_exp_is_accurate_and_vectorized():
    # float64 softmax used one scalar math.exp per score (most of a float64 forward's time).
    import re

    from selfattn.backends._numba.tiles import FASTMATH, exp_shift_row

    @numba.njit(fastmath=FASTMATH)
    def row(a, mu):
        return exp_shift_row(a, a.shape[0], mu)

    a = np.concatenate([np.linspace(-700.0, 5.0, 1001), [-np.inf, np.nan, -800.0, 0.0]])
    b = a.copy()
    total = row(b, 1.5)
    want = np.exp(a - 1.5)
    ok = np.isfinite(a) & (a > -700)
    np.testing.assert_allclose(b[ok], want[ok], rtol=1e-15, atol=0)
    assert b[-4] == 0.0 and np.isnan(b[-3]) and b[-2] == 0.0  # exp(-inf) = 0, NaN kept, underflow to 0
    assert np.isnan(total)  # the NaN reaches the row sum
    asm = "\n".join(row.inspect_asm().values())
    assert re.search(r"vfmadd\w*pd\s+%[xyz]mm", asm), "float64 exp is not packed (pd, not sd)"


def test_exp2_is_accurate_and_scaled_in_one_instruction():
    # The SIMD forward's interior tiles hold scores in base 2 (log2(e) folded into the query's
    # scale) and take 2**s on the product's accumulators (gemm_exp2): no clamps, no ln2
    # reduction, and on AVX-512 one vscalef for the 2**n. As accurate as the natural exp. Band-edge
    # tiles use the masked row variant, where -inf gives 0 and a partial vector is left alone.
    import re

    from selfattn.backends._numba import microkernel as mk

    @numba.njit
    def masked(a, mu):
        return mk.exp2_vectors_masked(a, a.shape[0], mu)

    # Compiled here, not loaded from Numba's disk cache (whose entries carry no assembly text).
    fused = numba.njit(mk.gemm_exp2.py_func)

    for dtype, lim, ulps in ((np.float32, 44.0, 3), (np.float64, 440.0, 4)):
        w = mk.lanes(np.dtype(dtype).itemsize)
        n = 50 * w
        x = np.linspace(-lim, lim, n + w - 1).astype(dtype)
        # Unchecked 2**x through the fused product: C = 2**(1 * x) row by row (kred = 1, exact products).
        ones = np.ones(mk.ROWS, dtype)
        c = np.full(mk.ROWS * n, np.nan, dtype)
        rs = np.zeros(mk.ROWS * w, dtype)
        fused(ones, 0, 1, 1, x[:n].copy(), 0, n, c, 0, n, mk.ROWS, n, 1, w, rs, 0)
        want = np.exp2(x[:n].astype(np.longdouble))
        y = c.reshape(mk.ROWS, n)
        rel = np.abs((y - want) / want)
        assert rel.max() <= ulps * np.finfo(dtype).eps, (dtype, float(rel.max()))
        assert np.all(np.abs(rs.reshape(mk.ROWS, w).sum(1) - want.sum()) <= 1e-6 * want.sum())
        # Band edges: masked (-inf) entries give exactly 0, the others 2**(x - mu).
        z = x.copy()
        z[::7] = -np.inf
        z0 = z.copy()
        want_z = np.where(np.isinf(z[:n]), 0.0, np.exp2((z[:n] - dtype(0.75)).astype(np.longdouble)))
        total_z, nz = masked(z, dtype(0.75))
        assert nz == n and np.array_equal(z[n:], z0[n:])
        fin = want_z > 0
        assert np.all(z[:n][~fin] == 0) and np.abs(z[:n][fin] / want_z[fin] - 1).max() <= ulps * np.finfo(dtype).eps
        assert abs(total_z - want_z.sum()) <= 1e-6 * want_z.sum()
        if mk._SCALEF and mk.LANES32 == 16:  # vscalef is used on 512-bit vectors
            suffix = "pd" if dtype == np.float64 else "ps"
            for fn in (masked, fused):
                asm = "\n".join(fn.inspect_asm().values())
                assert re.search(rf"vscalef{suffix}\s+%zmm", asm), "2**n is not one vscalef"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_exp2_matches_numpy(dtype):
    """The fused product + 2**x: every panel width, both loop orders (B in L1 or not), offsets, row sums."""
    from selfattn.backends._numba import microkernel as mk

    rng = np.random.default_rng(23)
    w = mk.lanes(np.dtype(dtype).itemsize)
    for nr, nvec, kred in ((8, 1, 5), (16, 2, 64), (24, 3, 64), (8, 5, 7), (16, 8, 64), (8, 8, 3000)):
        ncol = nvec * w
        a = (rng.standard_normal((nr, kred)) / np.sqrt(kred)).astype(dtype)
        b = rng.standard_normal((kred, ncol)).astype(dtype)
        # B (kred x ncol) is read at offset 3 inside a wider array with leading dimension ncol + w.
        bb = np.zeros(3 + kred * (ncol + w), dtype)
        bb[3:].reshape(kred, ncol + w)[:, :ncol] = b
        c = np.full(5 + nr * (ncol + w), np.nan, dtype)
        rs = np.full(2 + nr * w, 0.5, dtype)
        mk.gemm_exp2(a.ravel(), 0, kred, 1, bb, 3, ncol + w, c, 5, ncol + w, nr, ncol, kred, w, rs, 2)
        want = np.exp2(a.astype(np.float64) @ b.astype(np.float64))
        got = c[5:].reshape(nr, ncol + w)[:, :ncol]
        tol = 2e-6 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(got, want, rtol=tol * (1 + kred / 64))
        sums = rs[2:].reshape(nr, w).sum(1) - 0.5 * w
        np.testing.assert_allclose(sums, want.sum(1), rtol=tol * (1 + kred / 64))
        assert np.all(rs[:2] == 0.5) and np.all(np.isnan(c[:5]))  # nothing written before the offsets
        assert np.all(np.isnan(c[5:].reshape(nr, ncol + w)[:, ncol:]))  # nor past ncol


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_epilogues_give_the_bits_of_the_separate_passes(dtype):
    """gemm_exp2_shifted / gemm_times_diff == gemm then exp2_vectors_masked / ``P * (dP - delta)``, bit for bit."""
    from selfattn.backends._numba import microkernel as mk

    rng = np.random.default_rng(29)
    w = mk.lanes(np.dtype(dtype).itemsize)
    big = 300.0 if dtype == np.float32 else 2000.0  # 2**(x - big) is below the exponent range: exactly 0
    for nr, nvec, kred in ((8, 1, 5), (16, 2, 64), (24, 3, 64), (8, 5, 7), (16, 8, 64), (8, 8, 3000)):
        ncol = nvec * w
        ld = ncol + w  # C and B inside wider arrays, at offsets
        a = (rng.standard_normal((nr, kred)) * (8 / np.sqrt(kred))).astype(dtype)  # scores ~ N(0, 64)
        a[1, 0] = np.nan  # a NaN score row stays NaN
        b = np.zeros(3 + kred * ld, dtype)
        b[3:].reshape(kred, ld)[:, :ncol] = rng.standard_normal((kred, ncol))
        mu = np.full(2 + nr, 0.0, dtype)
        mu[2:] = rng.standard_normal(nr) * 4
        mu[2 + 2] = np.inf  # a padding row: 0 everywhere
        mu[2 + 3] = big
        plain = np.full(5 + nr * ld, np.nan, dtype)
        mk.gemm(a.ravel(), 0, kred, 1, b, 3, ld, plain, 5, ld, nr, ncol, kred, False, w)
        want = plain[5:].reshape(nr, ld)[:, :ncol].copy()
        for r in range(nr):
            row = want[r].copy()
            mk.exp2_vectors_masked(row, ncol, dtype(mu[2 + r]))
            want[r] = row
        c = np.full(5 + nr * ld, np.nan, dtype)
        mk.gemm_exp2_shifted(a.ravel(), 0, kred, 1, b, 3, ld, c, 5, ld, nr, ncol, kred, w, mu, 2)
        got = c[5:].reshape(nr, ld)
        np.testing.assert_array_equal(got[:, :ncol], want)
        assert np.all(np.isnan(got[1])[:ncol]) and np.all(got[2, :ncol] == 0) and np.all(got[3, :ncol] == 0)
        assert np.all(np.isnan(c[:5])) and np.all(np.isnan(got[:, ncol:]))  # nothing outside C's block
        # dS = P * (dP - delta) with P read from C
        p = np.full(5 + nr * ld, np.nan, dtype)
        pv = p[5:].reshape(nr, ld)
        pv[:, :ncol] = rng.random((nr, ncol))
        p0 = pv[:, :ncol].copy()
        dl = np.zeros(4 + nr, dtype)
        dl[4:] = rng.standard_normal(nr)
        mk.gemm_times_diff(a.ravel(), 0, kred, 1, b, 3, ld, p, 5, ld, nr, ncol, kred, w, dl, 4)
        dp = plain[5:].reshape(nr, ld)[:, :ncol]
        np.testing.assert_array_equal(pv[:, :ncol], p0 * (dp - dl[4:, None]))
        assert np.all(np.isnan(p[:5])) and np.all(np.isnan(pv[:, ncol:]))


def test_key_block_keeps_the_transposed_key_block_in_l1():
    from selfattn.backends._numba.microkernel import B_IN_L1, LANES32
    from selfattn.backends._numba.simd import key_block

    w32 = LANES32
    assert key_block(128, 64, 4) == 128  # float32 D = 64: 32 KiB, as measured best
    # Halved to 64 keys; four float32 vectors of them (AVX-512) become three (one 3-vector panel).
    assert key_block(128, 128, 4) == (48 if 4 * w32 == 64 else 64)
    assert key_block(128, 160, 4) == (48 if 4 * w32 == 64 else 64)
    assert key_block(128, 64, 8) == 64  # float64: 64 keys are eight vectors, kept
    assert key_block(128, 512, 4) == 64  # never below 64 keys (three vectors would not fit L1 either)
    assert key_block(16, 128, 4) == 16 and key_block(64, 128, 4) == 64  # tiles not halved are kept
    assert all(key_block(128, d, 4) * d * 4 <= B_IN_L1 for d in (8, 32, 64, 128, 160))


def test_simd_backward_takes_the_short_key_block_only_where_it_fits_l1(monkeypatch):
    """The backward's key block: the forward's (key_block) where its K^T fits L1, else the default."""
    from selfattn.backends import numba_
    from selfattn.backends._numba.microkernel import B_IN_L1, lanes
    from selfattn.backends._numba.simd import key_block

    seen = []
    real = numba_._kernel

    def spy(path):
        k = real(path)
        if path != "simd.backward":
            return k
        return lambda *a: (seen.append(a[10]), k(*a))[1]  # a[10]: BCB

    monkeypatch.setattr(numba_, "_kernel", spy)
    bk = numba_.NumbaBackend(kernels="simd")
    rng = np.random.default_rng(5)
    for dtype, d in ((np.float32, 64), (np.float32, 128), (np.float64, 64), (np.float64, 128)):
        q, k, v = (rng.standard_normal((1, 2, 40, d)).astype(dtype) for _ in range(3))
        pb = selfattn._problem.normalize(q, k, v, needs_vjp=True)
        o, lse, _ = bk.forward(pb)
        seen.clear()
        bk.backward(pb, o, lse, np.ones_like(o))
        it = np.dtype(dtype).itemsize
        short = key_block(128, d, it)
        want = short if short * d * it <= B_IN_L1 else 128
        assert seen and all(b == -(-want // lanes(it)) * lanes(it) for b in seen), (dtype, d, seen)


@pytest.mark.parametrize("tiles", [(64, 16, 16, 16), (24, 32, 8, 32), (8, 64, 8, 16)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "case",
    [
        dict(causal=True),
        dict(window=(20, 5)),
        dict(window=(3, 0)),
        dict(causal=True, dropout_p=0.3, dropout_seed=4),
        dict(window=(20, 5), dropout_p=0.3, dropout_seed=5),
        dict(window=(0, 9), softcap=4.0),
    ],
    ids=["causal", "window", "narrow", "dropout", "window-dropout", "softcap"],
)
def test_simd_band_edge_products_stop_at_the_diagonal(kernel_path, monkeypatch, tiles, dtype, case):
    # The SIMD forward multiplies a block cut by the band's upper edge row block by row block,
    # each only up to its last row's last key (row blocks before the block attend none of it:
    # tasks of more rows than keys per block). The backward trims a tile's keys to those its
    # last row reaches, and accumulates dK/dV straight into the results for blocks of whole
    # row blocks with whole-vector heads (else through its own buffers); the block's first
    # tile overwrites, so keys it does not reach must come out zero before later tiles add.
    if kernel_path != "simd":
        pytest.skip("SIMD kernels only")
    from selfattn.backends import numba_

    monkeypatch.setattr(numba_.backend, "simd_tiles", tiles)
    rng = np.random.default_rng(11)
    for n, m, d, dv in ((130, 130, 16, 16), (70, 131, 24, 20), (137, 61, 32, 48)):
        q, k, v = _inputs(rng, 1, 4, 2, n, m, d, dv, dtype=dtype)
        if case.get("dropout_p"):  # the same keep-masks on both backends: compare with NumPy's
            out, f = selfattn.scaled_dot_product_attention_vjp(q, k, v, backend=BACKEND, **case)
            ro, rf = selfattn.scaled_dot_product_attention_vjp(q, k, v, backend="numpy", **case)
            g = rng.standard_normal(out.shape).astype(dtype)
            _close(out, ro, dtype, "dropout out")
            for name, a, r in zip(("dq", "dk", "dv"), f(g), rf(g), strict=True):
                _close(a, r, dtype, f"dropout {name}")
            continue
        _check_forward(q, k, v, **case)
        _check_vjp(q, k, v, **case)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "case",
    [dict(), dict(causal=True), dict(window=(40, 40)), dict(dropout_p=0.2, dropout_seed=3), dict(large=True)],
    ids=["plain", "causal", "window", "dropout", "large-lse"],
)
def test_simd_backward_takes_p_and_ds_on_the_accumulators(kernel_path, monkeypatch, dtype, case):
    # Backward tiles of whole key vectors take P = 2**(S - lse log2 e) on the S product's
    # accumulators (base-2 tiles inside the band) and dS = P (dP - delta) on the dP product's
    # (no dropout or soft-cap); other tiles keep the separate passes. Tiles of 16 rows over 37
    # or 45 rows leave padding rows (P must come out 0 there); 32-key blocks over 100 keys
    # end with a partial vector (the separate passes); a query row of large scores (|lse| > 30)
    # puts its tile in natural exp with dS still fused.
    if kernel_path != "simd":
        pytest.skip("SIMD kernels only")
    from selfattn.backends import numba_

    monkeypatch.setattr(numba_.backend, "simd_tiles", (64, 32, 16, 32))
    case = dict(case)
    large = case.pop("large", False)
    rng = np.random.default_rng(13)
    for n, m in ((37, 96), (45, 100)):
        q, k, v = _inputs(rng, 1, 2, 2, n, m, 32, dtype=dtype)
        if large:
            q[0, 1, 20] *= 40
        if case.get("dropout_p"):
            out, f = selfattn.scaled_dot_product_attention_vjp(q, k, v, backend=BACKEND, **case)
            _, rf = selfattn.scaled_dot_product_attention_vjp(q, k, v, backend="numpy", **case)
            g = rng.standard_normal(out.shape).astype(dtype)
            for name, a, r in zip(("dq", "dk", "dv"), f(g), rf(g), strict=True):
                _close(a, r, dtype, f"dropout {name}")
            continue
        _check_vjp(q, k, v, **case)


def test_scratch_arrays_are_reused_per_thread_and_bounded(monkeypatch):
    # Work arrays that never leave a call are kept per thread (fresh pages cost a page fault
    # per touch): the same role/shape/dtype gets the same array back, other threads and
    # other shapes get their own, large arrays are not kept, the oldest go first.
    import threading

    from selfattn.backends._numba import scratch

    scratch.clear()
    a = scratch.scratch("t.a", (4, 5), np.float32)
    assert a.shape == (4, 5) and a.dtype == np.float32 and a.flags.c_contiguous
    assert scratch.scratch("t.a", (4, 5), np.float32) is a
    assert scratch.scratch("t.a", (4, 5), np.float64) is not a
    assert scratch.scratch("t.a", (5, 4), np.float32) is not a
    other = []
    th = threading.Thread(target=lambda: other.append(scratch.scratch("t.a", (4, 5), np.float32)))
    th.start()
    th.join()
    assert other[0] is not a
    monkeypatch.setattr(scratch, "MAX_BYTES", 100)
    assert scratch.scratch("t.big", (100,), np.float32) is not scratch.scratch("t.big", (100,), np.float32)
    scratch.clear()
    first = scratch.scratch("t.0", (1,), np.float32)
    for i in range(1, scratch.MAX_ARRAYS + 1):
        scratch.scratch(f"t.{i}", (1,), np.float32)
    assert scratch.scratch("t.0", (1,), np.float32) is not first  # evicted
    scratch.clear()


def test_repeated_calls_do_not_share_results(kernel_path):
    # Reused work arrays must never leak into results: two calls of different inputs in a row
    # keep their own outputs and gradients.
    rng = np.random.default_rng(8)
    q1, k1, v1 = _inputs(rng, 1, 2, 2, 40, 40, 16)
    q2, k2, v2 = (x * 2 for x in (q1, k1, v1))
    o1, f1 = selfattn.scaled_dot_product_attention_vjp(q1, k1, v1, backend=BACKEND)
    g1 = f1(np.ones_like(o1))
    keep = [x.copy() for x in (o1, *g1)]
    o2, f2 = selfattn.scaled_dot_product_attention_vjp(q2, k2, v2, backend=BACKEND)
    f2(np.ones_like(o2))
    for a, b in zip((o1, *g1), keep, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prepare_keys_transposes_and_bounds(dtype):
    # The SIMD forward's pass over K and V, per key/value head: K^T in whole vector blocks
    # (register shuffles) plus element-wise edges, zero padding, the key-norm bound and the
    # head's own shift-free bound (non-finite values must give 0, so the shortcut is refused;
    # a call that does not allow the shortcut gets 0 everywhere).
    from selfattn.backends._numba import microkernel as mk
    from selfattn.backends._numba.simd import key_columns, prepare_keys
    from selfattn.backends._numba.tiles import shift_free_room

    w = mk.lanes(np.dtype(dtype).itemsize)
    rng = np.random.default_rng(12)
    for m, d in [(3 * w, 2 * w), (3 * w + 5, 2 * w + 3), (w - 1, 5), (2 * w, w - 2)]:
        k = rng.standard_normal((4, m, d)).astype(dtype)
        v = rng.standard_normal((4, m, d + 1)).astype(dtype)
        v[1, -1, -1] = np.nan
        v[2, 0, 0] = -np.inf
        v[3] *= 1e25 if dtype == np.float32 else 1e200  # less room than head 0
        kt = np.full((4, d, key_columns(m, w)), 7.0, dtype)
        kmax, safe = np.empty(4, dtype), np.full(4, -1.0)
        prepare_keys(0, 4, k, v, kt, kmax, safe, True)
        np.testing.assert_array_equal(kt[:, :, :m], k.transpose(0, 2, 1))
        assert np.all(kt[:, :, m:] == 0)
        np.testing.assert_allclose(kmax, np.linalg.norm(k.astype(np.float64), axis=2).max(axis=1), rtol=1e-6)
        room = [shift_free_room(float(np.abs(v[t]).max()), m, np.dtype(dtype).itemsize) for t in (0, 3)]
        assert safe[0] == room[0] > safe[3] == room[1] > 0.0
        assert safe[1] == 0.0 and safe[2] == 0.0
        prepare_keys(0, 4, k, v, kt, kmax, safe, False)
        assert np.all(safe == 0.0)


def test_a_heads_output_does_not_depend_on_other_heads(kernel_path):
    # The shift-free bound is taken per key/value head: a head whose neighbour has huge (or
    # non-finite) values computes exactly as it does alone.
    rng = np.random.default_rng(21)
    q, k, v = _inputs(rng, 1, 3, 3, 80, 80, 16)
    head0 = (q[:, :1], k[:, :1], v[:, :1])
    alone = [selfattn.scaled_dot_product_attention(*head0, backend=BACKEND, causal=c) for c in (False, True)]
    v[:, 1] *= np.float32(1e30)
    v[0, 2, 5, 3] = np.inf
    for c, a in zip((False, True), alone, strict=True):
        out = selfattn.scaled_dot_product_attention(q, k, v, backend=BACKEND, causal=c)
        np.testing.assert_array_equal(out[:, :1], a)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_shift_free_and_shifted_query_tiles_in_one_call(dtype, causal):
    # Tiles whose scores are provably small skip the row maximum (the SIMD family then works in
    # base 2); a tile with one large row takes the shifted softmax. Mixed in one call, across the
    # band's edges, both give the reference's numbers and gradients.
    rng = np.random.default_rng(41)
    q, k, v = _inputs(rng, 1, 2, 2, 50, 67, 32, dtype=dtype)
    q[0, 1, 20:26] *= 40  # scores near 200 on these rows: exp unshifted would overflow float32
    _check_forward(q, k, v, causal=causal)
    _check_vjp(q, k, v, causal=causal)


def test_blas_tile_kernels_reported_and_refused_without_a_limitable_blas(monkeypatch):
    from selfattn.backends import numba_

    ctl, why = numba_._blas.probe()
    info = numba_.backend.info()["blas_tile_kernels"]
    assert info.startswith("yes") if ctl is not None else why in info
    # A BLAS threadpoolctl cannot limit would be oversubscribed: the probe must refuse it.
    threadpoolctl = pytest.importorskip("threadpoolctl")

    class NoBlas(threadpoolctl.ThreadpoolController):
        def select(self, **kw):
            sel = super().select(**kw)
            sel.lib_controllers = []
            return sel

    monkeypatch.setattr(threadpoolctl, "ThreadpoolController", NoBlas)
    monkeypatch.setattr(numba_._blas, "_state", None)
    assert numba_._blas.probe()[0] is None
    assert "no BLAS it can limit" in numba_.backend.info()["blas_tile_kernels"]
    rng = np.random.default_rng(21)
    _check_forward(*_inputs(rng, 1, 4, 4, 256, 256, 64))  # still correct, on the fused kernels


# -- the SIMD family's building blocks ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_microkernel_gemm_matches_numpy(dtype):
    """Every panel split (3, 2+2, 3+2, 1 vectors), strided (transposed) A, offsets, accumulate or not,
    with B small enough to stay in L1 (rows outermost) and too large for it (column panels outermost)."""
    from selfattn.backends._numba import microkernel as mk

    W = mk.lanes(np.dtype(dtype).itemsize)
    rng = np.random.default_rng(30)
    cases = [(1, 13), (2, 13), (3, 13), (4, 13), (5, 13), (7, 13), (7, 700), (2, 700)]
    large = {kred * nvec * W * np.dtype(dtype).itemsize > mk.B_IN_L1 for nvec, kred in cases}
    assert large == {True, False}  # both loop orders run
    for nvec, kred in cases:
        nr, ncol = 2 * mk.ROWS, nvec * W
        a = rng.standard_normal((nr + 3, kred + 2)).astype(dtype)
        b = rng.standard_normal((kred + 1, ncol + W)).astype(dtype)
        want = a[3 : 3 + nr, 2:] @ b[1:, W:]
        c = np.full((nr, ncol + 5), 7.0, dtype)
        lda, ldb, ldc = a.shape[1], b.shape[1], c.shape[1]
        mk.gemm(a.ravel(), 3 * lda + 2, lda, 1, b.ravel(), ldb + W, ldb, c.ravel(), 0, ldc, nr, ncol, kred, False, W)
        np.testing.assert_allclose(c[:, :ncol], want, rtol=1e-5, atol=1e-4)
        assert np.all(c[:, ncol:] == 7.0)  # nothing written past the columns asked for
        mk.gemm(a.ravel(), 3 * lda + 2, lda, 1, b.ravel(), ldb + W, ldb, c.ravel(), 0, ldc, nr, ncol, kred, True, W)
        np.testing.assert_allclose(c[:, :ncol], 2 * want, rtol=1e-5, atol=1e-4)
        at = np.ascontiguousarray(a[3 : 3 + nr, 2:].T)  # A read through strides: row stride 1
        ct = np.zeros((nr, ncol), dtype)
        mk.gemm(at.ravel(), 0, 1, nr, b.ravel(), ldb + W, ldb, ct.ravel(), 0, ncol, nr, ncol, kred, False, W)
        np.testing.assert_allclose(ct, want, rtol=1e-5, atol=1e-4)
    c0 = np.full((mk.ROWS, W), 3.0, dtype)  # an empty reduction leaves C (acc) or zeroes it
    mk.gemm(a.ravel(), 0, 1, 1, b.ravel(), 0, 1, c0.ravel(), 0, W, mk.ROWS, W, 0, True, W)
    assert np.all(c0 == 3.0)
    mk.gemm(a.ravel(), 0, 1, 1, b.ravel(), 0, 1, c0.ravel(), 0, W, mk.ROWS, W, 0, False, W)
    assert np.all(c0 == 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_max_skips_nan_like_the_scalar_loop(dtype):
    from selfattn.backends._numba.microkernel import LANES32, row_max

    @numba.njit
    def rmax(x, n):
        return row_max(x, n, x.dtype.type(-np.inf))

    rng = np.random.default_rng(31)
    for n in (0, 1, LANES32 - 1, LANES32, 3 * LANES32 + 5):
        x = rng.standard_normal(n + 4).astype(dtype)
        if n > 2:
            x[1] = np.nan
        want = np.nanmax(x[:n]) if n else -np.inf
        assert rmax(x, n) == want
    assert rmax(np.full(2 * LANES32, np.nan, dtype), 2 * LANES32) == -np.inf  # as `x > m ? x : m` gives
    assert rmax(np.full(LANES32, -np.inf, dtype), LANES32) == -np.inf


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="checks x86 assembly")
def test_microkernel_compiles_to_vector_fmas():
    # The point of the SIMD family: the tile products must be packed FMAs on the
    # widest vectors the host has (zmm with AVX-512, ymm with AVX2), not scalar code.
    import re

    from selfattn.backends._numba import microkernel as mk

    @numba.njit
    def prod(a, b, c, n):
        mk.gemm(a, 0, n, 1, b, 0, 3 * mk.LANES32, c, 0, 3 * mk.LANES32, mk.ROWS, 3 * mk.LANES32, n, False, mk.LANES32)

    a = np.ones(mk.ROWS * 8, np.float32)
    b = np.ones(8 * 3 * mk.LANES32, np.float32)
    c = np.zeros(mk.ROWS * 3 * mk.LANES32, np.float32)
    prod(a, b, c, 8)
    assert np.all(c == 8.0)
    asm = "\n".join(prod.inspect_asm().values())
    reg = {16: "zmm", 8: "ymm", 4: "xmm"}[mk.LANES32]
    fmas = re.findall(rf"vfmadd\w*ps\s+%{reg}", asm)
    assert len(fmas) >= mk.ROWS * 3, f"expected packed FMAs on {reg} registers, found {len(fmas)}"


def test_no_compile_per_shape_or_option(kernel_path):
    # Sizes, tiles, head layouts and options are run-time arguments: every kernel keeps one
    # specialisation per compute dtype (float16 computes in float32) however it is called.
    from selfattn.backends._numba import blas, fused, simd

    rng = np.random.default_rng(33)
    for b, hq, hkv, n, m, d, dv in [(1, 2, 2, 70, 90, 16, 16), (2, 4, 2, 33, 129, 40, 24), (1, 1, 1, 9, 300, 64, 8)]:
        for dtype in (np.float16, np.float32, np.float64):
            q, k, v = _inputs(rng, b, hq, hkv, n, m, d, dv, dtype)
            for kw in ({}, {"causal": True}, {"window": (7, 2), "dropout_p": 0.2, "dropout_seed": 1}):
                out, vjp = selfattn.scaled_dot_product_attention_vjp(q, k, v, backend=BACKEND, **kw)
                vjp(np.ones_like(out))
    kernels = [fused.forward, fused.backward, blas.forward_gemm, blas.backward_gemm]
    kernels += [simd.forward, simd.backward, simd.prepare_keys]
    for kern in kernels:
        assert len(kern.signatures) <= 2, (kern.__name__, kern.signatures)


def test_simd_lanes_follow_the_host_and_can_be_forced(monkeypatch):
    from selfattn.backends._numba.microkernel import vector_isa

    name, n = vector_isa()
    assert n in (4, 8, 16) and name
    monkeypatch.setenv("SELFATTN_SIMD_LANES", "8")
    assert vector_isa() == ("forced 8 lanes", 8)
    monkeypatch.setenv("SELFATTN_SIMD_LANES", "5")
    with pytest.raises(ValueError, match="SELFATTN_SIMD_LANES"):
        vector_isa()


def test_simd_width_does_not_change_results(kernel_path, tmp_path):
    # Another vector width (AVX2's 8 lanes, or 4) compiles other micro-kernels -- and, below
    # 512-bit vectors, builds 2**n from exponent bits instead of vscalef: same numbers, forward
    # and backward (the plain call's 96 keys are whole vectors at every width, so its backward
    # takes P and dS on the accumulators; 77 rows leave padding rows).
    import subprocess
    import sys

    if kernel_path != "simd":  # the subprocess picks its own kernels: once is enough
        pytest.skip("SIMD kernels only")

    from selfattn.backends._numba.microkernel import LANES32

    other = 8 if LANES32 != 8 else 4
    code = (
        "import numpy as np, selfattn\n"
        "from selfattn.backends import numba_\n"
        "numba_.backend.kernels = 'simd'\n"
        "rng = np.random.default_rng(5)\n"
        "q, k, v = (rng.standard_normal((1, 2, 77, 40)).astype(np.float32) for _ in range(3))\n"
        "o = selfattn.scaled_dot_product_attention(q, k, v, causal=True, backend='numba')\n"
        "r = selfattn.scaled_dot_product_attention(q, k, v, causal=True, backend='numpy')\n"
        "err = [float(np.abs(o - r).max())]\n"
        "k2, v2 = (rng.standard_normal((1, 2, 96, 40)).astype(np.float32) for _ in range(2))\n"
        "g = rng.standard_normal((1, 2, 77, 40)).astype(np.float32)\n"
        "for kk, vv, causal in ((k, v, True), (k2, v2, False)):\n"
        "    _, f = selfattn.scaled_dot_product_attention_vjp(q, kk, vv, causal=causal, backend='numba')\n"
        "    _, rf = selfattn.scaled_dot_product_attention_vjp(q, kk, vv, causal=causal, backend='numpy')\n"
        "    err += [float(np.abs(a - b).max()) for a, b in zip(f(g), rf(g))]\n"
        "print(max(err))\n"
    )
    env = dict(__import__("os").environ, SELFATTN_SIMD_LANES=str(other), NUMBA_CACHE_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.split()[-1]) < 2e-5


def test_simd_kernels_leave_every_blas_alone(kernel_path):
    # The SIMD kernels call no BLAS, so (unlike the BLAS-tile ones) they change no BLAS thread setting.
    pytest.importorskip("threadpoolctl")
    from selfattn.backends import numba_

    if kernel_path != "simd":
        pytest.skip("SIMD kernels only")
    rng = np.random.default_rng(32)
    q, k, v = _inputs(rng, 1, 2, 2, 200, 300, 32)
    seen = []
    real = numba_._blas.single_threaded

    def spy():
        seen.append(1)
        return real()

    before = _blas_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(numba_._blas, "single_threaded", spy)
        _check_forward(q, k, v, causal=True)
        _check_vjp(q, k, v)
    assert not seen and _blas_threads() == before


def test_alibi_keeps_the_shift_free_shortcut_only_when_exact():
    """ALiBi biases are <= 0 for slopes >= 0; every row of a whole N <= M call keeps a bias-0 key."""
    from selfattn._problem import normalize
    from selfattn.backends.numba_ import _alibi_keeps_bound

    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, 1, 2, 2, 8, 12, 4)
    pos, neg = np.array([0.5, 0.25]), np.array([0.5, -0.25])
    assert _alibi_keeps_bound(normalize(q, k, v))  # no ALiBi
    assert _alibi_keeps_bound(normalize(q, k, v, alibi_slopes=pos, causal=True))
    assert not _alibi_keeps_bound(normalize(q, k, v, alibi_slopes=neg))
    assert not _alibi_keeps_bound(normalize(k, q, q, alibi_slopes=pos))  # N > M: early rows lack the key
    chunk = normalize(q, k, v, alibi_slopes=pos).chunk(rows=(0, 2), keys=(8, 12))  # distant keys only
    assert chunk.is_chunk and not _alibi_keeps_bound(chunk)
