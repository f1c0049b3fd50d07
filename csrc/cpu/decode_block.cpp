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
  // int8_activations: every layer int8, each layer's input rows quantized to int8 and multiplied by integer dot
  // products, as linear_w8a8 does (quantize(model, "w8a8")).
  m.def("decode_block(Tensor x, Tensor[] norms, Tensor[] weights, Tensor?[] scales, Tensor?[] biases, Tensor(a!) k_cache, Tensor(b!) v_cache, SymInt start_pos, float eps, bool int8_activations=False) -> Tensor");
  // The whole model's step: the L blocks one after the other (norms 4 L, weights/scales/biases 6 L, a cache pair a
  // block), then the final LayerNorm (final_norm: [weight, bias]) and the LM head (head_weight (V, C) with its
  // scales and bias): logits (B, 1, V). One parallel region for the token; the threads meet at barriers.
  m.def("decode_blocks(Tensor x, Tensor[] norms, Tensor[] weights, Tensor?[] scales, Tensor?[] biases, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, SymInt start_pos, float eps, Tensor[] final_norm, Tensor head_weight, Tensor? head_scales, Tensor? head_bias, bool int8_activations=False) -> Tensor");
}
#endif

namespace gptfast {
namespace {

constexpr int64_t kMaxRows = 16;   // sequences per call: the linear kernel's few-rows range (linear.cpp)

using LinearArgs = FusedLinear;   // decode_parts.h: a layer of any storage type, checked by fused_layer

LinearArgs layer_args(int i, const at::Tensor& w, const std::optional<at::Tensor>& scales,
                      const std::optional<at::Tensor>& bias, int64_t N, int64_t K) {
  static const char* names[] = {"q", "k", "v", "out", "fc", "proj"};
  return fused_layer(names[i], w, scales, bias, N, K);
}

// Thread t's share [begin, end) of N output columns, in whole blocks of kDecodeColumnBlock.
std::pair<int64_t, int64_t> column_share(int64_t N, int64_t t, int64_t nt) {
  const int64_t blocks = (N + kDecodeColumnBlock - 1) / kDecodeColumnBlock;
  return {std::min(N, blocks * t / nt * kDecodeColumnBlock), std::min(N, blocks * (t + 1) / nt * kDecodeColumnBlock)};
}

// The rows a linear layer reads: float32 rows a (row stride lda), or with int8 activations their quantized copy
// q (rows of w8a8_padded_k(K) bytes) and its row scales sx.
struct Act {
  const float* a;
  int64_t lda;
  const int8_t* q;
  const float* sx;
};

// Columns [c0, c1) of y (row stride ldy) = the B rows of `in` times L's weights: the linear or the linear_w8a8 kernel.
void layer_columns(const Act& in, int64_t B, const LinearArgs& L, float* y, int64_t ldy, int64_t c0, int64_t c1) {
  fused_columns(L, in.a, in.lda, in.q, in.sx, B, y, ldy, c0, c1);
}

// With int8 activations, this thread's rows of a (B x K) quantized into q, sx (the rows the next layer reads).
void quantize_my_rows(const float* a, int64_t B, int64_t K, int8_t* q, float* sx, int64_t t, int64_t nt) {
  if (q == nullptr) return;
  for (int64_t b = t; b < B; b += nt) w8a8_quantize_rows(a + b * K, K, 1, K, q + b * w8a8_padded_k(K), sx + b);
}

// This thread's share of y (B x N) = in (B x K) W^T + residual (B x N): the residual added to
// the columns the thread computed, so no barrier in between.
void linear_plus_residual(const Act& in, int64_t B, const LinearArgs& L, const float* residual, float* y, int64_t t,
                          int64_t nt) {
  const int64_t N = L.N;
  const auto [c0, c1] = column_share(N, t, nt);
  layer_columns(in, B, L, y, N, c0, c1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = c0; c < c1; ++c) y[b * N + c] += residual[b * N + c];
}

// The block as the threads read it: the six layers, the LayerNorms, the sizes (checked: block_args).
struct Block {
  LinearArgs q, k, v, out, fc, proj;
  const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
  int64_t B, C, F, H, Tmax, D;
};

// The arguments' one check, for a direct call of the kernel op (gptfast.ops.decode_block checks them first,
// naming each): the sizes, types and contiguity the loops rely on.
Block block_args(const at::Tensor& x, at::TensorList norms, at::TensorList weights,
                 const c10::List<std::optional<at::Tensor>>& scales, const c10::List<std::optional<at::Tensor>>& biases,
                 const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t start_pos, int64_t block = 0,
                 int64_t n_layers = 1) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(1) == 1 && x.is_contiguous() &&
                  x.size(0) >= 1 && x.size(0) <= kMaxRows && x.device().is_cpu(),
              "x must be a contiguous float32 (B, 1, C) CPU tensor with 1 <= B <= ", kMaxRows, ", got ",
              x.scalar_type(), " ", x.sizes());
  const int64_t B = x.size(0), C = x.size(2);
  TORCH_CHECK(int64_t(norms.size()) == 4 * n_layers,
              "norms: [ln1_weight, ln1_bias, ln2_weight, ln2_bias] a block, got ", norms.size(), " for ", n_layers);
  norms = norms.slice(4 * block, 4);
  for (const at::Tensor& t : norms)
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == C && t.is_contiguous(),
                "norms must be contiguous float32 (", C, ",) tensors");
  TORCH_CHECK(int64_t(weights.size()) == 6 * n_layers && int64_t(scales.size()) == 6 * n_layers &&
                  int64_t(biases.size()) == 6 * n_layers,
              "weights, scales, biases: six layers each (q, k, v, out, fc, proj) a block");
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 && t->is_contiguous() && t->size(0) == B &&
                    t->size(1) * t->size(3) == C && t->sizes() == k_cache.sizes() && t->device().is_cpu(),
                "k_cache and v_cache must be contiguous float32 (", B, ", n_heads, context, head_dim) CPU tensors with "
                "n_heads * head_dim = ", C, ", got ", t->sizes());
  TORCH_CHECK(start_pos >= 0 && start_pos < k_cache.size(2), "start_pos must be in [0, ", k_cache.size(2), "), got ",
              start_pos);
  auto layer = [&](int i, int64_t N, int64_t K) {
    const int64_t j = 6 * block + i;
    return layer_args(i, weights[j], scales.get(j), biases.get(j), N, K);
  };
  const LinearArgs fc = layer(4, -1, C);
  return {layer(0, C, C), layer(1, C, C), layer(2, C, C), layer(3, C, C), fc, layer(5, C, fc.N),
          norms[0].data_ptr<float>(), norms[1].data_ptr<float>(), norms[2].data_ptr<float>(), norms[3].data_ptr<float>(),
          B, C, fc.N, k_cache.size(1), k_cache.size(2), k_cache.size(3)};
}

