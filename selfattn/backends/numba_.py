"""The Numba backend: fused, tiled FlashAttention kernels on the CPU.

Every feature of the public API, forward and VJP, for float16 (computed in
float32, returned float16; lse float32), float32 and float64.

* Forward: one task per (batch·head, tile of 64 query rows[, key split]) runs
  in parallel (``numba.prange``); each walks 64-key tiles with an online
  softmax, so no N x M scores are ever stored (only the weights, when asked).
  Key tiles that causal/window masking excludes for the whole query tile are
  never visited (causal costs about half).
* Decode-like shapes (too few query tiles to keep every thread busy) split the
  key range into chunks whose partial results are merged by log-sum-exp
  (flash-decoding).
* Backward (FlashAttention-2): probabilities are recomputed tile by tile from
  ``q``, ``k`` and the forward's lse; tasks own (kv head, key chunk) pairs so
  dK/dV need no atomics, and grouped-query heads are summed in place.
* Dropout reproduces :mod:`selfattn._dropout` bit for bit.
* Tile products use a 2 x 4 register-blocked dot-product kernel whose
  reductions LLVM vectorises; float32 ``exp`` is a branch-free Cephes-style
  polynomial that vectorises too (float64 uses ``math.exp``). No BLAS is
  called from inside the parallel region, so there is no oversubscription.
* Calls from several Python threads take turns (one lock): each call already
  uses all of Numba's threads.

Importing this module does not import Numba: the kernels
(:mod:`selfattn.backends._numba_kernels`) are compiled on first use and
cached on disk (``cache=True``), two specialisations (float32/float64) each.
The thread count is Numba's (``NUMBA_NUM_THREADS`` / ``numba.set_num_threads``).
"""

from __future__ import annotations

import importlib.util
import threading

import numpy as np

from .._capabilities import Capabilities
from .._dropout import split_seed, threshold
from ._base import Backend

__all__ = ["NumbaBackend", "backend"]

_kernels = None
# Numba's default "workqueue" threading layer must not run parallel kernels from
# two Python threads at once; each kernel already uses every thread, so calls
# from concurrent Python threads simply take turns.
_lock = threading.Lock()


def _load():
    global _kernels
    if _kernels is None:
        from . import _numba_kernels

        _kernels = _numba_kernels
    return _kernels


def _band(pb):
    big = pb.n + pb.m + 2
    lo = big if pb.lower is None else int(pb.lower)
    up = big if pb.upper is None else int(pb.upper)
    return lo, up


def _mask_args(pb, cdt):
    """``(kind, bool_mask_u8, float_mask, index)`` for the kernels; the mask is never expanded."""
    dummy_b = np.ones((1, 1, 1, 1), np.uint8)
    dummy_f = np.zeros((1, 1, 1, 1), cdt)
    if pb.mask is None:
        return 0, dummy_b, dummy_f, np.zeros(max(pb.batch, 1), np.int64)
    idx = np.ascontiguousarray(pb.mask_index, dtype=np.int64)
    if pb.mask.dtype.kind == "b":
        return 1, np.ascontiguousarray(pb.mask).view(np.uint8), dummy_f, idx
    return 2, dummy_b, np.ascontiguousarray(pb.mask, dtype=cdt), idx


def _dropout_args(pb):
    if pb.dropout_p <= 0.0:
        return 0, 0, 0, 1.0
    lo, hi = split_seed(pb.dropout_seed)
    return threshold(pb.dropout_p), lo, hi, 1.0 / (1.0 - pb.dropout_p)


def _c3(x, cdt):
    """``x`` (4-D) as a C-contiguous 3-D array in ``cdt`` (no copy when already so)."""
    a = np.ascontiguousarray(x, dtype=cdt)
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


