"""Blockwise exact attention for any NumPy-like array module (``xp``): the NumPy and CuPy backends.

One implementation of the algorithm both array backends run: work proceeds
in blocks of query rows (and, for short sequences, of batch entries), each
block's scores ``(bb, Hkv, G*rows, cols)`` are computed with one batched
matmul per block (grouped-query heads share their key/value head without
copying K or V), masked, soft-maxed and multiplied by V; the backward
recomputes the probabilities from the forward's log-sum-exp
(FlashAttention-2 style), so temporaries stay near ``block_bytes`` whatever
N and M are, unless the caller asks for the full weights. Keys that the
causal/window band excludes for a whole row block are sliced away before the
matmul.

What differs between array modules is passed in, not branched on:

* ``xp``: ``numpy`` or ``cupy``;
* ``dropout``: a callable ``(problem, b0, b1, i0, i1, j0, j1) -> z`` giving the
  dropout multipliers (0 or ``1/(1-p)``) of a block in the compute dtype,
  shaped ``(bb, Hq, rows, cols)`` (NumPy hashes on the host, CuPy launches a
  kernel);
* the NumPy backend's CPU-specific shortcuts, as options: ``shift_free``
  (skip the row-max pass when a Cauchy-Schwarz bound proves ``exp`` safe) and
  ``ones_column`` (append a column of ones to V so the ``P·V`` product also
  returns the row sums), plus ``reuse_buffer`` (one score buffer for all
  blocks: fresh pages cost more than the arithmetic on a CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._problem import Array, Problem

__all__ = [
    "row_block",
    "blocks",
    "scores",
    "forward",
    "backward",
    "forward_varlen",
    "backward_varlen",
    "shift_free",
    "DropoutFn",
    "BANDED_ROWS",
    "GEMM_ROWS",
]

#: Largest row block for banded (causal/window) calls: smaller blocks let the
#: key range that the band leaves shrink with them.
BANDED_ROWS = 256

#: With a cache target, blocks keep at least this many query rows (see :func:`row_block`).
GEMM_ROWS = 256

DropoutFn = Callable[[Problem, int, int, int, int, int, int], Array]


def row_block(
    batch: int,
    q_heads: int,
    n: int,
    m: int,
    itemsize: int,
    budget_bytes: int,
    banded: bool,
    cache_bytes: int | None = None,
    min_rows: int = GEMM_ROWS,
) -> tuple[int, int]:
    """``(batches_per_block, rows_per_block)``: the one row-block rule of the blockwise paths.

    One score tile ``(bb, Hq, rows, M)`` stays within ``budget_bytes`` (at least
    one row of one batch entry); banded calls use at most :data:`BANDED_ROWS`
    rows; whole sequences of several batch entries share a block when they fit.

    ``cache_bytes`` (CPU): aim for tiles of about that size, so the exp and the
    reductions between the two products run from cache, but never fewer than
    ``min_rows`` query rows (or N) while ``budget_bytes`` allows -- thinner
    blocks make the products inefficient. Measured on a 2-core x86 VM with
    ``cache_bytes`` = 2 MiB against a flat 32 MiB budget: 5x faster at
    (8, 8, 128, 128, 32), 1.3-1.5x at N = M = 1024-2048, unchanged from 4096 up.
    """
    per_row = max(1, int(q_heads) * max(int(m), 1) * int(itemsize))
    target = int(budget_bytes) if cache_bytes is None else min(int(budget_bytes), int(cache_bytes))
    rows = target // per_row
    if cache_bytes is not None:
        rows = max(rows, min(int(n), int(min_rows)))
    rows = max(1, min(int(n), rows, int(budget_bytes) // per_row)) if n else 1
    if banded:
        rows = min(rows, BANDED_ROWS)
    bb = max(1, min(int(batch), target // (per_row * max(int(n), 1)))) if rows >= n else 1
    return bb, rows


def blocks(pb: Problem, budget_bytes: int, cache_bytes: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(b0, b1, i0, i1)`` blocks whose score tile stays within ``budget_bytes`` (see :func:`row_block`)."""
    B, N = pb.batch, pb.n
    if B == 0 or pb.q_heads == 0 or N == 0:
        return
    bb, rows = row_block(
        B,
        pb.q_heads,
        N,
        pb.m,
        pb.compute_dtype.itemsize,
        budget_bytes,
        pb.lower is not None or pb.upper is not None,
        cache_bytes,
    )
    for b0 in range(0, B, bb):
        for i0 in range(0, N, rows):
            yield b0, min(B, b0 + bb), i0, min(N, i0 + rows)


