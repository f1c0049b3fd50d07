// One transformer block's decoding step on CPU, in one call: a new position per sequence (x: B x 1 x C)
// through LayerNorm -> Q/K/V -> the KV cache -> attention -> output projection + residual -> LayerNorm
// -> fc -> GELU -> projection + residual.
//
// Why: decoding a token of GPT-2 124M is ~12 small steps per block, each a separate op call: ~250
// calls a token, each paying Python, the dispatcher, an allocation and a wake-up of the threads
// (~15 us), about as long as streaming the token's int8 weights. Here a block is one call, its
// threads wake once, and they meet at a barrier between the steps instead of returning to Python.
//
// Every step runs the loop of the standalone op (decode_parts.h) on a part of the work: the threads
// split each linear layer's output columns, the rows of the LayerNorms and the (sequence, head)
// pairs of the attention. A column, row or head is computed by the same instructions in the same order
// as by the ops one by one, so the block's output and the cache it writes are bit-for-bit what the
// unfused extension path gives (tested), on either ISA build.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "../common.h"
#include "decode_parts.h"
#include "kernels.h"

#ifndef GPTFAST_ISA_MODULE   // the schemas once, in gptfast._C (the AVX-512 module adds kernels only)
TORCH_LIBRARY_FRAGMENT(gptfast, m) {
  // One transformer block's decoding step: x (B, 1, C), one new position per sequence at start_pos, through
  // y = x1 + proj(gelu(fc(ln2(x1)))), x1 = x + out(attention(ln1(x))), writing the new keys and values into
  // k_cache/v_cache (B, n_heads, context, head_dim) at start_pos and attending over positions 0..start_pos.
  // norms: [ln1_weight, ln1_bias, ln2_weight, ln2_bias]; the six linear layers in the order q, k, v, out, fc,
  // proj: weights (N, K) float32, bfloat16 or int8, scales (N,) for int8, biases (N,) or None. Inference only.
  m.def("decode_block(Tensor x, Tensor[] norms, Tensor[] weights, Tensor?[] scales, Tensor?[] biases, Tensor(a!) k_cache, Tensor(b!) v_cache, SymInt start_pos, float eps) -> Tensor");
}
#endif

namespace gptfast {
namespace {

constexpr int64_t kMaxRows = 16;   // sequences per call: the linear kernel's few-rows range (linear.cpp)

struct LinearArgs {
  at::Tensor w;            // (N, K) float32, bfloat16 or int8, contiguous
  const float* scales;     // (N,) or null
  const float* bias;       // (N,) or null
  int64_t N;
};

// The arguments' one check, for a direct call of the kernel op (gptfast.ops.decode_block checks them first, with
// each argument named): sizes, types and contiguity the loops below rely on, layer by layer.
LinearArgs layer_args(int i, const at::Tensor& w, const std::optional<at::Tensor>& scales,
                      const std::optional<at::Tensor>& bias, int64_t N, int64_t K) {
  static const char* names[] = {"q", "k", "v", "out", "fc", "proj"};
  const auto wt = w.scalar_type();
  TORCH_CHECK((wt == at::kFloat || wt == at::kBFloat16 || wt == at::kChar) && w.dim() == 2 && w.size(1) == K &&
                  (N < 0 || w.size(0) == N) && w.is_contiguous() && w.device().is_cpu(),
              names[i], " weight must be a contiguous float32, bfloat16 or int8 (N, ", K, ") CPU tensor, got ", wt, " ",
              w.sizes());
  TORCH_CHECK(wt != at::kChar || scales.has_value(), names[i], " weight is int8 and needs scales");
  const float* ptr[2] = {nullptr, nullptr};
  for (int j = 0; j < 2; ++j) {
    const auto& t = j == 0 ? scales : bias;
    if (!t.has_value()) continue;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == w.size(0) && t->is_contiguous() &&
                    t->device().is_cpu(),
                names[i], j == 0 ? " scales" : " bias", " must be a contiguous float32 (", w.size(0), ",) CPU tensor");
    ptr[j] = t->data_ptr<float>();
  }
  return {w, ptr[0], ptr[1], w.size(0)};
}

// Thread t's share [begin, end) of N output columns, in whole blocks of kDecodeColumnBlock.
std::pair<int64_t, int64_t> column_share(int64_t N, int64_t t, int64_t nt) {
  const int64_t blocks = (N + kDecodeColumnBlock - 1) / kDecodeColumnBlock;
  return {std::min(N, blocks * t / nt * kDecodeColumnBlock), std::min(N, blocks * (t + 1) / nt * kDecodeColumnBlock)};
}

// This thread's share of y (B x N) = a (B x K, row stride lda) W^T + residual (B x N): the residual added to
// the columns the thread computed, so no barrier in between.
void linear_plus_residual(const float* a, int64_t lda, int64_t B, const LinearArgs& L, const float* residual,
                          float* y, int64_t t, int64_t nt) {
  const int64_t N = L.N;
  const auto [c0, c1] = column_share(N, t, nt);
  linear_columns(a, lda, B, L.w, L.scales, L.bias, y, N, c0, c1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = c0; c < c1; ++c) y[b * N + c] += residual[b * N + c];
}

at::Tensor decode_block_cpu(const at::Tensor& x, at::TensorList norms, at::TensorList weights,
                            const c10::List<std::optional<at::Tensor>>& scales,
                            const c10::List<std::optional<at::Tensor>>& biases, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, int64_t start_pos, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(1) == 1 && x.is_contiguous() &&
                  x.size(0) >= 1 && x.size(0) <= kMaxRows && x.device().is_cpu(),
              "x must be a contiguous float32 (B, 1, C) CPU tensor with 1 <= B <= ", kMaxRows, ", got ",
              x.scalar_type(), " ", x.sizes());
  const int64_t B = x.size(0), C = x.size(2);
  TORCH_CHECK(norms.size() == 4, "norms: [ln1_weight, ln1_bias, ln2_weight, ln2_bias], got ", norms.size());
  for (const at::Tensor& t : norms)
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == C && t.is_contiguous(),
                "norms must be contiguous float32 (", C, ",) tensors");
  TORCH_CHECK(weights.size() == 6 && scales.size() == 6 && biases.size() == 6,
              "weights, scales, biases: six layers each (q, k, v, out, fc, proj)");
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 && t->is_contiguous() && t->size(0) == B &&
                    t->size(1) * t->size(3) == C && t->sizes() == k_cache.sizes() && t->device().is_cpu(),
                "k_cache and v_cache must be contiguous float32 (", B, ", n_heads, context, head_dim) CPU tensors with "
                "n_heads * head_dim = ", C, ", got ", t->sizes());
  const int64_t H = k_cache.size(1), Tmax = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(start_pos >= 0 && start_pos < Tmax, "start_pos must be in [0, ", Tmax, "), got ", start_pos);
  std::vector<LinearArgs> qkv;
  for (int i = 0; i < 3; ++i) qkv.push_back(layer_args(i, weights[i], scales.get(i), biases.get(i), C, C));
  const LinearArgs out = layer_args(3, weights[3], scales.get(3), biases.get(3), C, C);
  const LinearArgs fc = layer_args(4, weights[4], scales.get(4), biases.get(4), -1, C);
  const int64_t F = fc.N;
  const LinearArgs proj = layer_args(5, weights[5], scales.get(5), biases.get(5), C, F);
  const float *ln1_w = norms[0].data_ptr<float>(), *ln1_b = norms[1].data_ptr<float>(),
              *ln2_w = norms[2].data_ptr<float>(), *ln2_b = norms[3].data_ptr<float>();

  const int64_t P = start_pos, n_keys = start_pos + 1;
  const auto opts = x.options();
  at::Tensor y = at::empty({B, 1, C}, opts);
  at::Tensor work = at::empty({B * (C + 3 * C + C + C + F)}, opts);   // h, qkv, att, x1, f
  const int nt = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  at::Tensor scratch = at::empty({nt, n_keys + 2 * D}, opts);
  maybe_poison(y), maybe_poison(work);
  const float* px = x.data_ptr<float>();
  float* h = work.data_ptr<float>();         // (B, C): a LayerNorm's output
  float* qkv_out = h + B * C;                // (B, 3C): queries, keys, values side by side
  float* att = qkv_out + B * 3 * C;          // (B, C): the heads' outputs side by side
  float* x1 = att + B * C;                   // (B, C): x + attention
  float* f = x1 + B * C;                     // (B, F): the feed-forward's hidden layer
  float* py = y.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  float* pscratch = scratch.data_ptr<float>();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));   // as ops.causal_attention

