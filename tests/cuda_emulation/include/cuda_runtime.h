// CUDA emulation on CPU threads, for checking kernel code without a GPU (see ../README.md): just
// enough of the CUDA runtime and device built-ins for csrc/cuda/attention_tc.cu. One block runs
// at a time as blockDim.x std::threads; __syncthreads and __syncwarp are std::barriers, warp
// shuffles go through a per-warp exchange buffer, and shared memory is one global array.
#pragma once
#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

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
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3 };
template <typename K>
cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int bytes) {
  return bytes <= 227 * 1024 ? cudaSuccess : cudaErrorInvalidValue;   // an H100's opt-in limit
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }

// "device" memory is host memory
inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
struct cudaDeviceProp {
  char name[256];
  int major, minor;
};
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  std::strcpy(p->name, "CPU emulation (tests/cuda_emulation)");
  p->major = 8;
  p->minor = 0;
  return cudaSuccess;
}
using cudaEvent_t = std::chrono::steady_clock::time_point*;
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new std::chrono::steady_clock::time_point();
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) {
  *e = std::chrono::steady_clock::now();
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  *ms = std::chrono::duration<float, std::milli>(*b - *a).count();
  return cudaSuccess;
}

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
inline thread_local dim3 gridDim{1, 1, 1};

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
inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask) {   // the bits through the float exchange
  float f;
  std::memcpy(&f, &v, 4);
  f = __shfl_xor_sync(mask, f, lane_mask);
  std::memcpy(&v, &f, 4);
  return v;
}
inline int __dp4a(int a, int b, int c) {   // four signed bytes of a times those of b, summed into c
  for (int i = 0; i < 4; ++i) c += static_cast<int8_t>(a >> (8 * i)) * static_cast<int8_t>(b >> (8 * i));
  return c;
}
// the rounded operations: one IEEE rounding each, never fused (volatile keeps g++ from contracting them)
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
using std::max;
using std::min;

namespace emu {
// `kernel<<<grid, block, smem, stream>>>(args...)` becomes launch_kernel(grid, block, smem, stream,
// kernel, args...) (tests/test_cuda_emulation.py rewrites the launches): the blocks run one after
// another, each as block.x threads (1-D blocks only, as in our kernels).
template <typename K, typename... A>
void launch_kernel(dim3 grid, dim3 block, size_t, cudaStream_t, K kernel, A... args) {
  const int threads = static_cast<int>(block.x);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> block_bar(threads);
        const int warps = (threads + 31) / 32;
        std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
        std::vector<std::vector<float>> xchg(warps, std::vector<float>(32));
        for (int w = 0; w < warps; ++w) warp_bars.push_back(std::make_unique<std::barrier<>>(std::min(32, threads - 32 * w)));
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = {static_cast<unsigned>(t), 0, 0};
            blockIdx = {bx, by, bz};
            blockDim = block;
            gridDim = grid;
            block_barrier = &block_bar;
            warp = {warp_bars[t / 32].get(), xchg[t / 32].data()};
            kernel(args...);
          });
        for (auto& th : pool) th.join();
      }
}
}  // namespace emu
