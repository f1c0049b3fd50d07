// The gptfast op contract: every schema declared once. Kernels register per device elsewhere:
// CUDA statically (csrc/cuda/), CPU at load time from the build for the running CPU's instruction
// set (csrc/cpu/register.cpp, chosen by gptfast/compiled.py); fake kernels and autograd are
// registered in Python (gptfast/ops/extension.py).
#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY(gptfast, m) {
  // LayerNorm over the last dim. mean/rstd: one per row, float32 (float64 for float64 x).
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  // GELU, tanh approximation.
  m.def("gelu_fwd(Tensor x) -> Tensor");
  m.def("gelu_bwd(Tensor dy, Tensor x) -> Tensor");
  // Scaled dot-product attention on (B, H, T, D); lse (B, H, T) is the softmax log-normalizer.
  // seed: a one-element int64 tensor (a tensor, not an int, so drawing it stays inside a
  // torch.compile graph); it keys the counter-based dropout RNG of csrc/dropout_hash.h.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, float dropout_p, Tensor seed) -> (Tensor o, Tensor lse)");
  // Cross-entropy of each row of logits (N, V) against targets (N,): per-row loss and lse (float32,
  // float64 for float64 logits); with compute_grad, also dlogits = softmax - onehot (0 for rows
  // whose target is ignore_index), which the backward only scales by each row's upstream gradient.
  m.def("cross_entropy_fwd(Tensor logits, Tensor targets, int ignore_index, bool compute_grad) -> (Tensor loss, Tensor lse, Tensor dlogits)");
  m.def("cross_entropy_bwd(Tensor dlogits, Tensor grad_loss) -> Tensor");
  // The LM head fused with the loss: mean cross-entropy of hidden (N, C) @ weight (V, C)^T against
  // targets (N,), rows in chunks of chunk_rows so the (N, V) logits never exist; loss is a 0-dim float32
  // (float64 for float64 inputs). With compute_grad, also the gradients of that mean loss for hidden and
  // weight, which the backward only scales by the upstream gradient.
  m.def("linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor targets, int ignore_index, int chunk_rows, bool compute_grad) -> (Tensor loss, Tensor grad_hidden, Tensor grad_weight)");
  // A linear layer for inference (no backward: the weights are frozen): y (..., N) = x (..., K) @ weight^T,
  // times scales (N,) if given, plus bias (N,) if given. weight (N, K) is float32, bfloat16 or int8
  // (weight-only quantization; int8 needs the per-row scales); x, scales, bias and y are float32 on CPU.
  // Built for decoding, where x has a few rows and the weights are read once (csrc/cpu/linear.cpp).
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor? scales, Tensor? bias) -> Tensor");
  // Dropout fused with the residual add: y = residual + dropout(x). x is read as rows of its last dim C; element
  // (row, col) is kept with probability 1 - p (then scaled by 1 / (1 - p)) by the counter-based RNG of
  // csrc/dropout_hash.h keyed by (seed, 0, row, col), so no mask is stored. residual absent: plain dropout. y
  // has residual's dtype (x's without one): x bfloat16/float16 may add into a float32 residual. dropout_bwd:
  // dx = dy * keep / (1 - p), the same mask, written in `dtype` (x's).
  m.def("dropout_add_fwd(Tensor x, Tensor? residual, float p, Tensor seed) -> Tensor");
  m.def("dropout_bwd(Tensor dy, float p, Tensor seed, ScalarType dtype) -> Tensor");
  // One transformer block's decoding step (csrc/cpu/decode_block.cpp): x (B, 1, C), one new position per
  // sequence at start_pos, through y = x1 + proj(gelu(fc(ln2(x1)))), x1 = x + out(attention(ln1(x))), writing
  // the new keys and values into k_cache/v_cache (B, n_heads, context, head_dim) at start_pos and attending
  // over positions 0..start_pos. The linear layers are (weight, scales?, bias?) as for linear_fwd;
  // qkv_weights: one stacked (3C, C) weight (rows Q, K, V) or three (C, C). Inference only (no backward).
  m.def("decode_block(Tensor x, Tensor ln1_weight, Tensor ln1_bias, Tensor[] qkv_weights, Tensor?[] qkv_scales, Tensor?[] qkv_biases, Tensor out_weight, Tensor? out_scales, Tensor? out_bias, Tensor ln2_weight, Tensor ln2_bias, Tensor fc_weight, Tensor? fc_scales, Tensor? fc_bias, Tensor proj_weight, Tensor? proj_scales, Tensor? proj_bias, Tensor(a!) k_cache, Tensor(b!) v_cache, SymInt start_pos, float eps) -> Tensor");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal, float scale, float dropout_p, Tensor seed) -> (Tensor dq, Tensor dk, Tensor dv)");
}
