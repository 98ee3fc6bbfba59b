"""The Numba backend: tiled FlashAttention kernels on the CPU.

Every feature of the public API, forward and VJP, for float16 (computed in
float32, returned float16; lse float32), float32 and float64. Two kernel
families share one algorithm (online softmax over key blocks, no N x M
scores stored; only ``return_weights=True`` materialises N x M):

* **BLAS-tile kernels** (prefill-like shapes with enough work:
  ``GEMM_MIN_ROWS`` query rows and ``GEMM_MIN_WORK``): Numba threads run (batch·head, tile of query rows) tasks in parallel
  (``numba.prange``) and hand each tile product -- ``S = (q·scale) K_blkᵀ``,
  ``O += P V_blk`` and the five products of the backward -- to an optimised
  single-threaded sgemm/dgemm through ``np.dot`` (the BLAS SciPy exports).
  The exp/mask/softmax work between the two products stays in Numba. BLAS is
  limited to one thread for the duration of the call with threadpoolctl
  (every Numba thread already runs its own task, so nothing is
  oversubscribed); the user's BLAS thread settings are restored afterwards.
  Needs SciPy and threadpoolctl (both in ``selfattn[numba]``).
* **Fused loop kernels** (small problems, decode-like shapes, or no SciPy):
  64 x 64 tiles with a register-blocked dot product that LLVM vectorises; no
  BLAS at all. Decode-like shapes (too few query tiles to keep every thread
  busy) split the key range into chunks whose partial results are merged by
  log-sum-exp (flash-decoding).

Both skip key blocks that causal/window masking excludes for a whole query
tile (causal costs about half). The backward (FlashAttention-2) recomputes
probabilities block by block from ``q``, ``k`` and the forward's lse; tasks
own (kv head, key chunk) pairs, so dK/dV need no atomics and grouped-query
heads are summed in place without copying K/V. Dropout reproduces
:mod:`selfattn._dropout` bit for bit. float32 ``exp`` is a branch-free
degree-5 polynomial with exponent-bit scaling that vectorises (relative
error < 2.1e-7; float64 uses ``math.exp``).
Calls from several Python threads take turns (one lock): each call already
uses all of Numba's threads.

Importing this module does not import Numba: the kernels
(:mod:`selfattn.backends._numba_kernels`) are compiled on first use and
cached on disk (``cache=True``), two specialisations (float32/float64) each;
tile sizes are run-time arguments, so shapes never trigger a compile.
The thread count is Numba's (``NUMBA_NUM_THREADS`` / ``numba.set_num_threads``).
"""

from __future__ import annotations

import importlib.util
import math
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


#: Tests set this to ``"gemm"`` or ``"fused"`` to run one kernel family on
#: every shape; ``None`` picks per call (:func:`_use_gemm`).
_FORCE_PATH = None
#: The BLAS-tile kernels run for calls with at least this much work
#: (B*Hq*N*M*D) and at least GEMM_MIN_ROWS query rows; below, the fused ones
#: win (the BLAS-tile ones pay a thread-limit switch, per-call BLAS overhead
#: and, with few rows, BLAS's poor efficiency on thin products). Measured
#: side by side on the 2-core VM, float32 forward, fused / BLAS-tile:
#: (1,4,128,128,64) 2^22 1.14 / 1.46 ms; (1,4,256,256,64) 2^24 2.43 / 2.46;
#: (1,8,256,256,64) 2^25 4.05 / 3.29; (8,8,16,1024,64) 10.2 / 17.4;
#: (4,8,32,2048,64) 14.8 / 15.5; (4,8,48,2048,64) 20.0 / 19.2.
GEMM_MIN_WORK = 1 << 24
GEMM_MIN_ROWS = 48
_gemm_state = None  # None: not probed; else (threadpoolctl controller or None, reason)


def _gemm_probe():
    """``(controller, reason)``: the threadpoolctl controller for the BLAS-tile kernels, or
    ``(None, why they cannot run)``. Probed once, on the first large call (or ``info``).

    Numba's ``np.dot`` calls the BLAS SciPy exports, so those kernels need
    SciPy; threadpoolctl makes that BLAS single-threaded while Numba's threads
    each run a task (no oversubscription) and restores the user's setting.
    SciPy's BLAS is loaded before the controller scans the process, or it
    would not be limited; a BLAS that threadpoolctl cannot limit (e.g.
    Apple's Accelerate) would be oversubscribed, so the fused kernels run
    instead.
    """
    global _gemm_state
    if _gemm_state is None:
        missing = [m for m in ("scipy", "threadpoolctl") if importlib.util.find_spec(m) is None]
        if missing:
            _gemm_state = (None, f"{' and '.join(missing)} not installed: pip install 'selfattn[numba]'")
        else:
            import scipy.linalg.cython_blas  # noqa: F401 - load the BLAS that Numba will call
            from threadpoolctl import ThreadpoolController

            ctl = ThreadpoolController()
            if ctl.select(user_api="blas").lib_controllers:
                _gemm_state = (ctl, "")
            else:
                _gemm_state = (None, "threadpoolctl finds no BLAS it can limit to one thread here")
    return _gemm_state


