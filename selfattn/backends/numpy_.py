"""The NumPy backend: the readable, memory-bounded baseline.

Every feature of the public API, forward and VJP, for float16 (computed in
float32), float32 and float64. Work proceeds in blocks of query rows (and, for
short sequences, of batch entries) so temporary memory stays near
``block_bytes`` (32 MiB by default) whatever N and M are, unless the caller
asks for the full weights. Within a block all query heads run as one batched
matmul: a block of query rows is laid out ``(B, Hkv, G*rows, D)`` so grouped-query
heads share their key/value head without copying K or V.

Keys that causal/window masking excludes for a whole row block are sliced away
before the matmul, so banded calls also do less work here.
"""

from __future__ import annotations

import numpy as np

from .._capabilities import Capabilities
from .._dropout import keep_mask
from ._base import Backend

__all__ = ["NumpyBackend", "backend"]


class NumpyBackend(Backend):
    """Blocked exact attention in NumPy (see the module docstring)."""

    name = "numpy"
    priority = 100
    capabilities = Capabilities(array_type="numpy")

    def __init__(self, block_bytes: int = 32 * 2**20):
        self.block_bytes = int(block_bytes)
        self.version = np.__version__

    def info(self):
        return {"numpy": np.__version__}

    # -- tiling ----------------------------------------------------------
    def _blocks(self, pb, budget_bytes):
        """Yield ``(b0, b1, i0, i1)`` blocks whose score tile stays within ``budget_bytes``."""
        B, Hq, N, M = pb.batch, pb.q_heads, pb.n, pb.m
        if B == 0 or Hq == 0 or N == 0:
            return
        per_row = Hq * max(M, 1) * pb.compute_dtype.itemsize
        rows = max(1, min(N, budget_bytes // per_row))
        if pb.lower is not None or pb.upper is not None:
            # Smaller row blocks let the banded key range shrink with them.
            rows = min(rows, 256)
        bb = max(1, min(B, budget_bytes // (per_row * N))) if rows == N else 1
        for b0 in range(0, B, bb):
            for i0 in range(0, N, rows):
                yield b0, min(B, b0 + bb), i0, min(N, i0 + rows)

    def _scores(self, pb, b0, b1, i0, i1, j0, j1, buf=None):
        """Scaled, masked scores for one block.

        Returns ``(s, qs, kb)``: ``s`` ``(bb, Hkv, G*rows, cols)`` in the compute
        dtype with excluded entries at ``-inf``; ``qs`` the scaled query block
        laid out like ``s``; ``kb`` the key slice in the compute dtype.
        ``buf``, a flat compute-dtype array, receives the scores when given: reusing
        one buffer across blocks avoids re-faulting tens of MiB of fresh pages per block.
        """
        cdt = pb.compute_dtype
        bb, Hq, Hkv, G = b1 - b0, pb.q_heads, pb.kv_heads, pb.group
        rows, cols = i1 - i0, j1 - j0
        # Scaling q (rows x D) is cheaper than scaling the scores (rows x cols).
        qs = pb.query[b0:b1, :, i0:i1].astype(cdt) * cdt.type(pb.scale)
        qs = qs.reshape(bb, Hkv, G * rows, pb.d)
        kb = pb.key[b0:b1, :, j0:j1].astype(cdt, copy=False)
        shape = (bb, Hkv, G * rows, cols)
        out = None if buf is None else buf[: bb * Hkv * G * rows * cols].reshape(shape)
        s = np.matmul(qs, kb.swapaxes(-1, -2), out=out)
        s4 = s.reshape(bb, Hq, rows, cols)
        allowed = pb.band(i0, i1, j0, j1)
        if pb.mask is not None:
            mblk = pb.mask_block(b0, b1, i0, i1, j0, j1)
            if mblk.dtype == bool:
                allowed = mblk if allowed is None else (mblk & allowed)
            else:
                s4 += mblk.astype(cdt, copy=False)
        if allowed is not None:
            np.copyto(s4, -np.inf, where=~allowed)
        return s, qs, kb

    def _keep(self, pb, b0, b1, i0, i1, j0, j1):
        """Dropout keep-mask for the block, shaped like ``_scores``' ``s``."""
        Hq = pb.q_heads
        keep = keep_mask(pb.dropout_seed, np.arange(b0 * Hq, b1 * Hq), np.arange(i0, i1), np.arange(j0, j1), pb.dropout_p)
        return keep.reshape(b1 - b0, pb.kv_heads, pb.group * (i1 - i0), j1 - j0)

    @staticmethod
    def _shift_free(pb) -> bool:
        """True when exp(scores) can be taken without subtracting the row maximum.

        By Cauchy-Schwarz every score obeys ``|s_ij| <= scale·|q_i|·max_j |k_j|``.
        When that bound is small (60 in float32, 600 in float64) and no additive mask
        can raise a score, ``exp(s)`` neither overflows nor underflows, so the usual
        max pass and subtraction (two of the few passes over the N x M block) can be
        skipped with no loss of accuracy. NaN or inf inputs fail the test and take
        the safe path.
        """
        if pb.mask is not None and pb.mask.dtype != bool:
            return False
        if pb.n == 0 or pb.m == 0:
            return True
        cdt = pb.compute_dtype
        def max_norm(x):  # largest row norm, in the compute dtype
            x = x.astype(cdt, copy=False)
            return float(np.sqrt(np.max(np.einsum("bhnd,bhnd->bhn", x, x))))

        bound = pb.scale * max_norm(pb.query) * max_norm(pb.key)
        return bound <= (60.0 if cdt == np.float32 else 600.0)  # False for NaN

    # -- forward ---------------------------------------------------------
    def forward(self, pb):
        B, Hq, Hkv, G, N, M, Dv = pb.batch, pb.q_heads, pb.kv_heads, pb.group, pb.n, pb.m, pb.dv
        cdt = pb.compute_dtype
        out = np.zeros((B, Hq, N, Dv), dtype=pb.dtype)
        lse = np.full((B, Hq, N), -np.inf, dtype=pb.lse_dtype) if pb.want_lse else None
        weights = np.zeros((B, Hq, N, M), dtype=pb.dtype) if pb.return_weights else None
        blocks = list(self._blocks(pb, self.block_bytes))
        if not blocks:
            return out, lse, weights
        buf = np.empty(max((b1 - b0) * Hq * (i1 - i0) * M for b0, b1, i0, i1 in blocks), dtype=cdt)
        no_shift = self._shift_free(pb)
        # Without dropout, a column of ones appended to V makes the PV matmul also
        # return each row's sum of exponentials, saving a pass over the scores.
        ones_col = pb.dropout_p == 0.0
        value = pb.value.astype(cdt, copy=False)
        if ones_col:
            value = np.concatenate([value, np.ones(value.shape[:-1] + (1,), dtype=cdt)], axis=-1)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for b0, b1, i0, i1 in blocks:
                j0, j1 = pb.key_range(i0, i1)
                if j1 <= j0:
                    continue  # nothing to attend: out 0, lse -inf, weights 0 (as initialised)
                bb, rows = b1 - b0, i1 - i0
                s, _, _ = self._scores(pb, b0, b1, i0, i1, j0, j1, buf)
                vb = value[b0:b1, :, j0:j1]
                if no_shift:
                    mx = cdt.type(0)
                else:
                    mx = s.max(axis=-1, keepdims=True)
                    # Fully masked rows have max -inf; shifting by 0 keeps exp() at 0
                    # instead of NaN. A NaN max stays NaN and propagates, as it should.
                    mx = np.where(mx == -np.inf, cdt.type(0), mx)
                    s -= mx
                np.exp(s, out=s)
                if ones_col:
                    o = np.matmul(s, vb)
                    o, total = o[..., :Dv], o[..., Dv:]
                else:
                    total = s.sum(axis=-1, keepdims=True)
                if lse is not None:
                    lse[b0:b1, :, i0:i1] = (mx + np.log(total)).reshape(bb, Hq, rows)
                # Rows with nothing to attend have total 0: their output is 0, not NaN.
                inv = np.where(total == 0, cdt.type(0), 1.0 / total)
                if weights is not None:
                    weights[b0:b1, :, i0:i1, j0:j1] = (s * inv).reshape(bb, Hq, rows, j1 - j0)
                if not ones_col:
                    s *= self._keep(pb, b0, b1, i0, i1, j0, j1)
                    inv = inv * cdt.type(1.0 / (1.0 - pb.dropout_p))
                    o = np.matmul(s, vb)
                # Normalise the (rows x Dv) output rather than the (rows x cols) weights.
                out[b0:b1, :, i0:i1] = (o * inv).reshape(bb, Hq, rows, Dv)
        return out, lse, weights

    # -- backward --------------------------------------------------------
    def backward(self, pb, out, lse, grad_out):
        B, Hq, Hkv, G, N, M, D, Dv = pb.batch, pb.q_heads, pb.kv_heads, pb.group, pb.n, pb.m, pb.d, pb.dv
        cdt = pb.compute_dtype
        dq = np.zeros((B, Hq, N, D), dtype=cdt)
        dk = np.zeros((B, Hkv, M, D), dtype=cdt)
        dv = np.zeros((B, Hkv, M, Dv), dtype=cdt)
        # delta_i = sum_d dO_id * O_id equals sum_j P_ij dP_ij (dropout included),
        # which is what lets the backward pass skip storing P.
        delta = np.einsum("bhnd,bhnd->bhn", grad_out.astype(cdt), out.astype(cdt))
        # exp(s - (+inf)) = 0 gives fully masked rows zero probabilities (not NaN).
        lse_safe = np.where(lse == -np.inf, np.inf, lse).astype(cdt)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # The backward keeps ~3 score-sized temporaries alive; budget for that.
            for b0, b1, i0, i1 in self._blocks(pb, max(self.block_bytes // 3, 1)):
                j0, j1 = pb.key_range(i0, i1)
                if j1 <= j0:
                    continue
                bb, rows = b1 - b0, i1 - i0
                s, qs, kb = self._scores(pb, b0, b1, i0, i1, j0, j1)
                vb = pb.value[b0:b1, :, j0:j1].astype(cdt, copy=False)
                shape_rows = (bb, Hkv, G * rows, 1)
                s -= lse_safe[b0:b1, :, i0:i1].reshape(shape_rows)
                p = np.exp(s, out=s)
                do = grad_out[b0:b1, :, i0:i1].astype(cdt).reshape(bb, Hkv, G * rows, Dv)
                dp = np.matmul(do, vb.swapaxes(-1, -2))
                if pb.dropout_p > 0.0:
                    z = self._keep(pb, b0, b1, i0, i1, j0, j1) * cdt.type(1.0 / (1.0 - pb.dropout_p))
                    dv[b0:b1, :, j0:j1] += np.matmul((p * z).swapaxes(-1, -2), do)
                    dp *= z
                else:
                    dv[b0:b1, :, j0:j1] += np.matmul(p.swapaxes(-1, -2), do)
                dp -= delta[b0:b1, :, i0:i1].reshape(shape_rows)
                ds = np.multiply(p, dp, out=dp)
                dq[b0:b1, :, i0:i1] = (np.matmul(ds, kb) * cdt.type(pb.scale)).reshape(bb, Hq, rows, D)
                # qs already carries the scale, so dsᵀ·qs is dK directly; summing the
                # G*rows axis also sums over the query heads sharing this kv head.
                dk[b0:b1, :, j0:j1] += np.matmul(ds.swapaxes(-1, -2), qs)
        return dq.astype(pb.dtype, copy=False), dk.astype(pb.dtype, copy=False), dv.astype(pb.dtype, copy=False)


#: The instance the dispatcher registers.
backend = NumpyBackend()
