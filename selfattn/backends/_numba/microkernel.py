"""Register-blocked tile products emitted as LLVM vector code (the SIMD family's inner loops).

LLVM does not find the register blocking of a matrix product by itself in
Numba code (plain loops reach 4-10 GFLOP/s on a core that does ~100), so the
micro-kernel is written directly in LLVM IR through
:func:`numba.extending.intrinsic`: ``R`` rows x ``NV`` vectors of ``W``
lanes of ``C`` live in vector registers for the whole reduction, each step
loads ``NV`` vectors of one row of ``B`` and broadcasts one scalar of ``A``
per row, and updates the accumulators with ``llvm.fma`` on ``<W x float>``
(``<W/2 x double>`` for float64). The backend's code generator lowers those
to ``vfmadd...ps zmm`` (AVX-512), ``ymm`` (AVX2) or NEON ``fmla``; a vector
type wider than the hardware is split by LLVM, so the choice of ``W`` never
affects results, only speed.

:func:`gemm` is the one product every SIMD kernel uses:
``C[:nr, :ncol] (+)= A[:nr, :kred] @ B[:kred, :ncol]`` where ``A`` is read
through arbitrary element strides (so ``A`` may be a transposed view of a
score tile, which is how ``P^T dO`` and ``dS^T Q`` avoid a transposed copy)
and ``B``/``C`` are row-major with a leading dimension. Row counts must be
multiples of ``R`` and column counts multiples of ``W`` (callers pad their
scratch tiles); reads of ``A`` and ``B`` stay inside ``[:nr]``/``[:kred]``.

The vector width is chosen once, at import, from the host CPU that Numba
compiles for (``llvmlite.binding.get_host_cpu_features``): 16 float32 lanes
with AVX-512F, 8 with AVX2/FMA, 4 otherwise (SSE, NEON). Numba's disk cache
keys machine code on the CPU name and features, so a cache built on another
CPU is not reused.
"""

from __future__ import annotations

import math
import os

import numba as nb
from llvmlite import binding as llb
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .opts import INLINE, OPTS

__all__ = [
    "ISA",
    "LANES32",
    "ROWS",
    "VECS",
    "lanes",
    "gemm",
    "gemm_exp2",
    "gemm_exp2_shifted",
    "gemm_times_diff",
    "row_max",
    "exp_shift_vectors",
    "exp2_vectors_masked",
    "transpose_block",
    "vector_isa",
]


def _host_features() -> dict:
    """What llvmlite reports of the host CPU's features (empty if it cannot tell)."""
    try:
        return dict(llb.get_host_cpu_features())
    except Exception:  # pragma: no cover - llvmlite cannot query this CPU
        return {}


def vector_isa() -> tuple[str, int]:
    """``(name, float32 lanes)`` of the widest vector FMA the host CPU offers to Numba.

    ``SELFATTN_SIMD_LANES`` (4, 8 or 16) overrides the choice (tests and
    benchmarks use it to compare widths; every width gives the same results).
    """
    forced = os.environ.get("SELFATTN_SIMD_LANES")
    if forced:
        n = int(forced)
        if n not in (4, 8, 16):
            raise ValueError(f"SELFATTN_SIMD_LANES must be 4, 8 or 16, got {forced!r}")
        return f"forced {n} lanes", n
    feats = _host_features()
    if feats.get("avx512f"):
        return "avx512f", 16
    if feats.get("avx2") and feats.get("fma"):
        return "avx2+fma", 8
    if feats.get("neon"):
        return "neon", 4
    return "sse/generic", 4


#: ``(name, float32 lanes)`` chosen for this process at import (:func:`vector_isa`).
ISA = vector_isa()
#: float32 lanes per vector register on this host (float64: half as many).
LANES32 = ISA[1]
#: Rows of C held in registers per micro-kernel call.
ROWS = 8
#: Bytes of B that the product keeps in L1 across row blocks (most cores have 32-48 KiB of L1d).
B_IN_L1 = 32 * 1024
#: Most vectors per row of C held in registers (``ROWS * VECS`` = 24 accumulators,
#: which with the ``B`` vectors and one broadcast fits AVX-512's 32 registers).
VECS = 3


def lanes(dtype_bytes: int) -> int:
    """Lanes of one vector for elements of ``dtype_bytes`` bytes."""
    return LANES32 * 4 // dtype_bytes


def _micro_typing(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, kred, acc, rs, rs_off):
    """The signature of a micro-kernel call, or None when the argument types do not fit."""
    arrs = (a, b, c, rs)
    if not all(isinstance(x, types.Array) for x in arrs):
        return None
    dt = a.dtype
    if dt not in (types.float32, types.float64) or any(x.dtype != dt for x in arrs):
        return None
    ints = (a_off, ars, aks, b_off, ldb, c_off, ldc, kred, rs_off)
    if not all(isinstance(x, types.Integer) for x in ints) or not isinstance(acc, types.Boolean):
        return None
    i = types.intp
    return types.void(a, i, i, i, b, i, i, c, i, i, i, types.boolean, rs, i)