def _gemm_controller():
    """The threadpoolctl controller for the BLAS-tile kernels, or ``None`` if they cannot run."""
    return _gemm_probe()[0]


def _use_gemm(pb, nsplit=1):
    """Whether this call runs the BLAS-tile kernels (large prefill-like shapes) or the fused ones."""
    if pb.d == 0 or pb.dv == 0:
        return False
    if _FORCE_PATH is not None:
        return _FORCE_PATH == "gemm" and _gemm_controller() is not None
    work = pb.batch * pb.q_heads * pb.n * pb.m * pb.d
    return nsplit == 1 and pb.n >= GEMM_MIN_ROWS and work >= GEMM_MIN_WORK and _gemm_controller() is not None


def _query_tile(bh, n, nthreads, largest):
    """Query rows per BLAS-tile task: ``largest``, or fewer so every thread gets two tasks.

    Never below 32 rows (smaller tiles make BLAS inefficient) and a multiple of 8.
    """
    per_bh = -(-2 * nthreads // max(bh, 1))  # tiles each batch·head must give
    rows = -(-n // per_bh)
    return int(min(largest, max(32, -(-rows // 8) * 8)))


def _shift_free_bound(v3, cdt):
    """Largest score magnitude for which the BLAS-tile forward may skip the max shift.

    With every score in ``[-b, b]``, ``exp`` neither underflows to zero nor
    overflows, and neither do the row sums (at most ``M * e**b``) or the
    unnormalised output (at most ``M * e**b * max|v|``): ``b`` is capped at
    30 (float32) / 300 (float64) and lowered so that the output bound stays
    1000x below the dtype's largest value. Non-finite values in ``v`` give 0
    (the shortcut is not taken; the general path handles them).
    """
    vmax = max(float(v3.max()), -float(v3.min())) if v3.size else 0.0  # no |v| temporary
    if not math.isfinite(vmax):
        return 0.0
    cap = 30.0 if cdt == np.float32 else 300.0
    room = math.log(float(np.finfo(cdt).max) / 1e3) - math.log(max(vmax, 1.0) * v3.shape[1])
    return max(0.0, min(cap, room))


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
        ctl, why = _gemm_probe()
        d["blas_tile_kernels"] = "yes" if ctl is not None else f"no ({why}; the fused kernels run)"
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
        nthreads = numba.get_num_threads()
        nsplit = self._nsplit(pb, nthreads)
        args = (Hq, Hkv, lo, up, float(pb.scale), mkind, mb, mf, midx, thr, slo, shi, float(dscale))
        out3 = np.empty((BH, N, Dv), cdt)
        lse3 = np.empty((BH, N), cdt)
        with _lock:
            if _use_gemm(pb, nsplit):
                safe = 0.0 if mkind == 2 else _shift_free_bound(v3, cdt)
                gq = _query_tile(BH, N, nthreads, k.GQ)
                with _gemm_controller().limit(limits=1, user_api="blas"):
                    k.forward_gemm(q3, k3, v3, *args, k.key_norm_max(k3), safe, gq, k.GK, out3, lse3)
            elif nsplit == 1:
                k.forward(q3, k3, v3, *args, 1, out3[None], lse3[None], lse3[None])
            else:
                o_acc = np.empty((nsplit, BH, N, Dv), cdt)
                m_acc = np.empty((nsplit, BH, N), cdt)
                l_acc = np.empty((nsplit, BH, N), cdt)
                k.forward(q3, k3, v3, *args, nsplit, o_acc, m_acc, l_acc)
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
        gemm = _use_gemm(pb)
        block = k.GKB if gemm else k.BC
        nkb = (M + block - 1) // block
        tasks = B * Hkv
        nchunk = 1 if tasks >= 2 * nthreads else max(1, min(nkb, (2 * nthreads + tasks - 1) // tasks))
        dq_acc = np.zeros((nchunk, B * Hq, N, D), cdt)
        dk3 = np.empty((B * Hkv, M, D), cdt)
        dv3 = np.empty((B * Hkv, M, Dv), cdt)
        if gemm:
            with _lock, _gemm_controller().limit(limits=1, user_api="blas"):
                k.backward_gemm(q3, k3, v3, do3, lse3, delta, Hq, Hkv, lo, up, float(pb.scale), mkind, mb, mf,
                                midx, thr, slo, shi, float(dscale), k.GQB, k.GKB, nchunk, dq_acc, dk3, dv3)
        else:
            with _lock:
                k.backward(q3, k3, v3, do3, lse3, delta, Hq, Hkv, lo, up, float(pb.scale), mkind, mb, mf, midx,
                           thr, slo, shi, float(dscale), nchunk, dq_acc, dk3, dv3)
        dq3 = dq_acc[0] if nchunk == 1 else dq_acc.sum(axis=0)
        return (dq3.reshape(B, Hq, N, D).astype(pb.dtype, copy=False),
                dk3.reshape(B, Hkv, M, D).astype(pb.dtype, copy=False),
                dv3.reshape(B, Hkv, M, Dv).astype(pb.dtype, copy=False))


#: The instance the dispatcher registers.
backend = NumbaBackend()