// Where the threads keep the step's intermediate rows: x, the LayerNorms' output h, q/k/v side by side, the
// heads' outputs, x1 = x + attention, the feed-forward's hidden layer; and each thread's attention scratch.
struct Rows {
  const float* x;
  float *h, *qkv, *att, *x1, *f, *y, *k_cache, *v_cache, *scratch;
  int8_t* q;   // with int8 activations: the quantized rows the next layer reads (else null)
  float* sx;   // and their scales
};

// One thread's part (thread t of n) of the step: each stage the standalone op's loop on the thread's share,
// a barrier between stages.
void run_block(const Block& w, const Rows& r, int64_t P, double eps, int64_t t, int64_t n) {
  const int64_t B = w.B, C = w.C, F = w.F, D = w.D, n_keys = P + 1;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));   // 1/sqrt(D), as the attention op
  const bool q8 = r.q != nullptr;
  for (int64_t b = t; b < B; b += n) layer_norm_row_f32(r.x + b * C, w.ln1_w, w.ln1_b, r.h + b * C, C, eps);
  quantize_my_rows(r.h, B, C, r.q, r.sx, t, n);
#pragma omp barrier
  int64_t col = 0;                                                        // q, k, v = h W^T
  for (const LinearArgs* L : {&w.q, &w.k, &w.v}) {
    const auto [c0, c1] = column_share(L->N, t, n);
    layer_columns(Act{r.h, C, r.q, r.sx}, B, *L, r.qkv + col, 3 * C, c0, c1);
    col += L->N;
  }
