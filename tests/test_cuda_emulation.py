"""The CuPy backend's CUDA kernels, executed on the CPU.

``selfattn_cuda_emulated.emulate`` (in ``tests/plugins/good``) compiles the real
``attn.cu`` source with g++ under ``simt.hpp`` (one OS thread per CUDA thread; warp collectives,
ldmatrix, mma.sync and cp.async emulated from the PTX ISA). Here the backend's
own host code runs with NumPy standing in for CuPy and those kernels standing
in for the NVRTC-compiled ones, and must match the NumPy backend -- for the
float16 tensor-core forward and for the CUDA-core forwards. Further tests show
that the emulator is not vacuous: single instructions are probed against the
PTX ISA's fragment tables (written out independently below), and broken
variants of the tensor-core kernel (wrong fragment, missing wait, missing
barrier, out-of-range copy) are caught.

What this cannot show: speed, and GPU behaviour the emulator does not model
(see simt.hpp). docs/gpu-validation.md keeps the GPU part.
"""

from __future__ import annotations

import numpy as np
import pytest
from selfattn_cuda_emulated import EmulatedCupyBackend, emulate

from selfattn._dropout import keep_mask
from selfattn._problem import normalize
from selfattn.backends import cupy_ as cupy_backend_mod
from selfattn.backends import numpy_
from selfattn.backends._cuda import launch


@pytest.fixture(scope="module", autouse=True)
def _need_compiler():
    try:
        emulate.check_toolchain()
    except emulate.EmulatorUnavailable as exc:
        pytest.skip(f"CUDA emulator unavailable: {exc}")


class EmulatedCupy(EmulatedCupyBackend):
    """The emulated CuPy backend, recording which kernels it launched, optionally with a broken source."""

    def __init__(self, cc=90, copies="late", mutate=None, tensor_cores=True):
        super().__init__(compute_capability=cc, copies=copies)
        self.tensor_cores, self.launched = tensor_cores, []
        # mutate: one (old, new) source replacement, or a list of them
        self.mutate = [mutate] if isinstance(mutate, tuple) else mutate

    def _kernel(self, xp, name):
        self.launched.append(name)
        if self.mutate is None:
            return super()._kernel(xp, name)
        src = launch.kernel_source("attn.cu", only=name if name.startswith("attn_fwd_") else "-")
        for old, new in self.mutate:
            assert old in src, f"mutation target not in the source: {old!r}"
            src = src.replace(old, new, 1)
        kern = emulate.load(name, source=src)
        return lambda grid, block, args: kern(grid, block, args, copies=self.copies)


def test_emulated_backend_is_registered_for_the_conformance_suite():
    """tests/plugins registers it, so the conformance suite runs the CuPy backend's code on every CI run."""
    import selfattn

    rec = {r.name: r for r in selfattn.list_backends()}["cupy-emulated"]
    assert rec.available, rec.reason
    be = selfattn.get_backend("cupy-emulated")
    assert isinstance(be, cupy_backend_mod.CupyBackend) and be.capabilities.array_type == "numpy"
    assert be.capabilities.features == cupy_backend_mod.backend.capabilities.features
    assert be.capabilities.dtypes == cupy_backend_mod.backend.capabilities.dtypes
    from selfattn.testing import reference
    from selfattn.testing.compare import assert_close

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 8)).astype(np.float16) for _ in range(3))
    assert selfattn.explain(q, k, v).backend != "cupy-emulated"  # never chosen automatically
    out = selfattn.scaled_dot_product_attention(q, k, v, backend="cupy-emulated")
    assert_close(
        out,
        reference.forward(q, k, v)[0],
        "float16",
        "out",
        score_max=reference.score_max(q, k),
        bound=reference.rounding_bounds(q, k, v)["out"],
    )


