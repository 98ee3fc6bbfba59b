"""Fused loop kernels: FlashAttention tiles with no BLAS at all.

Small tiles (``BR`` query rows x ``BC`` keys, run-time arguments) with the
register-blocked :func:`~selfattn.backends._numba.tiles.dot_nt`. They win on
small and thin problems (few rows, decode-like shapes) where a BLAS call's
fixed cost or poor efficiency on thin products dominates, they run packed
variable-length batches (one launch over every sequence's tiles), and they
are the fallback where no BLAS can be used. Decode-like shapes split each
tile's key range into ``nsplit`` pieces whose partials :func:`merge_splits`
combines by log-sum-exp (flash-decoding).

Every kernel is serial over a half-open range of tasks ``[t0, t1)`` and
releases the GIL: the host (:mod:`selfattn.backends.numba_`) runs task ranges
on its own threads, or inline for small problems. Arguments follow
:mod:`selfattn.backends._numba.args`. The per-tile work is written once
(:func:`_attend_rows`, :func:`_backward_block`) and shared by the regular
and the varlen kernels, which differ only in how a task finds its rows and
keys: a regular problem's batch·head rows, or a packed sequence's slice
(``qbase``/``kbase`` offsets into the packed axis, positions local to the
sequence).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .tiles import (
    OPTS,
    cast_like,
    dot_nt,
    dropout_grad,
    dropout_tile,
    ds_in_place,
    exp_shift_row,
    query_task,
    score_bias,
    softmax_tile,
)

__all__ = ["forward", "forward_varlen", "merge_splits", "weights", "backward", "backward_varlen"]


@nb.njit(**OPTS)
def _attend_rows(q, k, v, bh, kvh, qbase, kbase, i0, nr, js0, js1, off, b, h, P, BC, bufs):
    """Online softmax of rows ``qbase+i0 .. +nr`` of ``q[bh]`` over keys ``kbase+js0 .. kbase+js1`` of ``k[kvh]``.

    Leaves the unnormalised output in ``o[:nr]``, the running maximum in
    ``mrow`` and the running sum in ``lrow`` (``bufs`` = scratch tiles from
    :func:`_buffers`). Row/key positions in masks, band, ALiBi and dropout are
    ``i0 + r`` and ``js0 + c`` (local to a packed sequence for varlen).
    """
    qs, kb, vt, s, dcap, o, mrow, lrow = bufs
    D = q.shape[2]
    Dv = v.shape[2]
    Dvp = o.shape[1]
    ninf = cast_like(-np.inf, s[0, 0])
    zero = cast_like(0.0, s[0, 0])
    sc = cast_like(P.scale, zero)
    for r in range(nr + 1):
        for e in range(Dvp):
            o[r, e] = zero
    for r in range(nr):
        mrow[r] = ninf
        lrow[r] = zero
    nrp = nr + (nr & 1)
    for r in range(nr):
        for dd in range(D):
            qs[r, dd] = q[bh, qbase + i0 + r, dd] * sc
    for c0 in range(js0, js1, BC):
        c1 = min(js1, c0 + BC)
        nc = c1 - c0
        ncp = (nc + 3) // 4 * 4
        if ncp == nc:  # whole groups of 4 keys: read K in place
            dot_nt(qs, k[kvh], s, nrp, nc, D, False, zero, kbase + c0)
        else:
            for c in range(nc):
                krow = k[kvh, kbase + c0 + c]
                for dd in range(D):
                    kb[c, dd] = krow[dd]
            dot_nt(qs, kb, s, nrp, ncp, D, False, zero, 0)
        score_bias(s, nr, nc, i0, c0, b, h, off, P, dcap, False)
        softmax_tile(s, nr, nc, mrow, lrow, o, Dv, False, ninf, zero)
        if P.thr > 0:
            dropout_tile(s, nr, nc, i0, c0, b, h, P)
        if nr < 8:
            # Few rows (decode): transposing V would cost as much as the
            # product; accumulate four value rows per pass over o instead.
            vk = v[kvh]
            kb0 = kbase + c0
            for r in range(nr):
                orow = o[r]
                srow = s[r]
                c = 0
                while c + 4 <= nc:
                    p0 = srow[c]
                    p1 = srow[c + 1]
                    p2 = srow[c + 2]
                    p3 = srow[c + 3]
                    v0 = vk[kb0 + c]
                    v1 = vk[kb0 + c + 1]
                    v2 = vk[kb0 + c + 2]
                    v3 = vk[kb0 + c + 3]
                    for e in range(Dv):
                        orow[e] += p0 * v0[e] + p1 * v1[e] + p2 * v2[e] + p3 * v3[e]
                    c += 4
                while c < nc:
                    p0 = srow[c]
                    v0 = vk[kb0 + c]
                    for e in range(Dv):
                        orow[e] += p0 * v0[e]
                    c += 1
        else:
            for c in range(nc):
                vrow = v[kvh, kbase + c0 + c]
                for e in range(Dv):
                    vt[e, c] = vrow[e]
            dot_nt(s, vt, o, nrp, Dvp, nc, True, zero, 0)


@nb.njit(**OPTS)
def _buffers(BR, BC, D, Dv, softcap, like):
    """Scratch tiles of one thread for :func:`_attend_rows` (allocated once per task range)."""
    dt = like.dtype
    Dvp = (Dv + 3) // 4 * 4
    qs = np.zeros((BR + 1, D), dt)
    kb = np.zeros((BC + 3, D), dt)
    vt = np.zeros((Dvp, BC + 3), dt)
    s = np.zeros((BR + 1, BC + 3), dt)
    dcap = np.zeros((BR + 1, BC + 3) if softcap > 0.0 else (1, 1), dt)
    o = np.zeros((BR + 1, Dvp), dt)
    mrow = np.full(BR, -np.inf, dt)
    lrow = np.zeros(BR, dt)
    return qs, kb, vt, s, dcap, o, mrow, lrow


@nb.njit(**OPTS)
def _finish(bufs, nr, Dv, dscale, out, lse, bh, row0):
    """Normalise :func:`_attend_rows`' result into ``out[bh, row0:row0+nr]`` and ``lse`` (-inf for empty rows)."""
    o, mrow, lrow = bufs[5], bufs[6], bufs[7]
    for r in range(nr):
        l = lrow[r]
        if l == 0.0:
            lse[bh, row0 + r] = -np.inf
            for e in range(Dv):
                out[bh, row0 + r, e] = 0.0
        else:
            inv = dscale / l
            lse[bh, row0 + r] = mrow[r] + math.log(l)
            for e in range(Dv):
                out[bh, row0 + r, e] = o[r, e] * inv