#: What the micro-kernel does with its accumulators ``x`` before they are stored
#: (``rs``: the extra array of the epilogues, row ``r``'s entries at ``rs_off + r*W``
#: (:data:`EXP2_SUMS`) or ``rs_off + r``): plain (``C (+)= x``); ``C = 2**x`` unchecked,
#: adding row ``r``'s vectors lane-wise into ``rs``; ``C = 2**(x - rs[r])`` masked
#: (``-inf`` gives 0, NaN stays NaN, as :func:`exp2_vectors_masked`); ``C = C * (x - rs[r])``.
PLAIN, EXP2_SUMS, EXP2_SHIFTED, TIMES_DIFF = 0, 1, 2, 3


def _micro(nrows: int, nvec: int, epilogue: int = PLAIN):
    """The ``nrows x nvec``-vector micro-kernel as a Numba intrinsic (one per shape, typed per dtype).

    ``_k(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, kred, acc, rs, rs_off)``:
    ``C[r, j] (+)= sum_d A[a_off + r*ars + d*aks] * B[b_off + d*ldb + j]``
    for ``r < nrows``, ``j < nvec*W``; offsets and strides in elements;
    ``acc`` False overwrites ``C``.

    ``epilogue`` (see :data:`PLAIN`) is applied to the accumulators while
    they are still in registers; ``rs, rs_off`` are its operand (unused by
    :data:`PLAIN`): :data:`EXP2_SUMS` stores ``2**x`` (:func:`_exp2_ir`
    unchecked: for finite results well inside the exponent range) and adds
    row ``r``'s vectors of it lane-wise into ``rs[rs_off + r*W : rs_off +
    (r+1)*W]`` (the exp of the forward's interior base-2 tiles);
    :data:`EXP2_SHIFTED` stores ``2**(x - rs[rs_off + r])`` with the masked
    ``2**x`` (the backward's ``P``); :data:`TIMES_DIFF` stores ``C * (x -
    rs[rs_off + r])``, reading ``C`` first (the backward's ``dS = P * (dP -
    delta)``).
    """

    @intrinsic
    def _k(typingctx, a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, kred, acc, rs, rs_off):
        sig = _micro_typing(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, kred, acc, rs, rs_off)
        return None if sig is None else (sig, _micro_codegen(nrows, nvec, a.dtype, epilogue))

    return _k


