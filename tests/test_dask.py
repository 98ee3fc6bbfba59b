"""The Dask backend: graph shape, laziness, exactness across chunkings and schedulers, inputs, options.

The conformance suite runs on it too (tests/test_conformance.py, cases converted by
selfattn.testing.compare.dask_chunks); tests on a real LocalCluster are in
test_dask_distributed.py.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import selfattn
from selfattn._dropout import keep_mask
from selfattn.testing import reference
from selfattn.testing.compare import assert_close

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

from selfattn.backends import _dask_tasks, dask_  # noqa: E402

SYNC = {"scheduler": "synchronous"}


def _rand(shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _qkv(b=2, hq=4, hkv=2, n=40, m=48, d=8, dv=None, dtype=np.float64, seed=0):
    dv = d if dv is None else dv
    return (
        _rand((b, hq, n, d), dtype, seed),
        _rand((b, hkv, m, d), dtype, seed + 1),
        _rand((b, hkv, m, dv), dtype, seed + 2),
    )


def _layer(arr, kind):
    """The keys of the graph layer ``selfattn-<kind>-<token>`` of a result array."""
    names = [n for n in arr.dask.layers if n.rsplit("-", 1)[0] == f"selfattn-{kind}"]
    assert len(names) == 1, names
    return list(arr.dask.layers[names[0]])


def _kind(key):
    return key[0].rsplit("-", 1)[0] if isinstance(key, tuple) and isinstance(key[0], str) else None


# -- graph shape ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, m, opts, expect",
    [
        (64, 64, {"causal": True}, 10),  # 4 x 4 chunks of 16: the lower triangle
        (64, 64, {}, 16),
        (32, 64, {"causal": True}, 3 + 4),  # N < M, bottom-right: rows 0-15 see keys <= 47, rows 16-31 all
        (64, 32, {"causal": True}, 3),  # N > M: the first 32 rows attend nothing (no pairs)
        (64, 64, {"window": (0, 0)}, 4),  # the diagonal only
        (64, 64, {"window": (16, 0)}, 4 + 3),  # diagonal and the one below
        (64, 64, {"window": (17, 0)}, 4 + 3 + 2),  # one key more reaches the last key of the chunk two below
    ],
)
def test_only_in_band_pairs_are_created(n, m, opts, expect):
    q, k, v = _qkv(1, 2, 2, n, m)
    dq, dk, dv = (da.from_array(x, chunks=(1, 2, 16, -1)) for x in (q, k, v))
    out = selfattn.scaled_dot_product_attention(dq, dk, dv, **opts)
    assert len(_layer(out, "pairs")) == expect
    ref = reference.forward(q, k, v, **opts)[0]
    assert_close(out.compute(**SYNC), ref, "float64")


def test_pair_count_is_per_batch_head_chunk_and_in_explain():
    q, k, v = _qkv(2, 4, 4, 64, 64)
    dq, dk, dv = (da.from_array(x, chunks=(1, 2, 16, -1)) for x in (q, k, v))
    out = selfattn.scaled_dot_product_attention(dq, dk, dv, causal=True)
    assert len(_layer(out, "pairs")) == 4 * 10
    plan = str(selfattn.explain(dq, dk, dv, causal=True))
    assert (
        "dask plan: 4 batch·head chunks x 4 query chunks x 4 key chunks: 40 pair tasks "
        "(10 of 16 chunk pairs in the causal band), merge fan-in 4"
    ) in plan
    assert "inner backend numpy on numpy chunks, 1 thread per task" in plan


def test_merge_tree_fan_in_follows_split_every():
    q, k, v = _qkv(1, 1, 1, 8, 64)
    dq = da.from_array(q, chunks=(1, 1, 8, -1))
    dk, dv = (da.from_array(x, chunks=(1, 1, 8, -1)) for x in (k, v))  # 8 key chunks
    for split, merges in ((2, 4 + 2 + 1), (4, 2 + 1), (8, 1)):
        with dask.config.set({"selfattn.split-every": split}):
            out = selfattn.scaled_dot_product_attention(dq, dk, dv)
        assert len(_layer(out, "merge")) == merges
        assert_close(out.compute(**SYNC), reference.forward(q, k, v)[0], "float64")


def test_chunks_user_default_gqa_and_head_dim():
    q, k, v = _qkv(2, 8, 2, 50, 70, 16)
    # The caller's chunks along N (uneven) and M are kept; heads round up to whole GQA groups of 4; D is rechunked.
    dq = da.from_array(q, chunks=(1, 3, (20, 5, 25), 8))
    dk = da.from_array(k, chunks=(2, 1, (33, 37), 16))
    dv = da.from_array(v, chunks=(2, 2, 70, 16))
    out, lse = selfattn.scaled_dot_product_attention(dq, dk, dv, return_lse=True)
    assert out.chunks == ((1, 1), (4, 4), (20, 5, 25), (16,))
    assert lse.chunks == ((1, 1), (4, 4), (20, 5, 25))
    assert len(_layer(out, "pairs")) == 2 * 2 * 3 * 2
    ref_out, ref_lse, _ = reference.forward(q, k, v)
    assert_close(out.compute(**SYNC), ref_out, "float64")
    assert_close(lse.compute(**SYNC), ref_lse, "float64", what="lse")


def test_default_chunks_split_a_single_chunk_by_bytes():
    q, k, v = _qkv(1, 2, 2, 1000, 900, 32)
    dq, dk, dv = (da.from_array(x, chunks=-1) for x in (q, k, v))
    # 2 heads x (32 + 32) x 8 bytes = 1 KiB per row: 256 KiB -> 256 rows per chunk at most.
    with dask.config.set({"selfattn.chunk-size": "256KiB"}):
        out = selfattn.scaled_dot_product_attention(dq, dk, dv)
    assert out.chunks[2] == (250, 250, 250, 250)
    assert len(_layer(out, "pairs")) == 4 * 4  # 900 keys: 4 even chunks of 225
    assert_close(out.compute(**SYNC), reference.forward(q, k, v)[0], "float64")
    out = selfattn.scaled_dot_product_attention(dq, dk, dv)  # 16 MiB default: one chunk each way
    assert out.chunks[2] == (1000,) and len(_layer(out, "pairs")) == 1


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("chunk-size", "lots", "selfattn.chunk-size"),
        ("chunk-size", -5, "selfattn.chunk-size"),
        ("split-every", 1, "selfattn.split-every"),
        ("threads-per-task", 0, "selfattn.threads-per-task"),
        ("inner-backend", 3, "selfattn.inner-backend"),
    ],
)
def test_bad_configuration_is_a_value_error_naming_the_key(key, value, match):
    q = da.ones((1, 1, 4, 4), chunks=2)
    with dask.config.set({f"selfattn.{key}": value}), pytest.raises(ValueError, match=match):
        selfattn.scaled_dot_product_attention(q, q, q)


# -- laziness, schedulers -------------------------------------------------------------------------------------------
def _counted(x, chunks, calls):
    """A Dask array of ``x`` whose every chunk computation is recorded in ``calls``."""

    def block(blk, block_info=None):
        calls.append(block_info[None]["chunk-location"])
        return blk

    return da.from_array(x, chunks=chunks).map_blocks(block, dtype=x.dtype)


def test_nothing_is_computed_at_call_time():
    q, k, v = _qkv(2, 4, 2, 24, 30)
    calls: list = []
    runs: list = []

    def scheduler(dsk, keys, **kwargs):  # any compute during the calls would come here
        runs.append(keys)
        return dask.get(dsk, keys, **kwargs)

    dq, dk, dv = (_counted(x, (1, 2, 8, -1), calls) for x in (q, k, v))
    mask = da.from_array(np.ones((24, 30), bool), chunks=12)
    slopes = da.from_array(np.linspace(0.1, 0.5, 4), chunks=2)
    with dask.config.set(scheduler=scheduler):
        out, lse, w = selfattn.scaled_dot_product_attention(
            dq, dk, dv, mask=mask, causal=True, alibi_slopes=slopes, dropout_p=0.2, return_lse=True, return_weights=True
        )
        o, backward = selfattn.scaled_dot_product_attention_vjp(dq, dk, dv, mask=mask, window=(3, 4))
        grads = backward(da.ones(o.shape, chunks=5))
        selfattn.explain(dq, dk, dv, causal=True)
    assert runs == [] and calls == []
    assert all(isinstance(x, da.Array) for x in (out, lse, w, o) + tuple(grads))
    out.compute(**SYNC)
    assert calls  # computing does read the inputs


def test_same_numbers_on_every_local_scheduler():
    q, k, v = _qkv(2, 4, 1, 33, 41, dtype=np.float32)
    dq, dk, dv = (da.from_array(x, chunks=(1, 1, 10, -1)) for x in (q, k, v))
    opts = dict(causal=True, dropout_p=0.25, dropout_seed=11)
    out, lse = selfattn.scaled_dot_product_attention(dq, dk, dv, return_lse=True, **opts)
    results = [dask.compute(out, lse, scheduler=s) for s in ("synchronous", "threads")]
    for a, b in zip(*results, strict=True):
        assert np.array_equal(a, b, equal_nan=True)
    _, backward = selfattn.scaled_dot_product_attention_vjp(dq, dk, dv, **opts)
    grads = backward(da.from_array(_rand(out.shape, np.float32), chunks=(2, 2, 11, 4)))
    g1 = dask.compute(*grads, scheduler="synchronous")
    g2 = dask.compute(*grads, scheduler="threads")
    assert all(np.array_equal(a, b) for a, b in zip(g1, g2, strict=True))


def test_backward_reuses_the_forward():
    q, k, v = _qkv(1, 2, 2, 32, 32)
    dq, dk, dv = (da.from_array(x, chunks=(1, 1, 8, -1)) for x in (q, k, v))
    out, backward = selfattn.scaled_dot_product_attention_vjp(dq, dk, dv, causal=True)
    grads = backward(da.from_array(_rand(out.shape, seed=4), chunks=8))
    ran: list = []
    from dask.callbacks import Callback

    with Callback(pretask=lambda key, dsk, state: ran.append(key)):
        o, gq, gk, gv = dask.compute(out, *grads, **SYNC)
    forward_pairs = [key for key in ran if _kind(key) == "selfattn-pairs"]
    backward_pairs = [key for key in ran if _kind(key) == "selfattn-pairs-bwd"]
    assert len(forward_pairs) == len(set(forward_pairs)) == 2 * 10  # each forward pair ran once
    assert len(backward_pairs) == 2 * 10  # the same pair set
    ref = reference.vjp(q, k, v, _rand(out.shape, seed=4), causal=True)
    for name, got, exp in zip(("dq", "dk", "dv"), (gq, gk, gv), ref, strict=True):
        assert_close(got, exp, "float64", what=name)


# -- exactness ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [(1, 1, 7, -1), (2, 2, 16, -1), (1, 4, (5, 30, 5), -1), -1])
@pytest.mark.parametrize("opts", [{"causal": True}, {"window": (6, 2)}, {}])
def test_dropout_pattern_is_the_single_calls_bit_for_bit(chunks, opts):
    """With V = I the output is the kept, rescaled weights: zeros sit exactly where the single call's hash drops."""
    B, Hq, Hkv, N, M, p, seed = 2, 4, 2, 40, 40, 0.3, 2**63 + 5
    q, k = _rand((B, Hq, N, 8)), _rand((B, Hkv, M, 8), seed=1)
    v = np.broadcast_to(np.eye(M), (B, Hkv, M, M)).copy()
    out = selfattn.scaled_dot_product_attention(
        *(da.from_array(x, chunks=chunks) for x in (q, k, v)), dropout_p=p, dropout_seed=seed, **opts
    ).compute(**SYNC)
    single = selfattn.scaled_dot_product_attention(q, k, v, dropout_p=p, dropout_seed=seed, backend="numpy", **opts)
    pb = selfattn._problem.normalize(q, k, v, **opts)
    band = pb.band(0, N, 0, M)
    keep = keep_mask(seed, np.arange(B * Hq), np.arange(N), np.arange(M), p).reshape(B, Hq, N, M)
    expected = keep if band is None else keep & band
    assert np.array_equal(out != 0, expected)
    assert np.array_equal(out != 0, single != 0)
    assert_close(out, single, "float64")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_partials_stay_in_the_accumulation_dtype(dtype):
    q, k, v = _qkv(1, 2, 2, 20, 30, dtype=dtype)
    dq, dk, dv = (da.from_array(x, chunks=(1, 2, 10, -1)) for x in (q, k, v))
    out, lse = selfattn.scaled_dot_product_attention(dq, dk, dv, return_lse=True, causal=True)
    key = _layer(out, "pairs")[0]
    part_out, part_lse = dask.get(out.__dask_graph__(), key)
    acc = np.float32 if dtype == "float16" else np.dtype(dtype)
    assert part_out.dtype == acc and part_lse.dtype == acc
    o, lse_ = dask.compute(out, lse, **SYNC)
    assert o.dtype == np.dtype(dtype) and lse_.dtype == acc
    ref_out, ref_lse, _ = reference.forward(q, k, v, causal=True)
    assert_close(o, ref_out, dtype)
    assert_close(lse_, ref_lse, dtype, what="lse")


