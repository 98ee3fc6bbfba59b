// selfattn CUDA helpers shared by every kernel source.
//
// Self-contained on purpose: no #include, so NVRTC compiles it without the CUDA
// toolkit headers, and (outside __CUDACC__) a host C++ compiler can build the
// hash for tests that compare it bit for bit with selfattn/_dropout.py.
//
// The hash's constants are not repeated here: launch.kernel_source() puts
// launch.hash_defines() (SA_MUL_BH, SA_MUL_ROW, SA_MUL_COL, SA_FMIX_1,
// SA_FMIX_2, generated from selfattn/_dropout.py) in front of this file, so
// the pattern is defined once, in Python, for every backend.
#ifndef SELFATTN_COMMON_CUH
#define SELFATTN_COMMON_CUH

#if !defined(SA_MUL_BH) || !defined(SA_MUL_ROW) || !defined(SA_MUL_COL) || !defined(SA_FMIX_1) || !defined(SA_FMIX_2)
#error "the dropout hash constants are missing: build sources with selfattn.backends._cuda.launch.kernel_source()"
#endif

#ifdef __CUDACC__
#define SA_HD __host__ __device__ __forceinline__
#else
#define SA_HD inline
#endif

typedef unsigned int sa_u32;

// MurmurHash3 finaliser on uint32 (wrapping arithmetic), as in _dropout.fmix32.
SA_HD sa_u32 sa_fmix32(sa_u32 h) {
    h ^= h >> 16; h *= SA_FMIX_1;
    h ^= h >> 13; h *= SA_FMIX_2;
    h ^= h >> 16;
    return h;
}

// head = fmix32(k0 ^ fmix32(k1 ^ (bh * MUL_BH)))
SA_HD sa_u32 sa_head_hash(sa_u32 k0, sa_u32 k1, sa_u32 bh) {
    return sa_fmix32(k0 ^ sa_fmix32(k1 ^ (bh * SA_MUL_BH)));
}

// row = fmix32(head ^ (i * MUL_ROW))
SA_HD sa_u32 sa_row_hash(sa_u32 head, sa_u32 i) {
    return sa_fmix32(head ^ (i * SA_MUL_ROW));
}

// True when weight (bh, i, j) is kept: fmix32(row ^ (j * MUL_COL)) >= threshold.
SA_HD bool sa_keep(sa_u32 row, sa_u32 j, sa_u32 threshold) {
    return sa_fmix32(row ^ (j * SA_MUL_COL)) >= threshold;
}

#endif  // SELFATTN_COMMON_CUH