class NumbaBackend(Backend):
    """Fused FlashAttention-style CPU kernels compiled with Numba (see the module docstring)."""

    name = "numba"
    priority = 20
    capabilities = Capabilities(array_type="numpy")

    def __init__(self):
        self._version = None

    @property
    def version(self):
        if self._version is None:
            try:
                from importlib.metadata import version

                self._version = version("numba")
            except Exception:  # pragma: no cover - metadata missing
                self._version = "unknown"
        return self._version

    def availability(self):
        if importlib.util.find_spec("numba") is None:
            return False, "numba is not installed; pip install 'selfattn[numba]'"
        return True, ""

    def info(self):
        import sys

        d = {"numba": self.version}
        nbm = sys.modules.get("numba")
        if nbm is not None:
            d["threads"] = nbm.get_num_threads()
            d["threading_layer"] = nbm.config.THREADING_LAYER
        return d

    # -- forward ---------------------------------------------------------
    def _nsplit(self, pb, nthreads):
        """Key splits per query tile: enough tasks for every thread on decode-like shapes."""
        k = _load()
        tiles = pb.batch * pb.q_heads * ((pb.n + k.BR - 1) // k.BR)
        if tiles == 0 or pb.m <= 4 * k.BC or tiles >= 2 * nthreads:
            return 1
        want = (4 * nthreads + tiles - 1) // tiles
        return int(max(1, min(want, pb.m // (2 * k.BC), 64)))

    def forward(self, pb):
        B, Hq, Hkv, N, M, D, Dv = pb.batch, pb.q_heads, pb.kv_heads, pb.n, pb.m, pb.d, pb.dv
        cdt = pb.compute_dtype
        BH = B * Hq
        if BH == 0 or N == 0 or M == 0:
            out = np.zeros((B, Hq, N, Dv), pb.dtype)
            lse = np.full((B, Hq, N), -np.inf, pb.lse_dtype) if pb.want_lse else None
            w = np.zeros((B, Hq, N, M), pb.dtype) if pb.return_weights else None
            return out, lse, w
        k = _load()
        import numba

        q3, k3, v3 = _c3(pb.query, cdt), _c3(pb.key, cdt), _c3(pb.value, cdt)
        lo, up = _band(pb)
        mkind, mb, mf, midx = _mask_args(pb, cdt)
        thr, slo, shi, dscale = _dropout_args(pb)
        nsplit = self._nsplit(pb, numba.get_num_threads())
        if nsplit == 1:
            o_acc = np.empty((1, BH, N, Dv), cdt)
            m_acc = np.empty((1, BH, N), cdt)
            l_acc = m_acc
        else:
            o_acc = np.empty((nsplit, BH, N, Dv), cdt)
            m_acc = np.empty((nsplit, BH, N), cdt)
            l_acc = np.empty((nsplit, BH, N), cdt)
        with _lock:
            k.forward(q3, k3, v3, Hq, Hkv, lo, up, float(pb.scale), mkind, mb, mf, midx,
                      thr, slo, shi, float(dscale), nsplit, o_acc, m_acc, l_acc)
            if nsplit == 1:
                out3, lse3 = o_acc[0], m_acc[0]
            else:
                out3 = np.empty((BH, N, Dv), cdt)
                lse3 = np.empty((BH, N), cdt)
                k.merge_splits(o_acc, m_acc, l_acc, float(dscale), out3, lse3)
                del o_acc, m_acc, l_acc
            w = None
            if pb.return_weights:
                w3 = np.zeros((BH, N, M), cdt)
                k.weights(q3, k3, Hq, Hkv, lo, up, float(pb.scale), mkind, mb, mf, midx, lse3, w3)
                w = w3.reshape(B, Hq, N, M).astype(pb.dtype, copy=False)
        out = out3.reshape(B, Hq, N, Dv).astype(pb.dtype, copy=False)
        lse = lse3.reshape(B, Hq, N).astype(pb.lse_dtype, copy=False) if pb.want_lse else None
        return out, lse, w

    # -- backward --------------------------------------------------------
    def backward(self, pb, out, lse, grad_out):
        B, Hq, Hkv, N, M, D, Dv = pb.batch, pb.q_heads, pb.kv_heads, pb.n, pb.m, pb.d, pb.dv
        cdt = pb.compute_dtype
        if B * Hq == 0 or N == 0 or M == 0:
            return (np.zeros((B, Hq, N, D), pb.dtype), np.zeros((B, Hkv, M, D), pb.dtype),
                    np.zeros((B, Hkv, M, Dv), pb.dtype))
        k = _load()
        import numba

        q3, k3, v3 = _c3(pb.query, cdt), _c3(pb.key, cdt), _c3(pb.value, cdt)
        do3 = _c3(grad_out, cdt)
        o3 = _c3(out, cdt)
        delta = np.einsum("bnd,bnd->bn", do3, o3)
        lse3 = np.asarray(lse, dtype=cdt).reshape(B * Hq, N)
        lse3 = np.where(lse3 == -np.inf, np.inf, lse3).astype(cdt)
        lo, up = _band(pb)
        mkind, mb, mf, midx = _mask_args(pb, cdt)
        thr, slo, shi, dscale = _dropout_args(pb)
        nthreads = numba.get_num_threads()
        nkb = (M + k.BC - 1) // k.BC
        tasks = B * Hkv
        nchunk = 1 if tasks >= 2 * nthreads else max(1, min(nkb, (2 * nthreads + tasks - 1) // tasks))
        dq_acc = np.zeros((nchunk, B * Hq, N, D), cdt)
        dk3 = np.empty((B * Hkv, M, D), cdt)
        dv3 = np.empty((B * Hkv, M, Dv), cdt)
        with _lock:
            k.backward(q3, k3, v3, do3, lse3, delta, Hq, Hkv, lo, up, float(pb.scale), mkind, mb, mf, midx,
                       thr, slo, shi, float(dscale), nchunk, dq_acc, dk3, dv3)
        dq3 = dq_acc[0] if nchunk == 1 else dq_acc.sum(axis=0)
        return (dq3.reshape(B, Hq, N, D).astype(pb.dtype, copy=False),
                dk3.reshape(B, Hkv, M, D).astype(pb.dtype, copy=False),
                dv3.reshape(B, Hkv, M, Dv).astype(pb.dtype, copy=False))


#: The instance the dispatcher registers.
backend = NumbaBackend()
