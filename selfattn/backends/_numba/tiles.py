"""Tile primitives shared by the Numba kernel families (fused, BLAS-tile, SIMD).

Everything here is inlined into the kernels that use it. The per-call options
arrive as one :class:`~selfattn.backends._numba.args.KernelParams` named
tuple ``P``. The dropout hash takes its constants from
:mod:`selfattn._dropout` (the one definition every backend shares).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ... import _dropout
from .microkernel import abs_max, exp_shift_vectors, row_max
from .opts import FASTMATH, INLINE, OPTS

__all__ = [
    "FASTMATH",
    "OPTS",
    "band_fill_row",
    "inside_band",
    "cast_like",
    "fmix32",
    "key_norm_step",
    "head_bound",
    "shift_free_room",
    "value_room",
    "row_hash",
    "dot_nt",
    "exp_shift_row",
    "query_task",
    "score_bias",
    "softmax_tile",
    "dropout_tile",
    "dropout_grad",
    "ds_in_place",
    "finish_rows",
]

_M32 = 0xFFFFFFFF
_MUL_BH = _dropout.MUL_BH
_MUL_ROW = _dropout.MUL_ROW
_MUL_COL = _dropout.MUL_COL
_F1 = int(_dropout.FMIX_1)
_F2 = int(_dropout.FMIX_2)

_INLINE = INLINE


@nb.njit(**_INLINE)
def fmix32(h):
    """MurmurHash3's finaliser on an int64 holding a uint32 (products wrap and keep the low 32 bits)."""
    h ^= h >> 16
    h = (h * _F1) & _M32
    h ^= h >> 13
    h = (h * _F2) & _M32
    h ^= h >> 16
    return h


@nb.njit(**_INLINE)
def key_norm_step(best, krow):
    """``max(best, |krow|²)`` with ``|krow|²`` accumulated in float64; once either is NaN, NaN sticks.

    The running step of the key-norm bound behind the forward's shift-free
    shortcut (a NaN key makes the bound NaN, which disables the shortcut).
    """
    acc = 0.0
    for dd in range(krow.shape[0]):
        x = np.float64(krow[dd])
        acc += x * x
    return acc if (acc > best or acc != acc) else best


#: ``ln(largest value / 1000)`` of float32 and float64: the shift-free output bound's headroom.
_LOG_TOP32 = math.log(float(np.finfo(np.float32).max) / 1e3)
_LOG_TOP64 = math.log(float(np.finfo(np.float64).max) / 1e3)


@nb.njit(**_INLINE)
def shift_free_room(vmax, m, itemsize):
    """Largest score magnitude ``b`` for which a softmax over ``m`` keys may skip the max shift.

    ``vmax`` is ``max|v|`` over those keys' values (float64; NaN or infinite
    gives 0: the shortcut is not taken), ``itemsize`` that of the compute
    dtype (4 or 8). With every score in ``[-b, b]``, ``exp`` neither
    underflows to zero nor overflows, and neither do the row sums (at most
    ``m * e**b``) or the unnormalised output (at most ``m * e**b * vmax``):
    ``b`` is capped at 30 (float32) / 300 (float64) and lowered so that the
    output bound stays 1000x below the dtype's largest value.
    """
    if vmax != vmax or vmax == np.inf:
        return 0.0
    top, cap = (_LOG_TOP32, 30.0) if itemsize == 4 else (_LOG_TOP64, 300.0)
    room = top - math.log(max(vmax, 1.0) * max(m, 1))
    return max(0.0, min(cap, room))


@nb.njit(**_INLINE)
def value_room(vt, m, itemsize):
    """:func:`shift_free_room` of one head's values ``vt`` (C-contiguous, ``m`` keys): 0 if any is NaN or infinite.

    ``max|v|`` skips NaN (vector ``maxnum``), so non-finite values are found
    by a sum of ``v * 0``, which is NaN exactly when one of them is.
    """
    vrow = vt.reshape(vt.size)
    probe = 0.0
    for i in range(vrow.size):
        probe += vrow[i] * 0.0
    if probe != 0.0:
        return 0.0
    return shift_free_room(np.float64(abs_max(vrow, vrow.size)), m, itemsize)