def scores(
    pb: Problem, xp: Any, b0: int, b1: int, i0: int, i1: int, j0: int, j1: int, out: Array | None = None
) -> tuple[Array, Array, Array, Array | None]:
    """Scaled, soft-capped, biased and masked scores of one block.

    Returns ``(s, qs, kb, tcap)``: ``s`` ``(bb, Hkv, G*rows, cols)`` in the
    compute dtype with excluded entries at ``-inf``; ``qs`` the scaled query
    block laid out like ``s``; ``kb`` the key slice in the compute dtype;
    ``tcap`` ``tanh(s_scaled / softcap)`` (shaped like ``s``, for the
    backward's ``1 - tanh²`` factor) or None without soft-capping. ``out``, a
    compute-dtype array of ``s``'s shape, receives the scores when given.
    """
    cdt = pb.compute_dtype
    bb, Hq, Hkv, G = b1 - b0, pb.q_heads, pb.kv_heads, pb.group
    rows, cols = i1 - i0, j1 - j0
    # Scaling q (rows x D) is cheaper than scaling the scores (rows x cols).
    qs = pb.query[b0:b1, :, i0:i1].astype(cdt) * cdt.type(pb.scale)
    qs = qs.reshape(bb, Hkv, G * rows, pb.d)
    kb = pb.key[b0:b1, :, j0:j1].astype(cdt, copy=False)
    s = xp.matmul(qs, kb.swapaxes(-1, -2), out=out)
    s4 = s.reshape(bb, Hq, rows, cols)
    tcap = None
    if pb.softcap is not None:
        cap = cdt.type(pb.softcap)
        tcap = xp.tanh(s * cdt.type(1.0 / pb.softcap))
        xp.multiply(tcap, cap, out=s)
    if pb.alibi is not None:
        dist = xp.abs(pb.distance(i0, i1, j0, j1, xp)).astype(cdt)
        slopes = pb.alibi[b0:b1].astype(cdt, copy=False)
        s4 -= slopes[:, :, None, None] * dist
    allowed = pb.band(i0, i1, j0, j1, xp)
    if pb.mask is not None:
        mblk = pb.mask_block(b0, b1, i0, i1, j0, j1, xp)
        if mblk.dtype == np.bool_:
            allowed = mblk if allowed is None else (mblk & allowed)
        else:
            s4 += mblk.astype(cdt, copy=False)
    if allowed is not None:
        xp.copyto(s4, cdt.type(-np.inf), where=xp.broadcast_to(~allowed, s4.shape))
    return s, qs, kb, tcap


def shift_free(pb: Problem, xp: Any) -> bool:
    """True when ``exp(scores)`` can be taken without subtracting the row maximum.

    By Cauchy-Schwarz every score obeys ``|s_ij| <= scale·|q_i|·max_j |k_j|``
    (and ``<= softcap`` with soft-capping). When that bound is small (60 in
    float32, 600 in float64) and no additive mask or ALiBi bias can move a
    score, ``exp(s)`` neither overflows nor underflows, so the max pass and
    subtraction (two of the few passes over the block) can be skipped with no
    loss of accuracy. NaN or inf inputs fail the test and take the safe path.
    """
    if (pb.mask is not None and pb.mask.dtype != np.bool_) or pb.alibi is not None:
        return False
    if pb.n == 0 or pb.m == 0:
        return True
    cdt = pb.compute_dtype
    limit = 60.0 if cdt == np.float32 else 600.0
    if pb.softcap is not None and pb.softcap <= limit:
        return True

    def max_norm(x: Array) -> float:  # largest row norm, in the compute dtype
        x = x.astype(cdt, copy=False)
        return float(xp.sqrt(xp.max(xp.einsum("bhnd,bhnd->bhn", x, x))))

    bound = pb.scale * max_norm(pb.query) * max_norm(pb.key)
    return bool(bound <= limit)  # False for NaN