def _micro_codegen(nrows: int, nvec: int, dt, epilogue: int):
    """The code generator of :func:`_micro`'s intrinsic for element type ``dt`` (see there)."""
    width = lanes(8 if dt == types.float64 else 4)

    def codegen(context, builder, signature, args):
        fty = context.get_value_type(dt)
        vty = ir.VectorType(fty, width)
        intp = context.get_value_type(types.intp)
        a_arr = context.make_array(signature.args[0])(context, builder, args[0])
        b_arr = context.make_array(signature.args[4])(context, builder, args[4])
        c_arr = context.make_array(signature.args[7])(context, builder, args[7])
        a_off, ars, aks = args[1], args[2], args[3]
        b_off, ldb = args[5], args[6]
        c_off, ldc, kred, accf = args[8], args[9], args[10], args[11]
        pa = builder.gep(a_arr.data, [a_off])
        pb = builder.gep(b_arr.data, [b_off])
        pc = builder.gep(c_arr.data, [c_off])
        fname = f"llvm.fma.v{width}{'f64' if dt == types.float64 else 'f32'}"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, vty]), fname)
        esize = dt.bitwidth // 8
        zero_v = ir.Constant(vty, [ir.Constant(fty, 0.0)] * width)

        def vptr(base, offset):
            return builder.bitcast(builder.gep(base, [offset]), vty.as_pointer())

        def c_off_of(r, j):
            return builder.add(builder.mul(ir.Constant(intp, r), ldc), ir.Constant(intp, j * width))

        # Initial accumulators: C (accumulate) or zeros.
        init = []
        with builder.if_else(builder.icmp_unsigned("!=", accf, ir.Constant(accf.type, 0))) as (then, other):
            with then:
                bb_then = builder.block
                loaded = [
                    builder.load(vptr(pc, c_off_of(r, j)), align=esize) for r in range(nrows) for j in range(nvec)
                ]
                bb_then = builder.block
            with other:
                bb_else = builder.block
        for idx in range(nrows * nvec):
            phi = builder.phi(vty)
            phi.add_incoming(loaded[idx], bb_then)
            phi.add_incoming(zero_v, bb_else)
            init.append(phi)
        pre = builder.block
        loop = builder.append_basic_block("mk.loop")
        done = builder.append_basic_block("mk.done")
        zero_i = ir.Constant(intp, 0)
        builder.cbranch(builder.icmp_signed(">", kred, zero_i), loop, done)
        builder.position_at_end(loop)
        d = builder.phi(intp)
        d.add_incoming(zero_i, pre)
        accs = []
        for idx in range(nrows * nvec):
            phi = builder.phi(vty)
            phi.add_incoming(init[idx], pre)
            accs.append(phi)
        brow = builder.mul(d, ldb)
        bv = [builder.load(vptr(pb, builder.add(brow, ir.Constant(intp, j * width))), align=esize) for j in range(nvec)]
        acol = builder.mul(d, aks)
        new = []
        for r in range(nrows):
            aoff = builder.add(builder.mul(ir.Constant(intp, r), ars), acol)
            x = builder.load(builder.gep(pa, [aoff]), align=esize)
            xs = _broadcast(builder, x, vty)
            for j in range(nvec):
                new.append(builder.call(fma, [xs, bv[j], accs[r * nvec + j]]))
        d_next = builder.add(d, ir.Constant(intp, 1))
        d.add_incoming(d_next, builder.block)
        for idx in range(nrows * nvec):
            accs[idx].add_incoming(new[idx], builder.block)
        builder.cbranch(builder.icmp_signed("<", d_next, kred), loop, done)
        loop_end = builder.block
        builder.position_at_end(done)
        results = []
        for idx in range(nrows * nvec):  # phis first: LLVM wants them at the top of the block
            res = builder.phi(vty)
            res.add_incoming(init[idx], pre)
            res.add_incoming(new[idx], loop_end)
            results.append(res)
        if epilogue != PLAIN:
            rs_arr = context.make_array(signature.args[12])(context, builder, args[12])
            prs = builder.gep(rs_arr.data, [args[13]])
            f64 = dt == types.float64
        if epilogue in (EXP2_SHIFTED, TIMES_DIFF):
            for r in range(nrows):
                # row r's shift (or delta), broadcast once for the row's nvec vectors
                mu = _broadcast(builder, builder.load(builder.gep(prs, [ir.Constant(intp, r)]), align=esize), vty)
                for j in range(nvec):
                    x = builder.fsub(results[r * nvec + j], mu)
                    cp = vptr(pc, c_off_of(r, j))
                    if epilogue == EXP2_SHIFTED:
                        y = _exp2_ir(builder, x, width, f64, masked=True)
                    else:
                        y = builder.fmul(builder.load(cp, align=esize), x)
                    builder.store(y, cp, align=esize)
            return context.get_dummy_value()
        if epilogue == EXP2_SUMS:
            for r in range(nrows):
                tot = None
                for j in range(nvec):
                    e = _exp2_ir(builder, results[r * nvec + j], width, f64)
                    builder.store(e, vptr(pc, c_off_of(r, j)), align=esize)
                    tot = e if tot is None else builder.fadd(tot, e)
                p = vptr(prs, ir.Constant(intp, r * width))
                builder.store(builder.fadd(builder.load(p, align=esize), tot), p, align=esize)
            return context.get_dummy_value()
        for r in range(nrows):
            for j in range(nvec):
                builder.store(results[r * nvec + j], vptr(pc, c_off_of(r, j)), align=esize)
        return context.get_dummy_value()

    return codegen


assert ROWS == 8 and VECS == 3  # the panel dispatch below is written for these


@nb.njit(**INLINE)
def _panel_vectors(rem):
    """Vectors in the next column panel when ``rem`` are left: 3, ending 2 + 2 rather than 3 + 1."""
    return 3 if (rem >= 5 or rem == 3) else (2 if rem >= 2 else 1)


def _product_loops(epilogue: int):
    """The loops of one ``gemm*`` product over row blocks and column panels, for one epilogue.

    Each epilogue gets its own three intrinsics (``ROWS`` x 3, 2, 1 vectors)
    and its own loops, so a kernel compiles only the micro-kernels it calls
    (one shared loop with the epilogue as an argument lowered all twelve
    into every product: simd-backward's cold compile 8 -> 17 s).
    """
    k3, k2, k1 = (_micro(ROWS, nv, epilogue) for nv in (3, 2, 1))
    sums = epilogue == EXP2_SUMS  # rs holds W entries per row, else one

    @nb.njit(**INLINE)
    def panel(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, kred, acc, nv, rs, rs_off):
        if nv == 3:
            k3(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, kred, acc, rs, rs_off)
        elif nv == 2:
            k2(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, kred, acc, rs, rs_off)
        else:
            k1(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, kred, acc, rs, rs_off)

    @nb.njit(**INLINE)
    def loops(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, nr, ncol, kred, acc, width, rs, rs_off):
        rstep = width if sums else 1
        if kred * ncol * a.itemsize <= B_IN_L1:
            # B fits in L1 next to a row block of A: rows outermost, so A (whose
            # broadcast loads stall worst on an L1 miss) is read from L1 too.
            for r0 in range(0, nr, ROWS):
                ra, rso = a_off + r0 * ars, rs_off + r0 * rstep
                rem = ncol // width
                j0 = 0
                while rem > 0:
                    nv = _panel_vectors(rem)
                    c0 = c_off + r0 * ldc + j0
                    panel(a, ra, ars, aks, b, b_off + j0, ldb, c, c0, ldc, kred, acc, nv, rs, rso)
                    j0 += nv * width
                    rem -= nv
            return
        rem = ncol // width
        j0 = 0
        while rem > 0:
            nv = _panel_vectors(rem)
            for r0 in range(0, nr, ROWS):
                ra, rso = a_off + r0 * ars, rs_off + r0 * rstep
                c0 = c_off + r0 * ldc + j0
                panel(a, ra, ars, aks, b, b_off + j0, ldb, c, c0, ldc, kred, acc, nv, rs, rso)
            j0 += nv * width
            rem -= nv

    return loops


