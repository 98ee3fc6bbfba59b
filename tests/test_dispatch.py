"""The dispatcher: precedence, context isolation, strictness, plugins, listing, cost."""

import asyncio
import importlib.metadata
import logging
import subprocess
import sys
import threading

import numpy as np
import pytest

import selfattn
from selfattn import (
    BackendNotFoundError,
    NoBackendError,
    UnsupportedFeatureError,
)
from selfattn._dispatch import registry

from conftest import PLUGINS

Q = np.ones((1, 1, 4, 8), np.float32)


def chosen(**options):
    return selfattn.explain(Q, Q, Q, **options).backend


def auto_numpy_backend():
    """What automatic selection picks for plain float32 NumPy inputs."""
    return next(r.name for r in selfattn.list_backends() if r.available and r.capabilities.array_type == "numpy")


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    monkeypatch.delenv("SELFATTN_BACKEND", raising=False)
    monkeypatch.delenv("SELFATTN_STRICT", raising=False)
    selfattn.set_backend(None)
    yield
    selfattn.set_backend(None)


def test_import_is_light():
    code = "import sys, selfattn; bad=[m for m in ('numba','cupy','llvmlite') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_list_backends_without_importing_numba_or_cupy():
    # Where a GPU is usable, checking the cupy backend's availability legitimately imports cupy.
    code = ("import sys, selfattn; recs = selfattn.list_backends(); "
            "print([(r.name, r.available) for r in recs]); "
            "gpu = any(r.name == 'cupy' and r.available for r in recs); "
            "sys.exit(('cupy' in sys.modules and not gpu) or 'numba' in sys.modules)")
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
    with selfattn.use_backend("loopback"):
        with pytest.raises(UnsupportedFeatureError, match="dropout"):
            selfattn.scaled_dot_product_attention(Q, Q, Q, dropout_p=0.1)


def test_unknown_backend_lists_installed_and_install_hints():
    with pytest.raises(BackendNotFoundError) as err:
        selfattn.scaled_dot_product_attention(Q, Q, Q, backend="tensorflow")
    msg = str(err.value)
    assert "'tensorflow'" in msg and "numpy" in msg and "pip install 'selfattn[numba]'" in msg
    with pytest.raises(BackendNotFoundError):
        selfattn.set_backend("nope")
    with pytest.raises(BackendNotFoundError):
        with selfattn.use_backend("nope"):
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
        with selfattn.use_backend(strict=True):
            with pytest.raises(UnsupportedFeatureError, match="strict"):
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
        assert r.capabilities is None or r.capabilities.as_dict()["array_type"] in ("numpy", "cupy")
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
