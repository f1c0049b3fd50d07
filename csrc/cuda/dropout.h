// The CUDA launchers of dropout.cu (see kernels.h for the conventions).
#pragma once
#include <cstdint>

#include "kernels.h"

namespace gptfast {
namespace cuda {

// y = residual + dropout(x) over n values seen as rows of C (residual may be null: plain dropout); x in
// dtype `in`, residual and y in `out`. Also dropout's backward (x = dy, residual null, out = dx's dtype).
int dropout_add(DType in, DType out, const void* x, const void* residual, void* y, int64_t n, int64_t C,
                uint64_t seed, float p, void* stream);

}  // namespace cuda
}  // namespace gptfast
