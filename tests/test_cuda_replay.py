"""The CuPy backend's algorithms replayed on the CPU with NumPy.

``emulate_fused`` recomputes what the CUDA-core forward kernel does, tile by
tile, reading its inputs only through the packed kernel arguments (so strides,
mask broadcasting, the band and the dropout hash are the kernel's). The
blockwise (cuBLAS) forward-with-weights and backward run the backend's own code
with NumPy standing in for CuPy. Both must match the NumPy backend. (The
kernels themselves run on the CPU in ``test_cuda_emulation.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest
from _cuda_cases import BLOCK_CASES, EMU_CASES, FEATURE_CASES, case_id, make_inputs, pack_for

from selfattn._dropout import keep_mask
from selfattn._problem import normalize
from selfattn.backends import numpy_
from selfattn.backends._cuda import launch
from selfattn.backends.cupy_ import CupyBackend

# -- NumPy emulation of the fused kernel, driven by the packed arguments ----


def _memory(x):
    """The memory an array views, as a flat array indexed by element offsets (what the kernel sees)."""
    assert all(st >= 0 for st in x.strides)
    span = 1 + sum((n - 1) * st // x.itemsize for n, st in zip(x.shape, x.strides, strict=True)) if x.size else 0
    return np.lib.stride_tricks.as_strided(x, shape=(span,), strides=(x.itemsize,))


def emulate_fused(pb):
    """What attn_fwd_* computes, tile by tile, reading inputs only through the packed arguments."""
    args = dict(zip((n for n, _ in launch.FWD_SIGNATURE), pack_for(pb), strict=True))
    A = np.float64 if pb.dtype == np.float64 else np.float32
    BN = min(32, 32768 // (2 * launch.pick_dmax(pb.d, pb.dv) * np.dtype(A).itemsize))
    Hq, G, N, M, D, Dv = (int(args[x]) for x in ("Hq", "G", "N", "M", "D", "Dv"))
    mem = {a: _memory(x) for a, x in (("q", pb.query), ("k", pb.key), ("v", pb.value))}
    st = {a: [int(args[f"{a}s{i}"]) for i in range(4)] for a in "qkvm"}
    B = pb.batch
    out = np.zeros((B, Hq, N, Dv), A)
    lse = np.zeros((B, Hq, N), A)
    off = int(args["offset"])
    cap = float(args["softcap"])
    slopes = args["alibi"] if args["use_alibi"] else None
    bidx = args["batch_index"] if args["use_batch_index"] else np.arange(B)
    h0, htot, r0, c0 = (int(args[x]) for x in ("head_start", "total_heads", "row_start", "col_start"))
    seed = (int(args["seed_hi"]) << 32) | int(args["seed_lo"])
    mflat = None if pb.mask is None else _memory(pb.mask)
    has_lower, lower = args["has_lower"], int(args["lower"])
    has_upper, upper = args["has_upper"], int(args["upper"])

    def row(a, b, h, i, n):  # row i of head h of batch b of q/k/v, read through the element strides
        s0, s1, s2, s3 = st[a]
        return np.array([mem[a][b * s0 + h * s1 + i * s2 + c * s3] for c in range(n)], A)

    def mask_term(b, h, i, j):
        mv = mflat[int(pb.mask_index[b]) * st["m"][0] + h * st["m"][1] + i * st["m"][2] + j * st["m"][3]]
        if args["mask_kind"] == 1:
            return A(0) if mv else A(-np.inf)
        return A(mv)

    for bh in range(B * Hq):
        b, h = divmod(bh, Hq)
        hk = h // G
        for i0 in range(0, N, launch.BM):
            i1 = min(N, i0 + launch.BM)
            j0 = max(0, i0 + off - lower) if has_lower else 0
            j1 = min(M, i1 - 1 + off + upper + 1) if has_upper else M
            j1 = max(j0, j1)
            for i in range(i0, i1):
                qr = row("q", b, h, i, D) * A(args["scale"])
                acc = np.zeros(Dv, A)
                m_run, l_run, nan = A(-np.inf), A(0), False
                for jt in range(j0, j1, BN):
                    js = [j for j in range(jt, jt + BN) if j < j1]
                    s = []
                    for j in js:
                        x = A(np.dot(qr, row("k", b, hk, j, D)))
                        if cap > 0:
                            x = A(A(cap) * np.tanh(x * A(1.0 / cap)))
                        rel = j - (i + off)
                        if slopes is not None:
                            x = A(x - slopes[b, h] * A(abs(rel)))
                        if args["mask_kind"]:
                            x = x + mask_term(b, h, i, j)
                        if (has_lower and rel < -lower) or (has_upper and rel > upper):
                            x = A(-np.inf)
                        nan |= bool(np.isnan(x))
                        s.append(x)
                    s = np.array(s, A)
                    m_new = max(m_run, np.max(s[~np.isnan(s)], initial=-np.inf))
                    if m_new == -np.inf:
                        continue
                    with np.errstate(invalid="ignore"):
                        corr = np.exp(A(m_run - m_new))
                        l_run *= corr
                        acc *= corr
                        for x, j in zip(s, js, strict=True):
                            p = np.exp(A(x - m_new))
                            l_run += p
                            if args["use_dropout"]:
                                ctr = int(bidx[b]) * htot + h0 + h
                                keep = keep_mask(
                                    seed, np.array([ctr]), np.array([r0 + i]), np.array([c0 + j]), pb.dropout_p
                                )
                                p = p * A(args["drop_scale"]) if keep[0, 0, 0] else A(0)
                            acc += p * row("v", b, hk, j, Dv)
                    m_run = m_new
                if nan:
                    out[b, h, i], lse[b, h, i] = np.nan, np.nan
                elif l_run > 0:
                    out[b, h, i], lse[b, h, i] = acc / l_run, m_run + np.log(l_run)
                else:
                    out[b, h, i], lse[b, h, i] = 0, -np.inf
    return out.astype(pb.dtype), lse


@pytest.mark.parametrize("case", EMU_CASES + FEATURE_CASES, ids=case_id)
def test_fused_kernel_emulation_matches_numpy(case):
    q, k, v, kw = make_inputs(case, contiguous=len(case) % 2 == 0)
    pb = normalize(q, k, v, return_lse=True, **kw)
    out, lse, _ = numpy_.backend.forward(pb)
    eo, el = emulate_fused(pb)
    np.testing.assert_allclose(eo, out, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(el, lse, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "case",
    [
        dict(causal=True, dropout_p=0.4, dropout_seed=3, alibi="per_batch"),
        dict(window=(4, 6), softcap=5.0, mask="float_full"),
    ],
    ids=case_id,
)
def test_fused_kernel_emulation_of_a_chunk(case):
    """A chunk (rows, keys, heads, batches of a larger call) replayed from its packed arguments: band
    offset and dropout counters are the whole call's, so it equals the NumPy backend on the same chunk."""
    q, k, v, kw = make_inputs(case, shape=(3, 4, 2, 50, 45, 6, 5))
    pb = normalize(q, k, v, return_lse=True, **kw).chunk(batches=(1, 3), heads=(2, 4), rows=(7, 40), keys=(9, 30))
    assert pb.is_chunk and pb.offset != pb.m - pb.n
    out, lse, _ = numpy_.backend.forward(pb)
    eo, el = emulate_fused(pb)
    np.testing.assert_allclose(eo, out, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(el, lse, rtol=2e-5, atol=2e-6)


def test_fused_kernel_emulation_fully_masked_and_nan():
    q, k, v, _ = make_inputs({}, shape=(1, 1, 1, 6, 5, 4, 3))
    mask = np.ones((6, 5), bool)
    mask[1] = False
    q[0, 0, 3, 0] = np.nan
    pb = normalize(q[0, 0], k[0, 0], v[0, 0], mask=mask, return_lse=True)
    with np.errstate(invalid="ignore"):
        out, lse, _ = numpy_.backend.forward(pb)
    eo, el = emulate_fused(pb)
    np.testing.assert_array_equal(eo[0, 0, 1], 0)
    assert el[0, 0, 1] == -np.inf
    assert np.isnan(eo[0, 0, 3]).all() and np.isnan(el[0, 0, 3])
    np.testing.assert_allclose(eo, out, rtol=2e-5, atol=2e-6)


# -- the blockwise (cuBLAS) paths, with NumPy standing in for CuPy ------------


class NumpyDropoutCupyBackend(CupyBackend):
    """The CuPy backend's blockwise code with the dropout multipliers made by the core's NumPy hash."""

    def _dropout_z(self, xp, pb, b0, b1, i0, i1, j0, j1):
        keep = keep_mask(
            pb.dropout_seed,
            np.arange(b0 * pb.q_heads, b1 * pb.q_heads),
            np.arange(i0, i1),
            np.arange(j0, j1),
            pb.dropout_p,
        )
        z = keep * pb.compute_dtype.type(1.0 / (1.0 - pb.dropout_p))
        return z.reshape(b1 - b0, pb.kv_heads, pb.group * (i1 - i0), j1 - j0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=case_id)
def test_blockwise_paths_match_numpy(case, dtype):
    be = NumpyDropoutCupyBackend(block_bytes=4096)
    q, k, v, kw = make_inputs(case, dtype=dtype, contiguous=len(case) % 2 == 1)
    pb = normalize(q, k, v, return_lse=True, return_weights=True, needs_vjp=True, **kw)
    with np.errstate(all="ignore"):
        o, l, w = be._forward_blockwise(np, pb)
    # Against the float64 oracle at each output's own dtype tolerance (selfattn.testing.cases.TOLERANCES).
    from selfattn.testing import reference
    from selfattn.testing.compare import assert_close

    smax = reference.score_max(q, k, mask=kw.get("mask"))
    g = np.random.default_rng(1).standard_normal(o.shape).astype(dtype)
    bounds = reference.rounding_bounds(q, k, v, g, **kw)
    for what, got, exp in zip(("out", "lse", "weights"), (o, l, w), reference.forward(q, k, v, **kw), strict=True):
        assert_close(got, exp, dtype, what, score_max=smax, bound=bounds.get(what))
    with np.errstate(all="ignore"):
        grads = be._backward(np, pb, o, l, g)
    for what, a, exp in zip(("dq", "dk", "dv"), grads, reference.vjp(q, k, v, g, **kw), strict=True):
        assert a.shape == exp.shape
        assert_close(a, exp, dtype, what, score_max=smax, bound=bounds.get(what))
