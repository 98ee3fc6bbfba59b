"""The dispatcher: precedence, context isolation, strictness, plugins, listing, cost."""

import asyncio
import importlib.metadata
import logging
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import PLUGINS

import selfattn
from selfattn import (
    BackendNotFoundError,
    NoBackendError,
    UnsupportedFeatureError,
)
from selfattn._dispatch import registry

Q = np.ones((1, 1, 4, 8), np.float32)


def chosen(**options):
    return selfattn.explain(Q, Q, Q, **options).backend


def auto_numpy_backend(q=Q):
    """What automatic selection picks for plain float32 NumPy inputs of ``q``'s size.

    The first available NumPy-array backend whose declared work range holds the
    call (``Capabilities.pays_off``), else the last able one.
    """
    from selfattn._problem import normalize

    pb = normalize(q, q, q)
    able = [r for r in selfattn.list_backends() if r.available and r.capabilities.array_type == "numpy"]
    return next((r.name for r in able if r.capabilities.pays_off.outside(pb) is None), able[-1].name)


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    monkeypatch.delenv("SELFATTN_BACKEND", raising=False)
    monkeypatch.delenv("SELFATTN_STRICT", raising=False)
    selfattn.set_backend(None)
    yield
    selfattn.set_backend(None)


def test_import_is_light():
    code = (
        "import sys, selfattn; bad=[m for m in ('numba','cupy','llvmlite','dask','distributed') if m in sys.modules]; "
        "print(bad); sys.exit(bool(bad))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_list_backends_without_importing_numba_or_cupy():
    # Where a GPU is usable, checking the cupy backend's availability legitimately imports cupy.
    code = (
        "import sys, selfattn; recs = selfattn.list_backends(); "
        "print([(r.name, r.available) for r in recs]); "
        "gpu = any(r.name == 'cupy' and r.available for r in recs); "
        "sys.exit(('cupy' in sys.modules and not gpu) or any(m in sys.modules for m in ('numba', 'dask', "
        "'distributed')))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "'numpy', True" in res.stdout


def test_precedence_argument_context_global_env(monkeypatch):
    auto = auto_numpy_backend()
    assert chosen() == auto
    monkeypatch.setenv("SELFATTN_BACKEND", "loopback")
    assert chosen() == "loopback"
    selfattn.set_backend("numpy")
    assert chosen() == "numpy"  # set_backend beats the environment
    with selfattn.use_backend("loopback"):
        assert chosen() == "loopback"  # the context beats set_backend
        assert chosen(backend="numpy") == "numpy"  # the argument beats everything
        with selfattn.use_backend("numpy"):
            assert chosen() == "numpy"  # innermost wins
        assert chosen() == "loopback"
    assert chosen() == "numpy"


def test_explicit_backend_never_falls_back():
    q16 = Q.astype(np.float16)
    with pytest.raises(UnsupportedFeatureError, match="loopback.*float16"):
        selfattn.scaled_dot_product_attention(q16, q16, q16, backend="loopback")
    with selfattn.use_backend("loopback"), pytest.raises(UnsupportedFeatureError, match="dropout"):
        selfattn.scaled_dot_product_attention(Q, Q, Q, dropout_p=0.1)


def test_unknown_backend_lists_installed_and_install_hints():
    with pytest.raises(BackendNotFoundError) as err:
        selfattn.scaled_dot_product_attention(Q, Q, Q, backend="tensorflow")
    msg = str(err.value)
    assert "'tensorflow'" in msg and "numpy" in msg and "pip install 'selfattn[numba]'" in msg
    with pytest.raises(BackendNotFoundError):
        selfattn.set_backend("nope")
    with pytest.raises(BackendNotFoundError), selfattn.use_backend("nope"):
        pass
    with pytest.raises(TypeError, match="backend must be"):
        selfattn.scaled_dot_product_attention(Q, Q, Q, backend=3)


def test_unavailable_backend_error_names_the_reason():
    rec = {r.name: r for r in selfattn.list_backends()}["cupy"]
    if rec.available:
        pytest.skip("cupy is available here")
    with pytest.raises(selfattn.BackendUnavailableError, match="cupy"):
        selfattn.scaled_dot_product_attention(Q, Q, Q, backend="cupy")


def test_array_type_filters_and_never_converts():
    # Asking a cupy backend to run NumPy arrays is refused (or it is unavailable), never converted.
    with pytest.raises((TypeError, selfattn.BackendUnavailableError)):
        selfattn.scaled_dot_product_attention(Q, Q, Q, backend="cupy")
    trail = selfattn.explain(Q, Q, Q).trail
    assert any(t.startswith("cupy: not considered") for t in trail)


def test_automatic_selection_skips_and_logs(caplog, monkeypatch):
    # Hide every built-in except numpy and loopback by asking for float16 with loopback preferred.
    monkeypatch.setattr(registry.entries()["loopback"], "priority", 1)
    monkeypatch.setattr(registry, "_entries", dict(sorted(registry.entries().items(), key=lambda kv: kv[1].priority)))
    registry._cache.clear()
    try:
        assert chosen() == "loopback"
        q16 = Q.astype(np.float16)
        with caplog.at_level(logging.DEBUG, logger="selfattn"):
            expl = selfattn.explain(q16, q16, q16)
            out = selfattn.scaled_dot_product_attention(q16, q16, q16)
        assert expl.backend != "loopback" and out.dtype == np.float16
        assert any("loopback: skipped" in t and "float16" in t for t in expl.trail)
        assert any("loopback: skipped" in r.getMessage() for r in caplog.records)
        # Strict mode turns the skip into an error, by context or by environment.
        with selfattn.use_backend(strict=True), pytest.raises(UnsupportedFeatureError, match="strict"):
            selfattn.scaled_dot_product_attention(q16, q16, q16)
        monkeypatch.setenv("SELFATTN_STRICT", "1")
        with pytest.raises(UnsupportedFeatureError, match="strict"):
            selfattn.scaled_dot_product_attention(q16, q16, q16)
        with selfattn.use_backend(strict=False):
            selfattn.scaled_dot_product_attention(q16, q16, q16)
    finally:
        registry.reset()


def test_no_backend_error_lists_reasons(monkeypatch):
    monkeypatch.setattr(registry, "_entries", {"loopback": registry.entries()["loopback"]})
    registry._cache.clear()
    try:
        q16 = Q.astype(np.float16)
        with pytest.raises(NoBackendError, match="loopback: skipped.*float16"):
            selfattn.scaled_dot_product_attention(q16, q16, q16)
    finally:
        registry.reset()


def test_context_is_isolated_between_threads_and_tasks():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name):
        with selfattn.use_backend(name):
            barrier.wait()
            seen[name] = chosen()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("numpy", "loopback")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"numpy": "numpy", "loopback": "loopback"}

    async def task(name, other_started):
        with selfattn.use_backend(name):
            await asyncio.sleep(0.01)
            return chosen()

    async def main():
        return await asyncio.gather(task("numpy", None), task("loopback", None))

    assert asyncio.run(main()) == ["numpy", "loopback"]
    assert chosen() == auto_numpy_backend()


