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

namespace gptfast {
namespace {

constexpr int64_t kMaxRows = 16;   // sequences per call: the linear kernel's few-rows range (linear.cpp)

struct LinearArgs {
  at::Tensor w;            // (N, K) float32, bfloat16 or int8, contiguous
  const float* scales;     // (N,) or null
  const float* bias;       // (N,) or null
  int64_t N;
};

LinearArgs linear_args(const std::string& name, const at::Tensor& w, const std::optional<at::Tensor>& scales,
                       const std::optional<at::Tensor>& bias, int64_t K, const at::Tensor& x) {
  const auto wt = w.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16 || wt == at::kChar, name,
              " weight must be float32, bfloat16 or int8, got ", wt);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == K, name, " weight must have shape (N, ", K, "), got ", w.sizes());
  TORCH_CHECK(w.device() == x.device(), name, " weight is on ", w.device(), " but x is on ", x.device());
  TORCH_CHECK(w.is_contiguous(), name, " weight must be contiguous");
  TORCH_CHECK(wt != at::kChar || scales.has_value(), name, " weight is int8 and needs scales");
  const float* ptr[2] = {nullptr, nullptr};
  int i = 0;
  for (const auto* t : {&scales, &bias}) {
    const char* what = i == 0 ? " scales" : " bias";
    if (t->has_value()) {
      const at::Tensor& v = **t;
      TORCH_CHECK(v.scalar_type() == at::kFloat && v.dim() == 1 && v.size(0) == w.size(0) && v.is_contiguous() &&
                      v.device() == x.device(),
                  name, what, " must be a contiguous float32 (", w.size(0), ",) tensor on x's device, got ",
                  v.scalar_type(), " ", v.sizes());
      ptr[i] = v.data_ptr<float>();
    }
    ++i;
  }
  return {w, ptr[0], ptr[1], w.size(0)};
}

void check_vector(const char* name, const at::Tensor& t, int64_t C, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == C && t.is_contiguous() &&
                  t.device() == x.device(),
              name, " must be a contiguous float32 (", C, ",) tensor on x's device, got ", t.scalar_type(), " ",
              t.sizes());
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

at::Tensor decode_block_cpu(const at::Tensor& x, const at::Tensor& ln1_weight, const at::Tensor& ln1_bias,
                            at::TensorList qkv_weights, const c10::List<std::optional<at::Tensor>>& qkv_scales,
                            const c10::List<std::optional<at::Tensor>>& qkv_biases, const at::Tensor& out_weight,
                            const std::optional<at::Tensor>& out_scales, const std::optional<at::Tensor>& out_bias,
                            const at::Tensor& ln2_weight, const at::Tensor& ln2_bias, const at::Tensor& fc_weight,
                            const std::optional<at::Tensor>& fc_scales, const std::optional<at::Tensor>& fc_bias,
                            const at::Tensor& proj_weight, const std::optional<at::Tensor>& proj_scales,
                            const std::optional<at::Tensor>& proj_bias, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, int64_t start_pos, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x: the fused decoding block takes float32 activations, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "x must have shape (B, 1, C) - one new position per sequence - got ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  const int64_t B = x.size(0), C = x.size(2);
  TORCH_CHECK(B >= 1 && B <= kMaxRows, "x: the fused decoding block takes 1 to ", kMaxRows, " sequences, got ", B);
  check_vector("ln1_weight", ln1_weight, C, x);
  check_vector("ln1_bias", ln1_bias, C, x);
  check_vector("ln2_weight", ln2_weight, C, x);
  check_vector("ln2_bias", ln2_bias, C, x);
  for (const auto* t : {&k_cache, &v_cache}) {
    const char* name = t == &k_cache ? "k_cache" : "v_cache";
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 && t->is_contiguous() && t->device() == x.device(),
                name, " must be a contiguous float32 (B, n_heads, context, head_dim) tensor on x's device, got ",
                t->scalar_type(), " ", t->sizes());
  }
  const int64_t H = k_cache.size(1), Tmax = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(k_cache.size(0) == B && H * D == C, "k_cache must have shape (", B, ", n_heads, context, head_dim) with ",
              "n_heads * head_dim = C = ", C, ", got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ", k_cache.sizes(), ", got ",
              v_cache.sizes());
  TORCH_CHECK(start_pos >= 0 && start_pos < Tmax, "start_pos must be in [0, ", Tmax, "), got ", start_pos);
  const int64_t n_qkv = static_cast<int64_t>(qkv_weights.size());
  TORCH_CHECK((n_qkv == 1 || n_qkv == 3) && static_cast<int64_t>(qkv_scales.size()) == n_qkv &&
                  static_cast<int64_t>(qkv_biases.size()) == n_qkv,
              "qkv_weights: one stacked (3C, C) weight or three (C, C) ones, with as many scales and biases, got ",
              n_qkv, " weights, ", qkv_scales.size(), " scales, ", qkv_biases.size(), " biases");
  std::vector<LinearArgs> qkv;
  int64_t qkv_cols = 0;
  for (int64_t i = 0; i < n_qkv; ++i) {
    qkv.push_back(linear_args("qkv_weights[" + std::to_string(i) + "]", qkv_weights[i], qkv_scales.get(i),
                              qkv_biases.get(i), C, x));
    qkv_cols += qkv.back().N;
  }
  TORCH_CHECK(qkv_cols == 3 * C, "qkv_weights must have 3C = ", 3 * C, " rows in all, got ", qkv_cols);
  const LinearArgs out = linear_args("out", out_weight, out_scales, out_bias, C, x);
  TORCH_CHECK(out.N == C, "out weight must have shape (", C, ", ", C, "), got ", out_weight.sizes());
  const LinearArgs fc = linear_args("fc", fc_weight, fc_scales, fc_bias, C, x);
  const int64_t F = fc.N;
  const LinearArgs proj = linear_args("proj", proj_weight, proj_scales, proj_bias, F, x);
  TORCH_CHECK(proj.N == C, "proj weight must have shape (", C, ", ", F, "), got ", proj_weight.sizes());

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
      layer_norm_row_f32(px + b * C, ln1_weight.data_ptr<float>(), ln1_bias.data_ptr<float>(), h + b * C, C, eps);
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
      layer_norm_row_f32(x1 + b * C, ln2_weight.data_ptr<float>(), ln2_bias.data_ptr<float>(), h + b * C, C, eps);
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

void register_decode_block_cpu(torch::Library& m) { m.impl("decode_block", &decode_block_cpu); }

}  // namespace gptfast
