"""BLAS-tile kernels: the FlashAttention structure with every tile product handed to BLAS.

Numba lowers ``np.dot`` on contiguous 2-D arrays to the BLAS that SciPy
exports (``scipy.linalg.cython_blas``). An optimised single-threaded sgemm/
dgemm on a (256 x 64) @ (64 x 512) tile runs 2-3x faster than any loop nest
LLVM generates from Python, so these kernels keep the FlashAttention
structure (tasks, online softmax over key blocks, no N x M scores) but call
BLAS for the tile products. The host must keep that BLAS single-threaded
while they run (each of its threads already runs its own task range):
:mod:`selfattn.backends.numba_` limits SciPy's BLAS with threadpoolctl for
the call. Every ``np.dot`` below writes into a C-contiguous buffer reshaped
from a flat scratch array, which is what lets Numba pass it to BLAS without
a temporary.

Serial over task ranges ``[t0, t1)``, GIL released; arguments follow
:mod:`selfattn.backends._numba.args`.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .tiles import (
    OPTS,
    cast_like,
    dropout_grad,
    dropout_tile,
    ds_in_place,
    exp_shift_row,
    finish_rows,
    head_bound,
    query_task,
    score_bias,
    softmax_tile,
)

__all__ = ["head_bounds", "forward_gemm", "backward_gemm", "GQ", "GK", "GQB", "GKB"]

#: Query rows per task in the forward (the host may pass fewer so that every
#: thread gets work). 256 rows amortise BLAS's packing of each K/V block.
GQ = 256
#: Keys per block in the forward: a 256 x 512 float32 score block is 512 KiB,
#: a core's L2 here, and stays there between the two products.
GK = 512
#: Query rows per tile in the backward: dK/dV of a key block accumulate over
#: longer products, which BLAS runs closer to its peak.
GQB = 512
#: Keys per block in the backward (five products share each block).
GKB = 256


@nb.njit(**OPTS)
def head_bounds(t0, t1, k, v, kmax, safe, allow):
    """Per key/value head ``t``: ``kmax[t]`` = the largest Euclidean norm among its keys (``k`` ``(BKV, M, D)``)
    and ``safe[t]`` = :func:`~selfattn.backends._numba.tiles.value_room` of its values (0 unless ``allow``).

    (:func:`~selfattn.backends._numba.tiles.head_bound`: a NaN key or a
    non-finite value disables the shift-free shortcut of :func:`forward_gemm`
    for that head). Tasks are key/value heads.
    """
    for t in range(t0, t1):
        kmax[t], safe[t] = head_bound(k[t], v[t], allow)


@nb.njit(**OPTS)
def forward_gemm(t0, t1, q, k, v, P, kmax, safe, GQ, GK, out, lse):
    """Online-softmax forward whose tile products are BLAS calls; tasks are (bh, tile of ``GQ`` rows).

    Each task walks its band's keys in blocks of ``GK``: ``S = (q*scale)
    K_blk^T`` (BLAS), soft-capping/biases/masks, online softmax,
    ``O += P V_blk`` (BLAS). Extra memory per task is O(GQ * GK + GQ * Dv),
    independent of N and M.

    The running-max pass and the rescaling of ``O`` are skipped for a tile
    whose rows all satisfy ``|q_i*scale| * max_j |k_j| <= safe[kvh]`` (or whose
    soft-cap is below it): every score is then bounded, so ``exp(s)``
    neither overflows nor underflows and the shift is 0 for the whole row.
    ``kmax[kvh]`` is the largest key norm of that head and ``safe[kvh]`` its
    bound (:func:`head_bounds`), such that ``M * exp(safe) * max|v|`` stays far
    below the dtype's largest value; per head, so a head's output does not
    depend on the other heads' values. The host makes it 0 (off) with additive
    masks, and with ALiBi biases unless every row keeps a zero-distance key
    (``numba_._alibi_keeps_bound``).
    Writes the normalised output (times ``dscale``) to ``out`` ``(BH, N, Dv)``
    and the log-sum-exp to ``lse`` ``(BH, N)`` (``-inf`` where nothing is
    attended).
    """
    BH, N, D = q.shape
    M = k.shape[1]
    Dv = v.shape[2]
    G = P.Hq // P.Hkv
    nqb = (N + GQ - 1) // GQ
    dt = q.dtype
    qs_buf = np.empty(GQ * D, dt)
    sbuf = np.empty(GQ * GK, dt)
    dcap_buf = np.empty(GQ * GK if P.softcap > 0.0 else 1, dt)
    pv_buf = np.empty(GQ * Dv, dt)
    o_buf = np.empty(GQ * Dv, dt)
    mrow = np.empty(GQ, dt)
    lrow = np.empty(GQ, dt)
    zero = np.zeros(1, dt)[0]
    ninf = cast_like(-np.inf, zero)
    sc = cast_like(P.scale, zero)
    for t in range(t0, t1):
        bh, b, h, kvh, i0, i1, j0, j1 = query_task(t, nqb, GQ, N, M, G, P)
        nr = i1 - i0
        qs = qs_buf[: nr * D].reshape((nr, D))
        pv = pv_buf[: nr * Dv].reshape((nr, Dv))
        o = o_buf[: nr * Dv].reshape((nr, Dv))
        for r in range(nr):
            mrow[r] = ninf
            lrow[r] = zero
        # Scale q once (masks add to scaled scores) and bound every row's scores.
        room = safe[kvh]
        bounded = room > 0.0
        for r in range(nr):
            nrm = zero
            for dd in range(D):
                x = q[bh, i0 + r, dd] * sc
                qs[r, dd] = x
                nrm += x * x
            # NaN norms fail the comparison and so take the general path.
            if not (math.sqrt(nrm) * kmax[kvh] * 1.001 <= room):
                bounded = False
        bounded = bounded or (P.softcap > 0.0 and P.softcap * 1.001 <= room)
        if bounded:
            for r in range(nr):
                mrow[r] = zero
        # Keys [e0, e1) are inside the band for every row of the tile; the
        # blocks are cut at e0 and e1 so that only the narrow edge blocks
        # (the causal diagonal: at most GQ keys) need per-element band masks.
        e0 = min(max(j0, i1 - 1 + P.off - P.lo), j1)
        e1 = max(min(j1, i0 + P.off + P.up + 1), e0)
        c1 = j0
        first = True
        while c1 < j1:
            c0 = c1
            c1 = min(c0 + GK, e0 if c0 < e0 else (e1 if c0 < e1 else j1))
            nc = c1 - c0
            s = sbuf[: nr * nc].reshape((nr, nc))
            dcap = dcap_buf[: nr * nc].reshape((nr, nc)) if P.softcap > 0.0 else dcap_buf[:1].reshape((1, 1))
            np.dot(qs, k[kvh, c0:c1].T, s)
            score_bias(s, nr, nc, i0, c0, b, h, P.off, P, dcap, False)
            softmax_tile(s, nr, nc, mrow, lrow, o, Dv, bounded, ninf, zero)
            if P.thr > 0:
                dropout_tile(s, nr, nc, i0, c0, b, h, P)
            if first:
                np.dot(s, v[kvh, c0:c1], o)
                first = False
            else:
                np.dot(s, v[kvh, c0:c1], pv)
                for r in range(nr):
                    for e in range(Dv):
                        o[r, e] += pv[r, e]
        if first:  # no key block at all: o was never written
            for r in range(nr):
                for e in range(Dv):
                    o[r, e] = zero
        finish_rows(o, mrow, lrow, nr, Dv, j1 <= j0, P.dscale, out, lse, bh, i0)


@nb.njit(**OPTS)
def backward_gemm(t0, t1, q, k, v, do, lse, delta, P, GQ, GKB, nchunk, dq_acc, dk, dv):
    """FlashAttention-2 backward whose tile products are BLAS calls; tasks are (kv head, key chunk).

    Same contract as :func:`selfattn.backends._numba.fused.backward` (blocks
    of ``GKB`` keys, query tiles of ``GQ`` rows, ``lse`` holding ``+inf`` for
    rows that attend nothing), with the five products per tile --
    ``S = (q*scale) K^T``, ``dP = dO V^T``, ``dV += (P*Z)^T dO``,
    ``dK += dS^T (q*scale)``, ``dQ += dS K * scale`` -- done by BLAS on views
    of the inputs (no copies of K, V or dO).
    """
    BH, N, D = q.shape
    BKV, M, Dv = v.shape
    G = P.Hq // P.Hkv
    nkb = (M + GKB - 1) // GKB
    per = (nkb + nchunk - 1) // nchunk
    dt = q.dtype
    Dm = max(D, Dv)
    qs = np.empty((GQ, D), dt)
    sbuf = np.empty(GQ * GKB, dt)
    zbuf = np.empty(GQ * GKB, dt)
    dpbuf = np.empty(GQ * GKB, dt)
    dcap_buf = np.empty(GQ * GKB if P.softcap > 0.0 else 1, dt)
    kvbuf = np.empty(GKB * Dm, dt)
    dqbuf = np.empty(GQ * D, dt)
    dka = np.empty((GKB, D), dt)
    dva = np.empty((GKB, Dv), dt)
    zero = np.zeros(1, dt)[0]
    sc = cast_like(P.scale, zero)
    capped = P.softcap > 0.0
    for t in range(t0, t1):
        ch = t % nchunk
        kvh = t // nchunk
        b = kvh // P.Hkv
        hk = kvh - b * P.Hkv
        for kbi in range(ch * per, min(nkb, (ch + 1) * per)):
            c0 = kbi * GKB
            c1 = min(M, c0 + GKB)
            nc = c1 - c0
            kb = k[kvh, c0:c1]
            vb = v[kvh, c0:c1]
            dka[:nc] = 0.0
            dva[:nc] = 0.0
            tk = kvbuf[: nc * D].reshape((nc, D))
            tv = kvbuf[: nc * Dv].reshape((nc, Dv))
            ilo = max(0, c0 - P.off - P.up)
            ihi = min(N, c1 - 1 - P.off + P.lo + 1)
            for g in range(G):
                h = hk * G + g
                bh = b * P.Hq + h
                for i0 in range(ilo, ihi, GQ):
                    i1 = min(ihi, i0 + GQ)
                    nr = i1 - i0
                    qt = qs[:nr]
                    for r in range(nr):
                        for dd in range(D):
                            qt[r, dd] = q[bh, i0 + r, dd] * sc
                    dot = do[bh, i0:i1]
                    s = sbuf[: nr * nc].reshape((nr, nc))
                    dp = dpbuf[: nr * nc].reshape((nr, nc))
                    dcap = dcap_buf[: nr * nc].reshape((nr, nc)) if capped else dcap_buf[:1].reshape((1, 1))
                    np.dot(qt, kb.T, s)
                    score_bias(s, nr, nc, i0, c0, b, h, P.off, P, dcap, True)
                    np.dot(dot, vb.T, dp)
                    # P = exp(S - lse)
                    for r in range(nr):
                        exp_shift_row(s[r], nc, lse[bh, i0 + r])
                    if P.thr > 0:
                        # pz = P*Z feeds dV; dP *= Z feeds dS.
                        pz = zbuf[: nr * nc].reshape((nr, nc))
                        dropout_grad(s, dp, pz, False, nr, nc, i0, c0, b, h, P)
                        np.dot(pz.T, dot, tv)
                    else:
                        np.dot(s.T, dot, tv)
                    dva[:nc] += tv
                    # dS = P * (dP - delta), in place of P (times 1 - tanh² under soft-capping)
                    ds_in_place(s, dp, nr, nc, delta, bh, i0, dcap, capped)
                    np.dot(s.T, qt, tk)
                    dka[:nc] += tk
                    dqt = dqbuf[: nr * D].reshape((nr, D))
                    np.dot(s, kb, dqt)
                    for r in range(nr):
                        dqrow = dq_acc[ch, bh, i0 + r]
                        for dd in range(D):
                            dqrow[dd] += dqt[r, dd] * sc
            for c in range(nc):
                for dd in range(D):
                    dk[kvh, c0 + c, dd] = dka[c, dd]
                for e in range(Dv):
                    dv[kvh, c0 + c, e] = dva[c, e]