def test_entry_point_plugin_is_registered_and_used():
    recs = {r.name: r for r in selfattn.list_backends()}
    assert recs["loopback"].available and recs["loopback"].source.startswith("plugin (selfattn-loopback")
    assert "dropout" not in recs["loopback"].capabilities.features
    be = selfattn.get_backend("loopback")
    before = be.calls
    selfattn.scaled_dot_product_attention(Q, Q, Q, backend="loopback")
    assert be.calls == before + 1


def test_broken_and_duplicate_plugins_warn_and_are_skipped(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS / "bad"))
    importlib.invalidate_caches() if hasattr(importlib, "invalidate_caches") else None
    registry.reset()
    try:
        with pytest.warns(RuntimeWarning) as rec:
            names = [r.name for r in selfattn.list_backends()]
        messages = " ".join(str(w.message) for w in rec)
        assert "broken" in messages and "selfattn-broken" in messages
        assert "refusing backend 'numpy'" in messages and "selfattn-dupe" in messages
        assert "broken" not in names and names.count("numpy") == 1
        assert selfattn.get_backend("numpy").name == "numpy"
    finally:
        monkeypatch.undo()
        registry.reset()


def test_list_backends_records():
    recs = selfattn.list_backends()
    names = [r.name for r in recs]
    assert names.index("cupy") < names.index("numba") < names.index("numpy") < names.index("loopback")
    for r in recs:
        assert isinstance(r.available, bool)
        assert r.available or r.reason
        assert r.capabilities is None or r.capabilities.as_dict()["array_type"] in ("numpy", "cupy", "dask")
    numpy_rec = recs[names.index("numpy")]
    assert numpy_rec.version == np.__version__ and numpy_rec.capabilities.features == frozenset(selfattn.FEATURES)


