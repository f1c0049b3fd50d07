// The CUDA launchers of linear.cu (see kernels.h for the conventions).
#pragma once
#include <cstdint>

#include "kernels.h"

namespace gptfast {
namespace cuda {

// The linear layer of decoding: y (M, N) = x (M, K) @ W^T [* scales] [+ bias] for 1 <= M <= kLinearMaxRows.
// x (row stride ldx), bias and y of dtype xt (y contiguous); W (N, K) contiguous of weight type wt;
// scales (N,) float32 or null (int8 weights need them); bias null for none. Math in float32.
enum WDType : int { kWF32 = 0, kWBF16 = 1, kWI8 = 2 };
constexpr int kLinearMaxRows = 16;
int linear_fwd(DType xt, WDType wt, const void* x, int64_t ldx, const void* w, const float* scales, const void* bias,
               void* y, int64_t M, int64_t N, int64_t K, void* stream);

}  // namespace cuda
}  // namespace gptfast