def test_everything_together_matches_the_single_call():
    """Masks (Dask, partial batch broadcast), GQA, softcap, ALiBi, window, dropout, lse, weights; forward and VJP."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 3, 4, 21, 8))
    k = rng.standard_normal((2, 3, 2, 26, 8))
    v = rng.standard_normal((2, 3, 2, 26, 5))
    mask = rng.standard_normal((2, 1, 1, 21, 26))
    mask[rng.random(mask.shape) < 0.2] = -np.inf
    slopes = np.linspace(0.05, 0.4, 4)
    opts = dict(mask=mask, alibi_slopes=slopes, window=(9, 3), softcap=5.0, dropout_p=0.2, dropout_seed=3)
    dq = da.from_array(q, chunks=(1, 2, 2, 6, 8))
    dk = da.from_array(k, chunks=(2, 1, 1, 9, 8))
    dv = da.from_array(v, chunks=(1, 3, 2, 13, 5))
    dopts = dict(opts, mask=da.from_array(mask, chunks=(1, 1, 1, 8, 10)), alibi_slopes=da.from_array(slopes, chunks=1))
    out, lse, w = selfattn.scaled_dot_product_attention(dq, dk, dv, return_lse=True, return_weights=True, **dopts)
    # The oracle has no softcap/ALiBi: the single call on the NumPy backend is the reference (conformance-tested).
    single = selfattn.scaled_dot_product_attention(
        q, k, v, return_lse=True, return_weights=True, backend="numpy", **opts
    )
    for what, got, exp in zip(("out", "lse", "weights"), dask.compute(out, lse, w, **SYNC), single, strict=True):
        assert_close(got, exp, "float64", what=what)
    assert w.chunks[-2:] == ((6, 6, 6, 3), (9, 9, 8))  # weights blockwise on the pair grid
    o2, backward = selfattn.scaled_dot_product_attention_vjp(dq, dk, dv, **dopts)
    g = rng.standard_normal(o2.shape)
    grads = dask.compute(*backward(da.from_array(g, chunks=7)), **SYNC)
    _, single_backward = selfattn.scaled_dot_product_attention_vjp(q, k, v, backend="numpy", **opts)
    for name, got, exp in zip(("dq", "dk", "dv"), grads, single_backward(g), strict=True):
        assert_close(got, exp, "float64", what=name)


def test_numpy_mask_and_slopes_join_a_dask_call_but_not_the_reverse():
    q, k, v = _qkv(1, 2, 2, 10, 12)
    dq, dk, dv = (da.from_array(x, chunks=(1, 1, 5, -1)) for x in (q, k, v))
    mask = np.random.default_rng(0).random((10, 12)) > 0.3
    out = selfattn.scaled_dot_product_attention(dq, dk, dv, mask=mask, alibi_slopes=np.array([0.1, 0.2]))
    ref = selfattn.scaled_dot_product_attention(q, k, v, mask=mask, alibi_slopes=np.array([0.1, 0.2]), backend="numpy")
    assert_close(out.compute(**SYNC), ref, "float64")
    with pytest.raises(TypeError, match="mask is a dask array but query is a numpy array"):
        selfattn.scaled_dot_product_attention(q, k, v, mask=da.from_array(mask))


def test_empty_axes():
    for b, n, m in ((0, 5, 6), (2, 0, 6), (2, 5, 0)):
        q, k, v = _qkv(b, 2, 2, n, m, 4)
        dq, dk, dv = (da.from_array(x, chunks=(1, 1, 3, -1)) for x in (q, k, v))
        out, lse = selfattn.scaled_dot_product_attention(dq, dk, dv, return_lse=True)
        o, lse_ = dask.compute(out, lse, **SYNC)
        assert o.shape == (b, 2, n, 4) and not o.any() and np.all(np.isneginf(lse_))
        _, backward = selfattn.scaled_dot_product_attention_vjp(dq, dk, dv)
        grads = dask.compute(*backward(da.ones((b, 2, n, 4), chunks=2)), **SYNC)
        assert [x.shape for x in grads] == [q.shape, k.shape, v.shape] and not any(x.any() for x in grads)


# -- input checks ---------------------------------------------------------------------------------------------------
def test_unknown_shapes_are_refused():
    x = da.ones((8, 4), chunks=4)
    unknown = x[x[:, 0] > 0][None, None]  # boolean indexing: lengths Dask does not know
    assert np.isnan(unknown.shape[2])
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        selfattn.scaled_dot_product_attention(unknown, unknown, unknown)


def test_chunks_of_other_array_types_are_a_type_error():
    q = da.ones((1, 1, 8, 4), chunks=4).map_blocks(np.ma.masked_array)
    with pytest.raises(TypeError, match="NumPy or CuPy chunks"):
        selfattn.scaled_dot_product_attention(q, q, q)


def _register(monkeypatch, backend, array_type):
    from selfattn._dispatch import _Entry, registry

    entries = dict(registry.entries())
    entries[backend.name] = _Entry(backend.name, "test", 5, array_type, None, (), None, backend, None, (True, ""))
    monkeypatch.setattr(registry, "_entries", entries)


def test_an_inner_backend_without_a_feature_is_refused_at_call_time(monkeypatch):
    class NoDropout(selfattn.Backend):
        name = "no-dropout"
        capabilities = selfattn.Capabilities(array_type="numpy", features=frozenset(selfattn.FEATURES) - {"dropout"})

        def forward(self, pb):  # pragma: no cover - must never run
            raise AssertionError("called outside its capabilities")

    _register(monkeypatch, NoDropout(), "numpy")
    q = da.ones((1, 1, 8, 4), chunks=4)
    with dask.config.set({"selfattn.inner-backend": "no-dropout"}):
        with pytest.raises(selfattn.UnsupportedFeatureError, match="dropout"):
            selfattn.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
        assert "failed" not in str(selfattn.explain(q, q, q))


# -- inner backend, threads --------------------------------------------------------------------------------------------
def test_inner_backend_ignores_the_callers_choice_of_dask(monkeypatch):
    q, k, v = _qkv(1, 2, 2, 16, 16)
    dq, dk, dv = (da.from_array(x, chunks=8) for x in (q, k, v))
    monkeypatch.setenv("SELFATTN_BACKEND", "dask")
    with selfattn.use_backend("dask"):
        out = selfattn.scaled_dot_product_attention(dq, dk, dv)
        got = out.compute(**SYNC)  # the pair tasks choose for NumPy chunks, not "dask"
    assert_close(got, reference.forward(q, k, v)[0], "float64")


def test_inner_backend_by_configuration_and_its_errors():
    q, k, v = _qkv(1, 2, 2, 64, 64, 32)
    dq, dk, dv = (da.from_array(x, chunks=(1, 2, 32, -1)) for x in (q, k, v))
    with dask.config.set({"selfattn.inner-backend": "numba"}):
        assert "inner backend numba" in str(selfattn.explain(dq, dk, dv))
        out = selfattn.scaled_dot_product_attention(dq, dk, dv)
    assert_close(out.compute(**SYNC), reference.forward(q, k, v)[0], "float64")
    with dask.config.set({"selfattn.inner-backend": "nonesuch"}), pytest.raises(selfattn.BackendNotFoundError):
        selfattn.scaled_dot_product_attention(dq, dk, dv)


def test_each_task_runs_numba_within_the_thread_budget(monkeypatch):
    pytest.importorskip("numba")
    from selfattn.backends import numba_

    seen: list = []
    real = numba_.NumbaBackend.forward

    def spy(self, pb):
        seen.append(numba_._numba_threads())
        return real(self, pb)

    monkeypatch.setattr(numba_.NumbaBackend, "forward", spy)
    q, k, v = _qkv(1, 4, 4, 256, 256, 32, dtype=np.float32)
    dq, dk, dv = (da.from_array(x, chunks=(1, 4, 128, -1)) for x in (q, k, v))
    with dask.config.set({"selfattn.inner-backend": "numba"}):
        out = selfattn.scaled_dot_product_attention(dq, dk, dv)
    out.compute(scheduler="threads")
    assert seen and set(seen) == {1}
    seen.clear()
    with dask.config.set({"selfattn.inner-backend": "numba", "selfattn.threads-per-task": None}):
        out = selfattn.scaled_dot_product_attention(dq, dk, dv)
    out.compute(**SYNC)
    import numba

    assert set(seen) == {numba.get_num_threads()}


# -- CuPy chunks, on the CPU ----------------------------------------------------------------------------------------
class _FakeCupyArray(np.ndarray):
    """A NumPy array that ``array_library`` reports as CuPy (it is an instance of the stand-in ``cupy.ndarray``)."""

    def get(self):
        return np.asarray(self)


def _fake_cupy_module():
    mod = types.ModuleType("cupy")
    mod.ndarray = _FakeCupyArray

    def wrap(fn):
        def call(*args, **kwargs):
            res = fn(*args, **kwargs)
            return res.view(_FakeCupyArray) if isinstance(res, np.ndarray) else res

        return call

    def getattr_(name):
        return wrap(getattr(np, name))

    mod.__getattr__ = getattr_
    return mod


class _CupyChunkBackend(selfattn.Backend):
    """A stand-in for the CuPy backend: runs the NumPy backend on the stand-in arrays' data."""

    name = "fake-cupy-chunks"
    capabilities = selfattn.Capabilities(array_type="cupy", features=frozenset(selfattn.FEATURES) - {"varlen"})
    calls = 0

    def _np(self, pb):
        import dataclasses

        def host(x):
            return None if x is None else np.asarray(x)

        assert type(pb.query) is _FakeCupyArray and (pb.mask is None or type(pb.mask) is _FakeCupyArray)
        return dataclasses.replace(
            pb,
            array_type="numpy",
            query=host(pb.query),
            key=host(pb.key),
            value=host(pb.value),
            mask=host(pb.mask),
            alibi=host(pb.alibi),
        )

    def forward(self, pb):
        type(self).calls += 1
        from selfattn.backends.numpy_ import backend as np_backend

        return tuple(None if x is None else x.view(_FakeCupyArray) for x in np_backend.forward(self._np(pb)))

    def backward(self, pb, out, lse, grad_out):
        from selfattn.backends.numpy_ import backend as np_backend

        res = np_backend.backward(self._np(pb), np.asarray(out), np.asarray(lse), np.asarray(grad_out))
        return tuple(x.view(_FakeCupyArray) for x in res)


