"""SIMD kernels: the FlashAttention structure with our own vector micro-kernels, no BLAS.

The BLAS-tile kernels (:mod:`~selfattn.backends._numba.blas`) top out near
0.8 of ``numpy.matmul``: their products are thin (inner dimension D = 64),
and every score tile is packed again by BLAS before ``P @ V``. These kernels
keep the same tasks, online softmax and band handling but do both products
with :func:`~selfattn.backends._numba.microkernel.gemm`, whose accumulators
stay in vector registers:

* ``S = (q*scale) K^T``: the scaled query tile (``BR x D``, L1) times a
  block of the transposed keys (:func:`prepare_keys` transposes each head
  once per call), written to the score tile ``s`` (``BR x BC``, L2);
* scale/soft-cap/ALiBi/mask/band (:func:`~selfattn.backends._numba.tiles.score_bias`)
  and the online softmax with the vectorised exp, on ``s`` in place (plain,
  bounded tiles: ``2**s`` on scores computed in base 2, see :func:`forward`;
  inside the band it is taken on the ``S`` product's accumulators before
  they are stored, :func:`~selfattn.backends._numba.microkernel.gemm_exp2`);
* ``O += P V``: ``P`` is read straight from ``s`` by scalar broadcasts (no
  copy, no re-packing) against rows of ``V`` read in place.

The backward's five products (``S``, ``dP = dO V^T``, ``dV += (P*Z)^T dO``,
``dK += dS^T (q*scale)``, ``dQ += dS K``) use the same micro-kernel; the
transposed operands ``P^T`` and ``dS^T`` are read through strides, not
copied. Neither direction computes the far side of the causal diagonal
beyond what whole vectors (forward) or a tile's last row (backward) need.

Tiles are padded (rows to :data:`~selfattn.backends._numba.microkernel.ROWS`,
columns to the vector width) inside scratch buffers; padded results are never
read back. Serial over task ranges ``[t0, t1)``, GIL released, no BLAS (so no
thread limit on any BLAS is needed while they run); arguments follow
:mod:`selfattn.backends._numba.args`.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .microkernel import (
    B_IN_L1,
    LANES32,
    ROWS,
    exp2_vectors_masked,
    gemm,
    gemm_exp2,
    gemm_exp2_shifted,
    gemm_times_diff,
    transpose_block,
)
from .opts import INLINE, OPTS
from .scratch import scratch
from .tiles import (
    band_fill_row,
    cast_like,
    dropout_grad,
    dropout_tile,
    ds_in_place,
    exp_shift_row,
    finish_rows,
    head_bound,
    inside_band,
    query_task,
    score_bias,
    softmax_tile,
)

__all__ = [
    "prepare_keys",
    "key_block",
    "key_columns",
    "backward_operands",
    "forward",
    "backward",
    "BR",
    "BR_BAND",
    "BC",
    "BRB",
    "BCB",
]

#: log2(e): the forward's shift-free plain tasks work in base 2 (see :func:`forward`).
_LOG2E = 1.4426950408889634

#: Query rows per forward task (the host may pass fewer so every thread gets work; a multiple of ROWS).
#: Longer tasks reuse each K^T/V block over more rows: measured 1 thread, (1,2,4096,64) f32,
#: 64 rows 99-103 GFLOP/s, 128: 105-113, 256: 112-114, 384: 118 (noise ~3%).
BR = 256
#: Query rows per forward task for causal/windowed calls: the diagonal block of each task computes
#: about BR^2/2 scores the band throws away (measured (1,8,1024,64) f32 causal, 1 thread: 64 rows
#: 12.1 ms, 256 rows 13.9 ms).
BR_BAND = 64
#: Keys per block: the V block (128 x 64 float32, 32 KiB) stays in L1 across the P @ V row
#: blocks; the 256 x 128 score tile (128 KiB) in L2. Larger heads take fewer (:func:`key_block`).
BC = 128
#: Query rows per backward tile.
BRB = 64
#: Keys per backward block.
BCB = 128


@nb.njit(**INLINE)
def _up(n, m):
    return (n + m - 1) // m * m


@nb.njit(**OPTS)
def _pack(src, row0, nrow, ncol, dst, ld, nrow_pad):
    """``dst[r*ld + c] = src[row0 + r, c]``; columns ``ncol..ld`` and rows ``nrow..nrow_pad`` zeroed."""
    for r in range(nrow):
        srow = src[row0 + r]
        base = r * ld
        for c in range(ncol):
            dst[base + c] = srow[c]
        for c in range(ncol, ld):
            dst[base + c] = 0.0
    for i in range(nrow * ld, nrow_pad * ld):
        dst[i] = 0.0


def key_block(bc: int, d: int, itemsize: int) -> int:
    """Keys per block for head size ``d``: ``bc``, halved (not below 64) until a block of
    ``K^T`` (``d x bc``) fits the micro-kernel's L1 budget; a halved block of exactly
    four vectors then becomes three.

    At the default 128 keys a float32 D = 128 or float64 D = 64 block is 64 KiB, so the
    product ran column panel by column panel with its broadcast operand from L2; 64 keys
    measured 3-4 % faster on both ((4,8,1024,128) float32, (1,8,2048,64) float64, 2 threads,
    11 alternating blocks; 32 keys 5-6 % slower). Where that halving leaves four vectors of
    keys (float32 on AVX-512, 64 < D <= 170), 48 keys measured 0.92-0.95x the forward's time
    at D = 128 ((4,8,1024,128), (1,8,2048,128), (1,8,512,128), 13 alternating blocks) and
    0.93-1.02x the backward's; neutral at D = 96 (1.00x). The ``S`` product is then one
    3-vector column panel instead of two 2-vector ones, but that alone is ~3 % of the product
    in isolation (znver4: 95.6 vs 93.0 GFLOP/s); the rest is presumably the smaller K^T and V
    blocks (24 instead of 32 KiB each) alternating in L1 (not isolated). Not generalised to
    whole 3-vector panels: 96 keys at float32 D = 32 measured 1.02x, 24 keys at float64
    D = 128 1.07x. Smaller ``bc`` (tests' tiles) are kept.
    """
    w = LANES32 * 4 // itemsize
    b = bc
    while b > 64 and b * d * itemsize > B_IN_L1:
        b //= 2
    if b < bc and b == 4 * w and 3 * w * d * itemsize <= B_IN_L1:
        b = 3 * w
    return b


def key_columns(m: int, width: int) -> int:
    """Columns of :func:`prepare_keys`' transposed keys: ``m`` rounded up to ``width``, plus ``width``.

    A key block may start anywhere (the first block of a task takes the remainder) and
    its product reads whole vectors, so up to ``width - 1`` columns past the
    last key are read; they are zeros.
    """
    return -(-m // width) * width + width


def backward_operands(q3: np.ndarray, do3: np.ndarray, scale: float, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The backward's row operands: ``q * scale`` and ``dO`` as ``(BH*N + ROWS, round_up(D, width))`` arrays.

    Zero columns past ``D`` and ``ROWS`` zero rows at the end let every tile
    of :func:`backward` read them in place (its products work on whole
    micro-kernel row blocks and whole vectors). Scaling happens in the
    compute dtype, as the forward scales its query tiles: the recomputed
    scores are then the forward's, bit for bit, where both work in natural
    log (what keeps ``exp(S - lse)`` accurate at large scores). The arrays
    are this thread's reusable work arrays
    (:mod:`~selfattn.backends._numba.scratch`): valid until its next call.
    """
    BH, N, D = q3.shape
    Dv = do3.shape[2]
    rows = BH * N
    qs = scratch("simd.backward.qs", (rows + ROWS, -(-D // width) * width), q3.dtype)
    dop = scratch("simd.backward.dop", (rows + ROWS, -(-Dv // width) * width), do3.dtype)
    # One pass each (no zero-fill of what is overwritten): only the padding is zeroed.
    np.multiply(q3.reshape(rows, D), q3.dtype.type(scale), out=qs[:rows, :D])
    dop[:rows, :Dv] = do3.reshape(rows, Dv)
    for a, used in ((qs, D), (dop, Dv)):
        a[rows:] = 0
        a[:rows, used:] = 0
    return qs, dop


@nb.njit(**OPTS)
def _transpose_into(src, s_off, lds, nrow, ncol, dst, d_off, ldd):
    """``dst[d_off + c*ldd + r] = src[s_off + r*lds + c]`` for ``r < nrow``, ``c < ncol``, and
    ``dst[d_off + c*ldd + r] = 0`` for ``nrow <= r < ldd`` (both arrays flat).

    Whole ``W x W`` blocks go through
    :func:`~selfattn.backends._numba.microkernel.transpose_block` (register
    shuffles), a row of ``W`` columns at a time (measured for the keys' pass,
    (32,1024,128) f32: 1.7 ms, rows outermost 2.6 ms, element by element
    3.4 ms), then the edges element by element. The keys' pass transposes
    each head's keys with it, the backward each block of keys and values
    (its scalar loop, a strided store per element, cost ~2 % of the backward).
    """
    TW = LANES32 * 4 // src.itemsize
    rfull = nrow // TW * TW
    cfull = ncol // TW * TW
    for c0 in range(0, cfull, TW):
        for r0 in range(0, rfull, TW):
            transpose_block(src, s_off + r0 * lds + c0, lds, dst, d_off + c0 * ldd + r0, ldd)
    for r in range(nrow):
        for c in range(cfull if r < rfull else 0, ncol):
            dst[d_off + c * ldd + r] = src[s_off + r * lds + c]
    for c in range(ncol):
        for r in range(nrow, ldd):
            dst[d_off + c * ldd + r] = 0.0


@nb.njit(**OPTS)
def prepare_keys(t0, t1, k, v, kt, kmax, safe, allow):
    """Per key/value head ``t``: ``kt[t] = k[t].T`` (zero-padded columns), ``kmax[t]`` = its largest
    key norm and ``safe[t]`` = the shift-free bound of its values (0 unless ``allow``).

    ``k`` ``(BKV, M, D)``, ``v`` ``(BKV, M, Dv)``, ``kt`` ``(BKV, D, Mp)`` with
    ``Mp`` from :func:`key_columns`, all C-contiguous; ``safe`` float64. The
    forward reads ``K^T`` blocks as the ``B`` operand of ``S = Q K^T`` in place,
    so each key is transposed once per call instead of once per query tile;
    whole ``W x W`` blocks go through
    :func:`~selfattn.backends._numba.microkernel.transpose_block` (vector
    loads, shuffles and stores), the edges element by element. ``kmax`` and
    ``safe`` come from :func:`~selfattn.backends._numba.tiles.head_bound`
    (a NaN key or a non-finite value disables the shift-free shortcut for
    that head): per head, so one head's values never change how another
    head's rows are computed (a head's output is the same whatever else is
    in the batch), and taken here, in the threads that read the keys anyway,
    rather than by serial NumPy reductions over ``v``.
    """
    M, D = k.shape[1], k.shape[2]
    Mp = kt.shape[2]
    kflat = k.reshape(k.size)
    ktflat = kt.reshape(kt.size)
    for t in range(t0, t1):
        kmax[t], safe[t] = head_bound(k[t], v[t], allow)
        _transpose_into(kflat, t * M * D, D, M, D, ktflat, t * D * Mp, Mp)


@nb.njit(**OPTS)
def forward(t0, t1, q, kt, v, P, kmax, safe, BR, BC, W, out, lse):
    """Online-softmax forward on the vector micro-kernels; tasks are (bh, tile of ``BR`` rows).

    Same contract as :func:`selfattn.backends._numba.blas.forward_gemm`
    (including the shift-free shortcut with ``kmax``/``safe``, except that
    ``safe`` is per key/value head, from :func:`prepare_keys`; blocks of
    ``BC`` keys ending at the band's last key); ``W`` is the vector width in lanes of this
    dtype, ``BR`` a multiple of ``ROWS`` and ``BC`` of ``W``. Writes ``out``
    ``(BH, N, Dv)`` and ``lse`` ``(BH, N)`` (``-inf`` where nothing is attended).

    A task with plain scores (no mask, ALiBi or soft-cap) whose rows pass the
    shift-free bound computes them in base 2, ``q * (scale * log2(e))``:
    tiles inside the band then take ``2**s`` unchecked, on the product's
    accumulators before they are stored
    (:func:`~selfattn.backends._numba.microkernel.gemm_exp2`),
    tiles on a band edge ``2**s`` with ``-inf`` outside the band
    (:func:`~selfattn.backends._numba.microkernel.exp2_vectors_masked`); a
    tile cut by the band's upper edge (the causal diagonal) runs row block
    by row block, each stopping at its last attended key. The softmax's sums
    (and so ``out`` and ``lse``) are the same quantities as in natural-log
    tasks.
    """
    BH, N, D = q.shape
    M = v.shape[1]
    Mp = kt.shape[2]
    Dv = v.shape[2]
    G = P.Hq // P.Hkv
    nqb = (N + BR - 1) // BR
    dt = q.dtype
    Dvw = _up(Dv, W)
    v_in_place = Dvw == Dv
    qs = np.zeros(BR * D, dt)
    ktflat = kt.reshape(kt.size)
    sbuf = np.zeros(BR * BC, dt)
    vp = np.zeros(1 if v_in_place else BC * Dvw, dt)
    obuf = np.zeros(BR * Dvw, dt)
    dcap_buf = np.zeros(BR * BC if P.softcap > 0.0 else 1, dt)
    mrow = np.empty(BR, dt)
    lrow = np.empty(BR, dt)
    # Lane-wise partial row sums of the interior tiles' 2**s (gemm_exp2), folded into lrow per task.
    rsum = np.zeros(BR * W, dt)
    vflat = v.reshape(v.size)
    zero = cast_like(0.0, qs[0])
    ninf = cast_like(-np.inf, zero)
    sc = cast_like(P.scale, zero)
    plain = P.softcap == 0.0 and not P.has_alibi and P.mask_kind == 0
    # Plain scores are computed in base 2 (log2(e) folded into the query's scale) when the
    # task is bounded: interior tiles then take 2**s, which needs neither the multiply by
    # log2(e) nor the two-step ln2 reduction of exp (a third fewer vector instructions).
    sc2 = cast_like(P.scale * _LOG2E, zero) if plain else sc
    for t in range(t0, t1):
        bh, b, h, kvh, i0, i1, j0, j1 = query_task(t, nqb, BR, N, M, G, P)
        nr = i1 - i0
        nrp = _up(nr, ROWS)
        o = obuf.reshape((BR, Dvw))
        for i in range(nrp * Dvw):
            obuf[i] = zero
        for r in range(nr):
            mrow[r] = ninf
            lrow[r] = zero
        room = safe[kvh]
        bounded = room > 0.0
        for r in range(nr):
            nrm = zero
            for dd in range(D):
                x = q[bh, i0 + r, dd] * sc2
                qs[r * D + dd] = x
                nrm += x * x
            if not (math.sqrt(nrm) * kmax[kvh] * 1.001 <= (room * _LOG2E if plain else room)):
                bounded = False
        for i in range(nr * D, nrp * D):
            qs[i] = zero
        base2 = plain and bounded
        if base2:  # only base-2 tasks have interior tiles that add into rsum
            for i in range(nrp * W):
                rsum[i] = zero
        if plain and not bounded:  # rows too large for the shift-free shortcut: natural scores
            for r in range(nr):
                for dd in range(D):
                    qs[r * D + dd] = q[bh, i0 + r, dd] * sc
        bounded = bounded or (P.softcap > 0.0 and P.softcap * 1.001 <= room)
        if bounded:
            for r in range(nr):
                mrow[r] = zero
        # Whole blocks of BC keys that end at the band's last key (the first block takes the
        # remainder): a block that crosses the band's edge is masked by score_bias (two fills
        # per row). Ending at j1 puts the causal diagonal at the end of one block, so at most
        # BR x BR/2 masked scores are computed per task (blocks from j0 averaged about twice
        # that); cutting blocks at the edges instead (as the BLAS-tile forward does) left
        # ragged slivers, each a full pass over the rows.
        first = (j1 - j0) % BC
        c1 = j0
        while c1 < j1:
            c0 = c1
            c1 = min(c0 + (first if (c0 == j0 and first > 0) else BC), j1)
            nc = c1 - c0
            ncw = _up(nc, W)
            s = sbuf[: nrp * ncw].reshape((nrp, ncw))
            dcap = dcap_buf[: nr * ncw].reshape((nr, ncw)) if P.softcap > 0.0 else dcap_buf[:1].reshape((1, 1))
            kto = kvh * D * Mp + c0  # the block's first column of K^T
            interior = nc == ncw and inside_band(i0, i1, c0, c1, P.off, P)
            if base2 and not interior and c1 - 1 > i0 + P.off + P.up:
                # The band's upper edge (the causal diagonal) cuts this block: each block of
                # ROWS rows multiplies only the keys up to its last row's last key, in whole
                # vectors for S (the rest of its row stays unread) and exactly for P V -- the
                # triangle past the diagonal is not computed. Same sums in the same order as
                # the whole-tile products (the skipped terms were exact zeros).
                for rb0 in range(0, nrp, ROWS):
                    ke = min(nc, i0 + rb0 + ROWS + P.off + P.up - c0)
                    if ke <= 0:
                        continue
                    kw = _up(ke, W)
                    gemm(qs, rb0 * D, D, 1, ktflat, kto, Mp, sbuf, rb0 * ncw, ncw, ROWS, kw, D, False, W)
                    for r in range(rb0, min(nr, rb0 + ROWS)):
                        srow = s[r]
                        band_fill_row(srow, i0 + r, c0, nc, kw, P.off, P)
                        lrow[r] += exp2_vectors_masked(srow, kw, zero)[0]
                if P.thr > 0:
                    dropout_tile(s, nr, nc, i0, c0, b, h, P)
                if v_in_place:
                    vb, vb_off, ldv = vflat, (kvh * M + c0) * Dv, Dv
                else:
                    _pack(v[kvh], c0, nc, Dv, vp, Dvw, nc)
                    vb, vb_off, ldv = vp, 0, Dvw
                for rb0 in range(0, nrp, ROWS):
                    ke = min(nc, i0 + rb0 + ROWS + P.off + P.up - c0)
                    if ke <= 0:
                        continue
                    gemm(sbuf, rb0 * ncw, ncw, 1, vb, vb_off, ldv, obuf, rb0 * Dvw, Dvw, ROWS, Dvw, ke, True, W)
                continue
            if base2 and interior:
                # Plain scores inside the band and bounded: nothing to bias or mask, no shift,
                # and the exp (2**s, the scores being in base 2) needs no range checks -- so it
                # is taken on the product's accumulators before they are stored (row sums in rsum).
                gemm_exp2(qs, 0, D, 1, ktflat, kto, Mp, sbuf, 0, ncw, nrp, ncw, D, W, rsum, 0)
            elif base2:
                # A band edge (or a partial vector) of a base-2 task: -inf outside the band and
                # in the padding columns, then 2**s with the masked entries giving 0.
                gemm(qs, 0, D, 1, ktflat, kto, Mp, sbuf, 0, ncw, nrp, ncw, D, False, W)
                score_bias(s, nr, nc, i0, c0, b, h, P.off, P, dcap, False)
                for r in range(nr):
                    srow = s[r]
                    for c in range(nc, ncw):
                        srow[c] = ninf
                    lrow[r] += exp2_vectors_masked(srow, ncw, zero)[0]
            else:
                gemm(qs, 0, D, 1, ktflat, kto, Mp, sbuf, 0, ncw, nrp, ncw, D, False, W)
                score_bias(s, nr, nc, i0, c0, b, h, P.off, P, dcap, False)
                softmax_tile(s, nr, nc, mrow, lrow, o, Dv, bounded, ninf, zero)
            if P.thr > 0:
                dropout_tile(s, nr, nc, i0, c0, b, h, P)
            if v_in_place:
                gemm(sbuf, 0, ncw, 1, vflat, (kvh * M + c0) * Dv, Dv, obuf, 0, Dvw, nrp, Dvw, nc, True, W)
            else:
                _pack(v[kvh], c0, nc, Dv, vp, Dvw, nc)
                gemm(sbuf, 0, ncw, 1, vp, 0, Dvw, obuf, 0, Dvw, nrp, Dvw, nc, True, W)
        if base2:
            for r in range(nr):
                tot = zero
                for lane in range(W):
                    tot += rsum[r * W + lane]
                lrow[r] += tot
        finish_rows(o, mrow, lrow, nr, Dv, j1 <= j0, P.dscale, out, lse, bh, i0)


@nb.njit(**OPTS)
def backward(t0, t1, qs, k, v, dop, lse, delta, P, BRB, BCB, W, nchunk, dq_acc, dk, dv):
    """FlashAttention-2 backward on the vector micro-kernels; tasks are (kv head, key chunk).

    Same contract as :func:`selfattn.backends._numba.blas.backward_gemm`
    (``lse`` ``(BH, N)`` holds ``+inf`` for rows that attend nothing), with
    the row operands prepared once per call by the host (:func:`backward_operands`):
    ``qs`` = ``q * scale`` and ``dop`` = ``dO``, each ``(BH*N + ROWS, Dw)``
    (``Dvw``) with zero columns past ``D`` (``Dv``) and ``ROWS`` spare rows,
    so every tile reads them in place. dQ of chunk ``ch`` is accumulated by
    the dQ product itself into ``dq_acc[ch]`` ``(BH*N + ROWS, Dw)`` (the host
    sums the chunks and drops the padding). ``BRB`` must be a multiple of
    ``ROWS``, ``BCB`` of ``W``.

    Each key block's ``K^T`` and ``V^T`` are transposed by register shuffles,
    ``K * scale`` (for ``dQ += dS (K scale)``) by one vector pass. A tile
    works on the block's keys up to its last row's band edge (the causal
    diagonal's far side is attended by none of its rows). Key blocks
    whose key count is a multiple of ``ROWS`` (and whose heads are whole
    vectors) accumulate ``dK``/``dV`` straight into ``dk``/``dv``, the block's
    first tile overwriting; others go through the task's own buffers. Tiles
    of plain calls (no soft-cap, ALiBi or mask) whose rows have
    ``|lse| <= 30`` (300 in float64) compute ``S`` in base 2 (a second
    ``K^T``, times ``log2 e``) and recompute ``P = 2**(S - lse log2 e)`` with
    the masked vector ``2**s`` (``-inf`` gives 0, NaN stays NaN) -- on the
    ``S`` product's accumulators when the tile is whole vectors of keys inside
    the band (:func:`~selfattn.backends._numba.microkernel.gemm_exp2_shifted`);
    the others recompute ``exp(S - lse)`` from the forward's own scores.
    Without dropout or soft-cap, a tile of whole vectors of keys takes
    ``dS = P (dP - delta)`` on the ``dP`` product's accumulators, over ``P``
    once ``dV`` has read it
    (:func:`~selfattn.backends._numba.microkernel.gemm_times_diff`): no
    ``dP`` tile is stored. Same bits either way.
    """
    N = lse.shape[1]
    BKV, M, Dv = v.shape
    D = k.shape[2]
    Dw = qs.shape[1]
    Dvw = dop.shape[1]
    G = P.Hq // P.Hkv
    nkb = (M + BCB - 1) // BCB
    per = (nkb + nchunk - 1) // nchunk
    dt = qs.dtype
    kt = np.zeros(D * BCB, dt)
    kt2 = np.zeros(D * BCB, dt)
    vt = np.zeros(Dv * BCB, dt)
    kps = np.zeros(BCB * Dw, dt)
    sbuf = np.zeros(BRB * BCB, dt)
    dpbuf = np.zeros(BRB * BCB, dt)
    zbuf = np.zeros(BRB * BCB if P.thr > 0 else 1, dt)
    dcap_buf = np.zeros(BRB * BCB if P.softcap > 0.0 else 1, dt)
    dka = np.zeros(BCB * Dw, dt)
    dva = np.zeros(BCB * Dvw, dt)
    dqt = np.zeros(BRB * Dw, dt)
    # A tile's rows' lse*log2(e) and delta, for the products that take P's exp and dS on their
    # accumulators; padding rows get P = 2**-inf = 0 and delta 0.
    mus = np.full(BRB, np.inf, dt)
    dls = np.zeros(BRB, dt)
    qflat = qs.reshape(qs.size)
    dflat = dop.reshape(dop.size)
    kflat = k.reshape(k.size)
    vflat = v.reshape(v.size)
    dkflat = dk.reshape(dk.size)
    dvflat = dv.reshape(dv.size)
    zero = cast_like(0.0, qs[0, 0])
    sc = cast_like(P.scale, zero)
    ninf = cast_like(-np.inf, zero)
    capped = P.softcap > 0.0
    # Plain scores (no soft-cap, ALiBi or mask: only band fills) of rows with |lse| <= lim are
    # computed in base 2 (K^T packed times log2 e too), so P = 2**(S - lse log2 e) skips
    # exp's multiply and ln2 reduction. Larger scores stay natural: in base 2 the
    # cancellation S - lse loses log2(e) times more to rounding (measured: float32 gradients
    # off by 5e-5 relative at scores near 200) -- and so must be the forward's scores bit for
    # bit: (q*scale) K^T, not q (K^T*scale).
    base2 = P.softcap == 0.0 and not P.has_alibi and P.mask_kind == 0
    l2e = cast_like(_LOG2E, zero)
    lim = cast_like(30.0 if qs.itemsize == 4 else 300.0, zero)
    # Accumulating dQ straight into dq_acc pays when the scaled K block stays in L1 (the
    # product then runs row block by row block); a larger one (D = 128) goes column panel by
    # column panel, and reading/writing dq_acc's rows once per panel cost more than the copy
    # through dqt (measured (4,8,1024,128): 240 vs 192 ms).
    direct_dq = BCB * Dw * qs.itemsize <= B_IN_L1
    for t in range(t0, t1):
        ch = t % nchunk
        kvh = t // nchunk
        b = kvh // P.Hkv
        hk = kvh - b * P.Hkv
        dqc = dq_acc[ch].reshape(dq_acc[ch].size)
        for kbi in range(ch * per, min(nkb, (ch + 1) * per)):
            c0 = kbi * BCB
            c1 = min(M, c0 + BCB)
            nc = c1 - c0
            ncw = _up(nc, W)
            ncr = _up(nc, ROWS)
            kv0 = kvh * M + c0  # first key of the block in k / v / dk / dv (as rows)
            _transpose_into(kflat, kv0 * D, D, nc, D, kt, 0, ncw)
            _transpose_into(vflat, kv0 * Dv, Dv, nc, Dv, vt, 0, ncw)
            if base2:
                for i in range(D * ncw):
                    kt2[i] = kt[i] * l2e
            # K * scale, for dQ += dS (K * scale): one contiguous (vectorised) pass when D is
            # whole vectors, else row by row with zero padding.
            if Dw == D:
                for i in range(nc * D):
                    kps[i] = kflat[kv0 * D + i] * sc
            else:
                for c in range(nc):
                    for dd in range(D):
                        kps[c * Dw + dd] = k[kvh, c0 + c, dd] * sc
                    for dd in range(D, Dw):
                        kps[c * Dw + dd] = zero
            # dK/dV of a block of whole micro-kernel rows go straight into dk/dv (the first
            # tile overwrites); others through dka/dva, whose padding rows are dropped.
            direct_kv = nc == ncr and Dw == D and Dvw == Dv
            if direct_kv:
                kacc, kacc_off, vacc, vacc_off = dkflat, kv0 * D, dvflat, kv0 * Dv
            else:
                kacc, kacc_off, vacc, vacc_off = dka, 0, dva, 0
            acc_kv = False
            ilo = max(0, c0 - P.off - P.up)
            ihi = min(N, c1 - 1 - P.off + P.lo + 1)
            for g in range(G):
                h = hk * G + g
                bh = b * P.Hq + h
                for i0 in range(ilo, ihi, BRB):
                    i1 = min(ihi, i0 + BRB)
                    nr = i1 - i0
                    nrp = _up(nr, ROWS)
                    rb = bh * N + i0  # first row of the tile in qs / dop / dq_acc
                    # Keys past the last row's band edge are attended by no row of this tile (the
                    # causal diagonal's far side): the tile works on the block's first nt keys.
                    nt = min(nc, i1 + P.off + P.up - c0)
                    ntw = _up(nt, W)
                    ntr = _up(nt, ROWS)
                    s = sbuf[: nrp * ntw].reshape((nrp, ntw))
                    dp = dpbuf[: nrp * ntw].reshape((nrp, ntw))
                    dcap = dcap_buf[: nr * ntw].reshape((nr, ntw)) if capped else dcap_buf[:1].reshape((1, 1))
                    b2 = base2
                    for r in range(nr):
                        if not (abs(lse[bh, i0 + r]) <= lim):
                            b2 = False
                    # Whole vectors of keys (no padding column to mask) and no band edge inside:
                    # a base-2 tile's P = 2**(S - lse log2 e) is taken on the S product's
                    # accumulators; with no dropout or soft-cap, dS = P (dP - delta) on the dP
                    # product's (after dV has read P), so neither S nor dP is stored and re-read.
                    whole = nt == ntw
                    fuse_p = b2 and whole and inside_band(i0, i1, c0, c0 + nt, P.off, P)
                    fuse_ds = whole and P.thr == 0 and not capped
                    if fuse_p:
                        for r in range(nr):
                            mus[r] = lse[bh, i0 + r] * l2e
                        for r in range(nr, nrp):
                            mus[r] = np.inf
                        gemm_exp2_shifted(qflat, rb * Dw, Dw, 1, kt2, 0, ncw, sbuf, 0, ntw, nrp, ntw, D, W, mus, 0)
                    else:
                        gemm(qflat, rb * Dw, Dw, 1, kt2 if b2 else kt, 0, ncw, sbuf, 0, ntw, nrp, ntw, D, False, W)
                        score_bias(s, nr, nt, i0, c0, b, h, P.off, P, dcap, True)
                    if not fuse_ds:
                        gemm(dflat, rb * Dvw, Dvw, 1, vt, 0, ncw, dpbuf, 0, ntw, nrp, ntw, Dv, False, W)
                    if b2 and not fuse_p:
                        # S is in base 2: P = 2**(S - lse*log2 e); columns past nt are set to -inf
                        # so whole vectors give 0 there.
                        for r in range(nr):
                            srow = s[r]
                            for c in range(nt, ntw):
                                srow[c] = ninf
                            exp2_vectors_masked(srow, ntw, lse[bh, i0 + r] * l2e)
                    elif not b2:
                        for r in range(nr):
                            srow = s[r]
                            exp_shift_row(srow, nt, lse[bh, i0 + r])
                            for c in range(nt, ntw):  # keys of the block past nt, or padding: P = 0
                                srow[c] = zero
                    # dV += (P*Z)^T dO: P^T read through strides (rows = keys), dO rows in place.
                    if P.thr > 0:
                        pz = zbuf[: nrp * ntw].reshape((nrp, ntw))
                        dropout_grad(s, dp, pz, False, nr, nt, i0, c0, b, h, P)
                        for r in range(nr):
                            for c in range(nt, ntw):
                                pz[r, c] = zero
                        gemm(zbuf, 0, 1, ntw, dflat, rb * Dvw, Dvw, vacc, vacc_off, Dvw, ntr, Dvw, nr, acc_kv, W)
                    else:
                        gemm(sbuf, 0, 1, ntw, dflat, rb * Dvw, Dvw, vacc, vacc_off, Dvw, ntr, Dvw, nr, acc_kv, W)
                    if fuse_ds:
                        for r in range(nr):
                            dls[r] = delta[bh, i0 + r]
                        for r in range(nr, nrp):
                            dls[r] = zero
                        gemm_times_diff(dflat, rb * Dvw, Dvw, 1, vt, 0, ncw, sbuf, 0, ntw, nrp, ntw, Dv, W, dls, 0)
                    else:
                        ds_in_place(s, dp, nr, nt, delta, bh, i0, dcap, capped)
                    # dK += dS^T (q*scale)
                    gemm(sbuf, 0, 1, ntw, qflat, rb * Dw, Dw, kacc, kacc_off, Dw, ntr, Dw, nr, acc_kv, W)
                    if not acc_kv:
                        # The block's first tile overwrote dK/dV rows [0, ntr) only: the rest start at 0.
                        for i in range(ntr * Dw, ncr * Dw):
                            kacc[kacc_off + i] = zero
                        for i in range(ntr * Dvw, ncr * Dvw):
                            vacc[vacc_off + i] = zero
                    acc_kv = True
                    # dQ += dS (K*scale). The micro-kernel writes whole blocks of ROWS rows; rows past
                    # nr get dS = 0 (zeroed here), so adding them is a no-op -- as long as
                    # they are this head's rows, which only this task touches. A tile whose
                    # padding would reach the next head goes through dqt instead.
                    for i in range(nr * ntw, nrp * ntw):
                        sbuf[i] = zero
                    if i0 + nrp <= N and direct_dq:
                        gemm(sbuf, 0, ntw, 1, kps, 0, Dw, dqc, rb * Dw, Dw, nrp, Dw, nt, True, W)
                    else:
                        gemm(sbuf, 0, ntw, 1, kps, 0, Dw, dqt, 0, Dw, nrp, Dw, nt, False, W)
                        for i in range(nr * Dw):
                            dqc[rb * Dw + i] += dqt[i]
            if direct_kv:
                if not acc_kv:  # no row attends this block
                    for i in range(nc * D):
                        dkflat[kv0 * D + i] = zero
                    for i in range(nc * Dv):
                        dvflat[kv0 * Dv + i] = zero
            else:
                for c in range(nc):
                    for dd in range(D):
                        dk[kvh, c0 + c, dd] = dka[c * Dw + dd] if acc_kv else zero
                    for e in range(Dv):
                        dv[kvh, c0 + c, e] = dva[c * Dvw + e] if acc_kv else zero