def _inputs(shape, dtype, case=None, layout="contiguous", seed=0):
    """``(q, k, v, kwargs)`` for ``normalize``; ``shape = (B, Hq, Hkv, N, M, D, Dv)``."""
    rng = np.random.default_rng(seed)
    B, Hq, Hkv, N, M, D, Dv = shape
    q = rng.standard_normal((B, Hq, N, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, M, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, M, Dv)).astype(dtype)
    if layout == "strided":  # q Fortran-ordered, k a transposed view: not unit-stride rows
        q = np.asfortranarray(q)
        k = rng.standard_normal((B, Hkv, D, M)).astype(dtype).swapaxes(-1, -2)
    elif layout == "offset":  # rows unit-stride but the views start 2 bytes off a 16-byte boundary
        q = np.pad(q, [(0, 0)] * 3 + [(1, 0)])[..., 1:]
    elif layout == "flat-offset":  # C-contiguous views whose first element is 2 bytes off a 16-byte boundary
        q, k, v = (_shifted(x) for x in (q, k, v))
    kw = dict(case or {})
    mk = kw.pop("mask", None)
    if mk == "bool_row":
        kw["mask"] = rng.random((1, 1, M)) > 0.2
    elif mk == "float_full":
        kw["mask"] = rng.standard_normal((B, Hq, N, M)).astype(np.float32)
    elif mk == "half_cols":
        kw["mask"] = (rng.standard_normal((N, M)) * 2).astype(np.float16)
    elif mk == "bool_batch":
        kw["mask"] = rng.random((B, 1, N, M)) > 0.5
    return q, k, v, kw


def _shifted(x):
    """A C-contiguous copy of ``x`` that starts one element past an aligned allocation (``flat[1:].reshape``)."""
    flat = np.empty(x.size + 1, x.dtype)
    view = flat[1:].reshape(x.shape)
    view[...] = x
    assert view.flags.c_contiguous and view.ctypes.data % 16 == x.itemsize % 16
    return view


def _check(be, q, k, v, kw, want_kernel, tol):
    pb = normalize(q, k, v, return_lse=True, **kw)
    with np.errstate(all="ignore"):
        ref_out, ref_lse, _ = numpy_.backend.forward(pb)
        out, lse, _ = be._forward_fused(np, pb)
    assert be.launched and be.launched[-1] == want_kernel
    assert out.dtype == pb.dtype and out.shape == ref_out.shape and lse.dtype == ref_lse.dtype
    np.testing.assert_allclose(out.astype(np.float64), ref_out.astype(np.float64), **tol)
    np.testing.assert_allclose(lse, ref_lse, **tol)
    return out, lse


F16 = dict(rtol=5e-3, atol=5e-3)
TC = launch.tc_kernel_name

# (shape (B, Hq, Hkv, N, M, D, Dv), case, layout, tensor-core kernel): N = 70 and M = 90
# cross row blocks (64) and key tiles (64); Hq > Hkv is GQA.
TC_CASES = [
    ((1, 2, 1, 70, 90, 64, 64), {}, "contiguous", TC(64)),
    ((1, 1, 1, 70, 90, 64, 64), dict(causal=True), "contiguous", TC(64)),
    ((1, 1, 1, 90, 40, 32, 32), dict(causal=True), "contiguous", TC(32)),  # first 50 rows attend nothing
    ((1, 2, 2, 70, 90, 64, 64), dict(window=(5, 3), mask="bool_row"), "contiguous", TC(64)),
    ((2, 2, 1, 40, 70, 64, 32), dict(mask="float_full"), "contiguous", TC(64)),
    ((2, 2, 2, 70, 70, 32, 32), dict(mask="bool_batch", dropout_p=0.3, dropout_seed=123), "contiguous", TC(32)),
    ((1, 2, 1, 70, 90, 16, 32), dict(mask="half_cols"), "strided", TC(32)),
    ((1, 1, 1, 20, 70, 128, 128), dict(causal=True, window=(30, 0)), "offset", TC(128)),
    ((1, 2, 1, 70, 90, 64, 64), dict(causal=True), "flat-offset", TC(64)),
    ((1, 1, 1, 33, 65, 96, 64), dict(scale=0.3), "contiguous", TC(128)),
]