#pragma omp barrier
  for (int64_t bh = t; bh < B * w.H; bh += n) {                           // cache the new k, v; attend
    const int64_t b = bh / w.H, hd = bh % w.H;
    const float* q = r.qkv + b * 3 * C + hd * D;
    float* kh = r.k_cache + bh * w.Tmax * D;                              // this head's cache rows
    float* vh = r.v_cache + bh * w.Tmax * D;
    std::copy(q + C, q + C + D, kh + P * D);
    std::copy(q + 2 * C, q + 2 * C + D, vh + P * D);
    attention_last_row_f32(q, kh, vh, n_keys, D, scale, r.att + b * C + hd * D, r.scratch + t * (n_keys + 2 * D));
  }
#pragma omp barrier
  if (q8) {                                                               // (a row's heads came from several threads)
    quantize_my_rows(r.att, B, C, r.q, r.sx, t, n);
#pragma omp barrier
  }
  linear_plus_residual(Act{r.att, C, r.q, r.sx}, B, w.out, r.x, r.x1, t, n);   // x1 = att W_out^T + x
#pragma omp barrier
  for (int64_t b = t; b < B; b += n) layer_norm_row_f32(r.x1 + b * C, w.ln2_w, w.ln2_b, r.h + b * C, C, eps);
  quantize_my_rows(r.h, B, C, r.q, r.sx, t, n);
#pragma omp barrier
  const auto [c0, c1] = column_share(F, t, n);                            // f = gelu(h W_fc^T)
  layer_columns(Act{r.h, C, r.q, r.sx}, B, w.fc, r.f, F, c0, c1);
  for (int64_t b = 0; b < B; ++b) gelu_span_f32(r.f + b * F + c0, r.f + b * F + c0, c1 - c0);
#pragma omp barrier
  if (q8) {
    quantize_my_rows(r.f, B, F, r.q, r.sx, t, n);
#pragma omp barrier
  }
  linear_plus_residual(Act{r.f, F, r.q, r.sx}, B, w.proj, r.x1, r.y, t, n);   // y = f W_proj^T + x1
}

// With int8 activations: the quantized rows' buffer (B rows of the widest input, padded) and their scales.
std::pair<at::Tensor, at::Tensor> int8_rows(bool on, const at::Tensor& x, int64_t B, int64_t widest) {
  if (!on) return {};
  return {at::empty({B * w8a8_padded_k(widest)}, x.options().dtype(at::kChar)), at::empty({B}, x.options())};
}

void check_int8_activations(bool on, const Block& w) {
  const char* names[] = {"q", "k", "v", "out", "fc", "proj"};
  const LinearArgs* layers[] = {&w.q, &w.k, &w.v, &w.out, &w.fc, &w.proj};
  for (int i = 0; i < 6; ++i) check_int8_activations(on, *layers[i], names[i]);
}

at::Tensor decode_block_cpu(const at::Tensor& x, at::TensorList norms, at::TensorList weights,
                            const c10::List<std::optional<at::Tensor>>& scales,
                            const c10::List<std::optional<at::Tensor>>& biases, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, int64_t start_pos, double eps, bool int8_activations) {
  const Block w = block_args(x, norms, weights, scales, biases, k_cache, v_cache, start_pos);
  check_int8_activations(int8_activations, w);
  const auto [q8, sx] = int8_rows(int8_activations, x, w.B, std::max(w.C, w.F));
  const int64_t B = w.B, C = w.C;
  const auto opts = x.options();
  at::Tensor y = at::empty({B, 1, C}, opts);
  at::Tensor work = at::empty({B * (C + 3 * C + C + C + w.F)}, opts);   // h, qkv, att, x1, f
  const int nt = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  at::Tensor scratch = at::empty({nt, start_pos + 1 + 2 * w.D}, opts);
  maybe_poison(y), maybe_poison(work);
  float* h = work.data_ptr<float>();
  const Rows r{x.data_ptr<float>(), h, h + B * C, h + B * 4 * C, h + B * 5 * C, h + B * 6 * C, y.data_ptr<float>(),
               k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), scratch.data_ptr<float>(),
               int8_activations ? q8.data_ptr<int8_t>() : nullptr, int8_activations ? sx.data_ptr<float>() : nullptr};