def test_cupy_chunks_run_on_the_cupy_array_type(monkeypatch):
    """The dask_cuda path on the CPU: CuPy-typed chunks go to a CuPy-array backend; NumPy masks are moved over."""
    if "cupy" in sys.modules:
        pytest.skip("CuPy is loaded: the stand-in would replace it")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy_module())
    be = _CupyChunkBackend()
    _register(monkeypatch, be, "cupy")
    q, k, v = _qkv(2, 4, 2, 20, 24)
    mask = np.random.default_rng(2).random((20, 24)) > 0.2
    dq, dk, dv = (da.from_array(x.view(_FakeCupyArray), chunks=(1, 2, 10, -1)) for x in (q, k, v))
    assert type(dq._meta) is _FakeCupyArray
    opts = dict(causal=True, dropout_p=0.1, dropout_seed=5)
    with dask.config.set({"selfattn.inner-backend": be.name}):
        assert "on cupy chunks" in str(selfattn.explain(dq, dk, dv, mask=mask, **opts))
        out, lse = selfattn.scaled_dot_product_attention(dq, dk, dv, mask=mask, return_lse=True, **opts)
        o2, backward = selfattn.scaled_dot_product_attention_vjp(dq, dk, dv, mask=mask, **opts)
        g = _rand(o2.shape, seed=9)
        grads = backward(da.from_array(g.view(_FakeCupyArray), chunks=5))
    # Blocks stay CuPy-typed (the stand-in's concatenation of blocks is NumPy's, so look at one block).
    assert all(type(x.blocks[0, 0, 1].compute(**SYNC)) is _FakeCupyArray for x in (out, lse))
    assert _CupyChunkBackend.calls > 0
    o, lse_ = dask.compute(out, lse, **SYNC)
    ref_out, ref_lse, _ = reference.forward(q, k, v, mask=mask, **opts)
    assert_close(np.asarray(o), ref_out, "float64")
    assert_close(np.asarray(lse_), ref_lse, "float64", what="lse")
    grads = dask.compute(*grads, **SYNC)
    for name, got, exp in zip(("dq", "dk", "dv"), grads, reference.vjp(q, k, v, g, mask=mask, **opts), strict=True):
        assert_close(np.asarray(got), exp, "float64", what=name)


