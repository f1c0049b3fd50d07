// Dropout fused with the residual add in CUDA: y = residual + dropout(x), and dropout's backward
// (dx = dy * keep / (1 - p)), elementwise with a grid-stride loop and fp32 math. Element i of x sits at
// (row, col) = (i / C, i % C); it is kept when the counter-based hash of (seed, 0, row, col) says so
// (dropout_hash.h), exactly as on CPU and in Triton, so the backward regenerates the mask from the seed.
// x and y may have different storage types (bf16 branch output added into a float32 residual stream).
#include "../dropout_hash.h"
#include "common.cuh"
#include "dropout.h"

namespace gptfast {
namespace cuda {
namespace {

template <typename In, typename Out>
__global__ void dropout_kernel(const In* __restrict__ x, const Out* __restrict__ residual, Out* __restrict__ y,
                               int64_t n, int64_t C, uint32_t head_key, uint32_t threshold, float scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t row = i / C, col = i - row * C;
    const uint32_t row_key = dropout_row_key(head_key, static_cast<uint32_t>(row));
    float v = dropout_keep(row_key, static_cast<uint32_t>(col), threshold) ? to_f(x[i]) * scale : 0.f;
    if (residual) v += to_f(residual[i]);
    y[i] = from_f<Out>(v);
  }
}

unsigned grid_for(int64_t work) {
  const int64_t blocks = (work + 255) / 256;
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

template <typename In>
int launch_out(DType out, const void* x, const void* residual, void* y, int64_t n, int64_t C, uint64_t seed,
               float p, cudaStream_t stream) {
  return dispatch_dtype(out, [&](auto tag) {
    using Out = decltype(tag);
    dropout_kernel<In, Out><<<grid_for(n), 256, 0, stream>>>(
        static_cast<const In*>(x), static_cast<const Out*>(residual), static_cast<Out*>(y), n, C,
        dropout_head_key(seed, 0), dropout_threshold(p), 1.f / (1.f - p));
    return launch_status();
  });
}

}  // namespace

int dropout_add(DType in, DType out, const void* x, const void* residual, void* y, int64_t n, int64_t C,
                uint64_t seed, float p, void* stream) {
  if (n == 0) return 0;
  return dispatch_dtype(in, [&](auto tag) {
    using In = decltype(tag);
    return launch_out<In>(out, x, residual, y, n, C, seed, p, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace cuda
}  // namespace gptfast
