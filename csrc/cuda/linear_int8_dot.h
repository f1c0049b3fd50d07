// The CUDA launchers of linear_int8_dot.cu (see kernels.h for the conventions): the integer-dot-product linear
// layers of inference, linear_w8a8 (int8 weights) and linear_int4 (4-bit weights, ops/linear_int4.py pack_int4),
// with the rows of x quantized to int8 first - the GPU twins of csrc/cpu/linear_w8a8.cpp and linear_int4.cpp.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace gptfast {
namespace cuda {

constexpr int kInt8DotMaxRows = 16;   // rows of x a launch takes (more: the glue launches again)

// Each row of x (M, K) float32 (row stride ldx) to int8: sx[m] = absmax / 127, q[m, k] = round-half-even(x * (127 /
// absmax)) clamped to [-127, 127], zeros for k in [K, Kp). The CPU kernels' q and sx, bit for bit.
int quantize_rows_int8(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q, int64_t Kp, float* sx,
                       void* stream);

// y (M, N) float32 = float(q . w[n]) * sx[m] * scales[n] (+ bias[n]): w (N, K) int8 contiguous, q (M, Kp) from
// quantize_rows_int8, 1 <= M <= kInt8DotMaxRows. The CPU kernel's bits (exact int32 sums, the same float steps).
int linear_w8a8_fwd(const int8_t* q, int64_t Kp, const float* sx, const int8_t* w, const float* scales,
                    const float* bias, float* y, int64_t M, int64_t N, int64_t K, void* stream);

// y (M, N) float32 = sx[m] * sum_g scales[n, g] * (q . w over group g) (+ bias[n]): w (N, Kp / 2) uint8 packed,
// scales (N, groups) with groups = Kp / 32 or Kp / 64, 1 <= M <= kInt8DotMaxRows.
int linear_int4_fwd(const int8_t* q, int64_t Kp, const float* sx, const uint8_t* w, const float* scales,
                    int64_t groups, const float* bias, float* y, int64_t M, int64_t N, void* stream);

}  // namespace cuda
}  // namespace gptfast