@nb.njit(**_INLINE)
def head_bound(kh, vh, allow):
    """``(kmax, safe)`` of one key/value head (``kh`` ``(M, D)``, ``vh`` ``(M, Dv)``, C-contiguous): the
    largest key norm and :func:`value_room` of the values (0 unless ``allow``).

    The per-head pass behind the forward's shift-free shortcut (both the
    SIMD and the BLAS-tile families). Norms are accumulated in float64; a
    NaN key gives a NaN ``kmax`` and a NaN or infinite value ``safe = 0``
    (either disables the shortcut for that head).
    """
    best = 0.0
    for j in range(kh.shape[0]):
        best = key_norm_step(best, kh[j])
    return math.sqrt(best), (value_room(vh, kh.shape[0], kh.itemsize) if allow else 0.0)


@nb.njit(**_INLINE)
def row_hash(b, h, i, P):
    """The dropout hash of (local batch ``b``, query head ``h``, local row ``i``) at its global counters."""
    bh = P.bidx[b] * P.htot + P.h0 + h
    inner = fmix32(P.seed_hi ^ ((bh * _MUL_BH) & _M32))
    head = fmix32(P.seed_lo ^ inner)
    return fmix32(head ^ (((P.row0 + i) * _MUL_ROW) & _M32))


@nb.njit(**OPTS)
def dot_nt(a, b, out, nrp, ncp, kred, acc, z, boff):
    """``out[:nrp, :ncp] (+)= a[:nrp, :kred] @ b[boff:boff+ncp, :kred].T``.

    Register-blocked 2 x 4: eight dot products share each load, and their
    reductions over ``kred`` vectorise. ``nrp`` must be even and ``ncp`` a
    multiple of 4 (the tiles are padded; padded results are ignored). ``z``
    is a zero of the compute dtype (keeps the accumulators in that dtype).
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


def exp_shift_row(srow, nc, mu):  # pragma: no cover - replaced by the overload
    """``srow[c] = exp(srow[c] - mu)`` for ``c < nc``; returns the row sum (see the overload)."""
    raise NotImplementedError


@overload(exp_shift_row, fastmath=FASTMATH)
def _exp_shift_row_impl(srow, nc, mu):
    """``srow[c] = exp(srow[c] - mu)`` for ``c < nc``; returns the row sum.

    float32: range reduction ``x = n·ln2 + r`` (Cody-Waite, two constants),
    a degree-5 polynomial for ``exp(r)`` on ``|r| <= ln2/2`` (least squares
    on Chebyshev nodes, relative error below 2.1e-7, i.e. about 3.5 ulp), and
    ``2**n`` built from its exponent bits; one branch-free loop that LLVM
    vectorises (min/max clamps, ``vroundps``, ``vcvttps2dq``, five FMAs).
    exp(-inf) is exactly 0, NaN stays NaN and arguments below -87.33 give 0.
    float64: whole vectors by the same reduction with a degree-12 Taylor
    polynomial (``microkernel.exp_shift_vectors``), the tail by ``math.exp``.
    """
    if srow.dtype == types.float32:

        def impl(srow, nc, mu):
            lo = np.float32(-87.33)
            hi = np.float32(88.37)
            # Whole vectors through the explicit vector code, the tail here.
            tot, c0 = exp_shift_vectors(srow, nc, mu)
            for c in range(c0, nc):
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
        tot, c0 = exp_shift_vectors(srow, nc, mu)
        for c in range(c0, nc):
            e = math.exp(srow[c] - mu)
            srow[c] = e
            tot += e
        return tot

    return impl64


def _softcap_row(srow, drow, nc, cap, want_d):  # pragma: no cover - replaced by the overload
    """``srow = cap·tanh(srow/cap)``; ``drow = 1 - tanh²`` when ``want_d`` (see the overload)."""
    raise NotImplementedError


@overload(_softcap_row, fastmath=FASTMATH)
def _softcap_row_impl(srow, drow, nc, cap, want_d):
    """Soft-capping of one score row, in place.

    float32: ``tanh(x) = 1 - 2 / (exp(2x) + 1)`` with the vectorised exp
    (absolute error below 3e-7 in ``tanh``, so below ``3e-7 · softcap`` in the
    score; the loop vectorises); float64: ``math.tanh``.
    """
    if srow.dtype == types.float32:

        def impl(srow, drow, nc, cap, want_d):
            inv = np.float32(2.0) / cap
            for c in range(nc):
                drow[c] = srow[c] * inv
            exp_shift_row(drow, nc, np.float32(0.0))
            if want_d:  # two loops, not a branch per element: each vectorises
                for c in range(nc):
                    x = srow[c]
                    e = drow[c]
                    t = np.float32(1.0) - np.float32(2.0) / (e + np.float32(1.0))
                    t = t if x == x else x
                    srow[c] = cap * t
                    drow[c] = np.float32(1.0) - t * t
            else:
                for c in range(nc):
                    x = srow[c]
                    t = np.float32(1.0) - np.float32(2.0) / (drow[c] + np.float32(1.0))
                    srow[c] = cap * (t if x == x else x)

        return impl

    def impl64(srow, drow, nc, cap, want_d):
        for c in range(nc):
            t = math.tanh(srow[c] / cap)
            srow[c] = cap * t
            if want_d:
                drow[c] = 1.0 - t * t

    return impl64


def cast_like(x, like):  # pragma: no cover - replaced by the overload
    """``x`` converted to the type of the scalar ``like`` (keeps float32 loops in float32)."""
    raise NotImplementedError


@overload(cast_like, inline="always")
def _cast_like_impl(x, like):
    if like == types.float32:
        return lambda x, like: np.float32(x)
    return lambda x, like: np.float64(x)


@nb.njit(**_INLINE)
def query_task(t, nqb, rows, N, M, G, P):
    """Decode task ``t`` = (bh, query tile) of a kernel with ``nqb`` tiles of ``rows`` rows.

    Returns ``(bh, b, h, kvh, i0, i1, j0, j1)``: flat batch·head, batch, query
    head, flat key/value head, the tile's query rows ``[i0, i1)`` and the keys
    ``[j0, j1)`` that the band lets any of them attend (``j1 <= j0`` when none).
    """
    qb = t % nqb
    bh = t // nqb
    b = bh // P.Hq
    h = bh - b * P.Hq
    kvh = b * P.Hkv + h // G
    i0 = qb * rows
    i1 = min(N, i0 + rows)
    j0 = max(0, i0 + P.off - P.lo)
    j1 = min(M, i1 - 1 + P.off + P.up + 1)
    return bh, b, h, kvh, i0, i1, j0, j1


@nb.njit(**_INLINE)
def inside_band(i0, i1, c0, c1, off, P):
    """Whether every row ``i0..i1-1`` may attend every key ``c0..c1-1`` (band offset ``off``): no band fill needed."""
    return c0 >= i1 - 1 + off - P.lo and c1 - 1 <= i0 + off + P.up


@nb.njit(**_INLINE)
def band_fill_row(srow, i, c0, nc, end, off, P):
    """``-inf`` in ``srow[:end]`` wherever row ``i`` may not attend key ``c0 + c`` (``c < nc``); ``srow[nc:end]`` too.

    Keys outside ``[i+off-lo, i+off+up]`` form a run at each end of the row:
    two fills, not a compare per score. ``end > nc`` also fills padding
    columns past the row's last key.
    """
    neg = -np.inf
    lo_end = min(nc, max(0, i + off - P.lo - c0))
    hi_start = max(lo_end, min(nc, i + off + P.up + 1 - c0))
    for c in range(lo_end):
        srow[c] = neg
    for c in range(hi_start, end):
        srow[c] = neg


@nb.njit(**OPTS)
def score_bias(s, nr, nc, i0, c0, b, h, off, P, dcap, want_dcap):
    """Turn a tile of scaled scores into the logits the softmax sees, in the API's order.

    Soft-capping (``dcap`` receives ``1 - tanh²`` when ``want_dcap``), the
    ALiBi bias ``-slope·|i + off - j|``, the user's mask (bool: ``-inf`` where
    False; float: added) and the causal/window band (``-inf`` outside), for
    rows ``i0..`` and keys ``c0..`` of batch ``b`` (a packed sequence's index
    for varlen), head ``h``, band offset ``off``.
    """
    neg = -np.inf
    if P.softcap > 0.0:
        cap = cast_like(P.softcap, s[0, 0])
        for r in range(nr):
            _softcap_row(s[r], dcap[r], nc, cap, want_dcap)
    if P.has_alibi:
        slope = P.alibi[b, h]
        for r in range(nr):
            base = i0 + r + off - c0
            srow = s[r]
            for c in range(nc):
                srow[c] -= slope * cast_like(abs(base - c), slope)
    if P.mask_kind != 0:
        mb = P.midx[b]
        if P.mask_kind == 1:
            Hm, Nm, Mm = P.mbool.shape[1], P.mbool.shape[2], P.mbool.shape[3]
        else:
            Hm, Nm, Mm = P.mfloat.shape[1], P.mfloat.shape[2], P.mfloat.shape[3]
        mh = h if Hm > 1 else 0
        for r in range(nr):
            mi = i0 + r if Nm > 1 else 0
            srow = s[r]
            if P.mask_kind == 1:
                mrow = P.mbool[mb, mh, mi]
                if Mm > 1:
                    for c in range(nc):
                        if mrow[c0 + c] == 0:
                            srow[c] = neg
                elif mrow[0] == 0:
                    for c in range(nc):
                        srow[c] = neg
            else:
                frow = P.mfloat[mb, mh, mi]
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
    if not inside_band(i0, i1, c0, c1, off, P):
        for r in range(nr):
            band_fill_row(s[r], i0 + r, c0, nc, nc, off, P)


@nb.njit(**OPTS)
def softmax_tile(s, nr, nc, mrow, lrow, o, Dv, bounded, ninf, zero):
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
            lrow[r] += exp_shift_row(srow, nc, zero)
            continue
        mx = row_max(srow, nc, ninf)
        mold = mrow[r]
        mnew = mx if mx > mold else mold
        muse = zero if mnew == ninf else mnew
        ps = exp_shift_row(srow, nc, muse)
        if mold != mnew:
            alpha = math.exp(mold - muse)
            lrow[r] = lrow[r] * alpha + ps
            orow = o[r]
            for e in range(Dv):
                orow[e] *= alpha
        else:
            lrow[r] += ps
        mrow[r] = mnew


@nb.njit(**OPTS)
def dropout_tile(s, nr, nc, i0, c0, b, h, P):
    """Zero the dropped entries of a probability tile (rows from ``i0``, keys from ``c0``)."""
    for r in range(nr):
        rh = row_hash(b, h, i0 + r, P)
        srow = s[r]
        for c in range(nc):
            u = fmix32(rh ^ (((P.col0 + c0 + c) * _MUL_COL) & _M32))
            if u < P.thr:
                srow[c] = 0.0


@nb.njit(**OPTS)
def dropout_grad(s, dp, pz, transposed, nr, nc, i0, c0, b, h, P):
    """Backward dropout on a tile: ``pz = P*Z`` (into ``pz``, or its transpose) and ``dP *= Z``.

    ``Z`` is the forward's keep mask times ``dscale`` (the same hash as :func:`dropout_tile`).
    """
    for r in range(nr):
        rh = row_hash(b, h, i0 + r, P)
        for c in range(nc):
            u = fmix32(rh ^ (((P.col0 + c0 + c) * _MUL_COL) & _M32))
            z = P.dscale if u >= P.thr else 0.0
            if transposed:
                pz[c, r] = s[r, c] * z
            else:
                pz[r, c] = s[r, c] * z
            dp[r, c] *= z


@nb.njit(**OPTS)
def ds_in_place(s, dp, nr, nc, delta, bh, i0, dcap, softcapped):
    """``dS = P * (dP - delta)`` on a tile, written over ``P`` in ``s`` (times ``1 - tanh²`` if soft-capped)."""
    for r in range(nr):
        dl = delta[bh, i0 + r]
        srow = s[r]
        dprow = dp[r]
        if softcapped:
            drow = dcap[r]
            for c in range(nc):
                srow[c] = srow[c] * (dprow[c] - dl) * drow[c]
        else:
            for c in range(nc):
                srow[c] = srow[c] * (dprow[c] - dl)


@nb.njit(**OPTS)
def finish_rows(o, mrow, lrow, nr, Dv, empty, dscale, out, lse, bh, i0):
    """Normalise a tile's accumulated rows into ``out[bh, i0:i0+nr]`` and ``lse[bh, ...]``.

    Rows with nothing attended (sum 0, or ``empty``) get output 0 and lse ``-inf``.
    """
    for r in range(nr):
        l = lrow[r]
        orow = out[bh, i0 + r]
        if l == 0.0 or empty:
            lse[bh, i0 + r] = -np.inf
            for e in range(Dv):
                orow[e] = 0.0
        else:
            inv = dscale / l
            lse[bh, i0 + r] = mrow[r] + math.log(l)
            for e in range(Dv):
                orow[e] = o[r, e] * inv
