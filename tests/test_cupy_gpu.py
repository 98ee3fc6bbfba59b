"""The CuPy backend on a CUDA device. Every test here skips, with the backend's reason, without one.

Run on a GPU by ``tools/gpu_report.py`` (the one-command GPU check): float16,
float32 and float64 forwards, lse, weights and VJPs against the NumPy backend on
the fused, tensor-core and blockwise paths; fully masked and NaN rows; the
tensor-core kernel against the CUDA-core one; inputs the tensor-core kernel
must not read in place (misaligned contiguous views); dropout close to 1;
arrays on another device; O(N) forward memory.
"""

from __future__ import annotations

import numpy as np
import pytest
from _cuda_cases import GPU_CASES, case_id, make_inputs

import selfattn
from selfattn._problem import normalize
from selfattn.backends._cuda import launch
from selfattn.backends.cupy_ import CupyBackend


def _need_gpu():
    ok, reason = CupyBackend().availability()
    if not ok:
        pytest.skip(f"cupy backend unavailable: {reason}")
    import cupy

    return cupy


def _need_tensor_cores(cupy):
    cc = int(cupy.cuda.Device().compute_capability)
    if cc < launch.TC_MIN_CC:
        pytest.skip(f"compute capability {cc} < {launch.TC_MIN_CC}: no tensor-core kernel")


def _recording(be: CupyBackend) -> list:
    """The names of the kernels ``be`` launches from now on (appended to the returned list)."""
    launched = []
    kernel = be._kernel
    be._kernel = lambda xp, name: launched.append(name) or kernel(xp, name)
    return launched


def test_gpu_backend_is_available_and_chosen():
    cupy = _need_gpu()
    rec = {r.name: r for r in selfattn.list_backends()}["cupy"]
    assert rec.available and rec.version, rec
    info = selfattn.get_backend("cupy").info()
    cc = str(cupy.cuda.Device().compute_capability)  # "90" for 9.0, "100" for 10.0
    assert info["devices"] >= 1 and info["compute_capability"] == f"{cc[:-1]}.{cc[-1]}"
    q = cupy.ones((1, 2, 8, 16), cupy.float32)
    assert selfattn.explain(q, q, q).backend == "cupy"  # CuPy arrays go to the cupy backend automatically


