// The CUDA launchers of rms_norm.cu (see kernels.h for the conventions).
#pragma once
#include <cstdint>

#include "kernels.h"

namespace gptfast {
namespace cuda {

// RMSNorm over rows of C: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps).
int rms_norm_fwd(DType dt, const void* x, const void* w, void* y, float* rstd, int64_t rows, int64_t C, float eps,
                 void* stream);
// dx per row; dweight summed over rows in a fixed order (deterministic). `scratch` holds
// rms_norm_bwd_scratch_floats(rows, C) floats.
int64_t rms_norm_bwd_scratch_floats(int64_t rows, int64_t C);
int rms_norm_bwd(DType dt, const void* dy, const void* x, const void* w, const float* rstd, void* dx, void* dw,
                 float* scratch, int64_t rows, int64_t C, void* stream);

}  // namespace cuda
}  // namespace gptfast
