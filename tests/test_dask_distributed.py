"""The Dask backend on a real ``dask.distributed.LocalCluster``: two worker processes, one thread each.

The cluster is started once for this module and closed at its end. Results
must equal the synchronous scheduler's bit for bit (same pairs, same inner
backend, same merge order), and a task must keep the Numba backend on its
worker's thread (no extra Numba threads in the worker processes).
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

import selfattn
from selfattn.testing.compare import assert_close

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def _inputs(b=2, hq=4, hkv=2, n=48, m=56, d=16, dtype=np.float32, chunks=(1, 2, 16, -1)):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((b, h, length, d)).astype(dtype) for h, length in ((hq, n), (hkv, m), (hkv, m))]
    return arrays, [da.from_array(x, chunks=chunks) for x in arrays]


def test_forward_equals_the_synchronous_scheduler_bit_for_bit(client):
    (q, k, v), (dq, dk, dv) = _inputs()
    mask = da.from_array(np.random.default_rng(2).random((2, 1, 48, 56)) > 0.1, chunks=(1, 1, 20, 20))
    out, lse, w = selfattn.scaled_dot_product_attention(
        dq, dk, dv, mask=mask, causal=True, dropout_p=0.2, dropout_seed=77, return_lse=True, return_weights=True
    )
    on_cluster = client.compute([out, lse, w], sync=True)
    local = dask.compute(out, lse, w, scheduler="synchronous")
    for a, b in zip(on_cluster, local, strict=True):
        assert np.array_equal(a, b, equal_nan=True)
    single = selfattn.scaled_dot_product_attention(
        q,
        k,
        v,
        mask=mask.compute(),
        causal=True,
        dropout_p=0.2,
        dropout_seed=77,
        return_lse=True,
        return_weights=True,
        backend="numpy",
    )
    for what, a, b in zip(("out", "lse", "weights"), on_cluster, single, strict=True):
        assert_close(a, b, "float32", what=what)


def test_vjp_on_the_cluster(client):
    (q, k, v), (dq, dk, dv) = _inputs(dtype=np.float64)
    out, backward = selfattn.scaled_dot_product_attention_vjp(dq, dk, dv, window=(20, 5), dropout_p=0.1, dropout_seed=5)
    g = np.random.default_rng(3).standard_normal(out.shape)
    grads = backward(da.from_array(g, chunks=(1, 4, 24, 8)))
    on_cluster = client.compute([out, *grads], sync=True)  # forward pairs shared with the backward
    local = dask.compute(out, *grads, scheduler="synchronous")
    assert all(np.array_equal(a, b) for a, b in zip(on_cluster, local, strict=True))
    _, single_backward = selfattn.scaled_dot_product_attention_vjp(
        q, k, v, window=(20, 5), dropout_p=0.1, dropout_seed=5, backend="numpy"
    )
    for name, got, exp in zip(("dq", "dk", "dv"), on_cluster[1:], single_backward(g), strict=True):
        assert_close(got, exp, "float64", what=name)


def test_numba_tasks_stay_on_their_worker_thread(client):
    pytest.importorskip("numba")
    (q, k, v), (dq, dk, dv) = _inputs(1, 4, 4, 256, 256, 32, chunks=(1, 4, 128, -1))
    with dask.config.set({"selfattn.inner-backend": "numba"}):
        out = selfattn.scaled_dot_product_attention(dq, dk, dv, causal=True)
    got = client.compute(out, sync=True)
    assert_close(got, selfattn.scaled_dot_product_attention(q, k, v, causal=True, backend="numpy"), "float32")

    def numba_threads():
        return [t.name for t in threading.enumerate() if t.name.startswith("selfattn-numba")]

    # A thread budget of 1 runs the kernels inline: no worker process started Numba pool threads.
    assert client.run(numba_threads) == {addr: [] for addr in client.scheduler_info()["workers"]}
