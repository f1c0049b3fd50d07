// One Llama/Qwen3 block's decoding step on CPU, in one call: a new position per sequence (x: B x 1 x C)
// through RMSNorm -> Q/K/V -> (Qwen3: per-head RMSNorm of q and k) -> RoPE -> the KV cache -> grouped-query
// attention -> output projection + residual -> RMSNorm -> gate, up -> SwiGLU -> down projection + residual.
//
// Why: as for GPT-2's block (decode_block.cpp), a Llama block op by op is ~14 op calls (Qwen3-0.6B: 28 blocks,
// ~400 calls a token), each paying Python, the dispatcher, an allocation and a wake-up of the threads. Here a
// block is one call whose threads meet at barriers between the steps.
//
// Every step runs the standalone op's own loop (decode_parts.h) on a thread's share: the columns of each linear
// layer, the rows of the RMSNorms, the heads of the q/k norm + rotation and of the attention. Each element is
// computed by the same instructions in the same order as by the ops one by one, so the output and the cache
// rows written are bit-for-bit the unfused extension path's (tested). Grouped-query attention reads each K/V
// head where it lies in the cache (n_heads / n_kv_heads query heads share it): no repeated copy.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../common.h"
#include "decode_parts.h"
#include "kernels.h"

#ifndef GPTFAST_ISA_MODULE   // the schemas once, in gptfast._C (the AVX-512 module adds kernels only)
TORCH_LIBRARY_FRAGMENT(gptfast, m) {
  // One Llama/Qwen3 block's decoding step: x (B, 1, C), one new position per sequence at start_pos, through
  // y = x1 + down(swiglu(gate(h2), up(h2))), h2 = rms(x1), x1 = x + out(attention(rope(q), rope(k), v)),
  // q, k, v = projections of rms(x) (Qwen3: q and k RMS-normalized per head before the rotation), writing the new
  // keys and values into k_cache/v_cache (B, n_kv_heads, context, head_dim) at start_pos and attending over
  // positions 0..start_pos. norms: [norm1, norm2] (C,) or [norm1, norm2, q_norm, k_norm] (the last two (head_dim,));
  // the seven linear layers in the order q, k, v, out, gate, up, down: weights (N, K) float32, bfloat16 or int8,
  // scales (N,) for int8, biases (N,) or None; cos, sin (1, head_dim / 2) float32: the position's angles.
  // int8_activations: every layer int8, each layer's input rows quantized to int8 and multiplied by integer dot
  // products, as linear_w8a8 does (quantize(model, "w8a8")).
  m.def("decode_block_llama(Tensor x, Tensor[] norms, Tensor[] weights, Tensor?[] scales, Tensor?[] biases, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cos, Tensor sin, SymInt start_pos, float eps, bool int8_activations=False) -> Tensor");
  // The whole model's step: the L blocks one after the other (norms 2 L or 4 L, weights/scales/biases 7 L, a cache
  // pair a block), then the final RMSNorm (final_norm (C,)) and the LM head (head_weight (V, C) with its scales and
  // bias): logits (B, 1, V). One parallel region for the token; the threads meet at barriers.
  m.def("decode_blocks_llama(Tensor x, Tensor[] norms, Tensor[] weights, Tensor?[] scales, Tensor?[] biases, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor cos, Tensor sin, SymInt start_pos, float eps, Tensor final_norm, Tensor head_weight, Tensor? head_scales, Tensor? head_bias, bool int8_activations=False) -> Tensor");
}
#endif

