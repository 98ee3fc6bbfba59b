// selfattn fused attention kernels (CuPy RawModule source).
//
// launch.kernel_source("attn.cu") prepends the dropout hash constants
// (launch.hash_defines(), from selfattn/_dropout.py) and common.cuh; no other
// header is needed (float16 is handled as raw bits with cvt PTX), so the
// source compiles with NVRTC alone -- tests/test_cuda_nvrtc.py checks sm_80
// and sm_90.
//
// attn_fwd_<dtype>_<DMAX>: online-softmax forward (FlashAttention-style) with
// float32 accumulation for float16/float32 and float64 for float64. One CUDA
// block handles BM query rows of one (batch, query head); each thread owns one
// query row (its scaled q and output accumulator live in registers), and K/V
// tiles of BN keys are staged in shared memory. Memory is O(N): only out and
// lse are written. Keys outside the causal/window band of the whole row block
// are never loaded (block skipping). Masks are read through element strides
// (0 for broadcast axes) plus a per-batch mask index: never expanded. GQA maps
// query head h to key/value head h / G without copying K/V.
//
// Every forward (CUDA cores and tensor cores) shares one parameter list
// (SA_FWD_ARGS) and these semantics, in the API's order of operations:
//   s = (q . k) * scale; soft-capping s = softcap * tanh(s / softcap) when
//   softcap > 0 (tanh in the accumulation type); ALiBi s -= slope[s_b, h] *
//   |j - (i + offset)| when use_alibi (slopes in the accumulation type,
//   (B or S, Hq) contiguous); + mask; the causal/window band
//   offset - lower <= j - i <= offset + upper; softmax; dropout.
// `offset` is the band's diagonal (M - N for a whole call, another value for a
// chunk of a larger call). Neither softcap nor ALiBi can make a key outside
// the band attendable, so block skipping is unchanged by them; with both off
// they cost one uniform branch each.
// Dropout counters: weight (b, h, i, j) uses (batch_index[b] or b) *
// total_heads + head_start + h, row_start + i and col_start + j
// (Problem.coords), so a chunk draws its piece of the whole call's pattern.
// Packed variable-length batches (varlen = 1): q/k/v are (1, H, total, D),
// block `blk` takes query tile blk / Hq (of the host-built tile table:
// tile_seq = its sequence s, tile_row = its first local row) and head
// blk % Hq; the sequence's rows are [cu_q[s], cu_q[s+1]) and keys
// [cu_k[s], cu_k[s+1]); positions (band, ALiBi, dropout row/column) are local
// to the sequence, its band offset is M_s - N_s, and s is its ALiBi row and
// dropout batch entry. out/lse keep the packed layout (H, total_q, .).

#define SA_BM 64

