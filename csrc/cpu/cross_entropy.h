// The CPU cross-entropy's row kernel, for other ops that produce logits themselves (the fused
// LM head + loss): each row of `logits` (N, V; float32/float64, contiguous) is reduced to its loss
// (lse - logit[target], 0 where the target is ignore_index) in loss_rows (N,), and with to_grad the
// row is overwritten, in place, by its gradient softmax - onehot (zeros for ignored rows).
#pragma once
#include <ATen/core/Tensor.h>

namespace gptfast {

void cross_entropy_rows_inplace_cpu(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                    at::Tensor& loss_rows, bool to_grad);

}  // namespace gptfast