namespace gptfast {
namespace {

constexpr int64_t kMaxRows = 16;   // sequences per call: the linear kernel's few-rows range (linear.cpp)

using Layer = FusedLinear;   // decode_parts.h: a layer of any storage type, checked by fused_layer

const char* const kLayerNames[] = {"q", "k", "v", "out", "gate", "up", "down", "head"};

Layer layer_args(int i, const at::Tensor& w, const std::optional<at::Tensor>& scales,
                 const std::optional<at::Tensor>& bias, int64_t N, int64_t K) {
  return fused_layer(kLayerNames[i], w, scales, bias, N, K);
}

// The block as the threads read it (checked: block_args). Hq query heads, Hkv K/V heads, D = head_dim.
struct Block {
  Layer q, k, v, out, gate, up, down;
  const float *norm1, *norm2, *q_norm, *k_norm, *cos, *sin;   // q_norm, k_norm null without Qwen3's q/k norm
  int64_t B, C, F, Hq, Hkv, Tmax, D;
};

Block block_args(const at::Tensor& x, at::TensorList norms, at::TensorList weights,
                 const c10::List<std::optional<at::Tensor>>& scales, const c10::List<std::optional<at::Tensor>>& biases,
                 const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cos, const at::Tensor& sin,
                 int64_t start_pos, int64_t block = 0, int64_t n_layers = 1) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(1) == 1 && x.is_contiguous() &&
                  x.size(0) >= 1 && x.size(0) <= kMaxRows && x.device().is_cpu(),
              "x must be a contiguous float32 (B, 1, C) CPU tensor with 1 <= B <= ", kMaxRows, ", got ",
              x.scalar_type(), " ", x.sizes());
  const int64_t B = x.size(0), C = x.size(2);
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 && t->is_contiguous() && t->size(0) == B &&
                    t->sizes() == k_cache.sizes() && t->device().is_cpu() && t->size(3) % 2 == 0,
                "k_cache and v_cache must be contiguous float32 (", B, ", n_kv_heads, context, head_dim) CPU tensors "
                "of one shape with an even head_dim, got ", t->sizes());
  const int64_t Hkv = k_cache.size(1), Tmax = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(start_pos >= 0 && start_pos < Tmax, "start_pos must be in [0, ", Tmax, "), got ", start_pos);
  TORCH_CHECK(int64_t(norms.size()) == 2 * n_layers || int64_t(norms.size()) == 4 * n_layers,
              "norms: [norm1, norm2] or [norm1, norm2, q_norm, k_norm] a block, got ", norms.size(), " for ", n_layers);
  const int64_t per = int64_t(norms.size()) / n_layers;
  norms = norms.slice(per * block, per);
  for (size_t i = 0; i < norms.size(); ++i)
    TORCH_CHECK(norms[i].scalar_type() == at::kFloat && norms[i].dim() == 1 && norms[i].size(0) == (i < 2 ? C : D) &&
                    norms[i].is_contiguous() && norms[i].device().is_cpu(),
                "norms must be contiguous float32 CPU tensors: norm1, norm2 (", C, ",), q_norm, k_norm (", D, ",)");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == D / 2 && t->is_contiguous() && t->device().is_cpu(),
                "cos and sin must be contiguous float32 tensors of head_dim / 2 = ", D / 2, " values, got ", t->sizes());
  TORCH_CHECK(int64_t(weights.size()) == 7 * n_layers && int64_t(scales.size()) == 7 * n_layers &&
                  int64_t(biases.size()) == 7 * n_layers,
              "weights, scales, biases: seven layers each (q, k, v, out, gate, up, down) a block");
  auto layer = [&](int i, int64_t N, int64_t K) {
    const int64_t j = 7 * block + i;
    return layer_args(i, weights[j], scales.get(j), biases.get(j), N, K);
  };
  const Layer q = layer(0, -1, C);
  TORCH_CHECK(q.N % D == 0 && (q.N / D) % Hkv == 0, "q weight must have n_heads * head_dim rows with n_heads a "
              "multiple of the cache's n_kv_heads = ", Hkv, ", got ", q.N, " rows for head_dim ", D);
  const Layer gate = layer(4, -1, C);
  const bool qk = norms.size() == 4;
  return {q, layer(1, Hkv * D, C), layer(2, Hkv * D, C), layer(3, C, q.N), gate, layer(5, gate.N, C),
          layer(6, C, gate.N), norms[0].data_ptr<float>(), norms[1].data_ptr<float>(),
          qk ? norms[2].data_ptr<float>() : nullptr, qk ? norms[3].data_ptr<float>() : nullptr,
          cos.data_ptr<float>(), sin.data_ptr<float>(), B, C, gate.N, q.N / D, Hkv, Tmax, D};
}

// Thread t's share [begin, end) of N output columns, in whole blocks of kDecodeColumnBlock.
std::pair<int64_t, int64_t> column_share(int64_t N, int64_t t, int64_t nt) {
  const int64_t blocks = (N + kDecodeColumnBlock - 1) / kDecodeColumnBlock;
  return {std::min(N, blocks * t / nt * kDecodeColumnBlock), std::min(N, blocks * (t + 1) / nt * kDecodeColumnBlock)};
}

