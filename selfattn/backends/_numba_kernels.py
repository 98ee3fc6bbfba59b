"""Numba kernels of the ``numba`` backend (imported lazily, on the first call).

All kernels work on 3-D, C-contiguous arrays in the compute dtype (float32 or
float64): ``q`` ``(B*Hq, N, D)``, ``k`` ``(B*Hkv, M, D)``, ``v`` ``(B*Hkv, M, Dv)``.
Flat batch·head ``bh = b*Hq + h`` uses key/value row ``b*Hkv + h // G``.

Causal/window masking is passed as a band ``[i + off - lo, i + off + up]``
(``off = M - N``; a side without a bound gets ``lo``/``up`` larger than
``N + M``). Masks are ``(Bm, Hm, Nm, Mm)`` C-contiguous arrays (``uint8`` for
boolean masks, the compute dtype for additive ones) read with broadcasting,
never expanded; ``mask_kind`` is 0 (none), 1 (bool) or 2 (float).

Only two specialisations per kernel exist (float32 and float64): every other
option is a runtime argument, so shapes and options never trigger a compile.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import prange, types
from llvmlite import ir
from numba.extending import intrinsic, overload

#: Query rows per tile (forward and backward).
BR = 64
#: Keys per tile.
BC = 64

_M32 = 0xFFFFFFFF
_MUL_BH = 0x9E3779B1
_MUL_ROW = 0x85EBCA77
_MUL_COL = 0xC2B2AE3D
_F1 = 0x85EBCA6B
_F2 = 0xC2B2AE35

# Reassociation lets LLVM vectorise the reductions; no nnan/ninf: -inf and NaN
# carry meaning here (masked scores, NaN propagation).
_FM = {"contract", "reassoc"}
_OPTS = dict(cache=True, nogil=True, fastmath=_FM, error_model="numpy", boundscheck=False)


@nb.njit(inline="always", **{k: v for k, v in _OPTS.items() if k != "parallel"})
def _fmix32(h):
    # h is an int64 in [0, 2**32); products wrap in int64 and keep the low 32 bits.
    h ^= h >> 16
    h = (h * _F1) & _M32
    h ^= h >> 13
    h = (h * _F2) & _M32
    h ^= h >> 16
    return h


@nb.njit(inline="always", **_OPTS)
def _row_hash(seed_lo, seed_hi, bh, i):
    inner = _fmix32(seed_hi ^ ((bh * _MUL_BH) & _M32))
    head = _fmix32(seed_lo ^ inner)
    return _fmix32(head ^ ((i * _MUL_ROW) & _M32))


@nb.njit(**_OPTS)
def _dot_nt(a, b, out, nrp, ncp, kred, acc, z, boff):
    """``out[:nrp, :ncp] (+)= a[:nrp, :kred] @ b[:ncp, :kred].T``.

    Register-blocked 2 x 4: eight dot products share each load, and their
    reductions over ``kred`` vectorise. ``nrp`` must be even and ``ncp`` a
    multiple of 4 (the tiles are padded; padded results are ignored). ``z``
    is a zero of the compute dtype (keeps the accumulators in that dtype);
    ``b``'s rows start at ``boff``.
    """
    for r in range(0, nrp, 2):
        a0 = a[r]
        a1 = a[r + 1]
        for c in range(0, ncp, 4):
            b0 = b[boff + c]
            b1 = b[boff + c + 1]
            b2 = b[boff + c + 2]
            b3 = b[boff + c + 3]
            s00 = z
            s01 = z
            s02 = z
            s03 = z
            s10 = z
            s11 = z
            s12 = z
            s13 = z
            for dd in range(kred):
                y0 = a0[dd]
                y1 = a1[dd]
                x0 = b0[dd]
                x1 = b1[dd]
                x2 = b2[dd]
                x3 = b3[dd]
                s00 += y0 * x0
                s01 += y0 * x1
                s02 += y0 * x2
                s03 += y0 * x3
                s10 += y1 * x0
                s11 += y1 * x1
                s12 += y1 * x2
                s13 += y1 * x3
            o0 = out[r]
            o1 = out[r + 1]
            if acc:
                o0[c] += s00
                o0[c + 1] += s01
                o0[c + 2] += s02
                o0[c + 3] += s03
                o1[c] += s10
                o1[c + 1] += s11
                o1[c + 2] += s12
                o1[c + 3] += s13
            else:
                o0[c] = s00
                o0[c + 1] = s01
                o0[c + 2] = s02
                o0[c + 3] = s03
                o1[c] = s10
                o1[c + 1] = s11
                o1[c + 2] = s12
                o1[c + 3] = s13


@intrinsic
def _bits_to_f32(typingctx, x):
    """Reinterpret an int32's bits as a float32 (an LLVM ``bitcast``, so loops using it vectorise)."""
    if x != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