# One intrinsic per (rows, vectors, epilogue). Measured on one core (AVX-512, float32,
# 96 x 256 x 64 and 96 x 64 x 256 products): 8 x 3 vectors 167-173 GFLOP/s,
# 8 x 2 138-163, 4 x 4 114-160, 6 x 4 137-151 (single-threaded sgemm 2048^2:
# ~150). Short reductions (D = 64) favour many accumulators per B load.
_plain_loops = _product_loops(PLAIN)
_exp2_sums_loops = _product_loops(EXP2_SUMS)
_exp2_shifted_loops = _product_loops(EXP2_SHIFTED)
_times_diff_loops = _product_loops(TIMES_DIFF)


@nb.njit(**OPTS)
def gemm(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, nr, ncol, kred, acc, width):
    """``C[:nr, :ncol] (+)= A[:nr, :kred] @ B[:kred, :ncol]`` with the vector micro-kernels.

    ``A[r, d] = a.flat[a_off + r*ars + d*aks]``, ``B[d, j] = b.flat[b_off +
    d*ldb + j]``, ``C[r, j] = c.flat[c_off + r*ldc + j]`` (arrays
    C-contiguous; offsets/strides in elements). ``nr`` must be a multiple of
    :data:`ROWS` and ``ncol`` a multiple of ``width`` (this dtype's
    :func:`lanes`). ``acc`` False overwrites ``C``. Column panels go
    outermost so a panel of ``B`` (``kred`` rows) stays in L1 while every
    row block of ``A`` passes over it; panels are 3 vectors wide, ending
    with 2 + 2 rather than 3 + 1 (a 1-vector panel reuses each broadcast once).
    """
    _plain_loops(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, nr, ncol, kred, acc, width, c, 0)


@nb.njit(**OPTS)
def gemm_exp2(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, nr, ncol, kred, width, rs, rs_off):
    """``C[:nr, :ncol] = 2**(A @ B)``, adding row ``r``'s lane-wise sums of it into ``rs[rs_off + r*width:][:width]``.

    :func:`gemm` (overwriting; same operands and layout rules) with the
    unchecked ``2**x`` of :func:`_exp2_ir` (no clamps, no multiply by
    ``log2(e)``, no ``ln2`` reduction; float32 results within ``|x| <= 44``,
    float64 ``440``) applied to the accumulators in registers before they
    are stored: a tile's product and exp in one pass, no second read and
    write of ``C``. Row ``r``'s sum of
    ``2**x`` is ``rs[rs_off + r*width : rs_off + (r+1)*width].sum()`` plus
    what ``rs`` held. For tiles whose every product is finite and well
    inside the exponent range (the forward's interior base-2 tiles);
    padding rows of zeros give ``2**0 = 1``.
    """
    _exp2_sums_loops(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, nr, ncol, kred, False, width, rs, rs_off)


@nb.njit(**OPTS)
def gemm_exp2_shifted(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, nr, ncol, kred, width, mu, mu_off):
    """``C[r, :ncol] = 2**((A @ B)[r] - mu[mu_off + r])`` for ``r < nr``, the exp on the accumulators.

    :func:`gemm` (overwriting; same operands and layout rules) followed, in
    registers, by what :func:`exp2_vectors_masked` does to a stored row
    (the same operations, so the same bits): ``-inf`` gives 0, results below
    the exponent range give 0, NaN stays NaN; no upper clamp (``x - mu``
    must stay below the range's top, e.g. ``mu`` a row's log-sum-exp).
    ``mu[mu_off : mu_off + nr]`` must be readable (padding rows too: ``+inf``
    gives them 0). The backward's ``P = 2**(S - lse log2 e)`` on tiles
    that need no mask.
    """
    _exp2_shifted_loops(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, nr, ncol, kred, False, width, mu, mu_off)


@nb.njit(**OPTS)
def gemm_times_diff(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, nr, ncol, kred, width, dl, dl_off):
    """``C[r, :ncol] = C[r, :ncol] * ((A @ B)[r] - dl[dl_off + r])`` for ``r < nr``, in registers.

    :func:`gemm`'s operands and layout rules; ``C`` is read (each element
    once, just before it is overwritten) instead of accumulated into. The
    backward's ``dS = P * (dP - delta)`` with ``P`` in ``C``: the ``dP``
    tile is never stored. ``dl[dl_off : dl_off + nr]`` must be readable.
    """
    _times_diff_loops(a, a_off, ars, aks, b, b_off, ldb, c, c_off, ldc, nr, ncol, kred, False, width, dl, dl_off)