// Hardware instructions (PTX) live in small wrappers, each guarded by
// SA_EMULATE: the tests' host SIMT emulator (simt.hpp in
// tests/plugins/good/selfattn_cuda_emulated) supplies the same functions with
// the semantics the PTX ISA documents, so this file also runs on a CPU.
#ifndef SA_EMULATE
__device__ __forceinline__ float sa_h2f(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short sa_f2h(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
#endif

// Storage type T -> accumulation type A and back.
template <typename A> __device__ __forceinline__ A sa_load(const unsigned short* p, long long i) { return (A)sa_h2f(p[i]); }
template <typename A> __device__ __forceinline__ A sa_load(const float* p, long long i) { return (A)p[i]; }
template <typename A> __device__ __forceinline__ A sa_load(const double* p, long long i) { return (A)p[i]; }
__device__ __forceinline__ void sa_store(unsigned short* p, long long i, float v) { p[i] = sa_f2h(v); }
__device__ __forceinline__ void sa_store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void sa_store(double* p, long long i, double v) { p[i] = v; }

__device__ __forceinline__ float sa_exp(float x) { return expf(x); }
__device__ __forceinline__ double sa_exp(double x) { return exp(x); }
__device__ __forceinline__ float sa_log(float x) { return logf(x); }
__device__ __forceinline__ double sa_log(double x) { return log(x); }
// Soft-capping's tanh in the accumulation type: float32 for float16/float32, float64 for float64.
__device__ __forceinline__ float sa_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double sa_tanh(double x) { return tanh(x); }

template <typename A> __device__ __forceinline__ A sa_ninf();
template <> __device__ __forceinline__ float sa_ninf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double sa_ninf<double>() { return __longlong_as_double(0xfff0000000000000LL); }
template <typename A> __device__ __forceinline__ A sa_nan();
template <> __device__ __forceinline__ float sa_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double sa_nan<double>() { return __longlong_as_double(0x7ff8000000000000LL); }

// Mask value for one score: kind 0 none, 1 bool (uint8), 2 float16, 3 float32, 4 float64.
// Returns the additive term (0 or -inf for bool masks).
template <typename A>
__device__ __forceinline__ A sa_mask_term(const void* mask, int kind, long long off) {
    switch (kind) {
        case 1: return ((const unsigned char*)mask)[off] ? (A)0 : sa_ninf<A>();
        case 2: return (A)sa_h2f(((const unsigned short*)mask)[off]);
        case 3: return (A)((const float*)mask)[off];
        case 4: return (A)((const double*)mask)[off];
        default: return (A)0;
    }
}

// |j - (i + offset)|, ALiBi's distance, as the accumulation type.
template <typename A>
__device__ __forceinline__ A sa_abs_dist(long long rel) { return (A)(rel < 0 ? -rel : rel); }

// Row block of a forward launch: query rows [i0, i1) (local to the sequence
// for varlen) of one (batch b, query head h), its key/value head hk = h / G,
// the key range [j0, j1) any of its rows may attend under the causal/window
// band (Problem.key_range: keys outside it are never loaded), where the
// sequence starts in q/out (q0) and in k/v (k0), its band offset and the
// batch entry s of its ALiBi slopes and dropout counters. Row indices are
// 64-bit: with N close to 2^31, i0 + BM (and a thread's row) no longer fits
// in an int.
struct SaRowBlock {
    long long obase;     // first element row of the sequence in out/lse: (b * Hq + h) * N + q0
    long long i0, i1;    // local query rows [i0, i1)
    long long j0, j1;    // local keys [j0, j1) that any row may attend
    long long q0, k0;    // first row of the sequence in q and in k/v (0 unless varlen)
    long long off;       // key j is at band distance j - (i + off) from query i
    int b, h, hk, s;     // q/k/v/mask batch, query head, key/value head, ALiBi/dropout batch entry
};

// Block `blk` of a launch. Ordinary launches: within a head the row blocks go
// last-first (under a causal mask the last rows see the most keys, and
// starting the longest blocks first shortens the tail of the launch, as
// FlashAttention-2 does). Packed varlen launches (varlen = 1): tile blk / Hq
// of the host's table (ordered longest first), head blk % Hq (the heads of
// one tile are neighbours, so they share K/V in L2).
template <int BM>
__device__ __forceinline__ SaRowBlock sa_row_block(long long blk, long long n_row_blocks, int Hq, int G, int N, int M,
                                                   long long offset, int has_lower, int lower, int has_upper, int upper,
                                                   int varlen, const long long* cu_q, const long long* cu_k,
                                                   const long long* tile_seq, const long long* tile_row) {
    SaRowBlock rb;
    long long nq = N, nk = M;
    if (varlen) {
        const long long t = blk / Hq;
        rb.h = (int)(blk - t * Hq);
        rb.b = 0;
        rb.s = (int)tile_seq[t];
        rb.q0 = cu_q[rb.s];
        rb.k0 = cu_k[rb.s];
        nq = cu_q[rb.s + 1] - rb.q0;
        nk = cu_k[rb.s + 1] - rb.k0;
        rb.i0 = tile_row[t];
        rb.off = nk - nq;
        rb.obase = (long long)rb.h * N + rb.q0;
    } else {
        const long long bh = blk / n_row_blocks;
        rb.i0 = (n_row_blocks - 1 - (blk - bh * n_row_blocks)) * BM;
        rb.b = (int)(bh / Hq);
        rb.h = (int)(bh - (long long)rb.b * Hq);
        rb.s = rb.b;
        rb.q0 = 0;
        rb.k0 = 0;
        rb.off = offset;
        rb.obase = bh * N;
    }
    rb.hk = rb.h / G;
    rb.i1 = min(nq, rb.i0 + BM);
    rb.j0 = 0;
    rb.j1 = nk;
    if (has_lower) rb.j0 = max(0LL, rb.i0 + rb.off - (long long)lower);
    if (has_upper) rb.j1 = min(nk, rb.i1 - 1 + rb.off + (long long)upper + 1);
    if (rb.j1 < rb.j0) rb.j1 = rb.j0;
    return rb;
}

// The dropout pattern's batch·head counter of batch entry s, query head h (Problem.coords).
__device__ __forceinline__ sa_u32 sa_drop_bh(int s, int h, const long long* batch_index, int use_batch_index,
                                             long long head_start, long long total_heads) {
    const long long bi = use_batch_index ? batch_index[s] : (long long)s;
    return (sa_u32)(bi * total_heads + head_start + h);
}

// The parameter list of every forward kernel (launch.FWD_SIGNATURE mirrors it).
#define SA_FWD_ARGS(T, A) \
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out, \
    A* __restrict__ lse, const void* __restrict__ mask, const long long* __restrict__ mask_index, int mask_kind, \
    long long qs0, long long qs1, long long qs2, long long qs3, \
    long long ks0, long long ks1, long long ks2, long long ks3, \
    long long vs0, long long vs1, long long vs2, long long vs3, \
    long long ms0, long long ms1, long long ms2, long long ms3, \
    int Hq, int G, int N, int M, int D, int Dv, long long n_row_blocks, long long total_blocks, \
    double scale, long long offset, int has_lower, int lower, int has_upper, int upper, \
    double softcap, const A* __restrict__ alibi, int use_alibi, \
    sa_u32 threshold, sa_u32 seed_lo, sa_u32 seed_hi, double drop_scale, int use_dropout, \
    const long long* __restrict__ batch_index, int use_batch_index, long long head_start, long long total_heads, \
    long long row_start, long long col_start, \
    int varlen, const long long* __restrict__ cu_q, const long long* __restrict__ cu_k, \
    const long long* __restrict__ tile_seq, const long long* __restrict__ tile_row, int write_lse

#define SA_FWD_PASS \
    q, k, v, out, lse, mask, mask_index, mask_kind, qs0, qs1, qs2, qs3, ks0, ks1, ks2, ks3, \
    vs0, vs1, vs2, vs3, ms0, ms1, ms2, ms3, Hq, G, N, M, D, Dv, n_row_blocks, total_blocks, \
    scale, offset, has_lower, lower, has_upper, upper, softcap, alibi, use_alibi, \
    threshold, seed_lo, seed_hi, drop_scale, use_dropout, batch_index, use_batch_index, head_start, total_heads, \
    row_start, col_start, varlen, cu_q, cu_k, tile_seq, tile_row, write_lse

// Key tile size: keep the K and V tiles within 32 KiB of static shared memory.
template <typename A, int DMAX>
struct SaTile {
    static const int raw = 32768 / (2 * DMAX * (int)sizeof(A));  // + BN*SA_BM scores: <= 48 KiB
    static const int BN = raw > 32 ? 32 : raw;
};

template <typename T, typename A, int DMAX>
__device__ void sa_attn_fwd(SA_FWD_ARGS(T, A))
{
    const int BN = SaTile<A, DMAX>::BN;
    __shared__ A Ks[BN][DMAX];
    __shared__ A Vs[BN][DMAX];
    __shared__ A Ss[BN][SA_BM];
    const A sc = (A)scale;
    const A dscale = (A)drop_scale;
    const bool capped = softcap > 0.0;
    const A cap = (A)softcap;
    const A inv_cap = capped ? (A)(1.0 / softcap) : (A)0;   // as the blockwise path: tanh(s * (1/cap))
    const A NINF = sa_ninf<A>();
    const int tid = threadIdx.x;
    const sa_u32 col0 = (sa_u32)col_start;   // dropout counters wrap mod 2^32, like the hash's

    for (long long blk = blockIdx.x; blk < total_blocks; blk += gridDim.x) {
        const SaRowBlock rb = sa_row_block<SA_BM>(blk, n_row_blocks, Hq, G, N, M, offset, has_lower, lower, has_upper,
                                                  upper, varlen, cu_q, cu_k, tile_seq, tile_row);
        const long long j0 = rb.j0, j1 = rb.j1, off = rb.off;
        const int b = rb.b, h = rb.h, hk = rb.hk;
        const long long i = rb.i0 + tid;
        const bool row_ok = i < rb.i1;
        const long long qrow = b * qs0 + h * qs1 + (rb.q0 + i) * qs2;

        A qr[DMAX];
        A acc[DMAX];
#pragma unroll
        for (int c = 0; c < DMAX; ++c) {
            qr[c] = (row_ok && c < D) ? sa_load<A>(q, qrow + c * qs3) * sc : (A)0;
            acc[c] = (A)0;
        }
        A m_run = NINF, l_run = (A)0;
        bool saw_nan = false;
        sa_u32 rowh = 0;
        if (use_dropout)
            rowh = sa_row_hash(sa_head_hash(seed_lo, seed_hi,
                                            sa_drop_bh(rb.s, h, batch_index, use_batch_index, head_start, total_heads)),
                               (sa_u32)(row_start + i));
        const A slope = use_alibi ? alibi[(long long)rb.s * Hq + h] : (A)0;
        long long mrow = 0;
        if (mask_kind) mrow = mask_index[b] * ms0 + h * ms1 + i * ms2;

        for (long long jt = j0; jt < j1; jt += BN) {
            __syncthreads();
            for (int e = tid; e < BN * DMAX; e += SA_BM) {
                const int r = e / DMAX, c = e - (e / DMAX) * DMAX;
                const long long j = jt + r;
                const bool ok = j < j1;
                Ks[r][c] = (ok && c < D) ? sa_load<A>(k, b * ks0 + hk * ks1 + (rb.k0 + j) * ks2 + c * ks3) : (A)0;
                Vs[r][c] = (ok && c < Dv) ? sa_load<A>(v, b * vs0 + hk * vs1 + (rb.k0 + j) * vs2 + c * vs3) : (A)0;
            }
            __syncthreads();
            if (!row_ok) continue;

            // Scores of this thread's row for the tile, in shared memory (column
            // tid: conflict-free), so the key loop need not be unrolled.
            A tmax = NINF;
            for (int r = 0; r < BN; ++r) {
                const long long j = jt + r;
                A x = NINF;
                if (j < j1) {
                    A dot = (A)0;
#pragma unroll
                    for (int c = 0; c < DMAX; ++c) dot += qr[c] * Ks[r][c];
                    x = dot;
                    if (capped) x = cap * sa_tanh(x * inv_cap);
                    const long long rel = j - (i + off);
                    if (use_alibi) x -= slope * sa_abs_dist<A>(rel);
                    if (mask_kind) x += sa_mask_term<A>(mask, mask_kind, mrow + j * ms3);
                    if ((has_lower && rel < -(long long)lower) || (has_upper && rel > (long long)upper)) x = NINF;
                }
                if (x != x) saw_nan = true;
                Ss[r][tid] = x;
                tmax = x > tmax ? x : tmax;
            }
            const A m_new = tmax > m_run ? tmax : m_run;
            if (m_new == NINF) continue;  // nothing attendable yet
            const A corr = sa_exp(m_run - m_new);  // exp(-inf) = 0 on the first tile
            l_run *= corr;
#pragma unroll
            for (int c = 0; c < DMAX; ++c) acc[c] *= corr;
            for (int r = 0; r < BN; ++r) {
                A p = sa_exp(Ss[r][tid] - m_new);
                l_run += p;
                if (use_dropout) p = sa_keep(rowh, (sa_u32)(jt + r) + col0, threshold) ? p * dscale : (A)0;
#pragma unroll
                for (int c = 0; c < DMAX; ++c) acc[c] += p * Vs[r][c];
            }
            m_run = m_new;
        }
        if (row_ok) {
            const long long orow = rb.obase + i;
            A inv = (A)0, lv = NINF;
            if (saw_nan) { inv = sa_nan<A>(); lv = sa_nan<A>(); }
            else if (l_run > (A)0) { inv = (A)1 / l_run; lv = m_run + sa_log(l_run); }
            else if (l_run != l_run) { inv = sa_nan<A>(); lv = sa_nan<A>(); }
#pragma unroll
            for (int c = 0; c < DMAX; ++c)
                if (c < Dv) sa_store(out, orow * Dv + c, saw_nan ? sa_nan<A>() : acc[c] * inv);
            if (write_lse) lse[orow] = lv;
        }
    }
}

#define SA_DEFINE_FWD(NAME, T, A, DMAX) \
    extern "C" __global__ void __launch_bounds__(SA_BM) NAME(SA_FWD_ARGS(T, A)) { \
        sa_attn_fwd<T, A, DMAX>(SA_FWD_PASS); \
    }

SA_DEFINE_FWD(attn_fwd_float16_32, unsigned short, float, 32)
SA_DEFINE_FWD(attn_fwd_float16_64, unsigned short, float, 64)
SA_DEFINE_FWD(attn_fwd_float16_128, unsigned short, float, 128)
SA_DEFINE_FWD(attn_fwd_float16_256, unsigned short, float, 256)
SA_DEFINE_FWD(attn_fwd_float32_32, float, float, 32)
SA_DEFINE_FWD(attn_fwd_float32_64, float, float, 64)
SA_DEFINE_FWD(attn_fwd_float32_128, float, float, 128)
SA_DEFINE_FWD(attn_fwd_float32_256, float, float, 256)
SA_DEFINE_FWD(attn_fwd_float64_32, double, double, 32)
SA_DEFINE_FWD(attn_fwd_float64_64, double, double, 64)
SA_DEFINE_FWD(attn_fwd_float64_128, double, double, 128)
SA_DEFINE_FWD(attn_fwd_float64_256, double, double, 256)

// ---------------------------------------------------------------------------
// attn_fwd_tc_float16_<DMAX>: the float16 forward on tensor cores (sm_80+).
//
// Same contract as attn_fwd_float16_<DMAX> (same parameter list, out and lse
// layout, masks, band and its offset, soft-capping, ALiBi, GQA, dropout pattern
// and its chunk counters, packed varlen, NaN and fully-masked rules), with
// two extra preconditions the host checks (launch.tc_layout_ok): D and Dv are
// multiples of 8, and Q/K/V have unit last-axis stride, 16-byte aligned rows
// and base pointers, so a row chunk of 8 halves is one 16-byte cp.async.
//
// FlashAttention-2 structure: a block of 4 warps owns SA_TC_BM = 64 query rows
// of one (batch, query head); each warp owns 16 rows and keeps their Q
// fragments in registers for the whole key loop. Per tile of SA_TC_BN = 64
// keys, S = Q Kᵀ is computed with mma.sync.m16n8k16 (float16 inputs, float32
// accumulation); the online softmax runs on the accumulator fragments in
// float32 (row max/sum across the 4 lanes that share a row via shuffles);
// P is rounded to float16 and re-used directly as the A operand of O += P V
// (the m16n8 accumulator layout of two adjacent key blocks is the m16n8k16 A
// layout), O stays in float32 registers. K and V tiles are staged by cp.async
// into padded shared memory (row pitch DMAX + 8 halves, so the 8 row addresses
// of an ldmatrix hit distinct banks); the next K tile loads while the softmax
// and P V of the current one run, the next V tile while the next S does.
// Memory is O(N) (out and lse only); key tiles outside the row block's band
// are never loaded. Soft-capping and ALiBi are applied to the S fragments in
// float32 (tanhf), before the mask; tiles with neither (and no mask, inside
// the band) keep the one-multiply fast path.
#define SA_TC_BM 64
#define SA_TC_BN 64
#define SA_TC_THREADS 128

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800

#ifndef SA_EMULATE
// 32-bit shared-memory address of a generic pointer (what ldmatrix/cp.async take).
__device__ __forceinline__ unsigned sa_smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// Four 8x8 b16 matrices; lanes 8j..8j+7 give the row addresses of matrix j, and
// lane l receives (row l/4, columns 2(l%4), 2(l%4)+1) of matrix j in r[j].
__device__ __forceinline__ void sa_ldsm_x4(unsigned (&r)[4], const unsigned short* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(sa_smem_addr(p)) : "memory");
}
// The same with each matrix transposed: lane l receives (rows 2(l%4), 2(l%4)+1; column l/4).
__device__ __forceinline__ void sa_ldsm_x4_trans(unsigned (&r)[4], const unsigned short* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(sa_smem_addr(p)) : "memory");
}
// c += A (16x16, row) * B (16x8, col); float16 inputs, float32 accumulators.
__device__ __forceinline__ void sa_mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 16 bytes global -> shared, asynchronously; bytes past src_bytes (0 or 16) are zero-filled.
__device__ __forceinline__ void sa_cp_async16(unsigned short* dst, const unsigned short* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(sa_smem_addr(dst)), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void sa_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void sa_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}
#endif  // SA_EMULATE

