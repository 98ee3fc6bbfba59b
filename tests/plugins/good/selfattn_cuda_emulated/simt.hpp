// simt.hpp -- run the CUDA C++ kernel sources of selfattn on a CPU.
//
// Included (g++ -include) in front of launch.kernel_source(...), it turns the
// CUDA dialect into host C++ and executes a launch with one OS thread per CUDA
// thread, one block at a time:
//   * threadIdx/blockIdx/blockDim/gridDim are per-thread / per-launch values;
//   * __shared__ variables become function-local statics, i.e. one copy shared
//     by the threads of the (single) running block, as on a GPU;
//   * __syncthreads() is a block-wide barrier;
//   * warp-collective operations (__shfl_xor_sync and the PTX wrappers the
//     kernels define under #ifndef SA_EMULATE: ldmatrix x4 [.trans],
//     mma.sync m16n8k16 f16/f32) exchange registers between the 32 lanes of a
//     warp through a warp barrier and compute each lane's result with the
//     fragment layouts of the PTX ISA, so a wrong lane/fragment mapping in a
//     kernel gives wrong numbers here as it would on a GPU;
//   * cp.async copies land at one of the two extremes the PTX memory model
//     allows (simt_set_copy_mode): "late", deferred to the cp.async.wait_group
//     that must retire them, so a kernel that reads shared memory before
//     waiting reads stale data; or "early", at issue, so a copy issued before
//     the other warps are done reading its destination (a missing
//     __syncthreads) overwrites what they read.
// It also reports (instead of hanging or reading garbage): lanes of a warp at
// different collectives, a barrier not reached by every thread (timeout),
// misaligned ldmatrix/cp.async addresses, and cp.async source ranges outside
// every array passed to the launch.
//
// Not emulated: timing, memory-model races beyond the above, other PTX.
#pragma once
#define SA_EMULATE 1

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::max;
using std::min;

struct sa_dim3 { unsigned x = 1, y = 1, z = 1; };

