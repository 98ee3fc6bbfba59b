"""Soft-capping, ALiBi, chunks of a larger call and packed varlen batches in the CuPy backend's fused kernels.

The kernels run on the CPU under the SIMT emulator (``tests/plugins/good/selfattn_cuda_emulated``),
driven by the backend's own host code with NumPy standing in for CuPy, and must match the NumPy
backend (which implements every option with the blockwise algorithm) on the same problem: the
float16 tensor-core forward and the CUDA-core forwards (float16 below sm_80, float32, float64, with
strided inputs). Dropout is checked bit for bit against the documented hash at the problem's
global counters, and broken variants of the new code (an ALiBi sign, an unscaled soft-cap, a
varlen band offset, a chunk's counters) are shown to fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from selfattn_cuda_emulated import emulate
from test_cuda_emulation import F16, EmulatedCupy, _inputs

import selfattn
from selfattn._dropout import keep_mask
from selfattn._problem import normalize, normalize_varlen
from selfattn.backends import numpy_
from selfattn.backends._cuda import launch


@pytest.fixture(scope="module", autouse=True)
def _need_compiler():
    try:
        emulate.check_toolchain()
    except emulate.EmulatorUnavailable as exc:
        pytest.skip(f"CUDA emulator unavailable: {exc}")


TC = launch.tc_kernel_name
CC = launch.fwd_kernel_name
F32 = dict(rtol=2e-5, atol=2e-6)
F64 = dict(rtol=1e-10, atol=1e-12)

#: name -> (dtype, compute capability, D, Dv, layout, kernel, tolerance): the tensor-core kernel
#: and the three CUDA-core ones (float16 on an sm_75 device; strided inputs).
KERNELS = {
    "tc16": (np.float16, 90, 32, 32, "contiguous", TC(32), F16),
    "cc16": (np.float16, 75, 32, 32, "strided", CC("float16", 32), F16),
    "cc32": (np.float32, 90, 6, 5, "strided", CC("float32", 32), F32),
    "cc64": (np.float64, 90, 6, 5, "strided", CC("float64", 32), F64),
}


def _slopes(kind, B, Hq, seed=3):
    rng = np.random.default_rng(seed)
    if kind == "per_head":
        return rng.uniform(0.05, 0.6, Hq).astype(np.float32)
    return rng.uniform(0.05, 0.6, (B, Hq))  # float64, one row per batch entry


def _problem_inputs(kernel, case, B=1, Hq=2, Hkv=1, N=70, M=90, seed=0):
    dtype, cc, D, Dv, layout, name, tol = KERNELS[kernel]
    case = dict(case)
    al = case.pop("alibi", None)
    q, k, v, kw = _inputs((B, Hq, Hkv, N, M, D, Dv), dtype, case, layout, seed=seed)
    if al:
        kw["alibi_slopes"] = _slopes(al, B, Hq)
    return q, k, v, kw


def _compare(out, lse, ref_out, ref_lse, tol):
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape and lse.dtype == ref_lse.dtype
    np.testing.assert_allclose(out.astype(np.float64), ref_out.astype(np.float64), **tol)
    np.testing.assert_allclose(lse, ref_lse, **tol)


def _run(be, pb):
    with np.errstate(all="ignore"):
        return be._forward(np, pb)


# -- soft-capping and ALiBi -----------------------------------------------------------------

FEATURE_CASES = [
    (dict(softcap=2.0), (70, 90)),
    (dict(alibi="per_head", causal=True), (70, 90)),  # bottom-right, M > N
    (dict(alibi="per_batch", causal=True, softcap=1.5), (90, 40)),  # the first 50 rows see nothing
    (dict(alibi="per_batch", window=(6, 3), softcap=1.5, mask="bool_row"), (70, 90)),
    (dict(softcap=4.0, alibi="per_head", mask="float_full", dropout_p=0.3, dropout_seed=77), (40, 70)),
]


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("case, nm", FEATURE_CASES, ids=lambda x: "-".join(x) if isinstance(x, dict) else None)
def test_softcap_and_alibi_match_numpy(kernel, case, nm):
    q, k, v, kw = _problem_inputs(kernel, case, B=2, N=nm[0], M=nm[1])
    pb = normalize(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse, _ = numpy_.backend.forward(pb)
    be = EmulatedCupy(cc=KERNELS[kernel][1])
    out, lse, _ = _run(be, pb)
    assert be.launched == [KERNELS[kernel][5]]  # the fused kernel, not the blockwise path
    _compare(out, lse, ref_out, ref_lse, KERNELS[kernel][6])
    # Not vacuous: without the feature the result is measurably different.
    plain = {x: kw[x] for x in kw if x not in ("softcap", "alibi_slopes")}
    other, _, _ = numpy_.backend.forward(normalize(q, k, v, return_lse=True, **plain))
    assert np.nanmax(np.abs(other.astype(np.float64) - ref_out)) > 0.05


# -- chunks of a larger call (Problem.chunk: band offset and dropout counters are global) -------

CHUNK_CASES = [
    dict(causal=True, alibi="per_batch", dropout_p=0.3, dropout_seed=5),
    dict(window=(7, 12), mask="bool_batch", softcap=3.0),
]


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: "-".join(c))
def test_chunk_matches_numpy_on_the_same_chunk(kernel, case):
    q, k, v, kw = _problem_inputs(kernel, case, B=3, Hq=4, Hkv=2, N=70, M=90)
    full = normalize(q, k, v, return_lse=True, **kw)
    pb = full.chunk(batches=(1, 3), heads=(2, 4), rows=(6, 70), keys=(16, 80))
    assert pb.is_chunk and pb.offset != pb.m - pb.n
    ref_out, ref_lse, _ = numpy_.backend.forward(pb)
    be = EmulatedCupy(cc=KERNELS[kernel][1])
    out, lse, _ = _run(be, pb)
    assert be.launched == [KERNELS[kernel][5]]
    _compare(out, lse, ref_out, ref_lse, KERNELS[kernel][6])


def test_key_chunks_merge_to_the_whole_call():
    """Split-KV as a Dask graph runs it: chunks over disjoint keys, merged, equal the whole call (dropout too)."""
    q, k, v, kw = _problem_inputs(
        "tc16", dict(causal=True, alibi="per_head", softcap=5.0, dropout_p=0.2, dropout_seed=11), N=70, M=130
    )
    full = normalize(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse, _ = numpy_.backend.forward(full)
    be = EmulatedCupy()
    parts = [_run(be, full.chunk(keys=(j0, j1))) for j0, j1 in ((0, 64), (64, 100), (100, 130))]
    assert be.launched == [TC(32)] * 3
    out, lse = selfattn.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    _compare(out, lse, ref_out, ref_lse, F16)


# -- packed variable-length batches ---------------------------------------------------------

#: (queries, keys) per sequence: N_s != M_s, a sequence without queries, one without keys, several
#: 64-row tiles in one sequence, a single-token one.
LENS_Q = [70, 0, 5, 33, 1]
LENS_K = [50, 7, 0, 90, 1]


def _varlen_inputs(kernel, lens_q, lens_k, Hq=2, Hkv=1, seed=1):
    dtype, cc, D, Dv, layout, name, tol = KERNELS[kernel]
    rng = np.random.default_rng(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = rng.standard_normal((Hq, tq, D)).astype(dtype)
    k = rng.standard_normal((Hkv, tk, D)).astype(dtype)
    v = rng.standard_normal((Hkv, tk, Dv)).astype(dtype)
    if layout == "strided":
        q = np.asfortranarray(q)
        k = rng.standard_normal((Hkv, D, tk)).astype(dtype).swapaxes(-1, -2)
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int64)
    return q, k, v, cu_q, cu_k


VARLEN_CASES = [
    dict(),
    dict(causal=True, alibi="per_seq", softcap=2.0),
    dict(window=(9, 4), alibi="per_head", dropout_p=0.25, dropout_seed=2**63 + 5),
]


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: "-".join(c) or "plain")
def test_varlen_is_one_launch_and_matches_numpy(kernel, case):
    q, k, v, cu_q, cu_k = _varlen_inputs(kernel, LENS_Q, LENS_K)
    kw = dict(case)
    al = kw.pop("alibi", None)
    if al == "per_seq":
        kw["alibi_slopes"] = _slopes("per_batch", len(LENS_Q), q.shape[0])
    elif al:
        kw["alibi_slopes"] = _slopes("per_head", 1, q.shape[0])
    pb = normalize_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    ref_out, ref_lse, _ = numpy_.backend.forward(pb)
    be = EmulatedCupy(cc=KERNELS[kernel][1])
    out, lse, _ = _run(be, pb)
    assert be.launched == [KERNELS[kernel][5]]  # one launch for every sequence
    _compare(out, lse, ref_out, ref_lse, KERNELS[kernel][6])
    rows = slice(70, 75)  # sequence 2: five queries, no keys
    assert (out[..., rows, :] == 0).all() and (lse[..., rows] == -np.inf).all()


def test_varlen_tile_table_order_does_not_change_the_result(monkeypatch):
    """The host orders tiles longest first; any order (here reversed) gives the same numbers."""
    q, k, v, cu_q, cu_k = _varlen_inputs("tc16", LENS_Q, LENS_K)
    pb = normalize_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    first = _run(EmulatedCupy(), pb)
    tiles = launch.varlen_tiles

    def reversed_tiles(*a, **kw):
        seq, row = tiles(*a, **kw)
        return seq[::-1].copy(), row[::-1].copy()

    monkeypatch.setattr(launch, "varlen_tiles", reversed_tiles)
    second = _run(EmulatedCupy(), pb)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


# -- dropout, bit for bit -------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["tc16", "cc32"])
def test_varlen_dropout_is_the_padded_calls_pattern(kernel):
    """V = I over the packed keys: out[h, i, j] != 0 exactly where the hash keeps weight (s·Hq + h, i, j).

    Sequence s draws as batch entry s of the padded call, with positions local to it.
    """
    lens_q, lens_k = [20, 3, 70, 0], [16, 0, 40, 8]
    dtype = KERNELS[kernel][0]
    Hq, tk = 2, sum(lens_k)
    rng = np.random.default_rng(2)
    q = rng.standard_normal((Hq, sum(lens_q), 8)).astype(dtype)
    k = rng.standard_normal((1, tk, 8)).astype(dtype)
    v = np.eye(tk, dtype=dtype)[None]  # Dv = total_k = 64
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(x)]) for x in (lens_q, lens_k))
    p, seed = 0.4, 123456789
    pb = normalize_varlen(q, k, v, cu_q, cu_k, dropout_p=p, dropout_seed=seed)
    be = EmulatedCupy(cc=KERNELS[kernel][1])
    out, _, _ = _run(be, pb)
    assert be.launched == [TC(64) if kernel == "tc16" else CC(np.dtype(dtype).name, 64)]
    want = np.zeros(out.shape, bool)
    for s in range(len(lens_q)):
        r0, k0 = cu_q[s], cu_k[s]
        keep = keep_mask(seed, s * Hq + np.arange(Hq), np.arange(lens_q[s]), np.arange(lens_k[s]), p)
        want[0, :, r0 : r0 + lens_q[s], k0 : k0 + lens_k[s]] = keep
    np.testing.assert_array_equal(out != 0, want)


@pytest.mark.parametrize("kernel", ["tc16", "cc64"])
def test_chunk_dropout_is_the_whole_calls_pattern(kernel):
    """V = I: a chunk's kept weights sit exactly where the whole call's pattern keeps them (global counters)."""
    dtype = KERNELS[kernel][0]
    B, Hq, N, M = 3, 4, 70, 64
    rng = np.random.default_rng(4)
    q = rng.standard_normal((B, Hq, N, 8)).astype(dtype)
    k = rng.standard_normal((B, 2, M, 8)).astype(dtype)
    v = np.broadcast_to(np.eye(M, dtype=dtype), (B, 2, M, M))
    p, seed = 0.5, 2**64 - 7
    full = normalize(q, k, v, dropout_p=p, dropout_seed=seed)
    b0, b1, h0, h1, i0, i1, j0, j1 = 1, 3, 2, 4, 5, 69, 8, 56
    pb = full.chunk(batches=(b0, b1), heads=(h0, h1), rows=(i0, i1), keys=(j0, j1))
    be = EmulatedCupy(cc=KERNELS[kernel][1])
    out, _, _ = _run(be, pb)
    assert be.launched == [TC(64) if kernel == "tc16" else CC("float64", 64)]
    bh = (np.arange(b0, b1)[:, None] * Hq + np.arange(h0, h1)[None, :]).reshape(-1)
    keep = keep_mask(seed, bh, np.arange(i0, i1), np.arange(j0, j1), p).reshape(out.shape[:3] + (j1 - j0,))
    nz = out != 0
    assert not nz[..., :j0].any() and not nz[..., j1:].any()
    np.testing.assert_array_equal(nz[..., j0:j1], keep)


# -- broken variants of the new code are caught --------------------------------------------------


def _max_err(be, pb, ref):
    try:
        out, _, _ = _run(be, pb)
    except emulate.EmulationError as exc:
        return f"fault: {exc}"
    return float(np.nanmax(np.abs(out.astype(np.float64) - ref))) if not np.isnan(out).any() else "nan"


def _chunk_dropout_problem():
    q, k, v, kw = _problem_inputs("tc16", dict(dropout_p=0.5, dropout_seed=9), B=2, N=40, M=70)
    return normalize(q, k, v, return_lse=True, **kw).chunk(batches=(1, 2), keys=(6, 70))


def _varlen_causal_problem():
    q, k, v, cu_q, cu_k = _varlen_inputs("tc16", LENS_Q, LENS_K)
    return normalize_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)


def _alibi_problem(kernel, per="per_head"):
    q, k, v, kw = _problem_inputs(kernel, dict(alibi=per), B=2, N=40, M=70)
    if per == "per_batch":  # slopes far apart between the batch entries
        kw["alibi_slopes"] = np.array([[0.02, 0.05], [0.3, 0.25]])
    return normalize(q, k, v, return_lse=True, **kw)


def _softcap_problem():
    q, k, v, kw = _problem_inputs("tc16", dict(softcap=2.0), N=40, M=70)
    return normalize(q, k, v, return_lse=True, **kw)


MUTATIONS = {
    "tc-alibi-sign": ("tc16", lambda: _alibi_problem("tc16"), ("x -= slope_log2 *", "x += slope_log2 *")),
    "cc-alibi-sign": ("cc32", lambda: _alibi_problem("cc32"), ("x -= slope *", "x += slope *")),
    "alibi-row-of-batch-ignored": (
        "tc16",
        lambda: _alibi_problem("tc16", "per_batch"),
        ("alibi[(long long)rb.s * Hq + h] * LOG2E", "alibi[h] * LOG2E"),
    ),
    "tc-softcap-unscaled": ("tc16", _softcap_problem, ("(float)(scale / softcap)", "(float)(1.0 / softcap)")),
    "varlen-offset": ("tc16", _varlen_causal_problem, ("rb.off = nk - nq;", "rb.off = 0;")),
    "chunk-columns-local": ("tc16", _chunk_dropout_problem, ("(sa_u32)j + col0", "(sa_u32)j")),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_broken_feature_is_caught(mutation):
    kernel, make, change = MUTATIONS[mutation]
    pb = make()
    ref, _, _ = numpy_.backend.forward(pb)
    ok = EmulatedCupy(cc=KERNELS[kernel][1])
    assert _max_err(ok, pb, ref) < 0.02  # the unbroken kernel passes ...
    broken = EmulatedCupy(cc=KERNELS[kernel][1], mutate=change)
    err = _max_err(broken, pb, ref)
    assert broken.launched and (not isinstance(err, float) or err > 0.05), err  # ... the broken one does not
