// The CUDA launchers of swiglu.cu (see kernels.h for the conventions).
#pragma once
#include <cstdint>

#include "kernels.h"

namespace gptfast {
namespace cuda {

// SwiGLU, elementwise over n values: y = silu(gate) * up; the backward gives dgate and dup.
int swiglu_fwd(DType dt, const void* gate, const void* up, void* y, int64_t n, void* stream);
int swiglu_bwd(DType dt, const void* dy, const void* gate, const void* up, void* dgate, void* dup, int64_t n,
               void* stream);

}  // namespace cuda
}  // namespace gptfast