// Columns [c0, c1) of y (row stride ldy) = the B rows a (row stride lda) times L's weights; with int8 activations
// (q non-null) the rows' quantized copy q, sx is what is multiplied (the linear_w8a8 kernel).
void columns(const float* a, int64_t lda, int64_t B, const Layer& L, float* y, int64_t ldy, int64_t c0, int64_t c1,
             const int8_t* q = nullptr, const float* sx = nullptr) {
  fused_columns(L, a, lda, q, sx, B, y, ldy, c0, c1);
}

// With int8 activations, this thread's rows of a (B x K) quantized into q, sx (the rows the next layer reads).
void quantize_my_rows(const float* a, int64_t B, int64_t K, int8_t* q, float* sx, int64_t t, int64_t nt) {
  if (q == nullptr) return;
  for (int64_t b = t; b < B; b += nt) w8a8_quantize_rows(a + b * K, K, 1, K, q + b * w8a8_padded_k(K), sx + b);
}

// Where the threads keep the step's rows: x, the RMSNorms' output h, q | k | v side by side (W = (Hq + 2 Hkv) D a
// row), the heads' outputs, x1 = x + attention, gate and up (F each), y; the caches; each thread's attention scratch.
struct Rows {
  const float* x;
  float *h, *qkv, *att, *x1, *g, *u, *y, *k_cache, *v_cache, *scratch;
  int8_t* q;   // with int8 activations: the quantized rows the next layer reads (else null)
  float* sx;   // and their scales
};

// This thread's q and k heads (of B x (Hq + Hkv)): Qwen3's per-head RMSNorm, the rotation in place; a k head then goes
// into the cache at position P, with its v.
void rotate_and_cache(const Block& w, const Rows& r, int64_t P, double eps, int64_t t, int64_t n) {
  const int64_t B = w.B, D = w.D, Hq = w.Hq, Hkv = w.Hkv, W = (Hq + 2 * Hkv) * D;
  for (int64_t i = t; i < B * (Hq + Hkv); i += n) {
    const int64_t b = i / (Hq + Hkv), hd = i % (Hq + Hkv);
    float* row = r.qkv + b * W + hd * D;                                  // q heads, then k heads: contiguous
    const float* norm = hd < Hq ? w.q_norm : w.k_norm;
    if (norm != nullptr) rms_norm_row_f32(row, norm, row, D, eps);
    if (hd < Hq) {
      rope_row_f32(row, row, w.cos, w.sin, D / 2);
      continue;
    }
    const int64_t slot = ((b * Hkv + hd - Hq) * w.Tmax + P) * D;          // cache row (b, kv head, P)
    rope_row_f32(row, r.k_cache + slot, w.cos, w.sin, D / 2);
    std::copy(row + Hkv * D, row + Hkv * D + D, r.v_cache + slot);        // v sits Hkv heads after k
  }
}

// One thread's part (thread t of n) of the step: each stage the standalone op's loop on the thread's share,
// a barrier between stages.
void run_block(const Block& w, const Rows& r, int64_t P, double eps, int64_t t, int64_t n) {
  const int64_t B = w.B, C = w.C, F = w.F, D = w.D, Hq = w.Hq, Hkv = w.Hkv, Cq = Hq * D, W = (Hq + 2 * Hkv) * D;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));   // 1/sqrt(D), as the attention op
  for (int64_t b = t; b < B; b += n) rms_norm_row_f32(r.x + b * C, w.norm1, r.h + b * C, C, eps);
  quantize_my_rows(r.h, B, C, r.q, r.sx, t, n);
#pragma omp barrier
  int64_t col = 0;                                                        // q, k, v = h W^T
  for (const Layer* L : {&w.q, &w.k, &w.v}) {
    const auto [c0, c1] = column_share(L->N, t, n);
    columns(r.h, C, B, *L, r.qkv + col, W, c0, c1, r.q, r.sx);
    col += L->N;
  }
#pragma omp barrier
  rotate_and_cache(w, r, P, eps, t, n);
#pragma omp barrier
  const int64_t group = Hq / Hkv;
  for (int64_t bh = t; bh < B * Hq; bh += n) {                            // attend: query head h reads K/V head h / group
    const int64_t b = bh / Hq, hd = bh % Hq;
    const int64_t kv = (b * Hkv + hd / group) * w.Tmax * D;
    attention_last_row_f32(r.qkv + b * W + hd * D, r.k_cache + kv, r.v_cache + kv, P + 1, D, scale,
                           r.att + b * Cq + hd * D, r.scratch + t * (P + 1 + 2 * D));
  }