#pragma omp parallel num_threads(nt)
  run_block(w, r, start_pos, eps, omp_get_thread_num(), omp_get_num_threads());
  return y;
}

// The whole model's step: each block as decode_block runs it (its output the next block's input, two row buffers
// taking turns), a barrier between blocks, then the final LayerNorm's rows and the LM head's columns.
at::Tensor decode_blocks_cpu(const at::Tensor& x, at::TensorList norms, at::TensorList weights,
                             const c10::List<std::optional<at::Tensor>>& scales,
                             const c10::List<std::optional<at::Tensor>>& biases, at::TensorList k_caches,
                             at::TensorList v_caches, int64_t start_pos, double eps, at::TensorList final_norm,
                             const at::Tensor& head_weight, const std::optional<at::Tensor>& head_scales,
                             const std::optional<at::Tensor>& head_bias, bool int8_activations) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(L >= 1 && v_caches.size() == k_caches.size(), "k_caches and v_caches: one cache a block, at least one "
              "block, got ", k_caches.size(), " and ", v_caches.size());
  std::vector<Block> blocks;
  for (int64_t l = 0; l < L; ++l)
    blocks.push_back(block_args(x, norms, weights, scales, biases, k_caches[l], v_caches[l], start_pos, l, L));
  const int64_t B = blocks[0].B, C = blocks[0].C;
  int64_t F = 0, D = 0;
  for (const Block& b : blocks) F = std::max(F, b.F), D = std::max(D, b.D);
  TORCH_CHECK(final_norm.size() == 2, "final_norm: [weight, bias], got ", final_norm.size());
  for (const at::Tensor& t : final_norm)
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == C && t.is_contiguous(),
                "final_norm must be contiguous float32 (", C, ",) tensors");
  const LinearArgs head = fused_layer("head", head_weight, head_scales, head_bias, -1, C);
  for (const Block& b : blocks) check_int8_activations(int8_activations, b);
  check_int8_activations(int8_activations, head, "head");
  const auto [q8, sx] = int8_rows(int8_activations, x, B, std::max(C, F));
  int8_t* pq = int8_activations ? q8.data_ptr<int8_t>() : nullptr;
  float* psx = int8_activations ? sx.data_ptr<float>() : nullptr;
  const auto opts = x.options();
  at::Tensor logits = at::empty({B, 1, head.N}, opts);
  at::Tensor work = at::empty({B * (C + 3 * C + C + C + F + 2 * C)}, opts);   // h, qkv, att, x1, f; two x rows
  const int nt = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  at::Tensor scratch = at::empty({nt, start_pos + 1 + 2 * D}, opts);
  maybe_poison(logits), maybe_poison(work);
  float* h = work.data_ptr<float>();
  float* rows[2] = {h + B * (6 * C + F), h + B * (7 * C + F)};
  const float *fw = final_norm[0].data_ptr<float>(), *fb = final_norm[1].data_ptr<float>();
#pragma omp parallel num_threads(nt)
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    for (int64_t l = 0; l < L; ++l) {
      const Rows r{l == 0 ? x.data_ptr<float>() : rows[(l - 1) % 2], h, h + B * C, h + B * 4 * C, h + B * 5 * C,
                   h + B * 6 * C, rows[l % 2], k_caches[l].data_ptr<float>(), v_caches[l].data_ptr<float>(),
                   scratch.data_ptr<float>(), pq, psx};
      run_block(blocks[l], r, start_pos, eps, t, n);
#pragma omp barrier
    }
    for (int64_t b = t; b < B; b += n) layer_norm_row_f32(rows[(L - 1) % 2] + b * C, fw, fb, h + b * C, C, eps);
    quantize_my_rows(h, B, C, pq, psx, t, n);
#pragma omp barrier
    const auto [c0, c1] = column_share(head.N, t, n);
    layer_columns(Act{h, C, pq, psx}, B, head, logits.data_ptr<float>(), head.N, c0, c1);
  }
  return logits;
}

}  // namespace

static void decode_block_kernels(torch::Library& m) {
  m.impl("decode_block", &decode_block_cpu);
  m.impl("decode_blocks", &decode_blocks_cpu);
}
GPTFAST_CPU_KERNELS(decode_block_kernels);

}  // namespace gptfast