@nb.njit(**OPTS)
def forward(t0, t1, q, k, v, P, BR, BC, nsplit, o_acc, m_acc, l_acc):
    """Online-softmax forward; tasks are (bh, query tile of ``BR`` rows, key split).

    With ``nsplit == 1`` a task writes the normalised output to ``o_acc[0]``
    and the log-sum-exp to ``m_acc[0]``; otherwise its unnormalised partial
    (O, running max, running sum) to ``o_acc/m_acc/l_acc[split]`` for
    :func:`merge_splits`.
    """
    N, D = q.shape[1], q.shape[2]
    M = k.shape[1]
    Dv = v.shape[2]
    G = P.Hq // P.Hkv
    nqb = (N + BR - 1) // BR
    bufs = _buffers(BR, BC, D, Dv, P.softcap, q)
    for t in range(t0, t1):
        sp = t % nsplit
        bh, b, h, kvh, i0, i1, j0, j1 = query_task(t // nsplit, nqb, BR, N, M, G, P)
        nr = i1 - i0
        if j1 > j0:
            per = ((j1 - j0 + nsplit - 1) // nsplit + BC - 1) // BC * BC
            js0 = j0 + sp * per
            js1 = min(j1, js0 + per)
        else:
            js0 = j0
            js1 = j0
        _attend_rows(q, k, v, bh, kvh, 0, 0, i0, nr, js0, js1, P.off, b, h, P, BC, bufs)
        if nsplit == 1:
            _finish(bufs, nr, Dv, P.dscale, o_acc[0], m_acc[0], bh, i0)
        else:
            o, mrow, lrow = bufs[5], bufs[6], bufs[7]
            for r in range(nr):
                m_acc[sp, bh, i0 + r] = mrow[r]
                l_acc[sp, bh, i0 + r] = lrow[r]
                for e in range(Dv):
                    o_acc[sp, bh, i0 + r, e] = o[r, e]


@nb.njit(**OPTS)
def forward_varlen(t0, t1, q, k, v, P, BR, BC, cu_q, cu_k, tile_seq, tile_row, out, lse):
    """Forward of a packed variable-length batch; tasks are (query head, query tile of one sequence).

    ``q`` ``(Hq, total_q, D)``, ``k``/``v`` ``(Hkv, total_k, ·)``;
    ``tile_seq[t]``/``tile_row[t]`` give each query tile's sequence and first
    (local) row, every sequence's tiles in order. Positions are local to the
    sequence, whose band offset is ``M_s - N_s``; ALiBi row and dropout batch
    index are the sequence's. Writes ``out`` ``(Hq, total_q, Dv)`` and
    ``lse`` ``(Hq, total_q)``.
    """
    D, Dv = q.shape[2], v.shape[2]
    G = P.Hq // P.Hkv
    ntile = tile_seq.shape[0]
    bufs = _buffers(BR, BC, D, Dv, P.softcap, q)
    for t in range(t0, t1):
        tile = t % ntile
        h = t // ntile
        sq = tile_seq[tile]
        i0 = tile_row[tile]
        q0 = cu_q[sq]
        k0 = cu_k[sq]
        nq = cu_q[sq + 1] - q0
        nk = cu_k[sq + 1] - k0
        off = nk - nq
        i1 = min(nq, i0 + BR)
        nr = i1 - i0
        j0 = max(0, i0 + off - P.lo)
        j1 = max(j0, min(nk, i1 - 1 + off + P.up + 1))
        _attend_rows(q, k, v, h, h // G, q0, k0, i0, nr, j0, j1, off, sq, h, P, BC, bufs)
        _finish(bufs, nr, Dv, P.dscale, out, lse, h, q0 + i0)


@nb.njit(**OPTS)
def merge_splits(t0, t1, o_acc, m_acc, l_acc, dscale, out, lse):
    """Combine key-split partials by log-sum-exp into ``out`` ``(BH, N, Dv)`` and ``lse``; tasks are rows."""
    nsplit, BH, N, Dv = o_acc.shape
    for t in range(t0, t1):
        bh = t // N
        i = t - bh * N
        mx = -np.inf
        for sp in range(nsplit):
            if m_acc[sp, bh, i] > mx:
                mx = m_acc[sp, bh, i]
        muse = 0.0 if mx == -np.inf else mx
        l = 0.0
        for sp in range(nsplit):
            l += math.exp(m_acc[sp, bh, i] - muse) * l_acc[sp, bh, i]
        for e in range(Dv):
            out[bh, i, e] = 0.0
        if l == 0.0:
            lse[bh, i] = -np.inf
            continue
        lse[bh, i] = mx + math.log(l)
        for sp in range(nsplit):
            w = math.exp(m_acc[sp, bh, i] - muse) * dscale / l
            for e in range(Dv):
                out[bh, i, e] += w * o_acc[sp, bh, i, e]


@nb.njit(**OPTS)
def weights(t0, t1, q, k, P, BR, BC, lse, w):
    """Write the probabilities ``exp(s - lse)`` (zero where masked) into ``w`` ``(BH, N, M)``; tasks are query tiles."""
    BH, N, D = q.shape
    M = k.shape[1]
    G = P.Hq // P.Hkv
    nqb = (N + BR - 1) // BR
    dt = q.dtype
    qs = np.zeros((BR + 1, D), dt)
    kb = np.zeros((BC + 3, D), dt)
    s = np.zeros((BR + 1, BC + 3), dt)
    dcap = np.zeros((BR + 1, BC + 3) if P.softcap > 0.0 else (1, 1), dt)
    zero = s[0, 0]
    sc = cast_like(P.scale, zero)
    for t in range(t0, t1):
        bh, b, h, kvh, i0, i1, j0, j1 = query_task(t, nqb, BR, N, M, G, P)
        nr = i1 - i0
        nrp = nr + (nr & 1)
        for r in range(nr):
            for dd in range(D):
                qs[r, dd] = q[bh, i0 + r, dd] * sc
        for c0 in range(j0, j1, BC):
            c1 = min(j1, c0 + BC)
            nc = c1 - c0
            for c in range(nc):
                for dd in range(D):
                    kb[c, dd] = k[kvh, c0 + c, dd]
            dot_nt(qs, kb, s, nrp, (nc + 3) // 4 * 4, D, False, zero, 0)
            score_bias(s, nr, nc, i0, c0, b, h, P.off, P, dcap, False)
            for r in range(nr):
                ls = lse[bh, i0 + r]
                wrow = w[bh, i0 + r]
                if ls == -np.inf:
                    continue  # nothing attended: weights stay 0
                for c in range(nc):
                    wrow[c0 + c] = math.exp(s[r, c] - ls)


@nb.njit(**OPTS)
def _bwd_buffers(BR, BC, D, Dv, softcap, like):
    """Scratch tiles of one thread for :func:`_backward_block`."""
    dt = like.dtype
    Dp = (D + 3) // 4 * 4
    Dvp = (Dv + 3) // 4 * 4
    BRp = BR + 1
    BCp = (BC + 3) // 4 * 4
    qs = np.zeros((BRp, D), dt)
    dob = np.zeros((BRp, Dv), dt)
    qT = np.zeros((Dp, BRp), dt)
    doT = np.zeros((Dvp, BRp), dt)
    kb = np.zeros((BCp, D), dt)
    vb = np.zeros((BCp, Dv), dt)
    kt = np.zeros((Dp, BCp), dt)
    s = np.zeros((BRp, BCp), dt)
    sT = np.zeros((BCp, BRp), dt)
    dp = np.zeros((BRp, BCp), dt)
    dcap = np.zeros((BRp, BCp) if softcap > 0.0 else (1, 1), dt)
    dka = np.zeros((BCp, Dp), dt)
    dva = np.zeros((BCp, Dvp), dt)
    dqb = np.zeros((BRp, Dp), dt)
    return qs, dob, qT, doT, kb, vb, kt, s, sT, dp, dcap, dka, dva, dqb


@nb.njit(**OPTS)
def _backward_block(
    q, k, v, do, lse, delta, P, BR, b, kvh, hk, bh0, qbase, kbase, nq, off, c0, nc, dq, ch, dk, dv, bufs
):
    """dK/dV of keys ``kbase+c0 .. +nc`` of ``k[kvh]`` (written to ``dk``/``dv``), and their dQ
    contributions (added to ``dq[ch]``), over every query head ``h`` of kv head ``hk``'s group
    (rows ``q[bh0 + h]``) and every query tile (of ``nq`` rows from ``qbase``) that may attend them.

    ``b`` is the batch index (a packed sequence's index for varlen), ``off``
    the band offset; positions are local (``i``, ``c0 + c``). ``lse`` holds
    ``+inf`` for rows with nothing attended. All five products go through the
    register-blocked :func:`dot_nt` on transposed copies of the small tiles.
    """
    qs, dob, qT, doT, kb, vb, kt, s, sT, dp, dcap, dka, dva, dqb = bufs
    D = q.shape[2]
    Dv = v.shape[2]
    Dp = dka.shape[1]
    Dvp = dva.shape[1]
    G = P.Hq // P.Hkv
    zero = cast_like(0.0, s[0, 0])
    sc = cast_like(P.scale, zero)
    capped = P.softcap > 0.0
    ncp = (nc + 3) // 4 * 4
    for c in range(nc):
        for dd in range(D):
            x = k[kvh, kbase + c0 + c, dd]
            kb[c, dd] = x
            kt[dd, c] = x
        for e in range(Dv):
            vb[c, e] = v[kvh, kbase + c0 + c, e]
    for c in range(ncp):
        for dd in range(Dp):
            dka[c, dd] = 0.0
        for e in range(Dvp):
            dva[c, e] = 0.0
    ilo = max(0, c0 - off - P.up)
    ihi = min(nq, c0 + nc - 1 - off + P.lo + 1)
    for g in range(G):
        h = hk * G + g
        bh = bh0 + h
        for i0 in range(ilo, ihi, BR):
            i1 = min(ihi, i0 + BR)
            nr = i1 - i0
            nrp = nr + (nr & 1)
            for r in range(nr):
                for dd in range(D):
                    x = q[bh, qbase + i0 + r, dd] * sc
                    qs[r, dd] = x
                    qT[dd, r] = x
                for e in range(Dv):
                    x = do[bh, qbase + i0 + r, e]
                    dob[r, e] = x
                    doT[e, r] = x
            dot_nt(qs, kb, s, nrp, ncp, D, False, zero, 0)
            score_bias(s, nr, nc, i0, c0, b, h, off, P, dcap, True)
            dot_nt(dob, vb, dp, nrp, ncp, Dv, False, zero, 0)
            # P = exp(S - lse) (lse is +inf for rows that attend nothing)
            for r in range(nr):
                exp_shift_row(s[r], nc, lse[bh, qbase + i0 + r])
            # sT = (P*Z)^T ; dP *= Z
            if P.thr > 0:
                dropout_grad(s, dp, sT, True, nr, nc, i0, c0, b, h, P)
            else:
                for r in range(nr):
                    for c in range(nc):
                        sT[c, r] = s[r, c]
            # dV += (P*Z)^T dO
            dot_nt(sT, doT, dva, ncp, Dvp, nr, True, zero, 0)
            # dS = P * (dP - delta)  (times 1 - tanh² under soft-capping)
            ds_in_place(s, dp, nr, nc, delta, bh, qbase + i0, dcap, capped)
            for r in range(nr):
                for c in range(nc):
                    sT[c, r] = s[r, c]
            # dK += dS^T (q*scale)  (summed over the group's query heads)
            dot_nt(sT, qT, dka, ncp, Dp, nr, True, zero, 0)
            # dQ += dS K * scale
            dot_nt(s, kt, dqb, nrp, Dp, nc, False, zero, 0)
            for r in range(nr):
                dqrow = dq[ch, bh, qbase + i0 + r]
                for dd in range(D):
                    dqrow[dd] += dqb[r, dd] * sc
    for c in range(nc):
        for dd in range(D):
            dk[kvh, kbase + c0 + c, dd] = dka[c, dd]
        for e in range(Dv):
            dv[kvh, kbase + c0 + c, e] = dva[c, e]


@nb.njit(**OPTS)
def backward(t0, t1, q, k, v, do, lse, delta, P, BR, BC, nchunk, dq_acc, dk, dv):
    """FlashAttention-2 backward; tasks are (kv head, key chunk) pairs.

    Each task walks its key tiles (:func:`_backward_block`): dK/dV of a tile
    are accumulated in task-local scratch and written once (no races); dQ goes
    to ``dq_acc[chunk]`` (rows of a query head are only touched by the tasks of
    its kv head and chunk; the host sums the chunks). ``lse`` must hold
    ``+inf`` for rows with nothing attended.
    """
    N, D = q.shape[1], q.shape[2]
    M, Dv = v.shape[1], v.shape[2]
    nkb = (M + BC - 1) // BC
    per = (nkb + nchunk - 1) // nchunk
    bufs = _bwd_buffers(BR, BC, D, Dv, P.softcap, q)
    for t in range(t0, t1):
        ch = t % nchunk
        kvh = t // nchunk
        b = kvh // P.Hkv
        hk = kvh - b * P.Hkv
        for kbi in range(ch * per, min(nkb, (ch + 1) * per)):
            c0 = kbi * BC
            nc = min(M, c0 + BC) - c0
            _backward_block(
                q, k, v, do, lse, delta, P, BR, b, kvh, hk, b * P.Hq, 0, 0, N, P.off, c0, nc, dq_acc, ch, dk, dv, bufs
            )


@nb.njit(**OPTS)
def backward_varlen(
    t0, t1, q, k, v, do, lse, delta, P, BR, BC, cu_q, cu_k, ktile_seq, ktile_col, nchunk, dq_acc, dk, dv
):
    """Backward of a packed variable-length batch; tasks are (kv head, chunk of key tiles).

    ``ktile_seq[t]``/``ktile_col[t]`` give each key tile's sequence and first
    (local) key, every sequence's tiles in order; chunk ``ch`` owns a
    contiguous run of key tiles and writes dQ to ``dq_acc[ch]`` (the host
    sums the chunks), so no two tasks write the same memory.
    """
    D, Dv = q.shape[2], v.shape[2]
    ntile = ktile_seq.shape[0]
    per = (ntile + nchunk - 1) // nchunk
    bufs = _bwd_buffers(BR, BC, D, Dv, P.softcap, q)
    for t in range(t0, t1):
        ch = t % nchunk
        hk = t // nchunk
        for kt_ in range(ch * per, min(ntile, (ch + 1) * per)):
            sq = ktile_seq[kt_]
            c0 = ktile_col[kt_]
            q0 = cu_q[sq]
            k0 = cu_k[sq]
            nq = cu_q[sq + 1] - q0
            nk = cu_k[sq + 1] - k0
            nc = min(nk, c0 + BC) - c0
            _backward_block(
                q, k, v, do, lse, delta, P, BR, sq, hk, hk, 0, q0, k0, nq, nk - nq, c0, nc, dq_acc, ch, dk, dv, bufs
            )