#pragma omp parallel num_threads(nt)
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    for (int64_t b = t; b < B; b += n)                                    // h = ln1(x)
      layer_norm_row_f32(px + b * C, ln1_w, ln1_b, h + b * C, C, eps);
#pragma omp barrier
    int64_t col = 0;                                                      // q, k, v = h W_qkv^T
    for (const LinearArgs& L : qkv) {
      const auto [c0, c1] = column_share(L.N, t, n);
      linear_columns(h, C, B, L.w, L.scales, L.bias, qkv_out + col, 3 * C, c0, c1);
      col += L.N;
    }
#pragma omp barrier
    for (int64_t bh = t; bh < B * H; bh += n) {                           // cache the new k, v; attend
      const int64_t b = bh / H, hd = bh % H;
      const float* q = qkv_out + b * 3 * C + hd * D;
      float* kh = kc + bh * Tmax * D;                                     // this head's cache rows
      float* vh = vc + bh * Tmax * D;
      std::copy(q + C, q + C + D, kh + P * D);
      std::copy(q + 2 * C, q + 2 * C + D, vh + P * D);
      attention_last_row_f32(q, kh, vh, n_keys, D, scale, att + b * C + hd * D, pscratch + t * (n_keys + 2 * D));
    }
#pragma omp barrier
    linear_plus_residual(att, C, B, out, px, x1, t, n);                  // x1 = att W_out^T + x
#pragma omp barrier
    for (int64_t b = t; b < B; b += n)                                    // h = ln2(x1)
      layer_norm_row_f32(x1 + b * C, ln2_w, ln2_b, h + b * C, C, eps);
#pragma omp barrier
    {                                                                     // f = gelu(h W_fc^T)
      const auto [c0, c1] = column_share(F, t, n);
      linear_columns(h, C, B, fc.w, fc.scales, fc.bias, f, F, c0, c1);
      for (int64_t b = 0; b < B; ++b) gelu_span_f32(f + b * F + c0, f + b * F + c0, c1 - c0);
    }
#pragma omp barrier
    linear_plus_residual(f, F, B, proj, x1, py, t, n);                   // y = f W_proj^T + x1
  }
  return y;
}

}  // namespace

static void decode_block_kernels(torch::Library& m) { m.impl("decode_block", &decode_block_cpu); }
GPTFAST_CPU_KERNELS(decode_block_kernels);

}  // namespace gptfast