def forward(
    pb: Problem,
    xp: Any,
    *,
    block_bytes: int,
    dropout: DropoutFn,
    cache_bytes: int | None = None,
    shift_free_ok: bool = False,
    ones_column: bool = False,
    reuse_buffer: bool = False,
) -> tuple[Array, Array | None, Array | None]:
    """``(out, lse, weights)`` of the backend contract (see :mod:`selfattn.backends._base`).

    Outputs are allocated before any work, so a result that cannot be
    allocated fails at once. Rows with nothing to attend get output 0, lse
    ``-inf`` and weights 0. ``shift_free_ok`` and ``ones_column`` enable the
    CPU shortcuts described in the module docstring; ``cache_bytes`` is
    :func:`row_block`'s cache target.
    """
    B, Hq, Hkv, G, N, M, Dv = pb.batch, pb.q_heads, pb.kv_heads, pb.group, pb.n, pb.m, pb.dv
    cdt = pb.compute_dtype
    out = xp.zeros((B, Hq, N, Dv), dtype=pb.dtype)
    lse = xp.full((B, Hq, N), -np.inf, dtype=pb.lse_dtype) if pb.want_lse else None
    weights = xp.zeros((B, Hq, N, M), dtype=pb.dtype) if pb.return_weights else None
    todo = list(blocks(pb, block_bytes, cache_bytes))
    if not todo:
        return out, lse, weights
    buf = None
    if reuse_buffer:
        buf = xp.empty(max((b1 - b0) * Hq * (i1 - i0) * M for b0, b1, i0, i1 in todo), dtype=cdt)
    no_shift = shift_free_ok and shift_free(pb, xp)
    drop = pb.dropout_p > 0.0
    # Without dropout, a column of ones appended to V makes the PV matmul also
    # return each row's sum of exponentials, saving a pass over the scores.
    ones_col = ones_column and not drop
    value = pb.value.astype(cdt, copy=False)
    if ones_col:
        value = xp.concatenate([value, xp.ones(value.shape[:-1] + (1,), dtype=cdt)], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for b0, b1, i0, i1 in todo:
            j0, j1 = pb.key_range(i0, i1)
            if j1 <= j0:
                continue  # nothing to attend: out 0, lse -inf, weights 0 (as initialised)
            bb, rows, cols = b1 - b0, i1 - i0, j1 - j0
            sbuf = None if buf is None else buf[: bb * Hq * rows * cols].reshape(bb, Hkv, G * rows, cols)
            s, _, _, _ = scores(pb, xp, b0, b1, i0, i1, j0, j1, sbuf)
            vb = value[b0:b1, :, j0:j1]
            if no_shift:
                mx = cdt.type(0)
            else:
                mx = s.max(axis=-1, keepdims=True)
                # Fully masked rows have max -inf; shifting by 0 keeps exp() at 0
                # instead of NaN. A NaN max stays NaN and propagates, as it should.
                mx = xp.where(mx == -np.inf, cdt.type(0), mx)
                s -= mx
            xp.exp(s, out=s)
            if ones_col:
                o = xp.matmul(s, vb)
                o, total = o[..., :Dv], o[..., Dv:]
            else:
                total = s.sum(axis=-1, keepdims=True)
            if lse is not None:
                lse[b0:b1, :, i0:i1] = (mx + xp.log(total)).reshape(bb, Hq, rows)
            # Rows with nothing to attend have total 0: their output is 0, not NaN.
            inv = xp.where(total == 0, cdt.type(0), 1.0 / total).astype(cdt, copy=False)
            if weights is not None:
                weights[b0:b1, :, i0:i1, j0:j1] = (s * inv).reshape(bb, Hq, rows, cols)
            if not ones_col:
                if drop:
                    s *= dropout(pb, b0, b1, i0, i1, j0, j1).reshape(s.shape)
                o = xp.matmul(s, vb)
            # Normalise the (rows x Dv) output rather than the (rows x cols) weights.
            out[b0:b1, :, i0:i1] = (o * inv).reshape(bb, Hq, rows, Dv)
    return out, lse, weights


def backward(
    pb: Problem,
    xp: Any,
    out: Array,
    lse: Array,
    grad_out: Array,
    *,
    block_bytes: int,
    dropout: DropoutFn,
    cache_bytes: int | None = None,
) -> tuple[Array, Array, Array]:
    """``(dq, dk, dv)`` of the backend contract, recomputing probabilities block by block.

    ``delta_i = sum_d dO_id O_id`` equals ``sum_j P_ij dP_ij`` (dropout
    included), which is what lets the backward skip storing P. dK/dV of
    grouped-query heads are summed over the ``G*rows`` axis of each block.
    The backward keeps about three score-sized temporaries alive, so it uses a
    third of ``block_bytes`` (and of ``cache_bytes``) per block.
    """
    B, Hq, Hkv, G, N, M, D, Dv = pb.batch, pb.q_heads, pb.kv_heads, pb.group, pb.n, pb.m, pb.d, pb.dv
    cdt = pb.compute_dtype
    dq = xp.zeros((B, Hq, N, D), dtype=cdt)
    dk = xp.zeros((B, Hkv, M, D), dtype=cdt)
    dv = xp.zeros((B, Hkv, M, Dv), dtype=cdt)
    delta = (grad_out.astype(cdt) * out.astype(cdt)).sum(axis=-1)
    # exp(s - (+inf)) = 0 gives fully masked rows zero probabilities (not NaN).
    lse_safe = xp.where(lse == -np.inf, np.inf, lse).astype(cdt)
    scale = cdt.type(pb.scale)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cache = None if cache_bytes is None else max(cache_bytes // 3, 1)
        for b0, b1, i0, i1 in blocks(pb, max(block_bytes // 3, 1), cache):
            j0, j1 = pb.key_range(i0, i1)
            if j1 <= j0:
                continue
            bb, rows = b1 - b0, i1 - i0
            s, qs, kb, tcap = scores(pb, xp, b0, b1, i0, i1, j0, j1)
            vb = pb.value[b0:b1, :, j0:j1].astype(cdt, copy=False)
            shape_rows = (bb, Hkv, G * rows, 1)
            s -= lse_safe[b0:b1, :, i0:i1].reshape(shape_rows)
            p = xp.exp(s, out=s)
            do = grad_out[b0:b1, :, i0:i1].astype(cdt).reshape(bb, Hkv, G * rows, Dv)
            dp = xp.matmul(do, vb.swapaxes(-1, -2))
            if pb.dropout_p > 0.0:
                z = dropout(pb, b0, b1, i0, i1, j0, j1).reshape(p.shape)
                dv[b0:b1, :, j0:j1] += xp.matmul((p * z).swapaxes(-1, -2), do)
                dp *= z
            else:
                dv[b0:b1, :, j0:j1] += xp.matmul(p.swapaxes(-1, -2), do)
            dp -= delta[b0:b1, :, i0:i1].reshape(shape_rows)
            ds = xp.multiply(p, dp, out=dp)
            if tcap is not None:
                # d(softcap·tanh(s/softcap))/ds = 1 - tanh²
                ds *= 1 - tcap * tcap
            dq[b0:b1, :, i0:i1] = (xp.matmul(ds, kb) * scale).reshape(bb, Hq, rows, D)
            # qs already carries the scale, so dsᵀ·qs is dK directly; summing the
            # G*rows axis also sums over the query heads sharing this kv head.
            dk[b0:b1, :, j0:j1] += xp.matmul(ds.swapaxes(-1, -2), qs)
    return dq.astype(pb.dtype, copy=False), dk.astype(pb.dtype, copy=False), dv.astype(pb.dtype, copy=False)


def forward_varlen(pb: Problem, xp: Any, **options: Any) -> tuple[Array, Array | None, Array | None]:
    """:func:`forward` of a packed variable-length problem, one sequence at a time (outputs allocated first).

    Work and memory follow each sequence's ``Nₛ·Mₛ``, never ``S·max N·max M``.
    ``options`` are :func:`forward`'s.
    """
    assert pb.cu_seqlens_q is not None and pb.cu_seqlens_k is not None
    out = xp.zeros((1, pb.q_heads, pb.n, pb.dv), dtype=pb.dtype)
    lse = xp.full((1, pb.q_heads, pb.n), -np.inf, dtype=pb.lse_dtype) if pb.want_lse else None
    cq = pb.cu_seqlens_q
    for s in range(pb.num_sequences):
        q0, q1 = int(cq[s]), int(cq[s + 1])
        if q1 == q0:
            continue
        o, ls, _ = forward(pb.sequence(s), xp, **options)
        out[:, :, q0:q1] = o
        if lse is not None and ls is not None:
            lse[:, :, q0:q1] = ls
    return out, lse, None


def backward_varlen(
    pb: Problem, xp: Any, out: Array, lse: Array, grad_out: Array, **options: Any
) -> tuple[Array, Array, Array]:
    """:func:`backward` of a packed variable-length problem, one sequence at a time."""
    assert pb.cu_seqlens_q is not None and pb.cu_seqlens_k is not None
    dq = xp.zeros(pb.query.shape, dtype=pb.dtype)
    dk = xp.zeros(pb.key.shape, dtype=pb.dtype)
    dv = xp.zeros(pb.value.shape, dtype=pb.dtype)
    cq, ck = pb.cu_seqlens_q, pb.cu_seqlens_k
    for s in range(pb.num_sequences):
        q0, q1, k0, k1 = int(cq[s]), int(cq[s + 1]), int(ck[s]), int(ck[s + 1])
        if q1 == q0 or k1 == k0:
            continue
        g = backward(pb.sequence(s), xp, out[:, :, q0:q1], lse[:, :, q0:q1], grad_out[:, :, q0:q1], **options)
        dq[:, :, q0:q1], dk[:, :, k0:k1], dv[:, :, k0:k1] = g
    return dq, dk, dv