@intrinsic
def _transpose_block(typingctx, src, s_off, lds, dst, d_off, ldd):
    """``dst.flat[d_off + c*ldd + r] = src.flat[s_off + r*lds + c]`` for ``r, c < W`` (one vector width).

    The ``W`` rows are loaded as vectors and transposed in registers by
    ``log2(W)`` rounds of two-input shuffles (each round swaps the
    off-diagonal blocks of every pair of rows ``h`` apart), then stored as
    vectors: no scalar gathers. Both arrays C-contiguous, same dtype.
    """
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array)):
        return None
    dt = src.dtype
    if dt not in (types.float32, types.float64) or dst.dtype != dt:
        return None
    if not all(isinstance(x, types.Integer) for x in (s_off, lds, d_off, ldd)):
        return None
    width = lanes(8 if dt == types.float64 else 4)
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        fty = context.get_value_type(dt)
        vty = ir.VectorType(fty, width)
        intp = context.get_value_type(types.intp)
        esize = dt.bitwidth // 8
        sarr = context.make_array(signature.args[0])(context, builder, args[0])
        darr = context.make_array(signature.args[3])(context, builder, args[3])
        ps = builder.gep(sarr.data, [args[1]])
        pd = builder.gep(darr.data, [args[4]])

        def vptr(base, i, ld):
            return builder.bitcast(builder.gep(base, [builder.mul(ir.Constant(intp, i), ld)]), vty.as_pointer())

        rows = [builder.load(vptr(ps, r, args[2]), align=esize) for r in range(width)]
        i32 = ir.IntType(32)
        h = width // 2
        while h >= 1:
            lo_mask = [c if c & h == 0 else width + c - h for c in range(width)]
            hi_mask = [c + h if c & h == 0 else width + c for c in range(width)]
            lo_c = ir.Constant(ir.VectorType(i32, width), lo_mask)
            hi_c = ir.Constant(ir.VectorType(i32, width), hi_mask)
            for i in range(width):
                if i & h == 0:
                    a, b = rows[i], rows[i + h]
                    rows[i] = builder.shuffle_vector(a, b, lo_c)
                    rows[i + h] = builder.shuffle_vector(a, b, hi_c)
            h //= 2
        for c in range(width):
            builder.store(rows[c], vptr(pd, c, args[5]), align=esize)
        return context.get_dummy_value()

    return sig, codegen


@nb.njit(**INLINE)
def transpose_block(src, s_off, lds, dst, d_off, ldd):
    """Transpose one ``W x W`` block (``W`` = this dtype's :func:`lanes`) from ``src`` into ``dst``.

    ``dst.flat[d_off + c*ldd + r] = src.flat[s_off + r*lds + c]`` for ``r, c < W``;
    offsets and leading dimensions in elements, both arrays C-contiguous.
    """
    _transpose_block(src, s_off, lds, dst, d_off, ldd)


def _broadcast(builder, x, vty):
    """A ``vty`` vector with ``x`` in every lane (insertelement + shufflevector; one vbroadcast)."""
    undef = ir.Constant(vty, ir.Undefined)
    lane0 = builder.insert_element(undef, x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(lane0, undef, ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count))


def _vector_fold(builder, base, nvec, vty, intp, start, step):
    """Emit ``acc = start; for i < nvec: acc = step(&base[i*W] as <W x T>*, acc)``; returns the final ``acc``.

    The loop skeleton of the row-wise vector intrinsics (``nvec`` may be 0:
    then ``start`` comes back).
    """
    width = vty.count
    pre = builder.block
    loop = builder.append_basic_block("vfold.loop")
    done = builder.append_basic_block("vfold.done")
    zero = ir.Constant(intp, 0)
    builder.cbranch(builder.icmp_signed(">", nvec, zero), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(intp)
    acc = builder.phi(vty)
    i.add_incoming(zero, pre)
    acc.add_incoming(start, pre)
    ptr = builder.bitcast(builder.gep(base, [builder.mul(i, ir.Constant(intp, width))]), vty.as_pointer())
    nxt = step(ptr, acc)
    inext = builder.add(i, ir.Constant(intp, 1))
    end = builder.block
    i.add_incoming(inext, end)
    acc.add_incoming(nxt, end)
    builder.cbranch(builder.icmp_signed("<", inext, nvec), loop, done)
    builder.position_at_end(done)
    res = builder.phi(vty)
    res.add_incoming(start, pre)
    res.add_incoming(nxt, end)
    return res


def _make_vmax(absolute: bool):
    """``max(init, a[off : off + nvec*W])`` (of ``|a|`` with ``absolute``) with ``llvm.maxnum`` on vectors.

    NaN entries are skipped, as by maxnum.
    """

    @intrinsic
    def _k(typingctx, a, off, nvec, init):
        return _vmax_typing(a, off, nvec, init, absolute)

    return _k


def _vmax_typing(a, off, nvec, init, absolute):
    """Typing and code generation of :func:`_make_vmax`'s intrinsics (``init``: any float, cast to the dtype)."""
    if not isinstance(a, types.Array) or a.dtype not in (types.float32, types.float64):
        return None
    if not isinstance(init, types.Float):
        return None
    if not isinstance(off, types.Integer) or not isinstance(nvec, types.Integer):
        return None
    dt = a.dtype
    width = lanes(8 if dt == types.float64 else 4)
    sig = dt(a, types.intp, types.intp, dt)

    def codegen(context, builder, signature, args):
        fty = context.get_value_type(dt)
        vty = ir.VectorType(fty, width)
        intp = context.get_value_type(types.intp)
        suffix = f"v{width}{'f64' if dt == types.float64 else 'f32'}"
        vmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty]), f"llvm.maxnum.{suffix}")
        red = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(fty, [vty]), f"llvm.vector.reduce.fmax.{suffix}"
        )
        smax = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(fty, [fty, fty]), f"llvm.maxnum.{'f64' if dt == types.float64 else 'f32'}"
        )
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        base = builder.gep(arr.data, [args[1]])
        nvec, init = args[2], args[3]
        start = ir.Constant(vty, [ir.Constant(fty, float("-inf"))] * width)
        esize = dt.bitwidth // 8

        fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty]), f"llvm.fabs.{suffix}")

        def step(ptr, acc):
            x = builder.load(ptr, align=esize)
            return builder.call(vmax, [acc, builder.call(fabs, [x]) if absolute else x])

        res = _vector_fold(builder, base, nvec, vty, intp, start, step)
        return builder.call(smax, [builder.call(red, [res]), init])

    return sig, codegen


