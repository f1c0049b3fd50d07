// CUDA emulation on CPU threads, for checking kernel code without a GPU (see ../README.md): just
// enough of the CUDA runtime and device built-ins for csrc/cuda/attention_tc.cu. One block runs
// at a time as blockDim.x std::threads; __syncthreads and __syncwarp are std::barriers, warp
// shuffles go through a per-warp exchange buffer, and shared memory is one global array.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename K>
cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }

namespace emu {
struct Warp {
  std::barrier<>* bar;
  float* xchg;   // 32 lanes
};
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local Warp warp{};
}  // namespace emu

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp.bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const int lane = threadIdx.x & 31;
  emu::warp.xchg[lane] = v;
  emu::warp.bar->arrive_and_wait();
  const float other = emu::warp.xchg[lane ^ lane_mask];
  emu::warp.bar->arrive_and_wait();
  return other;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
using std::max;
using std::min;
