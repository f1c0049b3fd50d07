// RoPE in CUDA: one thread per (row, pair i), fp32 math; reads each row through its strides (q and k may be
// transposed projections), writes the rotation contiguous.
//   out = (x1 c - x2 s, x2 c + x1 s);  back (the backward): (x1 c + x2 s, x2 c - x1 s)
// cuda_check: no spills (.ci/cuda_check.sh fails the build if a kernel here spills registers)
#include "common.cuh"
#include "rope.h"

namespace gptfast {
namespace cuda {
namespace {

template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ cos,
                            const float* __restrict__ sin, int64_t rows, int64_t H, int64_t T_, int64_t half, int64_t sb,
                            int64_t sh, int64_t st, float sign) {
  const int64_t total = rows * half, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t r = idx / half, i = idx % half, t = r % T_, bh = r / T_;
    const T* xr = x + (bh / H) * sb + (bh % H) * sh + t * st;
    const float x1 = to_f(xr[i]), x2 = to_f(xr[half + i]);
    const float c = cos[t * half + i], s = sign * sin[t * half + i];
    y[r * 2 * half + i] = from_f<T>(x1 * c - x2 * s);
    y[r * 2 * half + half + i] = from_f<T>(x2 * c + x1 * s);
  }
}

}  // namespace

int rope_rotate(DType dt, const void* x, void* y, const float* cos, const float* sin, int64_t B, int64_t H, int64_t T,
                int64_t D, int64_t sb, int64_t sh, int64_t st, bool back, void* stream) {
  const int64_t rows = B * H * T, half = D / 2;
  if (rows * half == 0) return 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using Ty = decltype(tag);
    const int64_t blocks = (rows * half + 255) / 256;
    const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
    rope_kernel<Ty><<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const Ty*>(x), static_cast<Ty*>(y), cos, sin, rows,
        H, T, half, sb, sh, st, back ? -1.f : 1.f);
    return launch_status();
  });
}

}  // namespace cuda
}  // namespace gptfast