def _exp_shift_row(srow, nc, mu):  # pragma: no cover - replaced by the overload
    raise NotImplementedError


@overload(_exp_shift_row, fastmath=_FM)
def _exp_shift_row_impl(srow, nc, mu):
    """``srow[c] = exp(srow[c] - mu)`` for ``c < nc``; returns the row sum.

    float32: range reduction ``x = n·ln2 + r`` (Cody-Waite, two constants),
    a degree-5 polynomial for ``exp(r)`` on ``|r| <= ln2/2`` (least squares
    on Chebyshev nodes, relative error below 2.1e-7, i.e. about 3.5 ulp), and
    ``2**n`` built from its exponent bits; one branch-free loop that LLVM
    vectorises (8 lanes with AVX2: min/max clamps, ``vroundps``,
    ``vcvttps2dq``, five FMAs). exp(-inf) is exactly 0, NaN stays NaN and
    arguments below -87.33 give 0. float64: ``math.exp``.
    """
    if srow.dtype == types.float32:
        def impl(srow, nc, mu):
            lo = np.float32(-87.33)
            hi = np.float32(88.37)
            tot = np.float32(0.0)
            for c in range(nc):
                x0 = srow[c] - mu
                x = min(max(x0, lo), hi)
                fn = np.rint(x * np.float32(1.44269504088896341))
                r = x - fn * np.float32(0.693359375)
                r = r + fn * np.float32(2.12194440e-4)
                p = np.float32(0.008375128731131554)
                p = p * r + np.float32(0.04190078377723694)
                p = p * r + np.float32(0.16666415333747864)
                p = p * r + np.float32(0.49999120831489563)
                p = p * r + np.float32(1.0)
                p = p * r + np.float32(1.0)
                # 2**fn from its exponent bits; 0 below the range (so exp(-inf) = 0)
                bits = (fn + np.float32(127.0)) * np.float32(8388608.0)
                bits = bits if x0 >= lo else np.float32(0.0)
                e = p * _bits_to_f32(np.int32(bits))
                e = e if x0 == x0 else x0
                srow[c] = e
                tot += e
            return tot
        return impl

    def impl64(srow, nc, mu):
        tot = 0.0
        for c in range(nc):
            e = math.exp(srow[c] - mu)
            srow[c] = e
            tot += e
        return tot
    return impl64


@nb.njit(inline="always", **_OPTS)
def _query_task(t, nqb, rows, N, M, Hq, G, Hkv, lo, up):
    """Decode task ``t`` = (bh, query tile) of a kernel with ``nqb`` tiles of ``rows`` rows.

    Returns ``(bh, b, h, kvh, i0, i1, j0, j1)``: flat batch·head, batch, query
    head, flat key/value head, the tile's query rows ``[i0, i1)`` and the keys
    ``[j0, j1)`` that the band (``lo``/``up`` around the bottom-right
    diagonal) lets any of them attend (``j1 <= j0`` when none).
    """
    qb = t % nqb
    bh = t // nqb
    b = bh // Hq
    h = bh - b * Hq
    kvh = b * Hkv + h // G
    i0 = qb * rows
    i1 = min(N, i0 + rows)
    off = M - N
    j0 = max(0, i0 + off - lo)
    j1 = min(M, i1 - 1 + off + up + 1)
    return bh, b, h, kvh, i0, i1, j0, j1


@nb.njit(**_OPTS)
def _apply_masks(s, nr, nc, i0, c0, off, lo, up, bh, b, h, Hq, mask_kind, mbool, mfloat, midx):
    """Add/apply the user mask and the causal/window band to the score tile."""
    neg = -np.inf
    if mask_kind != 0:
        mb = midx[b]
        if mask_kind == 1:
            Hm, Nm, Mm = mbool.shape[1], mbool.shape[2], mbool.shape[3]
        else:
            Hm, Nm, Mm = mfloat.shape[1], mfloat.shape[2], mfloat.shape[3]
        mh = h if Hm > 1 else 0
        for r in range(nr):
            mi = i0 + r if Nm > 1 else 0
            srow = s[r]
            if mask_kind == 1:
                mrow = mbool[mb, mh, mi]
                if Mm > 1:
                    for c in range(nc):
                        if mrow[c0 + c] == 0:
                            srow[c] = neg
                elif mrow[0] == 0:
                    for c in range(nc):
                        srow[c] = neg
            else:
                frow = mfloat[mb, mh, mi]
                if Mm > 1:
                    for c in range(nc):
                        srow[c] += frow[c0 + c]
                else:
                    fv = frow[0]
                    for c in range(nc):
                        srow[c] += fv
    # Band: only tiles that cross an edge of the band need per-element work.
    i1 = i0 + nr
    c1 = c0 + nc
    if not (c0 >= i1 - 1 + off - lo and c1 - 1 <= i0 + off + up):
        for r in range(nr):
            i = i0 + r
            jlo = i + off - lo
            jhi = i + off + up
            srow = s[r]
            for c in range(nc):
                j = c0 + c
                if j < jlo or j > jhi:
                    srow[c] = neg