__device__ __forceinline__ unsigned sa_pack_h2(float lo, float hi) {
    return (unsigned)sa_f2h(lo) | ((unsigned)sa_f2h(hi) << 16);
}

// Stage rows [r0, r0 + 64) of a (rows, cols) float16 matrix (row stride rs
// elements, unit column stride) into smem rows of pitch LD; rows >= r_end and
// columns >= cols become zeros. Every thread of the block takes part.
template <int DMAX, int LD>
__device__ __forceinline__ void sa_tc_stage(unsigned short* smem, const unsigned short* base, long long rs,
                                            long long r0, long long r_end, int cols) {
    const int chunks = DMAX / 8;
    for (int e = threadIdx.x; e < SA_TC_BN * chunks; e += SA_TC_THREADS) {
        const int r = e / chunks;
        const int c = (e - r * chunks) * 8;
        const bool ok = (r0 + r < r_end) && (c < cols);
        // A skipped chunk still needs a valid address; src_bytes = 0 reads nothing.
        sa_cp_async16(smem + r * LD + c, ok ? base + (r0 + r) * rs + c : base, ok ? 16 : 0);
    }
}

template <int DMAX>
__device__ void sa_attn_fwd_tc(SA_FWD_ARGS(unsigned short, float))
{
    const int LD = DMAX + 8;
    const int KS = DMAX / 16;        // k-steps of S = Q Kᵀ
    const int NB = SA_TC_BN / 8;     // 8-key accumulator blocks of S
    const int OB = DMAX / 8;         // 8-column accumulator blocks of O
    // Ks also stages the Q tile (SA_TC_BM == SA_TC_BN) before the key loop.
    __shared__ __attribute__((aligned(16))) unsigned short Ks[SA_TC_BN * LD];
    __shared__ __attribute__((aligned(16))) unsigned short Vs[SA_TC_BN * LD];
    (void)qs3; (void)ks3; (void)vs3;  // unit last-axis strides: checked by the host (launch.tc_layout_ok)
    const float out_scale = use_dropout ? (float)drop_scale : 1.0f;   // kept weights' 1/(1-p)
    const float NINF = sa_ninf<float>();
    const float LOG2E = 1.4426950408889634f;
    const float scale_log2 = (float)(scale * 1.4426950408889634);
    // Soft-capping in base-2 units: softcap * tanh(s * scale / softcap) * log2(e).
    const bool capped = softcap > 0.0;
    const float cap_in = capped ? (float)(scale / softcap) : 0.0f;
    const float cap_log2 = (float)(softcap * 1.4426950408889634);
    const bool plain_logits = !capped && !use_alibi;
    const sa_u32 col0 = (sa_u32)col_start;   // dropout counters wrap mod 2^32, like the hash's
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;   // fragment row group and column pair
    const int ks_used = (D + 15) / 16, vs_used = (Dv + 15) / 16;   // skip all-zero padding

    for (long long blk = blockIdx.x; blk < total_blocks; blk += gridDim.x) {
        const SaRowBlock rb = sa_row_block<SA_TC_BM>(blk, n_row_blocks, Hq, G, N, M, offset, has_lower, lower,
                                                     has_upper, upper, varlen, cu_q, cu_k, tile_seq, tile_row);
        const long long j0 = rb.j0, j1 = rb.j1, off = rb.off;
        const long long i0 = rb.i0, i1 = rb.i1;
        const int b = rb.b, h = rb.h, hk = rb.hk;
        const unsigned short* kb = k + b * ks0 + hk * ks1 + rb.k0 * ks2;
        const unsigned short* vb = v + b * vs0 + hk * vs1 + rb.k0 * vs2;
        const float slope_log2 = use_alibi ? alibi[(long long)rb.s * Hq + h] * LOG2E : 0.0f;

        // Q fragments of this warp's 16 rows, for every 16-column k-step.
        sa_tc_stage<DMAX, LD>(Ks, q + b * qs0 + h * qs1 + rb.q0 * qs2, qs2, i0, i1, D);
        sa_cp_async_commit();
        sa_cp_async_wait<0>();
        __syncthreads();
        unsigned qf[KS][4];
#pragma unroll
        for (int kk = 0; kk < KS; ++kk)
            sa_ldsm_x4(qf[kk], Ks + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
        __syncthreads();   // Ks is refilled with keys next

        if (j0 < j1) {
            sa_tc_stage<DMAX, LD>(Ks, kb, ks2, j0, j1, D);
            sa_cp_async_commit();
            sa_tc_stage<DMAX, LD>(Vs, vb, vs2, j0, j1, Dv);
            sa_cp_async_commit();
        }

        // This lane's two rows: r = 0 -> row g of the warp's 16 (wrow), r = 1 -> row g + 8.
        // The key loop keeps only what it needs of them, for row 0 (row 1's are 8 rows on;
        // registers are tight: ptxas aims at 128 for D = 32): whether each row exists,
        // the diagonal wrow + off (key j is at band distance j - diag0 - 8r) and the mask
        // offset of the row; the output row is rebuilt from orow0.
        const long long wrow = i0 + warp * 16 + g;
        const long long orow0 = rb.obase + wrow;
        const long long diag0 = wrow + off;
        const bool warp_full = i0 + warp * 16 + 16 <= i1;   // all 16 rows of the warp exist
        bool live[2];
        long long mrow0 = 0;
        if (mask_kind && wrow < i1) mrow0 = mask_index[b] * ms0 + h * ms1 + wrow * ms2;
        sa_u32 rowh[2] = {0u, 0u};
        float m_run[2], l_run[2];   // running max (base-2 logits) and this lane's share of the sum
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const long long row = wrow + 8 * r;
            live[r] = row < i1;
            if (use_dropout)
                rowh[r] = sa_row_hash(sa_head_hash(seed_lo, seed_hi, sa_drop_bh(rb.s, h, batch_index, use_batch_index,
                                                                                head_start, total_heads)),
                                      (sa_u32)(row_start + row));
            m_run[r] = NINF; l_run[r] = 0.0f;
        }
        float o[OB][4];
#pragma unroll
        for (int nb = 0; nb < OB; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[nb][e] = 0.0f;

        for (long long jt = j0; jt < j1; jt += SA_TC_BN) {
            sa_cp_async_wait<1>();   // K(tile) has landed (V(tile) may still be in flight)
            __syncthreads();
            float s[NB][4];
#pragma unroll
            for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nb][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                if (kk >= ks_used) break;
#pragma unroll
                for (int np = 0; np < NB / 2; ++np) {
                    unsigned kf[4];
                    sa_ldsm_x4(kf, Ks + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
                    sa_mma_16816(s[2 * np], qf[kk], kf[0], kf[1]);
                    sa_mma_16816(s[2 * np + 1], qf[kk], kf[2], kf[3]);
                }
            }
            __syncthreads();   // every warp is done with Ks: prefetch the next K tile
            if (jt + SA_TC_BN < j1) sa_tc_stage<DMAX, LD>(Ks, kb, ks2, jt + SA_TC_BN, j1, D);
            sa_cp_async_commit();   // possibly empty: keeps the group count uniform

            // Scores -> masked logits in base-2 units (x * log2(e): exp2 is one
            // instruction, and the scale folds into one multiply); row max per tile.
            // A NaN score makes its p, hence the row sum, NaN: that marks the row.
            float tmax[2] = {NINF, NINF};
            const long long wdiag = diag0 - g;   // the diagonal of this warp's first row
            const bool interior = plain_logits && !mask_kind && jt + SA_TC_BN <= j1 && warp_full
                && (!has_lower || jt - (wdiag + 15) >= -(long long)lower)
                && (!has_upper || jt + SA_TC_BN - 1 - wdiag <= (long long)upper);
            if (interior) {   // no mask, soft-capping or ALiBi; every key of the tile is in every row's band
#pragma unroll
                for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        s[nb][e] *= scale_log2;
                        tmax[e >> 1] = fmaxf(tmax[e >> 1], s[nb][e]);   // fmaxf ignores a NaN operand
                    }
            } else {
#pragma unroll
                for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int r = e >> 1;
                        const long long j = jt + nb * 8 + 2 * t + (e & 1);
                        float x = NINF;
                        if (j < j1 && live[r]) {
                            const long long rel = j - (diag0 + 8 * r);
                            x = capped ? cap_log2 * tanhf(s[nb][e] * cap_in) : s[nb][e] * scale_log2;
                            if (use_alibi) x -= slope_log2 * sa_abs_dist<float>(rel);
                            if (mask_kind)
                                x += sa_mask_term<float>(mask, mask_kind, mrow0 + 8 * r * ms2 + j * ms3) * LOG2E;
                            if ((has_lower && rel < -(long long)lower) || (has_upper && rel > (long long)upper)) x = NINF;
                        }
                        s[nb][e] = x;
                        tmax[r] = fmaxf(tmax[r], x);
                    }
            }
            float m_use[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
                tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
                const float m_new = fmaxf(m_run[r], tmax[r]);
                // Nothing attendable yet: exponentiate against 0 so every p is exp2(-inf) = 0.
                m_use[r] = m_new == NINF ? 0.0f : m_new;
                const float corr = exp2f(m_run[r] - m_use[r]);   // 0 on the first live tile
                l_run[r] *= corr;
#pragma unroll
                for (int nb = 0; nb < OB; ++nb) { o[nb][2 * r] *= corr; o[nb][2 * r + 1] *= corr; }
                m_run[r] = m_new;
            }
#pragma unroll
            for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e >> 1;
                    float p = exp2f(s[nb][e] - m_use[r]);
                    l_run[r] += p;   // this lane's share of the row sum; lanes are summed at the end
                    // A dropped weight is zeroed here; kept ones are scaled by 1/(1 - dropout_p)
                    // only at the end, in float32 (out_scale): p * drop_scale rounded to float16
                    // for the P V product would be inf once dropout_p > 1 - 1/65504.
                    if (use_dropout) {
                        const long long j = jt + nb * 8 + 2 * t + (e & 1);
                        if (!sa_keep(rowh[r], (sa_u32)j + col0, threshold)) p = 0.0f;
                    }
                    s[nb][e] = p;
                }

            sa_cp_async_wait<1>();   // V(tile) has landed
            __syncthreads();
#pragma unroll
            for (int kc = 0; kc < SA_TC_BN / 16; ++kc) {
                unsigned pa[4];
                pa[0] = sa_pack_h2(s[2 * kc][0], s[2 * kc][1]);
                pa[1] = sa_pack_h2(s[2 * kc][2], s[2 * kc][3]);
                pa[2] = sa_pack_h2(s[2 * kc + 1][0], s[2 * kc + 1][1]);
                pa[3] = sa_pack_h2(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
                for (int dp = 0; dp < OB / 2; ++dp) {
                    if (dp >= vs_used) break;
                    unsigned vf[4];
                    sa_ldsm_x4_trans(vf, Vs + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8);
                    sa_mma_16816(o[2 * dp], pa, vf[0], vf[1]);
                    sa_mma_16816(o[2 * dp + 1], pa, vf[2], vf[3]);
                }
            }
            __syncthreads();   // every warp is done with Vs: prefetch the next V tile
            if (jt + SA_TC_BN < j1) sa_tc_stage<DMAX, LD>(Vs, vb, vs2, jt + SA_TC_BN, j1, Dv);
            sa_cp_async_commit();
        }
        sa_cp_async_wait<0>();
        __syncthreads();   // the next row block restages Ks

#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = l_run[r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            if (!live[r]) continue;
            float inv = 0.0f, lv = NINF;
            const bool nan_row = l != l;   // a NaN score reached the sum
            if (nan_row) { inv = sa_nan<float>(); lv = sa_nan<float>(); }
            else if (l > 0.0f) { inv = out_scale / l; lv = (m_run[r] + log2f(l)) * 0.6931471805599453f; }
            const long long orow = orow0 + 8 * r;
#pragma unroll
            for (int nb = 0; nb < OB; ++nb) {
                const int c = nb * 8 + 2 * t;
                if (c < Dv) {
                    out[orow * Dv + c] = sa_f2h(nan_row ? sa_nan<float>() : o[nb][2 * r] * inv);
                    out[orow * Dv + c + 1] = sa_f2h(nan_row ? sa_nan<float>() : o[nb][2 * r + 1] * inv);
                }
            }
            if (write_lse && t == 0) lse[orow] = lv;
        }
    }
}