@pytest.mark.parametrize(
    "shape, case, layout, kernel",
    TC_CASES,
    ids=lambda x: (
        "-".join(map(str, x)) if isinstance(x, tuple) else ("-".join(x) or "plain") if isinstance(x, dict) else str(x)
    ),
)
def test_tensor_core_forward_matches_numpy(shape, case, layout, kernel):
    q, k, v, kw = _inputs(shape, np.float16, case, layout)
    out, lse = _check(EmulatedCupy(), q, k, v, kw, kernel, F16)
    if case.get("causal") and shape[3] > shape[4]:
        rows = shape[3] - shape[4]  # bottom-right alignment: these rows see no key
        assert (out[..., :rows, :] == 0).all() and (lse[..., :rows] == -np.inf).all()


def test_misaligned_contiguous_view_is_copied_for_the_tensor_cores():
    """A C-contiguous view off a 16-byte boundary fails the layout check and is copied.

    ``ascontiguousarray`` would hand it over as is: the kernel's cp.async then
    faults (on a GPU, a misaligned address that poisons the CUDA context).
    """
    q, k, v, kw = _inputs((1, 1, 1, 70, 90, 64, 64), np.float16, {}, "flat-offset")
    assert all(np.ascontiguousarray(x) is x for x in (q, k, v))
    assert not launch.tc_layout_ok(q.shape, q.strides, q.itemsize, q.ctypes.data)
    pb = normalize(q, k, v, return_lse=True, **kw)
    be = EmulatedCupy()
    _check(be, q, k, v, kw, TC(64), F16)
    # The same arrays passed to the kernel as they are: the fault the copy avoids.
    out, lse = np.empty((1, 1, 70, 64), np.float16), np.empty((1, 1, 70), np.float32)
    args = launch.pack_fwd_args(
        q=pb.query,
        k=pb.key,
        v=pb.value,
        out=out,
        lse=lse,
        placeholder=np.zeros(1, np.int64),
        shapes_strides={
            a: (x.shape, x.strides, x.itemsize) for a, x in (("q", pb.query), ("k", pb.key), ("v", pb.value))
        },
        sizes=dict(B=1, Hq=1, Hkv=1, N=70, M=90, D=64, Dv=64),
        scale=pb.scale,
        lower=None,
        upper=None,
        dropout_p=0.0,
        dropout_seed=None,
        write_lse=True,
    )
    grid, block, _, _ = launch.fwd_launch(1, 1, 70, launch.TC_THREADS)
    with pytest.raises(emulate.EmulationError, match="16-byte aligned"):
        emulate.load(TC(64))(grid, block, args)


def _seed_keeping(p, rows, cols, at_least):
    """A dropout seed that keeps at least ``at_least`` weights of head 0's first rows x cols."""
    for seed in range(10**5):
        if keep_mask(seed, np.arange(1), np.arange(rows), np.arange(cols), p).sum() >= at_least:
            return seed
    raise AssertionError("no seed found")


def test_tensor_core_dropout_close_to_one():
    """dropout_p > 1 - 1/65504: 1/(1-p) exceeds float16's range, yet the output is finite and right.

    Zero queries make every probability 1, so a kept weight scaled before the
    float16 rounding of P would be inf (the mutation below shows that it was).
    """
    p = 1 - 1 / 70000
    seed = _seed_keeping(p, 64, 128, 2)
    q, k, v, _ = _inputs((1, 1, 1, 64, 128, 32, 32), np.float16)
    q[...] = 0
    kw = dict(dropout_p=p, dropout_seed=seed)
    out, _ = _check(EmulatedCupy(), q, k, v, kw, TC(32), F16)
    assert np.isfinite(out).all() and np.abs(out).max() > 1.0  # kept weights reach the output, scaled
    before = [
        (
            "if (!sa_keep(rowh[r], (sa_u32)j + col0, threshold)) p = 0.0f;",
            "p = sa_keep(rowh[r], (sa_u32)j + col0, threshold) ? p * out_scale : 0.0f;",
        ),
        ("inv = out_scale / l;", "inv = 1.0f / l;"),
    ]
    pb = normalize(q, k, v, return_lse=True, **kw)
    with np.errstate(all="ignore"):
        old, _, _ = EmulatedCupy(mutate=before)._forward_fused(np, pb)
    assert np.isinf(old).any()


