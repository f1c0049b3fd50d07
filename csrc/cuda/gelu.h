// The CUDA launchers of gelu.cu (see kernels.h for the conventions).
#pragma once
#include <cstdint>

#include "kernels.h"

namespace gptfast {
namespace cuda {

// GELU, tanh approximation, elementwise over n values.
int gelu_fwd(DType dt, const void* x, void* y, int64_t n, void* stream);
int gelu_bwd(DType dt, const void* dy, const void* x, void* dx, int64_t n, void* stream);

}  // namespace cuda
}  // namespace gptfast