#define SA_DEFINE_FWD_TC(NAME, DMAX) \
    extern "C" __global__ void __launch_bounds__(SA_TC_THREADS) NAME(SA_FWD_ARGS(unsigned short, float)) { \
        sa_attn_fwd_tc<DMAX>(SA_FWD_PASS); \
    }

SA_DEFINE_FWD_TC(attn_fwd_tc_float16_32, 32)
SA_DEFINE_FWD_TC(attn_fwd_tc_float16_64, 64)
SA_DEFINE_FWD_TC(attn_fwd_tc_float16_128, 128)

#endif  // sm_80+

// Dropout multiplier tile for the blockwise paths: z[bhl, r, c] = drop_scale if
// weight (bh0 + bhl, i0 + r, j0 + c) is kept, else 0. Layout (n_bh, rows, cols),
// contiguous, so it reshapes to (bb, Hkv, G*rows, cols) like the score block.
template <typename A>
__device__ void sa_dropout_tile(A* z, long long n_bh, int rows, int cols, long long bh0, int i0, int j0,
                                sa_u32 seed_lo, sa_u32 seed_hi, sa_u32 threshold, double drop_scale) {
    const long long total = n_bh * (long long)rows * cols;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        const long long t = e / cols;
        const int c = (int)(e - t * cols);
        const long long bhl = t / rows;
        const int r = (int)(t - bhl * rows);
        const sa_u32 rowh = sa_row_hash(sa_head_hash(seed_lo, seed_hi, (sa_u32)(bh0 + bhl)), (sa_u32)(i0 + r));
        z[e] = sa_keep(rowh, (sa_u32)(j0 + c), threshold) ? (A)drop_scale : (A)0;
    }
}

#define SA_DROP_ARGS(A) A* z, long long n_bh, int rows, int cols, long long bh0, int i0, int j0, \
    sa_u32 seed_lo, sa_u32 seed_hi, sa_u32 threshold, double drop_scale
extern "C" __global__ void dropout_tile_float32(SA_DROP_ARGS(float)) {
    sa_dropout_tile<float>(z, n_bh, rows, cols, bh0, i0, j0, seed_lo, seed_hi, threshold, drop_scale);
}
extern "C" __global__ void dropout_tile_float64(SA_DROP_ARGS(double)) {
    sa_dropout_tile<double>(z, n_bh, rows, cols, bh0, i0, j0, seed_lo, seed_hi, threshold, drop_scale);
}
