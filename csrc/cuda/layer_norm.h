// The CUDA launchers of layer_norm.cu (see kernels.h for the conventions).
#pragma once
#include <cstdint>

#include "kernels.h"

namespace gptfast {
namespace cuda {

// LayerNorm over rows of C: y = (x - mean) * rstd * w + b.
int layer_norm_fwd(DType dt, const void* x, const void* w, const void* b, void* y, float* mean, float* rstd,
                   int64_t rows, int64_t C, float eps, void* stream);
// dx per row; dweight/dbias summed over rows in a fixed order (deterministic). `scratch` holds
// 2 * layer_norm_bwd_scratch_floats(rows, C) floats.
int64_t layer_norm_bwd_scratch_floats(int64_t rows, int64_t C);
int layer_norm_bwd(DType dt, const void* dy, const void* x, const void* w, const float* mean, const float* rstd,
                   void* dx, void* dw, void* db, float* scratch, int64_t rows, int64_t C, void* stream);

}  // namespace cuda
}  // namespace gptfast