_vmax = _make_vmax(False)
_vabsmax = _make_vmax(True)


@nb.njit(**INLINE)
def row_max(srow, nc, init):
    """``max(init, srow[:nc])`` ignoring NaN entries (as ``x > m ? x : m`` does), vectorised.

    ``srow`` is a C-contiguous 1-D array (a row of a tile). LLVM does not
    vectorise the compare-and-select loop (NaN semantics), so full vectors
    go through ``llvm.maxnum``.
    """
    width = LANES32 * 4 // srow.itemsize
    nv = nc // width
    m = _vmax(srow, 0, nv, init)
    for c in range(nv * width, nc):
        m = srow[c] if srow[c] > m else m
    return m


@nb.njit(**INLINE)
def abs_max(a, n):
    """``max(|a[:n]|)`` (0 for ``n = 0``) of a C-contiguous 1-D array, vectorised; NaN entries are skipped."""
    width = LANES32 * 4 // a.itemsize
    nv = n // width
    m = _vabsmax(a, 0, nv, 0.0)
    for c in range(nv * width, n):
        x = abs(a[c])
        m = x if x > m else m
    return m


#: float32 exp: Cody-Waite range reduction and a degree-5 polynomial (the
#: constants of :func:`selfattn.backends._numba.tiles.exp_shift_row`).
_EXP_LO, _EXP_HI = -87.33, 88.37
_LOG2E, _LN2_HI, _LN2_LO = 1.44269504088896341, 0.693359375, 2.12194440e-4
_EXP_POLY = (0.008375128731131554, 0.04190078377723694, 0.16666415333747864, 0.49999120831489563, 1.0, 1.0)


#: float64 exp: fdlibm's two-part ln2, Taylor polynomial to r**12/12! on |r| <= ln2/2
#: (truncation below 2e-16 relative); clamped to [-708, 709] so 2**n stays a normal number.
_EXP64_LO, _EXP64_HI = -708.0, 709.0
_LN2_HI64, _LN2_LO64 = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_EXP64_POLY = tuple(1.0 / math.factorial(k) for k in range(12, -1, -1))


#: Scale by 2**n with AVX-512's ``vscalef`` (one instruction instead of four) when the
#: host has AVX-512F, whatever vector width was forced: the intrinsic exists only there.
_SCALEF = bool(_host_features().get("avx512f"))


def _times_pow2(builder, p, fn, width, f64):
    """``p * 2**fn`` for a whole-number vector ``fn`` inside the normal exponent range.

    Both ways scale exactly by a power of two, so they give the same bits:
    ``vscalefps/pd`` on 512-bit vectors of an AVX-512 host, else ``2**fn``
    built from its exponent bits (convert, add the bias, shift, multiply).
    """
    fty = ir.DoubleType() if f64 else ir.FloatType()
    vty = ir.VectorType(fty, width)
    if _SCALEF and width * (64 if f64 else 32) == 512:
        mty = ir.IntType(width)
        scalef = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(vty, [vty, vty, vty, mty, ir.IntType(32)]),
            f"llvm.x86.avx512.mask.scalef.{'pd' if f64 else 'ps'}.512",
        )
        # all lanes (mask -1), rounding as MXCSR says (_MM_FROUND_CUR_DIRECTION = 4)
        return builder.call(scalef, [p, fn, p, ir.Constant(mty, -1), ir.Constant(ir.IntType(32), 4)])
    ity = ir.VectorType(ir.IntType(64 if f64 else 32), width)
    bias, shift = (1023, 52) if f64 else (127, 23)
    bits = builder.shl(
        builder.add(builder.fptosi(fn, ity), ir.Constant(ity, [bias] * width)), ir.Constant(ity, [shift] * width)
    )
    return builder.fmul(p, builder.bitcast(bits, vty))