@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 40, 6, 5), (1, 2, 1, 130, 150, 64, 64), (1, 1, 1, 33, 17, 200, 256)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_gpu_forward_and_vjp_match_numpy(case, dtype, shape):
    cupy = _need_gpu()
    q, k, v, kw = make_inputs(case, dtype=dtype, shape=shape, contiguous=len(case) % 2 == 0)
    # Against the float64 oracle at each output's own dtype tolerance (selfattn.testing.cases.TOLERANCES).
    from selfattn.testing import reference
    from selfattn.testing.compare import assert_close

    ref_out, ref_lse, ref_w = reference.forward(q, k, v, **kw)
    smax = reference.score_max(q, k, mask=kw.get("mask"))
    ckw = {n: (cupy.asarray(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    cq, ck, cv = (cupy.asarray(x) for x in (q, k, v))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        out, lse = selfattn.scaled_dot_product_attention(cq, ck, cv, return_lse=True, backend="cupy", **ckw)
    stream.synchronize()
    assert isinstance(out, cupy.ndarray)
    g = np.random.default_rng(3).standard_normal(ref_out.shape).astype(dtype)
    bounds = reference.rounding_bounds(q, k, v, g, **kw)
    assert_close(out, ref_out, dtype, "out", score_max=smax, bound=bounds["out"])
    assert_close(lse, ref_lse, dtype, "lse", score_max=smax)
    w = selfattn.scaled_dot_product_attention(cq, ck, cv, return_weights=True, backend="cupy", **ckw)[1]
    assert_close(w, ref_w, dtype, "weights", score_max=smax)
    _, cbwd = selfattn.scaled_dot_product_attention_vjp(cq, ck, cv, backend="cupy", **ckw)
    for what, a, exp in zip(("dq", "dk", "dv"), cbwd(cupy.asarray(g)), reference.vjp(q, k, v, g, **kw), strict=True):
        assert_close(a, exp, dtype, what, score_max=smax, bound=bounds.get(what))


def test_gpu_fully_masked_rows_and_nan():
    cupy = _need_gpu()
    q, k, v, _ = make_inputs({}, shape=(1, 1, 1, 6, 5, 4, 3))
    q, k, v = q[0, 0], k[0, 0], v[0, 0]
    mask = np.ones((6, 5), bool)
    mask[1] = False
    q[3, 0] = np.nan
    out, lse = selfattn.scaled_dot_product_attention(
        cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), mask=cupy.asarray(mask), return_lse=True, backend="cupy"
    )
    out, lse = cupy.asnumpy(out), cupy.asnumpy(lse)
    assert (out[1] == 0).all() and lse[1] == -np.inf
    assert np.isnan(out[3]).all() and np.isnan(lse[3])


@pytest.mark.parametrize(
    "case",
    [dict(), dict(causal=True), dict(window=(100, 20), mask="bool_row", dropout_p=0.1, dropout_seed=4)],
    ids=case_id,
)
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_tensor_core_forward_matches_cuda_cores_and_numpy(case, d):
    cupy = _need_gpu()
    _need_tensor_cores(cupy)
    q, k, v, kw = make_inputs(case, dtype=np.float16, shape=(2, 8, 2, 300, 517, d, d))
    ref_out, ref_lse = selfattn.scaled_dot_product_attention(q, k, v, return_lse=True, backend="numpy", **kw)
    ckw = {n: (cupy.asarray(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    pb = normalize(*(cupy.asarray(x) for x in (q, k, v)), return_lse=True, **ckw)
    for tc in (True, False):
        be = CupyBackend(tensor_cores=tc)
        launched = _recording(be)
        out, lse, _ = be.forward(pb)
        want = launch.tc_kernel_name(d) if tc else launch.fwd_kernel_name("float16", d)
        assert launched[-1] == want
        np.testing.assert_allclose(cupy.asnumpy(out).astype(np.float64), ref_out, rtol=5e-3, atol=5e-3)
        np.testing.assert_allclose(cupy.asnumpy(lse).reshape(ref_lse.shape), ref_lse, rtol=5e-3, atol=5e-3)


def test_gpu_misaligned_contiguous_view():
    """A C-contiguous float16 view 2 bytes off a 16-byte boundary: copied, not read in place (cp.async faults)."""
    cupy = _need_gpu()
    _need_tensor_cores(cupy)
    rng = np.random.default_rng(5)
    shape = (2, 4, 200, 64)
    host = [rng.standard_normal(shape).astype(np.float16) for _ in range(3)]
    views = []
    for x in host:
        view = cupy.empty(x.size + 1, np.float16)[1:].reshape(shape)
        view[...] = cupy.asarray(x)
        assert view.flags.c_contiguous and view.data.ptr % 16 == 2
        views.append(view)
    out = selfattn.scaled_dot_product_attention(*views, causal=True, backend="cupy")
    cupy.cuda.Device().synchronize()
    ref = selfattn.scaled_dot_product_attention(*host, causal=True, backend="numpy")
    np.testing.assert_allclose(cupy.asnumpy(out).astype(np.float64), ref, rtol=5e-3, atol=5e-3)


def test_gpu_dropout_close_to_one():
    """dropout_p > 1 - 1/65504: 1/(1-p) exceeds float16's range; the tensor-core output stays finite and right."""
    cupy = _need_gpu()
    _need_tensor_cores(cupy)
    rng = np.random.default_rng(6)
    q = np.zeros((1, 4, 128, 64), np.float16)  # every probability is 1/M: kept weights are large
    k, v = (rng.standard_normal((1, 4, 4096, 64)).astype(np.float16) for _ in range(2))
    kw = dict(dropout_p=1 - 1 / 70000, dropout_seed=11)
    ref = selfattn.scaled_dot_product_attention(q, k, v, backend="numpy", **kw)
    out = selfattn.scaled_dot_product_attention(*(cupy.asarray(x) for x in (q, k, v)), backend="cupy", **kw)
    out = cupy.asnumpy(out)
    assert np.isfinite(out).all() and np.abs(ref).max() > 0
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=5e-3, atol=5e-3)


def test_gpu_decode_paths_agree():
    """A decode call (N = 1, M = 4096) on the blockwise path (default) and the fused kernel (decode_max_rows=0)."""
    cupy = _need_gpu()
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 8, 1, 128)).astype(np.float16)
    k, v = (rng.standard_normal((2, 2, 4096, 128)).astype(np.float16) for _ in range(2))
    ref = selfattn.scaled_dot_product_attention(q, k, v, backend="numpy")
    pb = normalize(*(cupy.asarray(x) for x in (q, k, v)))
    for rows, path in ((launch.DECODE_MAX_ROWS, "blockwise"), (0, "fused")):
        be = CupyBackend(decode_max_rows=rows)
        launched = _recording(be)
        out, _, _ = be.forward(pb)
        assert bool(launched) == (path == "fused")
        np.testing.assert_allclose(cupy.asnumpy(out).astype(np.float64), ref, rtol=5e-3, atol=5e-3)


def test_gpu_arrays_on_two_devices():
    """With two GPUs: a key on the other device is a ValueError before any launch, not an illegal address."""
    cupy = _need_gpu()
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one CUDA device: arrays cannot be on different devices")
    x = np.ones((1, 2, 8, 16), np.float32)
    q = cupy.asarray(x)
    with cupy.cuda.Device(1):
        k = cupy.asarray(x)
    with pytest.raises(ValueError, match="key is on CUDA device 1 but query is on device 0"):
        selfattn.scaled_dot_product_attention(q, k, q, backend="cupy")
    assert selfattn.scaled_dot_product_attention(q, q, q, backend="cupy").shape == q.shape  # context still usable


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_gpu_forward_memory_is_linear(dtype):
    """The fused forwards allocate their output and lse, nothing that grows with N*M."""
    cupy = _need_gpu()
    pool = cupy.get_default_memory_pool()
    q = cupy.ones((1, 8, 16384, 64), dtype=dtype)
    pool.free_all_blocks()
    before = pool.used_bytes()
    out, lse = selfattn.scaled_dot_product_attention(q, q, q, return_lse=True, backend="cupy")
    cupy.cuda.Device().synchronize()
    extra = pool.total_bytes() - before - out.nbytes - lse.nbytes
    assert extra <= 2**20, f"{extra / 2**20:.1f} MiB beyond out and lse"