@nb.njit(**_OPTS)
def _softmax_tile(s, nr, nc, mrow, lrow, o, Dv, bounded, ninf, zero):
    """One online-softmax step on a score tile, in place.

    Row ``r`` of ``s[:nr, :nc]`` becomes ``exp(s - m_r)`` with ``m_r`` the
    running row maximum (``mrow``, updated); the running sums ``lrow`` and
    the output rows ``o[:nr, :Dv]`` are rescaled by ``exp(m_old - m_new)``
    when the maximum grows. Rows with nothing attended so far keep
    ``m = -inf`` and exponentiate against 0 (giving exact zeros). With
    ``bounded`` the caller has proved every score small enough for ``exp``
    unshifted: the maximum stays 0 and only the sums are updated. ``ninf``
    and ``zero`` are -inf and 0 in the tile's dtype.
    """
    for r in range(nr):
        srow = s[r]
        if bounded:
            lrow[r] += _exp_shift_row(srow, nc, zero)
            continue
        mx = ninf
        for c in range(nc):
            mx = srow[c] if srow[c] > mx else mx
        mold = mrow[r]
        mnew = mx if mx > mold else mold
        muse = zero if mnew == ninf else mnew
        ps = _exp_shift_row(srow, nc, muse)
        if mold != mnew:
            alpha = math.exp(mold - muse)
            lrow[r] = lrow[r] * alpha + ps
            orow = o[r]
            for e in range(Dv):
                orow[e] *= alpha
        else:
            lrow[r] += ps
        mrow[r] = mnew


@nb.njit(**_OPTS)
def _dropout(s, nr, nc, i0, c0, bh, seed_lo, seed_hi, thr):
    """Zero the dropped entries of the (probability) tile."""
    for r in range(nr):
        rh = _row_hash(seed_lo, seed_hi, bh, i0 + r)
        srow = s[r]
        for c in range(nc):
            u = _fmix32(rh ^ (((c0 + c) * _MUL_COL) & _M32))
            if u < thr:
                srow[c] = 0.0


@nb.njit(**_OPTS)
def _dropout_grad(s, dp, pz, transposed, nr, nc, i0, c0, bh, seed_lo, seed_hi, thr, dscale):
    """Backward dropout on a tile: ``pz = P*Z`` (into ``pz``, or its transpose) and ``dP *= Z``.

    ``Z`` is the forward's keep mask times ``dscale`` (the same hash as :func:`_dropout`).
    """
    for r in range(nr):
        rh = _row_hash(seed_lo, seed_hi, bh, i0 + r)
        for c in range(nc):
            u = _fmix32(rh ^ (((c0 + c) * _MUL_COL) & _M32))
            z = dscale if u >= thr else 0.0
            if transposed:
                pz[c, r] = s[r, c] * z
            else:
                pz[r, c] = s[r, c] * z
            dp[r, c] *= z


@nb.njit(**_OPTS)
def _ds_in_place(s, dp, nr, nc, delta, bh, i0):
    """``dS = P * (dP - delta)`` on a tile, written over ``P`` in ``s``."""
    for r in range(nr):
        dl = delta[bh, i0 + r]
        srow = s[r]
        dprow = dp[r]
        for c in range(nc):
            srow[c] = srow[c] * (dprow[c] - dl)