ROW_BLOCK_PROBE = r"""
extern "C" __global__ void probe_row_block(long long* out, long long blk, long long n_row_blocks, int N, int M,
                                           int has_upper, int upper) {
    const SaRowBlock rb = sa_row_block<SA_BM>(blk, n_row_blocks, 1, 1, N, M, (long long)M - N, 0, 0, has_upper,
                                              upper, 0, nullptr, nullptr, nullptr, nullptr);
    if (threadIdx.x == 0) { out[0] = rb.i0; out[1] = rb.i1; out[2] = rb.j0; out[3] = rb.j1; }
}
"""


@pytest.mark.parametrize("n", [2**31 - 1, 2**31 - 64, 1000])
def test_row_block_indices_near_int32_max(n):
    """The last row block of a launch with N close to 2^31: i0 + BM no longer fits in an int."""
    src = launch.kernel_source("attn.cu", only="-") + ROW_BLOCK_PROBE
    sig = (
        ("out", "ptr"),
        ("blk", "long long"),
        ("n_row_blocks", "long long"),
        ("N", "int"),
        ("M", "int"),
        ("has_upper", "int"),
        ("upper", "int"),
    )
    kern = emulate.load("probe_row_block", source=src, signature=sig)
    nrb = -(-n // launch.BM)
    out = np.zeros(4, np.int64)
    kern((1,), (32,), (out, np.int64(0), np.int64(nrb), np.int32(n), np.int32(n), np.int32(1), np.int32(0)))
    i0 = (nrb - 1) * launch.BM  # blocks go last-first: block 0 holds the last rows
    assert out.tolist() == [i0, n, 0, n]  # causal, M = N: the last rows see every key


def test_tensor_core_forward_same_result_with_early_copies():
    q, k, v, kw = _inputs((1, 2, 1, 70, 130, 64, 64), np.float16, dict(causal=True))
    late = _check(EmulatedCupy(copies="late"), q, k, v, kw, TC(64), F16)
    early = _check(EmulatedCupy(copies="early"), q, k, v, kw, TC(64), F16)
    np.testing.assert_array_equal(late[0], early[0])


def test_tensor_core_forward_nan_and_fully_masked_rows():
    q, k, v, _ = _inputs((1, 1, 1, 6, 70, 64, 64), np.float16)
    mask = np.ones((6, 70), bool)
    mask[1] = False
    q[0, 0, 3, 5] = np.nan
    out, lse = _check(EmulatedCupy(), q[0, 0], k[0, 0], v[0, 0], dict(mask=mask), TC(64), dict(F16, equal_nan=True))
    out, lse = out[0, 0], lse[0, 0]
    assert (out[1] == 0).all() and lse[1] == -np.inf
    assert np.isnan(out[3]).all() and np.isnan(lse[3])
    assert not np.isnan(out[[0, 2, 4, 5]]).any()


@pytest.mark.parametrize(
    "shape, dtype, case, cc, kernel",
    [
        ((1, 2, 1, 70, 90, 8, 8), np.float32, dict(causal=True), 90, launch.fwd_kernel_name("float32", 32)),
        (
            (1, 2, 2, 70, 40, 6, 5),
            np.float64,
            dict(window=(3, 1), mask="bool_row"),
            90,
            launch.fwd_kernel_name("float64", 32),
        ),
        (
            (1, 2, 1, 70, 90, 64, 64),
            np.float16,
            dict(dropout_p=0.25, dropout_seed=5),
            75,
            launch.fwd_kernel_name("float16", 64),
        ),
        ((1, 1, 1, 20, 30, 6, 6), np.float16, dict(mask="float_full"), 90, launch.fwd_kernel_name("float16", 32)),
    ],
)
def test_cuda_core_forward_matches_numpy(shape, dtype, case, cc, kernel):
    """The CUDA-core kernels too (float32/64; float16 below sm_80 or with D not a multiple of 8)."""
    q, k, v, kw = _inputs(shape, dtype, case, "strided")
    tol = {np.float16: F16, np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}[dtype]
    out, lse = _check(EmulatedCupy(cc=cc), q, k, v, kw, kernel, tol)
    # ... and against the float64 oracle at each output's own dtype tolerance (cases.TOLERANCES).
    from selfattn.testing import reference
    from selfattn.testing.compare import assert_close

    ref_out, ref_lse, _ = reference.forward(q, k, v, **kw)
    smax = reference.score_max(q, k, mask=kw.get("mask"))
    assert_close(out, ref_out, dtype, "out", score_max=smax, bound=reference.rounding_bounds(q, k, v, **kw)["out"])
    assert_close(lse, ref_lse, dtype, "lse", score_max=smax)


def test_tensor_cores_can_be_switched_off():
    q, k, v, kw = _inputs((1, 1, 1, 20, 30, 32, 32), np.float16)
    _check(EmulatedCupy(tensor_cores=False), q, k, v, kw, launch.fwd_kernel_name("float16", 32), F16)


def test_dropout_tile_kernel_matches_core():
    be = EmulatedCupy()
    q, k, v, _ = _inputs((2, 3, 3, 20, 30, 4, 4), np.float32)
    pb = normalize(q, k, v, dropout_p=0.4, dropout_seed=2**64 - 3)
    z = be._dropout_z(np, pb, 1, 2, 5, 17, 3, 29)
    keep = keep_mask(pb.dropout_seed, np.arange(3, 6), np.arange(5, 17), np.arange(3, 29), 0.4)
    np.testing.assert_array_equal(z.reshape(keep.shape), keep * np.float32(1 / 0.6))


# -- the emulator itself: instructions against the PTX ISA's fragment tables -----

PROBES = r"""
extern "C" __global__ void probe_ldsm(const unsigned short* m, unsigned* out, int trans) {
    __shared__ __attribute__((aligned(16))) unsigned short sm[32 * 8];
    for (int e = threadIdx.x; e < 32 * 8; e += 32) sm[e] = m[e];
    __syncthreads();
    unsigned r[4];
    const unsigned short* row = sm + threadIdx.x * 8 + (trans >> 1);  // trans & 2: misalign
    if (trans & 1) sa_ldsm_x4_trans(r, row); else sa_ldsm_x4(r, row);
    for (int j = 0; j < 4; ++j) out[threadIdx.x * 4 + j] = r[j];
}
extern "C" __global__ void probe_mma(const unsigned* a, const unsigned* b, float* c) {
    const int l = threadIdx.x;
    unsigned ar[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
    float cr[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
    sa_mma_16816(cr, ar, b[2 * l], b[2 * l + 1]);
    for (int i = 0; i < 4; ++i) c[4 * l + i] = cr[i];
}
"""
LDSM_SIG = (("m", "ptr"), ("out", "ptr"), ("trans", "int"))
MMA_SIG = (("a", "ptr"), ("b", "ptr"), ("c", "ptr"))


def _halves(words):
    """uint32 registers -> (low, high) float16 pairs."""
    return np.asarray(words, np.uint32).view(np.float16).reshape(*np.shape(words), 2)


@pytest.mark.parametrize("trans", [0, 1])
def test_ldmatrix_emulation_follows_ptx_table(trans):
    mats = np.arange(4 * 64, dtype=np.float16).reshape(4, 8, 8)  # matrix j, row, column
    out = np.zeros(32 * 4, np.uint32)
    emulate.load("probe_ldsm", source=PROBES, signature=LDSM_SIG)((1,), (32,), (mats.reshape(-1), out, np.int32(trans)))
    got = _halves(out.reshape(32, 4))
    for lane in range(32):
        for j in range(4):
            r, c = lane // 4, 2 * (lane % 4)  # PTX ISA: lane holds (row lane/4, cols 2(lane%4)+{0,1})
            want = mats[j].T if trans else mats[j]
            assert list(got[lane, j]) == [want[r, c], want[r, c + 1]], (lane, j)


def test_ldmatrix_misaligned_row_is_a_fault():
    mats = np.zeros(256, np.float16)
    out = np.zeros(128, np.uint32)
    with pytest.raises(emulate.EmulationError, match="16-byte aligned"):
        emulate.load("probe_ldsm", source=PROBES, signature=LDSM_SIG)((1,), (32,), (mats, out, np.int32(2)))


def test_mma_emulation_follows_ptx_table():
    rng = np.random.default_rng(0)
    A = rng.integers(-8, 8, (16, 16)).astype(np.float16)
    B = rng.integers(-8, 8, (16, 8)).astype(np.float16)
    C = rng.integers(-8, 8, (16, 8)).astype(np.float32)
    # PTX ISA, mma.m16n8k16 .f16 / .f32 fragments, g = lane >> 2, t = lane % 4:
    #   A a_i: row g + 8*[i in {2,3,6,7}], col 2t + (i & 1) + 8*[i >= 4]  (two per register)
    #   B b_i: row 2t + (i & 1) + 8*[i >= 2], col g
    #   C c_i: row g + 8*[i >= 2],           col 2t + (i & 1)
    a = np.zeros((32, 8), np.float16)
    b = np.zeros((32, 4), np.float16)
    c = np.zeros((32, 4), np.float32)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(8):
            a[lane, i] = A[g + 8 * (i in (2, 3, 6, 7)), 2 * t + (i & 1) + 8 * (i >= 4)]
        for i in range(4):
            b[lane, i] = B[2 * t + (i & 1) + 8 * (i >= 2), g]
            c[lane, i] = C[g + 8 * (i >= 2), 2 * t + (i & 1)]
    d = c.copy()
    emulate.load("probe_mma", source=PROBES, signature=MMA_SIG)(
        (1,), (32,), (a.view(np.uint32).reshape(-1).copy(), b.view(np.uint32).reshape(-1).copy(), d.reshape(-1))
    )
    want = A.astype(np.float32) @ B.astype(np.float32) + C
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(4):
            assert d[lane, i] == want[g + 8 * (i >= 2), 2 * t + (i & 1)], (lane, i)


# -- broken tensor-core kernels are caught ----------------------------------------

MUTATIONS = {
    "V-not-transposed": ("sa_ldsm_x4_trans(vf,", "sa_ldsm_x4(vf,"),
    "P-fragments-swapped": ("pa[1] = sa_pack_h2(s[2 * kc][2]", "pa[2] = sa_pack_h2(s[2 * kc][2]"),
    "K-row-addressing": ("((lane >> 4) << 3)) * LD + kk * 16", "((lane >> 3) & 1) * 8) * LD + kk * 16"),
    "row-max-not-shared": ("tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));", ";"),
    "no-wait-for-V": ("sa_cp_async_wait<1>();   // V(tile) has landed", ";"),
    "no-barrier-before-K-prefetch": ("__syncthreads();   // every warp is done with Ks: prefetch the next K tile", ";"),
    "copy-past-the-end": ("ok ? base + (r0 + r) * rs + c : base, ok ? 16 : 0", "base + (r0 + r) * rs + c, 16"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_broken_tensor_core_kernel_is_caught(mutation):
    q, k, v, kw = _inputs((1, 1, 1, 70, 150, 64, 64), np.float16)
    pb = normalize(q, k, v, return_lse=True, **kw)
    ref, _, _ = numpy_.backend.forward(pb)
    outcomes = []
    for copies in ("late", "early"):
        be = EmulatedCupy(copies=copies, mutate=MUTATIONS[mutation])
        try:
            out, _, _ = be._forward_fused(np, pb)
        except emulate.EmulationError as exc:
            outcomes.append(f"fault: {exc}")
            continue
        err = float(np.nanmax(np.abs(out.astype(np.float64) - ref)))
        outcomes.append(err if not np.isnan(out).any() else "nan")
    assert any(not isinstance(o, float) or o > 0.05 for o in outcomes), outcomes