def test_explain_returns_trail_without_computing():
    expl = selfattn.explain(Q, Q, Q, causal=True, vjp=True)
    assert expl.backend == auto_numpy_backend() and expl.error is None and expl.trail
    assert "backend:" in str(expl)
    bad = selfattn.explain(Q, Q, Q, dropout_p=0.5, backend="loopback")
    assert bad.backend is None and "UnsupportedFeatureError" in bad.error
    with pytest.raises(ValueError):
        selfattn.explain(Q, Q, Q, dropout_p=2.0)


def test_decision_cache_is_used(monkeypatch):
    selfattn.scaled_dot_product_attention(Q, Q, Q)
    calls = []
    real = registry.available
    monkeypatch.setattr(registry, "available", lambda e: calls.append(e.name) or real(e))
    selfattn.scaled_dot_product_attention(Q, Q, Q)
    assert calls == []


def test_entry_points_group_name():
    eps = importlib.metadata.entry_points(group="selfattn.backends")
    assert "loopback" in [e.name for e in eps]


# -- size-aware automatic choice (deterministic: the tests set the thresholds) -----------------------------------
@pytest.fixture
def numba_work_range(monkeypatch):
    """Give the numba backend (if installed) a declared work range of 1e6 FLOPs for the test."""
    import dataclasses

    recs = {r.name: r for r in selfattn.list_backends()}
    if not recs["numba"].available:
        pytest.skip("numba is not installed")
    be = selfattn.get_backend("numba")
    monkeypatch.setattr(be, "capabilities", dataclasses.replace(be.capabilities, min_flops=1e6, work_range=None))
    registry._cache.clear()
    yield be
    registry._cache.clear()


@pytest.fixture
def numba_rich_range(monkeypatch):
    """Give the numba backend a WorkRange with every rule, small numbers, for the test."""
    import dataclasses

    recs = {r.name: r for r in selfattn.list_backends()}
    if not recs["numba"].available:
        pytest.skip("numba is not installed")
    be = selfattn.get_backend("numba")
    wr = selfattn.WorkRange(min_flops=1e7, min_flops_many_heads=1e5, many_heads=16, min_keys_decode=512, decode_rows=4)
    monkeypatch.setattr(be, "capabilities", dataclasses.replace(be.capabilities, work_range=wr))
    registry._cache.clear()
    yield wr
    registry._cache.clear()