@nb.njit(parallel=True, **_OPTS)
def forward(q, k, v, Hq, Hkv, lo, up, scale, mask_kind, mbool, mfloat, midx,
            thr, seed_lo, seed_hi, dscale, nsplit, o_acc, m_acc, l_acc):
    """Fused online-softmax forward over tiles of BR query rows x BC keys.

    Tasks are (bh, query tile, key split). With ``nsplit == 1`` the task writes
    the normalised output to ``o_acc[0]`` and the log-sum-exp to ``m_acc[0]``;
    otherwise it writes its unnormalised partial (O, running max, running sum)
    for :func:`merge_splits` (flash-decoding).
    """
    BH, N, D = q.shape
    M = k.shape[1]
    Dv = v.shape[2]
    G = Hq // Hkv
    off = M - N
    nqb = (N + BR - 1) // BR
    ntask = BH * nqb * nsplit
    dt = q.dtype
    for t in prange(ntask):
        sp = t % nsplit
        bh, b, h, kvh, i0, i1, j0, j1 = _query_task(t // nsplit, nqb, BR, N, M, Hq, G, Hkv, lo, up)
        nr = i1 - i0
        if j1 > j0:
            per = ((j1 - j0 + nsplit - 1) // nsplit + BC - 1) // BC * BC
            js0 = j0 + sp * per
            js1 = min(j1, js0 + per)
        else:
            js0 = j0
            js1 = j0
        Dvp = (Dv + 3) // 4 * 4
        qs = np.zeros((BR, D), dt)
        kb = np.zeros((BC, D), dt)
        vt = np.zeros((Dvp, BC), dt)
        s = np.zeros((BR, BC), dt)
        o = np.zeros((BR, Dvp), dt)
        mrow = np.full(BR, -np.inf, dt)
        lrow = np.zeros(BR, dt)
        sc = np.full(1, scale, dt)[0]
        ninf = mrow[0]
        zero = lrow[0]
        nrp = nr + (nr & 1)
        for r in range(nr):
            for dd in range(D):
                qs[r, dd] = q[bh, i0 + r, dd] * sc
        for c0 in range(js0, js1, BC):
            c1 = min(js1, c0 + BC)
            nc = c1 - c0
            ncp = (nc + 3) // 4 * 4
            if ncp == nc:  # whole groups of 4 keys: read K in place
                _dot_nt(qs, k[kvh], s, nrp, nc, D, False, zero, c0)
            else:
                for c in range(nc):
                    krow = k[kvh, c0 + c]
                    for dd in range(D):
                        kb[c, dd] = krow[dd]
                _dot_nt(qs, kb, s, nrp, ncp, D, False, zero, 0)
            _apply_masks(s, nr, nc, i0, c0, off, lo, up, bh, b, h, Hq, mask_kind, mbool, mfloat, midx)
            _softmax_tile(s, nr, nc, mrow, lrow, o, Dv, False, ninf, zero)
            if thr > 0:
                _dropout(s, nr, nc, i0, c0, bh, seed_lo, seed_hi, thr)
            if nr < 8:
                # Few rows (decode): transposing V would cost as much as the
                # product; accumulate four value rows per pass over o instead.
                vk = v[kvh]
                for r in range(nr):
                    orow = o[r]
                    srow = s[r]
                    c = 0
                    while c + 4 <= nc:
                        p0 = srow[c]
                        p1 = srow[c + 1]
                        p2 = srow[c + 2]
                        p3 = srow[c + 3]
                        v0 = vk[c0 + c]
                        v1 = vk[c0 + c + 1]
                        v2 = vk[c0 + c + 2]
                        v3 = vk[c0 + c + 3]
                        for e in range(Dv):
                            orow[e] += p0 * v0[e] + p1 * v1[e] + p2 * v2[e] + p3 * v3[e]
                        c += 4
                    while c < nc:
                        p0 = srow[c]
                        v0 = vk[c0 + c]
                        for e in range(Dv):
                            orow[e] += p0 * v0[e]
                        c += 1
            else:
                for c in range(nc):
                    vrow = v[kvh, c0 + c]
                    for e in range(Dv):
                        vt[e, c] = vrow[e]
                _dot_nt(s, vt, o, nrp, Dvp, nc, True, zero, 0)
        if nsplit == 1:
            for r in range(nr):
                l = lrow[r]
                if l == 0.0:
                    inv = 0.0
                    m_acc[0, bh, i0 + r] = -np.inf
                else:
                    inv = dscale / l
                    m_acc[0, bh, i0 + r] = mrow[r] + math.log(l)
                for e in range(Dv):
                    o_acc[0, bh, i0 + r, e] = o[r, e] * inv
        else:
            for r in range(nr):
                m_acc[sp, bh, i0 + r] = mrow[r]
                l_acc[sp, bh, i0 + r] = lrow[r]
                for e in range(Dv):
                    o_acc[sp, bh, i0 + r, e] = o[r, e]


@nb.njit(parallel=True, **_OPTS)
def merge_splits(o_acc, m_acc, l_acc, dscale, out, lse):
    """Combine key-split partials by log-sum-exp into ``out`` ``(BH, N, Dv)`` and ``lse``."""
    nsplit, BH, N, Dv = o_acc.shape
    for t in prange(BH * N):
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


@nb.njit(parallel=True, **_OPTS)
def weights(q, k, Hq, Hkv, lo, up, scale, mask_kind, mbool, mfloat, midx, lse, w):
    """Write the probabilities ``exp(s - lse)`` (zero where masked) into ``w`` ``(BH, N, M)``."""
    BH, N, D = q.shape
    M = k.shape[1]
    G = Hq // Hkv
    off = M - N
    nqb = (N + BR - 1) // BR
    dt = q.dtype
    for t in prange(BH * nqb):
        bh, b, h, kvh, i0, i1, j0, j1 = _query_task(t, nqb, BR, N, M, Hq, G, Hkv, lo, up)
        nr = i1 - i0
        qs = np.zeros((BR, D), dt)
        kb = np.zeros((BC, D), dt)
        s = np.zeros((BR, BC), dt)
        zero = s[0, 0]
        nrp = nr + (nr & 1)
        for r in range(nr):
            for dd in range(D):
                qs[r, dd] = q[bh, i0 + r, dd] * scale
        for c0 in range(j0, j1, BC):
            c1 = min(j1, c0 + BC)
            nc = c1 - c0
            for c in range(nc):
                for dd in range(D):
                    kb[c, dd] = k[kvh, c0 + c, dd]
            _dot_nt(qs, kb, s, nrp, (nc + 3) // 4 * 4, D, False, zero, 0)
            _apply_masks(s, nr, nc, i0, c0, off, lo, up, bh, b, h, Hq, mask_kind, mbool, mfloat, midx)
            for r in range(nr):
                ls = lse[bh, i0 + r]
                wrow = w[bh, i0 + r]
                if ls == -np.inf:
                    continue  # nothing attended: weights stay 0
                for c in range(nc):
                    wrow[c0 + c] = math.exp(s[r, c] - ls)


@nb.njit(parallel=True, **_OPTS)
def backward(q, k, v, do, lse, delta, Hq, Hkv, lo, up, scale, mask_kind, mbool, mfloat, midx,
             thr, seed_lo, seed_hi, dscale, nchunk, dq_acc, dk, dv):
    """FlashAttention-2 backward: tasks own (kv head, key chunk) pairs.

    Each task walks its key tiles; for each it loops over the query heads of
    the group and the query tiles that may attend it, recomputes
    ``P = exp(S - lse)`` and accumulates the tile's dK/dV in task-local
    scratch (written once at the end of the tile: no races) and dQ into
    ``dq_acc[chunk]`` (rows of a query head are only touched by the tasks of
    its kv head and chunk; chunks are summed by the caller). All five
    products go through the register-blocked :func:`_dot_nt` on transposed
    copies of the small tiles. ``lse`` must hold ``+inf`` for rows with
    nothing attended.
    """
    BH, N, D = q.shape
    BKV, M, Dv = v.shape
    G = Hq // Hkv
    off = M - N
    nkb = (M + BC - 1) // BC
    per = (nkb + nchunk - 1) // nchunk
    dt = q.dtype
    for t in prange(BKV * nchunk):
        ch = t % nchunk
        kvh = t // nchunk
        b = kvh // Hkv
        hk = kvh - b * Hkv
        Dp = (D + 3) // 4 * 4
        Dvp = (Dv + 3) // 4 * 4
        qs = np.zeros((BR, D), dt)
        dob = np.zeros((BR, Dv), dt)
        qT = np.zeros((Dp, BR), dt)
        doT = np.zeros((Dvp, BR), dt)
        kb = np.zeros((BC, D), dt)
        vb = np.zeros((BC, Dv), dt)
        kt = np.zeros((Dp, BC), dt)
        s = np.zeros((BR, BC), dt)
        sT = np.zeros((BC, BR), dt)
        dp = np.zeros((BR, BC), dt)
        dka = np.zeros((BC, Dp), dt)
        dva = np.zeros((BC, Dvp), dt)
        dqb = np.zeros((BR, Dp), dt)
        zero = s[0, 0]
        sc = np.full(1, scale, dt)[0]
        for kbi in range(ch * per, min(nkb, (ch + 1) * per)):
            c0 = kbi * BC
            c1 = min(M, c0 + BC)
            nc = c1 - c0
            ncp = (nc + 3) // 4 * 4
            for c in range(nc):
                for dd in range(D):
                    kb[c, dd] = k[kvh, c0 + c, dd]
                    kt[dd, c] = k[kvh, c0 + c, dd]
                for e in range(Dv):
                    vb[c, e] = v[kvh, c0 + c, e]
            for c in range(ncp):
                for dd in range(Dp):
                    dka[c, dd] = 0.0
                for e in range(Dvp):
                    dva[c, e] = 0.0
            ilo = max(0, c0 - off - up)
            ihi = min(N, c1 - 1 - off + lo + 1)
            for g in range(G):
                h = hk * G + g
                bh = b * Hq + h
                for i0 in range(ilo, ihi, BR):
                    i1 = min(ihi, i0 + BR)
                    nr = i1 - i0
                    nrp = nr + (nr & 1)
                    for r in range(nr):
                        for dd in range(D):
                            x = q[bh, i0 + r, dd] * sc
                            qs[r, dd] = x
                            qT[dd, r] = x
                        for e in range(Dv):
                            x = do[bh, i0 + r, e]
                            dob[r, e] = x
                            doT[e, r] = x
                    _dot_nt(qs, kb, s, nrp, ncp, D, False, zero, 0)
                    _apply_masks(s, nr, nc, i0, c0, off, lo, up, bh, b, h, Hq, mask_kind, mbool, mfloat, midx)
                    _dot_nt(dob, vb, dp, nrp, ncp, Dv, False, zero, 0)
                    # P = exp(S - lse) (lse is +inf for rows that attend nothing)
                    for r in range(nr):
                        _exp_shift_row(s[r], nc, lse[bh, i0 + r])
                    # sT = (P*Z)^T ; dP *= Z
                    if thr > 0:
                        _dropout_grad(s, dp, sT, True, nr, nc, i0, c0, bh, seed_lo, seed_hi, thr, dscale)
                    else:
                        for r in range(nr):
                            for c in range(nc):
                                sT[c, r] = s[r, c]
                    # dV += (P*Z)^T dO
                    _dot_nt(sT, doT, dva, ncp, Dvp, nr, True, zero, 0)
                    # dS = P * (dP - delta)
                    _ds_in_place(s, dp, nr, nc, delta, bh, i0)
                    for r in range(nr):
                        for c in range(nc):
                            sT[c, r] = s[r, c]
                    # dK += dS^T (q*scale)  (summed over the group's query heads)
                    _dot_nt(sT, qT, dka, ncp, Dp, nr, True, zero, 0)
                    # dQ += dS K * scale
                    _dot_nt(s, kt, dqb, nrp, Dp, nc, False, zero, 0)
                    for r in range(nr):
                        dqrow = dq_acc[ch, bh, i0 + r]
                        for dd in range(D):
                            dqrow[dd] += dqb[r, dd] * sc
            for c in range(nc):
                for dd in range(D):
                    dk[kvh, c0 + c, dd] = dka[c, dd]
                for e in range(Dv):
                    dv[kvh, c0 + c, e] = dva[c, e]


# -- BLAS-tile kernels ---------------------------------------------------------
# Numba lowers ``np.dot`` on contiguous 2-D arrays to the BLAS that SciPy
# exports (``scipy.linalg.cython_blas``). An optimised single-threaded sgemm/
# dgemm on a (256 x 64) @ (64 x 512) tile runs 2-3x faster than any loop nest
# LLVM generates from Python, so these kernels keep the FlashAttention
# structure (parallel tasks, online softmax over key blocks, no N x M scores)
# but hand every tile product to BLAS. The caller must make BLAS
# single-threaded around them (numba_.py does, with threadpoolctl): every
# Numba thread already runs its own task. Every ``np.dot`` below writes into a
# C-contiguous buffer reshaped from a flat scratch array, which is what lets
# Numba pass it to BLAS without a temporary.

#: Query rows per task in the BLAS-tile forward (the caller may pass fewer so
#: that every thread gets work). 256 rows amortise BLAS's packing of each K/V block over more work than 128.
GQ = 256
#: Keys per block in the BLAS-tile forward: a 256 x 512 float32 score block is
#: 512 KiB, a core's L2 here, and stays there between the two products.
GK = 512
#: Query rows per tile in the BLAS-tile backward: dK/dV of a key block
#: accumulate over longer products, which BLAS runs closer to its peak.
GQB = 512
#: Keys per block in the BLAS-tile backward (five products share each block).
GKB = 256


@nb.njit(parallel=True, **_OPTS)
def key_norm_max(k):
    """Largest Euclidean norm among the keys of each head: ``(BKV,)`` from ``k`` ``(BKV, M, D)``.

    Accumulated in float64 and returned in ``k``'s dtype; NaN keys give NaN
    (which then disables the shift-free shortcut of :func:`forward_gemm`).
    """
    BKV, M, D = k.shape
    res = np.empty(BKV, k.dtype)
    for t in prange(BKV):
        best = 0.0
        for j in range(M):
            acc = 0.0
            for dd in range(D):
                x = np.float64(k[t, j, dd])
                acc += x * x
            if acc > best or acc != acc:  # once NaN, it sticks
                best = acc
        res[t] = math.sqrt(best)
    return res


@nb.njit(parallel=True, **_OPTS)
def forward_gemm(q, k, v, Hq, Hkv, lo, up, scale, mask_kind, mbool, mfloat, midx,
                 thr, seed_lo, seed_hi, dscale, kmax, safe, GQ, GK, out, lse):
    """Online-softmax forward whose tile products are BLAS calls.

    Tasks are (bh, tile of ``GQ`` query rows); each walks its band's keys in
    blocks of ``GK``: ``S = (q*scale) K_blk^T`` (BLAS), masks, online
    softmax, ``O += P V_blk`` (BLAS). Extra memory per task is
    O(GQ * GK + GQ * Dv), independent of N and M.

    The running-max pass and the rescaling of ``O`` are skipped for a tile
    whose rows all satisfy ``|q_i*scale| * max_j |k_j| <= safe`` (Cauchy-Schwarz
    bounds every score; ``kmax[kvh]`` is the largest key norm of that head,
    ``safe`` chosen by the caller so that ``M * exp(safe) * max|v|`` stays far
    below the dtype's largest value; 0 disables): ``exp(s)`` then neither
    overflows nor underflows to zero, so the shift is 0 for the whole row.
    Additive masks disable it (the caller passes ``safe = 0``).
    Writes the normalised output (times ``dscale``) to ``out`` ``(BH, N, Dv)``
    and the log-sum-exp to ``lse`` ``(BH, N)`` (``-inf`` where nothing is
    attended).
    """
    BH, N, D = q.shape
    M = k.shape[1]
    Dv = v.shape[2]
    G = Hq // Hkv
    off = M - N
    nqb = (N + GQ - 1) // GQ
    dt = q.dtype
    for t in prange(BH * nqb):
        bh, b, h, kvh, i0, i1, j0, j1 = _query_task(t, nqb, GQ, N, M, Hq, G, Hkv, lo, up)
        nr = i1 - i0
        qs = np.empty((nr, D), dt)
        sbuf = np.empty(nr * GK, dt)
        pv = np.empty((nr, Dv), dt)
        o = np.zeros((nr, Dv), dt)
        mrow = np.full(nr, -np.inf, dt)
        lrow = np.zeros(nr, dt)
        sc = np.full(1, scale, dt)[0]
        ninf = mrow[0]
        zero = lrow[0]
        # Scale q once (masks add to scaled scores) and bound every row's scores.
        bounded = safe > 0.0
        for r in range(nr):
            nrm = zero
            for dd in range(D):
                x = q[bh, i0 + r, dd] * sc
                qs[r, dd] = x
                nrm += x * x
            # NaN norms fail the comparison and so take the general path.
            if not (math.sqrt(nrm) * kmax[kvh] * 1.001 <= safe):
                bounded = False
        if bounded:
            for r in range(nr):
                mrow[r] = zero
        # Keys [e0, e1) are inside the band for every row of the tile; the
        # blocks are cut at e0 and e1 so that only the narrow edge blocks
        # (the causal diagonal: at most GQ keys) need per-element band masks.
        e0 = min(max(j0, i1 - 1 + off - lo), j1)
        e1 = max(min(j1, i0 + off + up + 1), e0)
        c1 = j0
        while c1 < j1:
            c0 = c1
            c1 = min(c0 + GK, e0 if c0 < e0 else (e1 if c0 < e1 else j1))
            nc = c1 - c0
            s = sbuf[:nr * nc].reshape((nr, nc))
            np.dot(qs, k[kvh, c0:c1].T, s)
            _apply_masks(s, nr, nc, i0, c0, off, lo, up, bh, b, h, Hq, mask_kind, mbool, mfloat, midx)
            # (o is still all zeros at the first block, so a rescale there is harmless)
            _softmax_tile(s, nr, nc, mrow, lrow, o, Dv, bounded, ninf, zero)
            if thr > 0:
                _dropout(s, nr, nc, i0, c0, bh, seed_lo, seed_hi, thr)
            if c0 == j0:
                np.dot(s, v[kvh, c0:c1], o)
            else:
                np.dot(s, v[kvh, c0:c1], pv)
                for r in range(nr):
                    for e in range(Dv):
                        o[r, e] += pv[r, e]
        for r in range(nr):
            l = lrow[r]
            orow = out[bh, i0 + r]
            if l == 0.0 or j1 <= j0:
                lse[bh, i0 + r] = -np.inf
                for e in range(Dv):
                    orow[e] = 0.0
            else:
                inv = dscale / l
                lse[bh, i0 + r] = mrow[r] + math.log(l)
                for e in range(Dv):
                    orow[e] = o[r, e] * inv


@nb.njit(parallel=True, **_OPTS)
def backward_gemm(q, k, v, do, lse, delta, Hq, Hkv, lo, up, scale, mask_kind, mbool, mfloat, midx,
                  thr, seed_lo, seed_hi, dscale, GQ, GKB, nchunk, dq_acc, dk, dv):
    """FlashAttention-2 backward whose tile products are BLAS calls.

    Same task structure and contract as :func:`backward` (tasks own
    (kv head, key chunk) pairs, blocks of ``GKB`` keys, query tiles of
    ``GQ`` rows -- the module's ``GQB`` by default; ``lse`` holds ``+inf`` for rows that attend nothing), with
    the five products per tile -- ``S = (q*scale) K^T``, ``dP = dO V^T``,
    ``dV += (P*Z)^T dO``, ``dK += dS^T (q*scale)``, ``dQ += dS K * scale`` --
    done by BLAS on views of the inputs (no copies of K, V or dO).
    """
    BH, N, D = q.shape
    BKV, M, Dv = v.shape
    G = Hq // Hkv
    off = M - N
    nkb = (M + GKB - 1) // GKB
    per = (nkb + nchunk - 1) // nchunk
    dt = q.dtype
    Dm = max(D, Dv)
    for t in prange(BKV * nchunk):
        ch = t % nchunk
        kvh = t // nchunk
        b = kvh // Hkv
        hk = kvh - b * Hkv
        qs = np.empty((GQ, D), dt)
        sbuf = np.empty(GQ * GKB, dt)
        zbuf = np.empty(GQ * GKB, dt)
        dpbuf = np.empty(GQ * GKB, dt)
        kvbuf = np.empty(GKB * Dm, dt)
        dqbuf = np.empty(GQ * D, dt)
        dka = np.empty((GKB, D), dt)
        dva = np.empty((GKB, Dv), dt)
        sc = np.full(1, scale, dt)[0]
        for kbi in range(ch * per, min(nkb, (ch + 1) * per)):
            c0 = kbi * GKB
            c1 = min(M, c0 + GKB)
            nc = c1 - c0
            kb = k[kvh, c0:c1]
            vb = v[kvh, c0:c1]
            dka[:nc] = 0.0
            dva[:nc] = 0.0
            tk = kvbuf[:nc * D].reshape((nc, D))
            tv = kvbuf[:nc * Dv].reshape((nc, Dv))
            ilo = max(0, c0 - off - up)
            ihi = min(N, c1 - 1 - off + lo + 1)
            for g in range(G):
                h = hk * G + g
                bh = b * Hq + h
                for i0 in range(ilo, ihi, GQ):
                    i1 = min(ihi, i0 + GQ)
                    nr = i1 - i0
                    qt = qs[:nr]
                    for r in range(nr):
                        for dd in range(D):
                            qt[r, dd] = q[bh, i0 + r, dd] * sc
                    dot = do[bh, i0:i1]
                    s = sbuf[:nr * nc].reshape((nr, nc))
                    dp = dpbuf[:nr * nc].reshape((nr, nc))
                    np.dot(qt, kb.T, s)
                    _apply_masks(s, nr, nc, i0, c0, off, lo, up, bh, b, h, Hq, mask_kind, mbool, mfloat, midx)
                    np.dot(dot, vb.T, dp)
                    # P = exp(S - lse)
                    for r in range(nr):
                        _exp_shift_row(s[r], nc, lse[bh, i0 + r])
                    if thr > 0:
                        # pz = P*Z feeds dV; dP *= Z feeds dS.
                        pz = zbuf[:nr * nc].reshape((nr, nc))
                        _dropout_grad(s, dp, pz, False, nr, nc, i0, c0, bh, seed_lo, seed_hi, thr, dscale)
                        np.dot(pz.T, dot, tv)
                    else:
                        np.dot(s.T, dot, tv)
                    dva[:nc] += tv
                    # dS = P * (dP - delta), in place of P
                    _ds_in_place(s, dp, nr, nc, delta, bh, i0)
                    np.dot(s.T, qt, tk)
                    dka[:nc] += tk
                    dqt = dqbuf[:nr * D].reshape((nr, D))
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