#pragma omp barrier
  if (r.q != nullptr) {                                                   // (a row's heads came from several threads)
    quantize_my_rows(r.att, B, Cq, r.q, r.sx, t, n);
#pragma omp barrier
  }
  {                                                                       // x1 = att W_out^T + x
    const auto [c0, c1] = column_share(C, t, n);
    columns(r.att, Cq, B, w.out, r.x1, C, c0, c1, r.q, r.sx);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = c0; c < c1; ++c) r.x1[b * C + c] += r.x[b * C + c];
  }
#pragma omp barrier
  for (int64_t b = t; b < B; b += n) rms_norm_row_f32(r.x1 + b * C, w.norm2, r.h + b * C, C, eps);
  quantize_my_rows(r.h, B, C, r.q, r.sx, t, n);
#pragma omp barrier
  {                                                                       // g = swiglu(h W_gate^T, h W_up^T)
    const auto [c0, c1] = column_share(F, t, n);
    columns(r.h, C, B, w.gate, r.g, F, c0, c1, r.q, r.sx);
    columns(r.h, C, B, w.up, r.u, F, c0, c1, r.q, r.sx);
    for (int64_t b = 0; b < B; ++b) swiglu_span_f32(r.g + b * F + c0, r.u + b * F + c0, r.g + b * F + c0, c1 - c0);
  }
#pragma omp barrier
  if (r.q != nullptr) {
    quantize_my_rows(r.g, B, F, r.q, r.sx, t, n);
#pragma omp barrier
  }
  const auto [c0, c1] = column_share(C, t, n);                            // y = g W_down^T + x1
  columns(r.g, F, B, w.down, r.y, C, c0, c1, r.q, r.sx);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = c0; c < c1; ++c) r.y[b * C + c] += r.x1[b * C + c];
}

// With int8 activations: the quantized rows' buffer (B rows of the widest input, padded) and their scales.
std::pair<at::Tensor, at::Tensor> int8_rows(bool on, const at::Tensor& x, int64_t B, int64_t widest) {
  if (!on) return {};
  return {at::empty({B * w8a8_padded_k(widest)}, x.options().dtype(at::kChar)), at::empty({B}, x.options())};
}

void check_int8_activations(bool on, const Block& w) {
  const Layer* layers[] = {&w.q, &w.k, &w.v, &w.out, &w.gate, &w.up, &w.down};
  for (int i = 0; i < 7; ++i) check_int8_activations(on, *layers[i], kLayerNames[i]);
}

at::Tensor decode_block_llama_cpu(const at::Tensor& x, at::TensorList norms, at::TensorList weights,
                                  const c10::List<std::optional<at::Tensor>>& scales,
                                  const c10::List<std::optional<at::Tensor>>& biases, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& cos, const at::Tensor& sin,
                                  int64_t start_pos, double eps, bool int8_activations) {
  const Block w = block_args(x, norms, weights, scales, biases, k_cache, v_cache, cos, sin, start_pos);
  check_int8_activations(int8_activations, w);
  const auto [q8, sx] = int8_rows(int8_activations, x, w.B, std::max({w.C, w.F, w.Hq * w.D}));
  const int64_t B = w.B, C = w.C, W = (w.Hq + 2 * w.Hkv) * w.D, Cq = w.Hq * w.D;
  const auto opts = x.options();
  at::Tensor y = at::empty({B, 1, C}, opts);
  at::Tensor work = at::empty({B * (C + W + Cq + C + 2 * w.F)}, opts);   // h, qkv, att, x1, gate, up
  const int nt = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  at::Tensor scratch = at::empty({nt, start_pos + 1 + 2 * w.D}, opts);
  maybe_poison(y), maybe_poison(work);
  float* h = work.data_ptr<float>();
  float* qkv = h + B * C;
  float* att = qkv + B * W;
  float* x1 = att + B * Cq;
  float* g = x1 + B * C;
  const Rows r{x.data_ptr<float>(), h, qkv, att, x1, g, g + B * w.F, y.data_ptr<float>(), k_cache.data_ptr<float>(),
               v_cache.data_ptr<float>(), scratch.data_ptr<float>(),
               int8_activations ? q8.data_ptr<int8_t>() : nullptr, int8_activations ? sx.data_ptr<float>() : nullptr};
#pragma omp parallel num_threads(nt)
  run_block(w, r, start_pos, eps, omp_get_thread_num(), omp_get_num_threads());
  return y;
}

