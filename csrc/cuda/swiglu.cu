// SwiGLU forward/backward in CUDA: elementwise, grid-stride loop, fp32 math (the CPU kernel's formulas):
//   y = g s u,  s = sigmoid(g);   dg = dy u s (1 + g (1 - s)),  du = dy g s
// cuda_check: no spills (.ci/cuda_check.sh fails the build if a kernel here spills registers)
#include "common.cuh"
#include "swiglu.h"

namespace gptfast {
namespace cuda {
namespace {

__device__ __forceinline__ float sigmoid_f(float g) { return 1.f / (1.f + __expf(fminf(-g, 80.f))); }

template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ y, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = to_f(gate[i]);
    y[i] = from_f<T>(g * sigmoid_f(g) * to_f(up[i]));
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ gate, const T* __restrict__ up,
                                  T* __restrict__ dgate, T* __restrict__ dup, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = to_f(gate[i]), u = to_f(up[i]), d = to_f(dy[i]);
    const float s = sigmoid_f(g);
    dgate[i] = from_f<T>(d * u * s * (1.f + g * (1.f - s)));
    dup[i] = from_f<T>(d * g * s);
  }
}

unsigned grid_for(int64_t work) {
  const int64_t blocks = (work + 255) / 256;
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

}  // namespace

int swiglu_fwd(DType dt, const void* gate, const void* up, void* y, int64_t n, void* stream) {
  if (n == 0) return 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    swiglu_fwd_kernel<T><<<grid_for(n), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(y), n);
    return launch_status();
  });
}

int swiglu_bwd(DType dt, const void* dy, const void* gate, const void* up, void* dgate, void* dup, int64_t n,
               void* stream) {
  if (n == 0) return 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    swiglu_bwd_kernel<T><<<grid_for(n), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(dgate),
        static_cast<T*>(dup), n);
    return launch_status();
  });
}

}  // namespace cuda
}  // namespace gptfast
