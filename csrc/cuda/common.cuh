// Device helpers shared by the gptfast CUDA kernels: dtype conversion, warp reductions,
// 16-byte vector loads/stores.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace gptfast {
namespace cuda {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// N = 16 / sizeof(T) values moved as one 16-byte transaction.
template <typename T>
struct Pack {
  static constexpr int N = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[N];
  };
};

template <typename T>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[Pack<T>::N]) {
  Pack<T> pk;
  pk.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < Pack<T>::N; ++i) out[i] = to_f(pk.v[i]);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[Pack<T>::N]) {
  Pack<T> pk;
#pragma unroll
  for (int i = 0; i < Pack<T>::N; ++i) pk.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = pk.raw;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

// Call f.template operator()<T>() with T the C++ type of `dt`.
template <typename F>
int dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case kF32: return f(float{});
    case kF16: return f(__half{});
    case kBF16: return f(__nv_bfloat16{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace gptfast
