// GELU (tanh approximation) forward/backward in CUDA: 16-byte packs per thread, grid-stride loop,
// fp32 math. 0.5 (1 + tanh(u)) is computed as sigmoid(2u) = 1 / (1 + exp(-2u)) like the CPU kernel.
// cuda_check: no spills (.ci/cuda_check.sh fails the build if a kernel here spills registers)
#include "common.cuh"
#include "gelu.h"

namespace gptfast {
namespace cuda {
namespace {

constexpr float kK0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kK1 = 0.044715f;

__device__ __forceinline__ float sigmoid_2u(float x) {
  const float arg = fminf(-2.f * kK0 * (x + kK1 * x * x * x), 80.f);   // no overflow to inf
  return 1.f / (1.f + __expf(arg));
}

__device__ __forceinline__ float gelu_f(float x) { return x * sigmoid_2u(x); }

__device__ __forceinline__ float gelu_grad_f(float x) {
  const float s = sigmoid_2u(x);
  return s + 2.f * x * s * (1.f - s) * kK0 * (1.f + 3.f * kK1 * x * x);
}

template <typename T>
__global__ void gelu_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, bool packed) {
  constexpr int N = Pack<T>::N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (packed) {
    for (int64_t p = i0; p < n / N; p += stride) {
      float v[N];
      load_pack(x + p * N, v);
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = gelu_f(v[i]);
      store_pack(y + p * N, v);
    }
    i0 += (n / N) * N;   // the tail after the last full pack
  }
  for (int64_t i = i0; i < n; i += stride) y[i] = from_f<T>(gelu_f(to_f(x[i])));
}

template <typename T>
__global__ void gelu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t n,
                                bool packed) {
  constexpr int N = Pack<T>::N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (packed) {
    for (int64_t p = i0; p < n / N; p += stride) {
      float v[N], d[N];
      load_pack(x + p * N, v);
      load_pack(dy + p * N, d);
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = d[i] * gelu_grad_f(v[i]);
      store_pack(dx + p * N, v);
    }
    i0 += (n / N) * N;
  }
  for (int64_t i = i0; i < n; i += stride) dx[i] = from_f<T>(to_f(dy[i]) * gelu_grad_f(to_f(x[i])));
}

unsigned grid_for(int64_t work) {
  const int64_t blocks = (work + 255) / 256;
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

}  // namespace

int gelu_fwd(DType dt, const void* x, void* y, int64_t n, void* stream) {
  if (n == 0) return 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const bool packed = aligned16(x) && aligned16(y);
    gelu_fwd_kernel<T><<<grid_for(packed ? n / Pack<T>::N + 1 : n), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), static_cast<T*>(y), n, packed);
    return launch_status();
  });
}

int gelu_bwd(DType dt, const void* dy, const void* x, void* dx, int64_t n, void* stream) {
  if (n == 0) return 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const bool packed = aligned16(dy) && aligned16(x) && aligned16(dx);
    gelu_bwd_kernel<T><<<grid_for(packed ? n / Pack<T>::N + 1 : n), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), n, packed);
    return launch_status();
  });
}

}  // namespace cuda
}  // namespace gptfast
