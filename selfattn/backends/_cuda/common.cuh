// selfattn CUDA helpers shared by every kernel source.
//
// Self-contained on purpose: no #include, so NVRTC compiles it without the CUDA
// toolkit headers, and (outside __CUDACC__) a host C++ compiler can build the
// hash for tests that compare it bit for bit with selfattn/_dropout.py.
#ifndef SELFATTN_COMMON_CUH
#define SELFATTN_COMMON_CUH

#ifdef __CUDACC__
#define SA_HD __host__ __device__ __forceinline__
#else
#define SA_HD inline
#endif

typedef unsigned int sa_u32;

// MurmurHash3 finaliser on uint32 (wrapping arithmetic), as in _dropout.fmix32.
SA_HD sa_u32 sa_fmix32(sa_u32 h) {
    h ^= h >> 16; h *= 0x85EBCA6Bu;
    h ^= h >> 13; h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

// head = fmix32(k0 ^ fmix32(k1 ^ (bh * 0x9E3779B1)))
SA_HD sa_u32 sa_head_hash(sa_u32 k0, sa_u32 k1, sa_u32 bh) {
    return sa_fmix32(k0 ^ sa_fmix32(k1 ^ (bh * 0x9E3779B1u)));
}

// row = fmix32(head ^ (i * 0x85EBCA77))
SA_HD sa_u32 sa_row_hash(sa_u32 head, sa_u32 i) {
    return sa_fmix32(head ^ (i * 0x85EBCA77u));
}

// True when weight (bh, i, j) is kept: fmix32(row ^ (j * 0xC2B2AE3D)) >= threshold.
SA_HD bool sa_keep(sa_u32 row, sa_u32 j, sa_u32 threshold) {
    return sa_fmix32(row ^ (j * 0xC2B2AE3Du)) >= threshold;
}

#endif  // SELFATTN_COMMON_CUH