// The whole model's step: each block as decode_block_llama runs it (its output the next block's input, two row
// buffers taking turns), a barrier between blocks, then the final RMSNorm's rows and the LM head's columns.
at::Tensor decode_blocks_llama_cpu(const at::Tensor& x, at::TensorList norms, at::TensorList weights,
                                   const c10::List<std::optional<at::Tensor>>& scales,
                                   const c10::List<std::optional<at::Tensor>>& biases, at::TensorList k_caches,
                                   at::TensorList v_caches, const at::Tensor& cos, const at::Tensor& sin,
                                   int64_t start_pos, double eps, const at::Tensor& final_norm,
                                   const at::Tensor& head_weight, const std::optional<at::Tensor>& head_scales,
                                   const std::optional<at::Tensor>& head_bias, bool int8_activations) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(L >= 1 && v_caches.size() == k_caches.size(), "k_caches and v_caches: one cache a block, at least one "
              "block, got ", k_caches.size(), " and ", v_caches.size());
  std::vector<Block> blocks;
  for (int64_t l = 0; l < L; ++l)
    blocks.push_back(block_args(x, norms, weights, scales, biases, k_caches[l], v_caches[l], cos, sin, start_pos, l, L));
  const Block& b0 = blocks[0];
  const int64_t B = b0.B, C = b0.C, W = (b0.Hq + 2 * b0.Hkv) * b0.D, Cq = b0.Hq * b0.D, F = b0.F, D = b0.D;
  for (const Block& b : blocks)
    TORCH_CHECK(b.F == F && b.Hq == b0.Hq && b.Hkv == b0.Hkv && b.D == D, "every block must have the first's shapes");
  TORCH_CHECK(final_norm.scalar_type() == at::kFloat && final_norm.dim() == 1 && final_norm.size(0) == C &&
                  final_norm.is_contiguous(), "final_norm must be a contiguous float32 (", C, ",) tensor");
  const Layer head = layer_args(7, head_weight, head_scales, head_bias, -1, C);
  for (const Block& b : blocks) check_int8_activations(int8_activations, b);
  check_int8_activations(int8_activations, head, "head");
  const auto [q8, sx] = int8_rows(int8_activations, x, B, std::max({C, F, Cq}));
  int8_t* pq = int8_activations ? q8.data_ptr<int8_t>() : nullptr;
  float* psx = int8_activations ? sx.data_ptr<float>() : nullptr;
  const auto opts = x.options();
  at::Tensor logits = at::empty({B, 1, head.N}, opts);
  at::Tensor work = at::empty({B * (C + W + Cq + C + 2 * F + 2 * C)}, opts);   // h, qkv, att, x1, gate, up; 2 x rows
  const int nt = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  at::Tensor scratch = at::empty({nt, start_pos + 1 + 2 * D}, opts);
  maybe_poison(logits), maybe_poison(work);
  float* h = work.data_ptr<float>();
  float* qkv = h + B * C;
  float* att = qkv + B * W;
  float* x1 = att + B * Cq;
  float* g = x1 + B * C;
  float* rows[2] = {g + 2 * B * F, g + 2 * B * F + B * C};
#pragma omp parallel num_threads(nt)
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    for (int64_t l = 0; l < L; ++l) {
      const Rows r{l == 0 ? x.data_ptr<float>() : rows[(l - 1) % 2], h, qkv, att, x1, g, g + B * F, rows[l % 2],
                   k_caches[l].data_ptr<float>(), v_caches[l].data_ptr<float>(), scratch.data_ptr<float>(), pq, psx};
      run_block(blocks[l], r, start_pos, eps, t, n);
#pragma omp barrier
    }
    for (int64_t b = t; b < B; b += n) rms_norm_row_f32(rows[(L - 1) % 2] + b * C, final_norm.data_ptr<float>(),
                                                        h + b * C, C, eps);
    quantize_my_rows(h, B, C, pq, psx, t, n);
#pragma omp barrier
    const auto [c0, c1] = column_share(head.N, t, n);
    columns(h, C, B, head, logits.data_ptr<float>(), head.N, c0, c1, pq, psx);
  }
  return logits;
}

}  // namespace

static void decode_block_llama_kernels(torch::Library& m) {
  m.impl("decode_block_llama", &decode_block_llama_cpu);
  m.impl("decode_blocks_llama", &decode_blocks_llama_cpu);
}
GPTFAST_CPU_KERNELS(decode_block_llama_kernels);

}  // namespace gptfast