def _exp_ir(builder, x0, width, f64=False):
    """LLVM IR for ``exp(x0)`` on a ``<width x float>`` (``<width x double>`` with ``f64``).

    float32: the algorithm of ``tiles.exp_shift_row`` (arguments below -87.33
    give 0, above 88.37 the value at 88.37). float64: arguments below -708
    give 0, above 709 the value at 709. ``exp(-inf) = 0``; NaN stays NaN.
    """
    fty = ir.DoubleType() if f64 else ir.FloatType()
    vty = ir.VectorType(fty, width)
    mod = builder.module
    suffix = f"v{width}{'f64' if f64 else 'f32'}"
    fnty2 = ir.FunctionType(vty, [vty, vty])
    vmin = cgutils.get_or_insert_function(mod, fnty2, f"llvm.minnum.{suffix}")
    vmax = cgutils.get_or_insert_function(mod, fnty2, f"llvm.maxnum.{suffix}")
    rint = cgutils.get_or_insert_function(mod, ir.FunctionType(vty, [vty]), f"llvm.rint.{suffix}")
    fma = cgutils.get_or_insert_function(mod, ir.FunctionType(vty, [vty, vty, vty]), f"llvm.fma.{suffix}")

    def splat(x):
        return ir.Constant(vty, [ir.Constant(fty, x)] * width)

    lo, hi = (_EXP64_LO, _EXP64_HI) if f64 else (_EXP_LO, _EXP_HI)
    ln2_hi, ln2_lo = (_LN2_HI64, _LN2_LO64) if f64 else (_LN2_HI, -_LN2_LO)
    poly = _EXP64_POLY if f64 else _EXP_POLY
    x = builder.call(vmin, [builder.call(vmax, [x0, splat(lo)]), splat(hi)])
    fn = builder.call(rint, [builder.fmul(x, splat(_LOG2E))])
    nfn = builder.fneg(fn)
    r = builder.call(fma, [nfn, splat(ln2_hi), x])
    r = builder.call(fma, [nfn, splat(ln2_lo), r])
    p = splat(poly[0])
    for coef in poly[1:]:
        p = builder.call(fma, [p, r, splat(coef)])
    e = _times_pow2(builder, p, fn, width, f64)
    # 0 below the range; NaN stays NaN
    e = builder.select(builder.fcmp_ordered(">=", x0, splat(lo)), e, splat(0.0))
    return builder.select(builder.fcmp_unordered("uno", x0, x0), x0, e)


#: The same polynomials in ``r = y / ln2`` (``2**r = exp(r ln2)``, ``|r| <= 1/2``): the
#: coefficient of ``r**k`` times ``ln2**k``, so :func:`_exp2_ir` is as accurate as the exp.
_EXP2_POLY = tuple(c * math.log(2.0) ** (len(_EXP_POLY) - 1 - i) for i, c in enumerate(_EXP_POLY))
_EXP2_POLY64 = tuple(c * math.log(2.0) ** (len(_EXP64_POLY) - 1 - i) for i, c in enumerate(_EXP64_POLY))


#: Smallest power of two the masked ``2**x`` builds (a normal number; below it the result is 0).
_EXP2_LO, _EXP2_LO64 = -126.0, -1022.0


def _exp2_ir(builder, x0, width, f64=False, masked=False):
    """LLVM IR for ``2**x0`` on a vector of finite ``x0`` well inside the exponent range.

    ``n = rint(x)``, ``r = x - n`` (exact), a polynomial for ``2**r``
    (:data:`_EXP2_POLY`), times ``2**n``. For scores already multiplied by
    ``log2(e)`` this is ``exp`` with neither the multiply nor the two-step
    ``ln2`` reduction: 9-10 vector instructions instead of 14-15 (float32).
    ``masked`` also takes ``-inf`` (a masked score), giving exactly 0
    (arguments below -126, -1022 in float64, give 0 too), and keeps NaN: a
    clamp, a compare and two selects more.
    """
    fty = ir.DoubleType() if f64 else ir.FloatType()
    vty = ir.VectorType(fty, width)
    suffix = f"v{width}{'f64' if f64 else 'f32'}"
    mod = builder.module
    rint = cgutils.get_or_insert_function(mod, ir.FunctionType(vty, [vty]), f"llvm.rint.{suffix}")
    fma = cgutils.get_or_insert_function(mod, ir.FunctionType(vty, [vty, vty, vty]), f"llvm.fma.{suffix}")

    def splat(v):
        return ir.Constant(vty, [ir.Constant(fty, v)] * width)

    lo = splat(_EXP2_LO64 if f64 else _EXP2_LO)
    if masked:
        vmax = cgutils.get_or_insert_function(mod, ir.FunctionType(vty, [vty, vty]), f"llvm.maxnum.{suffix}")
        x = builder.call(vmax, [x0, lo])
    else:
        x = x0
    fn = builder.call(rint, [x])
    r = builder.fsub(x, fn)
    poly = _EXP2_POLY64 if f64 else _EXP2_POLY
    p = splat(poly[0])
    for coef in poly[1:]:
        p = builder.call(fma, [p, r, splat(coef)])
    e = _times_pow2(builder, p, fn, width, f64)
    if masked:
        e = builder.select(builder.fcmp_ordered(">=", x0, lo), e, splat(0.0))
        e = builder.select(builder.fcmp_unordered("uno", x0, x0), x0, e)
    return e


