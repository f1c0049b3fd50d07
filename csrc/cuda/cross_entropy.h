// The CUDA launchers of cross_entropy.cu (see kernels.h for the conventions).
#pragma once
#include <cstdint>

#include "kernels.h"

namespace gptfast {
namespace cuda {

// Cross-entropy per row of logits (N, V) against int64 targets: loss and lse float32; with
// compute_grad, dlogits = softmax - onehot (0 for ignored rows). Backward: dlogits * grad[row].
int cross_entropy_fwd(DType dt, const void* logits, const int64_t* targets, float* loss, float* lse, void* dlogits,
                      int64_t N, int64_t V, int64_t ignore_index, bool compute_grad, void* stream);
int cross_entropy_bwd(DType dt, const void* dlogits, const float* grad, void* out, int64_t N, int64_t V, void* stream);

}  // namespace cuda
}  // namespace gptfast
