// The CUDA launchers of rope.cu (see kernels.h for the conventions).
#pragma once
#include <cstdint>

#include "kernels.h"

namespace gptfast {
namespace cuda {

// RoPE: every row (b, h, t) of x (B, H, T, D; element strides sb, sh, st, the last dim contiguous) rotated by
// position t's angles (cos, sin: (T, D / 2), float32) into y (B, H, T, D) contiguous. back: the opposite angles.
int rope_rotate(DType dt, const void* x, void* y, const float* cos, const float* sin, int64_t B, int64_t H, int64_t T,
                int64_t D, int64_t sb, int64_t sh, int64_t st, bool back, void* stream);

}  // namespace cuda
}  // namespace gptfast