def _reduce_add(builder, vec, width, f64=False):
    """The horizontal sum of a ``<width x float>`` (``double`` with ``f64``)."""
    fty = ir.DoubleType() if f64 else ir.FloatType()
    vty = ir.VectorType(fty, width)
    red = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(fty, [fty, vty]),
        f"llvm.vector.reduce.fadd.v{width}{'f64' if f64 else 'f32'}",
    )
    return builder.call(red, [ir.Constant(fty, 0.0), vec])


def _make_row_exp(kind: str):
    """The vector loop ``a = f(a - mu)`` of the row exps; returns the sum.

    ``kind``: ``"exp"`` (:func:`exp_shift_vectors`) or ``"exp2_masked"``
    (:func:`exp2_vectors_masked`). (The unchecked ``2**x`` of interior tiles
    is taken on the product's accumulators instead: :func:`gemm_exp2`.)
    """

    @intrinsic
    def _k(typingctx, a, nvec, mu):
        if not isinstance(a, types.Array) or a.dtype not in (types.float32, types.float64) or mu != a.dtype:
            return None
        if not isinstance(nvec, types.Integer):
            return None
        dt = a.dtype
        f64 = dt == types.float64
        width = lanes(8 if f64 else 4)
        sig = dt(a, types.intp, dt)

        def codegen(context, builder, signature, args):
            fty = context.get_value_type(dt)
            vty = ir.VectorType(fty, width)
            intp = context.get_value_type(types.intp)
            arr = context.make_array(signature.args[0])(context, builder, args[0])
            muv = _broadcast(builder, args[2], vty)
            esize = dt.bitwidth // 8

            def step(ptr, tot):
                x = builder.fsub(builder.load(ptr, align=esize), muv)
                if kind == "exp":
                    e = _exp_ir(builder, x, width, f64)
                else:
                    e = _exp2_ir(builder, x, width, f64, masked=True)
                builder.store(e, ptr, align=esize)
                return builder.fadd(tot, e)

            zero_v = ir.Constant(vty, [ir.Constant(fty, 0.0)] * width)
            res = _vector_fold(builder, arr.data, args[1], vty, intp, zero_v, step)
            return _reduce_add(builder, res, width, f64)

        return sig, codegen

    return _k


_vexp = _make_row_exp("exp")
_vexp2_masked = _make_row_exp("exp2_masked")


@nb.njit(**INLINE)
def exp_shift_vectors(srow, nc, mu):
    """``srow[:n] = exp(srow[:n] - mu)`` for the largest ``n <= nc`` of whole vectors; returns ``(sum, n)``.

    float32 and float64, at the host's full vector width (LLVM's own
    vectoriser stops at 256-bit vectors on CPUs where it prefers them, and
    does not vectorise ``math.exp`` at all). float32: the algorithm and
    constants of the scalar loop of ``tiles.exp_shift_row``, which finishes
    the tail. float64: see :data:`_EXP64_POLY` (relative error about 2 ulp).
    ``exp(-inf) = 0``, NaN stays NaN.
    """
    width = LANES32 * 4 // srow.itemsize
    nv = nc // width
    return _vexp(srow, nv, mu), nv * width


@nb.njit(**INLINE)
def exp2_vectors_masked(srow, nc, mu):
    """``srow[:n] = 2**(srow[:n] - mu)`` for whole vectors, where masked entries hold ``-inf``; returns ``(sum, n)``.

    For rows of scores computed with ``log2(e)`` folded into the query's
    scale (so ``2**s`` is the softmax's ``exp``): no multiply by ``log2(e)``
    and no two-constant reduction (see :func:`_exp2_ir`). ``-inf`` gives 0,
    finite entries below the range give 0 (no upper clamp: ``srow - mu`` must
    stay below the exponent range's top), ``-inf`` exactly 0, NaN stays NaN
    (a clamp, a compare and two selects per vector more). For the band-edge
    tiles of the forward's base-2 tasks and the backward's ``P = 2**(S - lse)``.
    """
    width = LANES32 * 4 // srow.itemsize
    nv = nc // width
    return _vexp2_masked(srow, nv, mu), nv * width