def test_work_range_rules(numba_rich_range):
    z = np.zeros
    # few heads, below min_flops: numpy; the same work in many heads: numba
    few = z((1, 2, 64, 16), np.float32)  # 2*2*64*64*32 = 524288 FLOPs
    many = z((16, 1, 20, 16), np.float32)  # 16 heads: 2*16*20*20*32 = 409600 FLOPs
    assert selfattn.explain(few, few, few).backend == "numpy"
    assert selfattn.explain(many, many, many).backend == "numba"
    tiny_many = z((16, 1, 2, 16), np.float32)[:, :, :, :]  # 16 heads but decode-like rows: not the heads rule
    assert selfattn.explain(tiny_many, tiny_many, tiny_many).backend == "numpy"
    # decode-like: by the number of keys
    q1 = z((1, 2, 1, 16), np.float32)
    short, long = z((1, 2, 511, 16), np.float32), z((1, 2, 512, 16), np.float32)
    assert selfattn.explain(q1, short, short).backend == "numpy"
    assert selfattn.explain(q1, long, long).backend == "numba"
    ex = selfattn.explain(q1, short, short)
    assert any("decode-like call with 511 < 512 keys" in line for line in ex.trail), ex.trail
    # large calls: by FLOPs
    big = z((1, 2, 400, 16), np.float32)  # 2*2*400*400*32 = 2.05e7
    assert selfattn.explain(big, big, big).backend == "numba"
    assert numba_rich_range.outside(normalize_pb(big)) is None


def normalize_pb(q):
    from selfattn._problem import normalize

    return normalize(q, q, q)


def test_work_range_defaults_and_min_flops():
    wr = selfattn.WorkRange()
    assert wr.outside(normalize_pb(np.zeros((1, 1, 2, 2), np.float32))) is None  # min_flops 0: everything
    caps = selfattn.Capabilities("numpy", min_flops=1e9)
    assert caps.pays_off == selfattn.WorkRange(min_flops=1e9)
    assert "small problem" in caps.pays_off.outside(normalize_pb(np.zeros((1, 1, 8, 8), np.float32)))
    assert caps.as_dict()["work_range"]["min_flops"] == 1e9


def _sized(n):
    q = np.zeros((1, 2, n, 16), np.float32)
    return q, q, q  # FLOPs = 2*2*n*n*32 = 128 n^2


def test_small_problems_go_to_the_next_backend(numba_work_range):
    small, big = _sized(80), _sized(90)  # 819200 and 1036800 FLOPs around the 1e6 threshold
    assert selfattn.explain(*small).backend == "numpy"
    assert selfattn.explain(*big).backend == "numba"
    trail = selfattn.explain(*small).trail
    assert any(line.startswith("numba: passed over, small problem") for line in trail), trail
    # The decision cache keeps both answers apart (same dtype and features, different sizes).
    assert selfattn.explain(*big).backend == "numba" and selfattn.explain(*small).backend == "numpy"
    from selfattn._dispatch import select
    from selfattn._problem import normalize

    assert select(normalize(*small)).name == "numpy" and select(normalize(*big)).name == "numba"


def test_size_preference_never_overrides_an_explicit_choice(numba_work_range):
    small = _sized(8)
    assert selfattn.explain(*small, backend="numba").backend == "numba"
    with selfattn.use_backend("numba"):
        assert selfattn.explain(*small).backend == "numba"
    selfattn.set_backend("numba")
    assert selfattn.explain(*small).backend == "numba"
    selfattn.set_backend(None)
    # strict mode forbids falling back after a failure; preferring a faster backend is not one
    with selfattn.use_backend(strict=True):
        assert selfattn.explain(*small).backend == "numpy"


def test_the_last_able_backend_takes_any_size(numba_work_range, monkeypatch):
    # numpy cannot run it (an unsupported feature is simulated): numba takes the small call anyway
    import dataclasses

    np_be = selfattn.get_backend("numpy")
    monkeypatch.setattr(np_be, "capabilities", dataclasses.replace(np_be.capabilities, dtypes=frozenset({"float64"})))
    monkeypatch.setattr(registry, "_entries", {k: v for k, v in registry.entries().items() if k in ("numba", "numpy")})
    registry._cache.clear()
    try:
        assert selfattn.explain(*_sized(8)).backend == "numba"
    finally:
        registry.reset()


@pytest.mark.parametrize(
    "kw", [dict(min_flops=-1), dict(min_flops="1e9"), dict(many_heads=1.5), dict(decode_rows=-2), dict(many_heads=True)]
)
def test_work_range_rejects_bad_values(kw):
    with pytest.raises(ValueError, match=f"WorkRange.{next(iter(kw))}"):
        selfattn.WorkRange(**kw)