def test_pair_tasks_pick_the_backend_by_the_pairs_own_size():
    """Automatic selection per pair uses the pair's own size: a tiny pair runs on NumPy, a large one on Numba."""
    opts = _dask_tasks.Options(
        scale=0.5,
        causal=False,
        window=None,
        softcap=None,
        dropout_p=0.0,
        dropout_seed=None,
        inner=None,
        threads=1,
        mask_batched=False,
    )
    pair = _dask_tasks.Pair(opts, 0, selfattn.backends.Coordinates())
    small = _dask_tasks.problem(pair, *_qkv(1, 1, 1, 4, 4, 4), None, None)
    assert _dask_tasks.inner_backend(small, None).name == "numpy"
    if any(r.name == "numba" and r.available for r in selfattn.list_backends()):
        large = _dask_tasks.problem(pair, *_qkv(1, 8, 8, 1024, 1024, 64), None, None)
        assert _dask_tasks.inner_backend(large, None).name == "numba"


def test_settings_defaults():
    assert dask_.settings() == dask_.Settings(chunk_bytes=16 * 2**20, split_every=4, inner=None, threads=1)


def test_benchmark_module_imports(monkeypatch):
    import importlib
    import pathlib

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1]))
    bench = importlib.import_module("benchmarks.bench_dask")
    assert {"DaskWorkers", "DaskWorkerScaling", "DaskThreads", "DaskThreadsRatio", "DaskMemory"} <= set(vars(bench))


