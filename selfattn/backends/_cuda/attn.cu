// selfattn fused attention kernels (CuPy RawModule source).
//
// launch.kernel_source("attn.cu") prepends common.cuh; no other header is
// needed (float16 is handled as raw bits with cvt PTX), so the source compiles
// with NVRTC alone -- tests/test_cupy_backend.py checks sm_80 and sm_90.
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

#define SA_BM 64

__device__ __forceinline__ float sa_h2f(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short sa_f2h(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}

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

// Key tile size: keep the K and V tiles within 32 KiB of static shared memory.
template <typename A, int DMAX>
struct SaTile {
    static const int raw = 32768 / (2 * DMAX * (int)sizeof(A));  // + BN*SA_BM scores: <= 48 KiB
    static const int BN = raw > 32 ? 32 : raw;
};

template <typename T, typename A, int DMAX>
__device__ void sa_attn_fwd(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    T* __restrict__ out, A* __restrict__ lse,
    const void* __restrict__ mask, const long long* __restrict__ mask_index, int mask_kind,
    long long qs0, long long qs1, long long qs2, long long qs3,
    long long ks0, long long ks1, long long ks2, long long ks3,
    long long vs0, long long vs1, long long vs2, long long vs3,
    long long ms0, long long ms1, long long ms2, long long ms3,
    int Hq, int G, int N, int M, int D, int Dv, long long n_row_blocks, long long total_blocks,
    double scale_d, int has_lower, int lower, int has_upper, int upper,
    sa_u32 threshold, sa_u32 seed_lo, sa_u32 seed_hi, double drop_scale_d, int use_dropout, int write_lse)
{
    const int BN = SaTile<A, DMAX>::BN;
    __shared__ A Ks[BN][DMAX];
    __shared__ A Vs[BN][DMAX];
    __shared__ A Ss[BN][SA_BM];
    const A scale = (A)scale_d;
    const A drop_scale = (A)drop_scale_d;
    const A NINF = sa_ninf<A>();
    const int tid = threadIdx.x;
    const long long off = (long long)M - (long long)N;

    for (long long blk = blockIdx.x; blk < total_blocks; blk += gridDim.x) {
        const long long bh = blk / n_row_blocks;
        const int i0 = (int)(blk - bh * n_row_blocks) * SA_BM;
        const int i1 = min(N, i0 + SA_BM);
        const int b = (int)(bh / Hq);
        const int h = (int)(bh - (long long)b * Hq);
        const int hk = h / G;
        const int i = i0 + tid;
        const bool row_ok = i < N;

        // Key range [j0, j1) that any row of the block may attend (Problem.key_range).
        long long j0 = 0, j1 = M;
        if (has_lower) j0 = max(0LL, (long long)i0 + off - lower);
        if (has_upper) j1 = min((long long)M, (long long)(i1 - 1) + off + upper + 1);
        if (j1 < j0) j1 = j0;

        A qr[DMAX];
        A acc[DMAX];
#pragma unroll
        for (int c = 0; c < DMAX; ++c) {
            qr[c] = (row_ok && c < D) ? sa_load<A>(q, b * qs0 + h * qs1 + (long long)i * qs2 + c * qs3) * scale : (A)0;
            acc[c] = (A)0;
        }
        A m_run = NINF, l_run = (A)0;
        bool saw_nan = false;
        sa_u32 rowh = 0;
        if (use_dropout) rowh = sa_row_hash(sa_head_hash(seed_lo, seed_hi, (sa_u32)bh), (sa_u32)i);
        long long mrow = 0;
        if (mask_kind) mrow = mask_index[b] * ms0 + h * ms1 + (long long)i * ms2;

        for (long long jt = j0; jt < j1; jt += BN) {
            __syncthreads();
            for (int e = tid; e < BN * DMAX; e += SA_BM) {
                const int r = e / DMAX, c = e - (e / DMAX) * DMAX;
                const long long j = jt + r;
                const bool ok = j < j1;
                Ks[r][c] = (ok && c < D) ? sa_load<A>(k, b * ks0 + hk * ks1 + j * ks2 + c * ks3) : (A)0;
                Vs[r][c] = (ok && c < Dv) ? sa_load<A>(v, b * vs0 + hk * vs1 + j * vs2 + c * vs3) : (A)0;
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
                    if (mask_kind) x += sa_mask_term<A>(mask, mask_kind, mrow + j * ms3);
                    const long long rel = j - ((long long)i + off);
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
                if (use_dropout) p = sa_keep(rowh, (sa_u32)(jt + r), threshold) ? p * drop_scale : (A)0;
#pragma unroll
                for (int c = 0; c < DMAX; ++c) acc[c] += p * Vs[r][c];
            }
            m_run = m_new;
        }
        if (row_ok) {
            const long long orow = (bh * N + i) * (long long)Dv;
            A inv = (A)0, lv = NINF;
            if (saw_nan) { inv = sa_nan<A>(); lv = sa_nan<A>(); }
            else if (l_run > (A)0) { inv = (A)1 / l_run; lv = m_run + sa_log(l_run); }
            else if (l_run != l_run) { inv = sa_nan<A>(); lv = sa_nan<A>(); }
#pragma unroll
            for (int c = 0; c < DMAX; ++c)
                if (c < Dv) sa_store(out, orow + c, saw_nan ? sa_nan<A>() : acc[c] * inv);
            if (write_lse) lse[bh * N + i] = lv;
        }
    }
}

#define SA_FWD_ARGS(T, A) \
    const T* q, const T* k, const T* v, T* out, A* lse, \
    const void* mask, const long long* mask_index, int mask_kind, \
    long long qs0, long long qs1, long long qs2, long long qs3, \
    long long ks0, long long ks1, long long ks2, long long ks3, \
    long long vs0, long long vs1, long long vs2, long long vs3, \
    long long ms0, long long ms1, long long ms2, long long ms3, \
    int Hq, int G, int N, int M, int D, int Dv, long long n_row_blocks, long long total_blocks, \
    double scale, int has_lower, int lower, int has_upper, int upper, \
    sa_u32 threshold, sa_u32 seed_lo, sa_u32 seed_hi, double drop_scale, int use_dropout, int write_lse

#define SA_FWD_PASS \
    q, k, v, out, lse, mask, mask_index, mask_kind, qs0, qs1, qs2, qs3, ks0, ks1, ks2, ks3, \
    vs0, vs1, vs2, vs3, ms0, ms1, ms2, ms3, Hq, G, N, M, D, Dv, n_row_blocks, total_blocks, \
    scale, has_lower, lower, has_upper, upper, threshold, seed_lo, seed_hi, drop_scale, use_dropout, write_lse

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