namespace simt {

struct Fault {};  // thrown in a thread to unwind it after the launch is poisoned

inline std::mutex err_mu;
inline std::string err_msg;
inline std::atomic<bool> poisoned{false};

[[noreturn]] inline void fail(const std::string& msg) {
    {
        std::lock_guard<std::mutex> lk(err_mu);
        if (err_msg.empty()) err_msg = msg;
    }
    poisoned = true;
    throw Fault{};
}

// A reusable barrier whose waits time out (a divergent __syncthreads would
// otherwise hang the test run) and that releases everyone once poisoned.
class Barrier {
public:
    explicit Barrier(int n) : n_(n) {}
    void wait(const char* what) {
        std::unique_lock<std::mutex> lk(mu_);
        if (poisoned) throw Fault{};
        const long gen = gen_;
        if (++count_ == n_) {
            count_ = 0;
            ++gen_;
            cv_.notify_all();
            return;
        }
        const bool ok = cv_.wait_for(lk, std::chrono::seconds(60), [&] { return gen_ != gen || poisoned; });
        if (poisoned) throw Fault{};
        if (!ok) {
            lk.unlock();
            fail(std::string("timeout at ") + what + ": not every thread reached it (divergent control flow?)");
        }
    }
    void poison() { std::lock_guard<std::mutex> lk(mu_); cv_.notify_all(); }
private:
    std::mutex mu_;
    std::condition_variable cv_;
    int n_, count_ = 0;
    long gen_ = 0;
};

struct Warp {
    Barrier bar{32};
    int kind[32];
    alignas(16) unsigned char slot[32][64];
};

struct Block {
    explicit Block(int nthreads) : bar(nthreads) {
        for (int w = 0; w < nthreads / 32; ++w) warps.emplace_back(new Warp);
    }
    Barrier bar;
    std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local sa_dim3 tidx, bidx;
inline sa_dim3 gdim, bdim;
inline thread_local Block* cur_block = nullptr;

// Global arrays of the current launch, for the cp.async source check.
inline std::vector<std::pair<uintptr_t, uintptr_t>> ranges;

struct Copy { void* dst; const void* src; int bytes; };
inline thread_local std::vector<Copy> open_group;
inline thread_local std::vector<std::vector<Copy>> groups;
inline bool copies_early = false;

inline void run_copies(const std::vector<Copy>& g) {
    for (const Copy& c : g) {
        std::memset(c.dst, 0, 16);
        if (c.bytes) std::memcpy(c.dst, c.src, (size_t)c.bytes);
    }
}

// Every lane posts `in`, all lanes of the warp meet, each computes its own result
// from everybody's inputs (f(lane, get)), and they meet again before the slots are reused.
template <class In, class F>
inline void collective(int kind, const char* what, const In& in, F&& f) {
    static_assert(sizeof(In) <= 64, "collective payload too large");
    Warp& w = *cur_block->warps[tidx.x / 32];
    const int lane = (int)(tidx.x & 31);
    std::memcpy(w.slot[lane], &in, sizeof(In));
    w.kind[lane] = kind;
    w.bar.wait(what);
    for (int l = 0; l < 32; ++l)
        if (w.kind[l] != kind)
            fail(std::string("lanes of one warp reached different warp-collective operations at ") + what);
    auto get = [&](int l) { In x; std::memcpy(&x, w.slot[l], sizeof(In)); return x; };
    f(lane, get);
    w.bar.wait(what);
}

struct AnyPtr {
    void* p;
    template <class T> operator T*() const { return static_cast<T*>(p); }
};

inline float h2f(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline unsigned short f2h(float f) { _Float16 x = (_Float16)f; unsigned short h; std::memcpy(&h, &x, 2); return h; }

// Run `body` as a <<<grid, block>>> launch. Returns 0, or 1 with simt_error() set.
inline int launch(unsigned grid, unsigned block, const std::function<void()>& body) {
    {
        std::lock_guard<std::mutex> lk(err_mu);
        err_msg.clear();
    }
    poisoned = false;
    if (block == 0 || block % 32 || block > 1024) {
        err_msg = "block size must be a positive multiple of 32, at most 1024";
        return 1;
    }
    gdim = sa_dim3{grid, 1, 1};
    bdim = sa_dim3{block, 1, 1};
    for (unsigned b = 0; b < grid && !poisoned; ++b) {
        Block blk((int)block);
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([&, b, t] {
                tidx = sa_dim3{t, 0, 0};
                bidx = sa_dim3{b, 0, 0};
                cur_block = &blk;
                open_group.clear();
                groups.clear();
                try {
                    body();
                    if (!open_group.empty() || !groups.empty())
                        fail("thread exited with cp.async copies never waited for");
                } catch (const Fault&) {
                    blk.bar.poison();
                    for (auto& w : blk.warps) w->bar.poison();
                }
                cur_block = nullptr;
            });
        }
        for (auto& th : threads) th.join();
    }
    return poisoned ? 1 : 0;
}

}  // namespace simt

#define threadIdx (simt::tidx)
#define blockIdx (simt::bidx)
#define blockDim (simt::bdim)
#define gridDim (simt::gdim)

inline void __syncthreads() { simt::cur_block->bar.wait("__syncthreads"); }

template <class T>
inline T __shfl_xor_sync(unsigned mask, T val, int lane_mask) {
    if (mask != 0xffffffffu) simt::fail("__shfl_xor_sync: only full-warp masks are emulated");
    T res{};
    simt::collective(1, "__shfl_xor_sync", val, [&](int lane, auto get) { res = get(lane ^ (lane_mask & 31)); });
    return res;
}

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }

// -- the PTX wrappers of attn.cu ---------------------------------------------

inline float sa_h2f(unsigned short h) { return simt::h2f(h); }
inline unsigned short sa_f2h(float f) { return simt::f2h(f); }