def test_numpy_arrays_beside_dask_arrays_are_wrapped_as_dask_does():
    """A NumPy key/value (or grad_out) with a Dask query: one-chunk Dask arrays, same results, never copied."""
    q, k, v = _qkv()
    dq = da.from_array(q, chunks=(1, 2, 16, 8))
    out = selfattn.scaled_dot_product_attention(dq, k, v, causal=True)
    assert isinstance(out, da.Array)
    ref = reference.forward(q, k, v, causal=True)[0]
    assert_close(out.compute(), ref, "float64", "out")
    out2, backward = selfattn.scaled_dot_product_attention_vjp(q, da.from_array(k), v)
    assert isinstance(out2, da.Array)
    g = _rand(out2.shape, np.float64, 9)
    grads = backward(g)  # a NumPy grad_out for a Dask output
    assert all(isinstance(x, da.Array) for x in grads)
    for name, got, exp in zip(("dq", "dk", "dv"), dask.compute(*grads), reference.vjp(q, k, v, g), strict=True):
        assert_close(got, exp, "float64", name)


def test_mixed_dask_and_other_libraries_say_how_to_wrap(monkeypatch):
    """Beside Dask arrays whose chunks are not NumPy (CuPy), a NumPy array is not wrapped: the error says how."""
    import selfattn._problem as problem

    q, k, v = _qkv()
    monkeypatch.setattr(problem, "_dask_holds_numpy", lambda *arrays: False)  # as for CuPy-backed Dask arrays
    with pytest.raises(TypeError, match=r"query=dask, key=numpy, value=numpy; wrap the others with dask.array"):
        selfattn.scaled_dot_product_attention(da.from_array(q), k, v)
