// Just enough of CUDA for our kernels to run on the CPU, so that their logic (index
// arithmetic, scans, radix selection, compaction) is tested where there is no GPU.
// A launch runs blockDim.x std::threads that step through the blocks together, so
// `__shared__` can be a function-local static. Warp shuffles exchange through a buffer
// between per-warp barriers. No FMA contraction (build with -ffp-contract=off), as the
// kernels are compiled with --fmad=false. It says nothing about GPU memory ordering,
// occupancy or speed: the cuda_* tests on a device do.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

using std::max;
using std::min;

inline std::unique_ptr<std::barrier<>> emu_block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
inline uint64_t emu_shfl[1024];

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

template <class T>
T emu_shfl_from(T v, int src_lane) {
    int t = threadIdx.x, lane = t & 31, w = t >> 5;
    std::memcpy(&emu_shfl[t], &v, sizeof(T));
    emu_warp_barriers[w]->arrive_and_wait();
    T r = v;
    if (src_lane >= 0 && src_lane < 32 && (unsigned)(t - lane + src_lane) < blockDim.x)
        std::memcpy(&r, &emu_shfl[t - lane + src_lane], sizeof(T));
    emu_warp_barriers[w]->arrive_and_wait();
    return r;
}
template <class T>
T __shfl_down_sync(unsigned, T v, int o) {
    int lane = threadIdx.x & 31;
    return emu_shfl_from(v, lane + o < 32 ? lane + o : lane);
}
template <class T>
T __shfl_up_sync(unsigned, T v, int o) {
    int lane = threadIdx.x & 31;
    return emu_shfl_from(v, lane >= o ? lane - o : lane);
}

template <class T>
T atomicAdd(T* p, T v) {
    return std::atomic_ref<T>(*p).fetch_add(v);
}
inline unsigned atomicMin(unsigned* p, unsigned v) {
    std::atomic_ref<unsigned> a(*p);
    unsigned old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) { return __uint_as_float((unsigned)i); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

// Runs `body` (a kernel call) over a grid of blocks: block.x threads, each stepping
// through the blocks in order, all finishing one block before any starts the next (so
// the static `__shared__` arrays belong to one block at a time).
template <class F>
void emu_launch(Dim3 grid, Dim3 block, F body) {
    gridDim = grid;
    blockDim = block;
    emu_block_barrier = std::make_unique<std::barrier<>>(block.x);
    emu_warp_barriers.clear();
    for (unsigned w = 0; w < (block.x + 31) / 32; ++w)
        emu_warp_barriers.push_back(
            std::make_unique<std::barrier<>>(std::min(32u, block.x - 32 * w)));
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block.x; ++t)
        threads.emplace_back([=] {
            threadIdx = {t, 0, 0};
            for (unsigned by = 0; by < grid.y; ++by)
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    blockIdx = {bx, by, 0};
                    body();
                    emu_block_barrier->arrive_and_wait();
                }
        });
    for (auto& th : threads) th.join();
}