namespace simt {
inline void ldsm_x4(unsigned (&r)[4], const unsigned short* p, bool trans, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % 16) fail(std::string(what) + ": row address not 16-byte aligned");
    unsigned out[4];
    collective(trans ? 3 : 2, what, p, [&](int lane, auto get) {
        for (int j = 0; j < 4; ++j) {
            unsigned short lo, hi;
            if (!trans) {  // (row lane/4, cols 2(lane%4), +1) of matrix j
                const unsigned short* rowp = get(8 * j + lane / 4);
                lo = rowp[2 * (lane % 4)];
                hi = rowp[2 * (lane % 4) + 1];
            } else {       // (rows 2(lane%4), +1; col lane/4) of matrix j
                lo = get(8 * j + 2 * (lane % 4))[lane / 4];
                hi = get(8 * j + 2 * (lane % 4) + 1)[lane / 4];
            }
            out[j] = (unsigned)lo | ((unsigned)hi << 16);
        }
    });
    for (int j = 0; j < 4; ++j) r[j] = out[j];
}
}  // namespace simt

inline void sa_ldsm_x4(unsigned (&r)[4], const unsigned short* p) { simt::ldsm_x4(r, p, false, "ldmatrix.x4"); }
inline void sa_ldsm_x4_trans(unsigned (&r)[4], const unsigned short* p) { simt::ldsm_x4(r, p, true, "ldmatrix.x4.trans"); }

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, fragment layouts of the PTX ISA
// (groupID = lane >> 2, threadID_in_group = lane % 4):
//   A a_i: row groupID (+8 for i in {2,3,6,7}), col 2*tig + (i&1) (+8 for i >= 4);
//   B b_i: row (k) 2*tig + (i&1) (+8 for i >= 2), col groupID;
//   C c_i: row groupID (+8 for i >= 2), col 2*tig + (i&1).
inline void sa_mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    struct Regs { unsigned a[4]; unsigned b[2]; };
    Regs in{{a[0], a[1], a[2], a[3]}, {b0, b1}};
    float d[4];
    simt::collective(4, "mma.sync.m16n8k16", in, [&](int lane, auto get) {
        auto half = [](unsigned reg, int k) { return simt::h2f((unsigned short)(k & 1 ? reg >> 16 : reg & 0xffffu)); };
        auto A = [&](int row, int k) {  // element (row, k) of A from the lane that holds it
            const Regs r = get((row % 8) * 4 + (k % 8) / 2);
            return half(r.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k);
        };
        auto B = [&](int k, int col) {
            const Regs r = get(col * 4 + (k % 8) / 2);
            return half(r.b[k >= 8 ? 1 : 0], k);
        };
        const int g = lane >> 2, t = lane & 3;
        for (int i = 0; i < 4; ++i) {
            const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
            float acc = c[i];
            for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);  // f16*f16 is exact in f32
            d[i] = acc;
        }
    });
    for (int i = 0; i < 4; ++i) c[i] = d[i];
}

inline void sa_cp_async16(unsigned short* dst, const unsigned short* src, int src_bytes) {
    if (reinterpret_cast<uintptr_t>(dst) % 16 || (src_bytes && reinterpret_cast<uintptr_t>(src) % 16))
        simt::fail("cp.async: address not 16-byte aligned");
    if (src_bytes != 0 && src_bytes != 16) simt::fail("cp.async: src_bytes must be 0 or 16 here");
    if (src_bytes) {
        const uintptr_t s = reinterpret_cast<uintptr_t>(src);
        bool inside = false;
        for (auto& r : simt::ranges) inside |= (s >= r.first && s + 16 <= r.second);
        if (!inside) simt::fail("cp.async: source bytes outside every array of the launch");
    }
    if (simt::copies_early) {
        simt::run_copies({{dst, src, src_bytes}});
        return;
    }
    simt::open_group.push_back({dst, src, src_bytes});
}
inline void sa_cp_async_commit() {
    simt::groups.push_back(std::move(simt::open_group));
    simt::open_group.clear();
}
template <int N> inline void sa_cp_async_wait() {
    while (simt::groups.size() > (size_t)N) {
        simt::run_copies(simt::groups.front());
        simt::groups.erase(simt::groups.begin());
    }
}

extern "C" const char* simt_error() { return simt::err_msg.c_str(); }
extern "C" void simt_set_copy_mode(int early) { simt::copies_early = early != 0; }
extern "C" void simt_set_ranges(int n, const unsigned long long* lo_hi) {
    simt::ranges.clear();
    for (int i = 0; i < n; ++i) simt::ranges.emplace_back((uintptr_t)lo_hi[2 * i], (uintptr_t)lo_hi[2 * i + 1]);
}
