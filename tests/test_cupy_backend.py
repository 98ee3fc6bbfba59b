"""The CuPy backend object on any machine: light import, capabilities, availability, settings, devices.

The kernels are tested elsewhere: ``test_cuda_nvrtc.py`` (compile),
``test_cuda_launch.py`` (host logic), ``test_cuda_replay.py`` and
``test_cuda_emulation.py`` (on the CPU), ``test_cupy_gpu.py`` (on a GPU). Here a
stand-in CuPy (``_standin.py``: NumPy memory, kernels run by the SIMT emulator)
takes the public API through the backend where a real GPU would be needed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types

import numpy as np
import pytest
from _standin import use_standin_cupy

import selfattn
from selfattn.backends import cupy_ as cupy_backend_mod
from selfattn.backends._cuda import launch


@pytest.fixture
def standin_cupy(monkeypatch):
    """The stand-in CuPy as ``cupy`` (``_standin.py``), the CuPy backend available on it; undone afterwards."""
    yield from use_standin_cupy(monkeypatch)


# -- import and availability ---------------------------------------------


def test_import_does_not_import_cupy():
    code = (
        "import sys, selfattn, selfattn.backends.cupy_ as m; "
        "m.backend.capabilities; assert 'cupy' not in sys.modules, 'cupy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_capabilities_declared():
    caps = cupy_backend_mod.backend.capabilities
    assert caps.array_type == "cupy"
    assert caps.dtypes == frozenset(selfattn.DTYPES)
    assert caps.features == frozenset(selfattn.FEATURES)
    assert cupy_backend_mod.backend.priority == 10
    assert cupy_backend_mod.backend.name == "cupy"


def test_availability_without_cupy(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "cupy" else real(n, *a))
    ok, reason = cupy_backend_mod.CupyBackend().availability()
    assert not ok
    assert "cupy is not installed" in reason and "pip install 'selfattn[cuda12]'" in reason


def _fake_cupy(monkeypatch, get_count):
    monkeypatch.setattr(cupy_backend_mod, "_driver_probe", lambda: (True, ""))
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_count))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "cupy" else real(n, *a))


def test_availability_no_driver(monkeypatch):
    def boom():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    _fake_cupy(monkeypatch, boom)
    ok, reason = cupy_backend_mod.CupyBackend().availability()
    assert not ok
    assert "no usable CUDA driver/device" in reason and "cudaErrorInsufficientDriver" in reason


def test_availability_zero_devices(monkeypatch):
    _fake_cupy(monkeypatch, lambda: 0)
    ok, reason = cupy_backend_mod.CupyBackend().availability()
    assert not ok and "no CUDA device" in reason


def test_availability_with_device(monkeypatch):
    _fake_cupy(monkeypatch, lambda: 2)
    assert cupy_backend_mod.CupyBackend().availability() == (True, "")


def test_availability_driver_probe_failure_skips_cupy_import(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object())
    no_driver = (False, "no CUDA driver: could not load libcuda.so.1")
    monkeypatch.setattr(cupy_backend_mod, "_driver_probe", lambda: no_driver)
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    ok, reason = cupy_backend_mod.CupyBackend().availability()
    assert (ok, reason) == (False, "no CUDA driver: could not load libcuda.so.1")
    assert "cupy" not in sys.modules


def test_driver_probe_runs_here():
    ok, reason = cupy_backend_mod._driver_probe()
    assert isinstance(ok, bool) and (ok or "CUDA" in reason)


def _real_availability():
    return cupy_backend_mod.CupyBackend().availability()


def test_list_backends_reports_cupy():
    rec = {r.name: r for r in selfattn.list_backends()}["cupy"]
    ok, reason = _real_availability()
    assert rec.available == ok
    assert rec.capabilities is not None and rec.capabilities.array_type == "cupy"
    if not ok:
        assert rec.reason  # e.g. "cupy is not installed; ..." or "no usable CUDA driver/device: ..."
        if importlib.util.find_spec("cupy") is None:
            assert "selfattn[cuda12]" in rec.reason
        else:
            assert "CUDA" in rec.reason


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed")
def test_real_cupy_without_device_gives_reason():
    ok, reason = _real_availability()
    if ok:
        pytest.skip("a CUDA device is present")
    assert "CUDA" in reason


def test_cupy_inputs_without_a_device_give_a_clear_error(monkeypatch):
    """CuPy arrays on a machine whose CuPy cannot reach a GPU: a NoBackendError that says why."""
    import importlib.machinery

    from selfattn import _dispatch

    if _real_availability()[0]:
        pytest.skip("a CUDA device is present")
    fake = types.ModuleType("cupy")
    fake.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    fake.ndarray = type("ndarray", (np.ndarray,), {})  # what the dispatcher tests arrays against
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 0))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    _dispatch.registry.reset()
    try:
        q = np.ones((2, 4, 8), np.float32).view(fake.ndarray)
        with pytest.raises(selfattn.NoBackendError) as info:
            selfattn.scaled_dot_product_attention(q, q, q)
        msg = str(info.value)
        assert "cupy arrays" in msg and "cupy: skipped" in msg and ("CUDA driver" in msg or "CUDA device" in msg)
        with pytest.raises(selfattn.BackendUnavailableError, match="CUDA"):
            selfattn.scaled_dot_product_attention(q, q, q, backend="cupy")
    finally:
        _dispatch.registry.reset()


# -- settings: per instance, never module globals -------------------------------


def test_settings_are_per_instance():
    be = cupy_backend_mod.CupyBackend(tensor_cores=False, decode_max_rows=0, decode_min_keys=1024, block_bytes=4096)
    assert (be.tensor_cores, be.decode_max_rows, be.decode_min_keys, be.block_bytes) == (False, 0, 1024, 4096)
    default = cupy_backend_mod.backend
    assert (default.tensor_cores, default.decode_max_rows, default.decode_min_keys) == (
        True,
        launch.DECODE_MAX_ROWS,
        launch.DECODE_MIN_KEYS,
    )
    assert launch.forward_path(64, 64, 1, 4096, False) == "blockwise"
    assert launch.forward_path(64, 64, 1, 4096, False, decode_max_rows=0) == "fused"
    assert launch.forward_path(64, 64, 1, 4096, False, decode_min_keys=8192) == "fused"


@pytest.mark.parametrize(
    "kw",
    [
        dict(block_bytes=0),
        dict(decode_max_rows=-1),
        dict(decode_min_keys=1.5),
        dict(decode_max_rows=True),
        dict(block_bytes="1"),
    ],
)
def test_settings_are_checked(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name} must be an integer"):
        cupy_backend_mod.CupyBackend(**kw)


def test_decode_setting_picks_the_kernel(standin_cupy):
    """decode_max_rows=0 keeps a decode call on the fused kernel; the default sends it blockwise."""
    from selfattn._problem import normalize

    cp = standin_cupy
    rng = np.random.default_rng(0)
    q = cp.asarray(rng.standard_normal((1, 2, 1, 32)).astype(np.float32))
    k, v = (cp.asarray(rng.standard_normal((1, 2, 300, 32)).astype(np.float32)) for _ in range(2))
    results = {}
    for rows in (launch.DECODE_MAX_ROWS, 0):
        be = cupy_backend_mod.CupyBackend(decode_max_rows=rows)
        launched = []
        kernel = be._kernel
        be._kernel = lambda xp, name, kernel=kernel, launched=launched: launched.append(name) or kernel(xp, name)
        results[rows] = be.forward(normalize(q, k, v))[0]
        assert (launched == [launch.fwd_kernel_name("float32", 32)]) == (rows == 0), launched
    np.testing.assert_allclose(results[0].get(), results[launch.DECODE_MAX_ROWS].get(), rtol=1e-5, atol=1e-6)


# -- arrays on several devices ----------------------------------------------------


def test_arrays_on_another_device_are_rejected_before_any_launch(standin_cupy, monkeypatch):
    cp = standin_cupy
    monkeypatch.setenv("CUPY_STANDIN_DEVICES", "2")

    def no_kernels(*a, **k):
        raise AssertionError("a kernel was compiled or launched")

    monkeypatch.setattr(cp, "RawModule", no_kernels)
    rng = np.random.default_rng(0)
    host = rng.standard_normal((1, 2, 8, 16)).astype(np.float32)
    q = cp.asarray(host)
    with cp.cuda.Device(1):
        other = cp.asarray(host)
        mask = cp.asarray(np.ones((8, 8), bool))
        slopes = cp.asarray(np.full(2, 0.25, np.float32))
    assert (q.device.id, other.device.id) == (0, 1)
    for name, args, kw in (
        ("key", (q, other, q), {}),
        ("value", (q, q, other), {}),
        ("mask", (q, q, q), dict(mask=mask)),
    ):
        want = rf"{name} is on CUDA device 1 but query is on device 0.*copy {name} there"
        with pytest.raises(ValueError, match=want):
            selfattn.scaled_dot_product_attention(*args, backend="cupy", **kw)
    # ALiBi slopes reach the backend as the problem's (B, Hq) array: on another device, refused too.
    from dataclasses import replace

    from selfattn._problem import normalize

    pb = replace(normalize(q, q, q, alibi_slopes=cp.asarray(np.full(2, 0.25, np.float32))), alibi=slopes[None])
    assert pb.alibi.device.id == 1
    with pytest.raises(ValueError, match="alibi_slopes is on CUDA device 1 but query is on device 0"):
        cupy_backend_mod.backend.forward(pb)


def test_grad_out_on_another_device_is_rejected(standin_cupy, monkeypatch):
    cp = standin_cupy
    monkeypatch.setenv("CUPY_STANDIN_DEVICES", "2")
    host = np.random.default_rng(0).standard_normal((1, 1, 4, 8)).astype(np.float32)
    q = cp.asarray(host)
    out, backward = selfattn.scaled_dot_product_attention_vjp(q, q, q, backend="cupy")
    with cp.cuda.Device(1):
        g = cp.asarray(host)
    with pytest.raises(ValueError, match="grad_out is on CUDA device 1 but query is on device 0"):
        backward(g)
    dq, dk, dv = backward(cp.asarray(host))  # on the query's device: fine
    assert dq.device.id == 0 and dq.shape == q.shape


def test_misaligned_contiguous_view_through_the_public_api(standin_cupy):
    """A float16 C-contiguous view off a 16-byte boundary: the tensor-core kernel gets an aligned copy."""
    cp = standin_cupy
    rng = np.random.default_rng(1)
    shape = (1, 2, 70, 64)
    host = [rng.standard_normal(shape).astype(np.float16) for _ in range(3)]
    views = []
    for x in host:
        flat = cp.empty(x.size + 1, np.float16)
        view = flat[1:].reshape(shape)
        view[...] = cp.asarray(x)
        assert view.flags.c_contiguous and view.data.ptr % 16 == 2
        views.append(view)
    out = selfattn.scaled_dot_product_attention(*views, causal=True, backend="cupy")
    ref = selfattn.scaled_dot_product_attention(*host, causal=True, backend="numpy")
    np.testing.assert_allclose(out.get().astype(np.float64), ref.astype(np.float64), rtol=5e-3, atol=5e-3)


def test_varlen_softcap_alibi_through_the_public_api(standin_cupy):
    """A packed varlen call on CuPy arrays (cu_seqlens too): one fused launch, the NumPy backend's numbers."""
    cp = standin_cupy
    rng = np.random.default_rng(2)
    lens_q, lens_k = [3, 0, 70, 9], [5, 4, 66, 0]
    host = [rng.standard_normal((2, sum(lens_q), 32)).astype(np.float16)]
    host += [rng.standard_normal((1, sum(lens_k), 32)).astype(np.float16) for _ in range(2)]
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(x)]).astype(np.int32) for x in (lens_q, lens_k))
    slopes = rng.uniform(0.05, 0.5, (4, 2)).astype(np.float32)
    kw = dict(causal=True, softcap=3.0, dropout_p=0.2, dropout_seed=21, return_lse=True)
    args = [cp.asarray(x) for x in host] + [cp.asarray(cu_q), cp.asarray(cu_k)]
    launched = []
    be = cupy_backend_mod.backend
    kernel = be._kernel
    be._kernel = lambda xp, name: launched.append(name) or kernel(xp, name)
    try:
        out, lse = selfattn.scaled_dot_product_attention_varlen(
            *args, alibi_slopes=cp.asarray(slopes), backend="cupy", **kw
        )
    finally:
        del be._kernel
    assert launched == [launch.tc_kernel_name(32)]
    ref_out, ref_lse = selfattn.scaled_dot_product_attention_varlen(
        *host, cu_q, cu_k, alibi_slopes=slopes, backend="numpy", **kw
    )
    assert out.device.id == 0 and out.shape == ref_out.shape
    np.testing.assert_allclose(out.get().astype(np.float64), ref_out.astype(np.float64), rtol=5e-3, atol=5e-3)
    np.testing.assert_allclose(lse.get(), ref_lse, rtol=5e-3, atol=5e-3)


def test_explain_names_the_forward_kernel(standin_cupy):
    cp = standin_cupy
    q = cp.asarray(np.zeros((1, 2, 70, 64), np.float16))
    slopes = cp.asarray(np.full(2, 0.1, np.float32))
    ex = selfattn.explain(q, q, q, softcap=5.0, alibi_slopes=slopes, backend="cupy")
    assert f"cupy plan: fused forward kernel {launch.tc_kernel_name(64)}" in str(ex)
    ex = selfattn.explain(q, q, q, return_weights=True, backend="cupy")
    assert "cupy plan: blockwise cuBLAS forward (weights requested)" in str(ex)
