// The linear layer for decoding on CPU: y (M, N) = x (M, K) @ W^T [* scales] [+ bias] for a few rows
// of x (M <= kSkinnyRows: one token per sequence, or a short prompt), with W in the nn.Linear layout
// (N, K) stored as float32, bfloat16 or int8 (weight-only quantization, one scale per output row).
//
// At M = 1 a linear layer is a matrix-vector product: every weight is used once, so its speed is the
// speed at which W streams from memory (GPT-2's 124M weights: 496 MB a token in float32, 124 MB in
// int8). The kernel therefore reads each weight exactly once, in its storage type, and widens it to
// float32 in registers (int8: sign-extend + convert; bfloat16: a 16-bit shift) right before the FMA;
// activations and accumulators are float32. The threads split the output rows (each weight row is
// read by one thread); a tile of kNB weight rows (8 for a single row of x) is multiplied with kMB rows
// of x at a time, the tile staying in L1 while the next rows of x pass over it, so W is read once
// whatever M is. A tile is NB consecutive rows, one contiguous block of memory, and while it is
// being multiplied the next tile is prefetched line by line into L2, at the pace the tile is consumed
// (NB lines a step): GPT-2's int8 rows are only 12 lines long, too short for the hardware's stream
// prefetcher to ramp up on each (measured on the 2-core EPYC, LM head 50257x768 int8, 1 row:
// 9-10 GB/s without software prefetch, 15-18 with 8 lines ahead in each row, 21-24 with the next
// tile; the same machine reads ~25 GB/s).
//
// Math order (the same for every M, every thread count and every tile choice): y[m, n] is the
// lane-wise float32 FMA accumulation of w[n, k] * x[m, k] over k in vector-width chunks (8 lanes
// AVX2, 16 AVX-512), the lanes summed pairwise, the k tail added in order, then * scales[n], + bias[n].
// So a row of x gets bit-for-bit the same output alone (M = 1) or in a batch - batched and single
// decoding pick the same tokens - but AVX2 and AVX-512 builds differ from each other (and from
// PyTorch's GEMM) in the last bits.
//
// Larger M is a matrix product (compute-bound, weights reused M times): it goes to at::mm on
// float32 weights (dequantized first for int8/bfloat16: once per call, cheap next to the product).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>

#include "../common.h"
#include "decode_parts.h"
#include "kernels.h"
#include "vec_io.h"

#ifndef GPTFAST_ISA_MODULE   // the schemas once, in gptfast._C (the AVX-512 module adds kernels only)
TORCH_LIBRARY_FRAGMENT(gptfast, m) {
  // A linear layer for inference (no backward: the weights are frozen): y (..., N) = x (..., K) @ weight^T,
  // times scales (N,) if given, plus bias (N,) if given. weight (N, K) is float32, bfloat16 or int8
  // (weight-only quantization; int8 needs the per-row scales); x, scales, bias and y are float32 on CPU.
  // Built for decoding, where x has a few rows and the weights are read once (csrc/cpu/linear.cpp).
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor? scales, Tensor? bias) -> Tensor");
}
#endif

namespace gptfast {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();            // float lanes: 8 (AVX2), 16 (AVX-512)
constexpr int64_t kSkinnyRows = 16;            // rows of x up to which the kernel runs (more: at::mm)
constexpr int kNB1 = 8;                        // weight rows per tile with one row of x: 8 independent FMA chains
constexpr int kMB = 4;                         // rows of x per pass with several
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kNB = 4;                         // weight rows per tile then: kNB * kMB accumulators of 32 zmm
constexpr int kMB8 = 8;                        // 8+ rows of x (a batch of 8 sequences): passes of 8 rows over
constexpr int kNB8 = 2;                        // 2 weight rows - 16 accumulators + 8 rows of x, each weight vector
                                               // widened once for 8 rows instead of once a pass of 4
#else
constexpr int kNB = 3;                         // of 16 ymm: 12 accumulators + 4 rows of x, the weights read
                                               // as FMA memory operands (4x2 tiles: 24 GMAC/s a core in
                                               // cache, 3x4: 39; the 2-core EPYC, 2026-12-03)
#endif
constexpr int64_t kRowBlock = 24;              // rows a thread takes at a time: a multiple of kNB1 and kNB
constexpr int64_t kMinBytesPerThread = 64 * 1024;   // below this a thread is not worth waking
static_assert(kDecodeColumnBlock % kRowBlock == 0, "the fused block's column spans must be whole row blocks");

// kV weights at p, widened to float32 lanes
template <typename W>
inline Vec load_w(const W* p);

template <>
inline Vec load_w<float>(const float* p) { return Vec::loadu(p); }

template <>
inline Vec load_w<int8_t>(const int8_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  float tmp[kV];
  for (int64_t i = 0; i < kV; ++i) tmp[i] = static_cast<float>(p[i]);
  return Vec::loadu(tmp);
#endif
}

template <>
inline Vec load_w<c10::BFloat16>(const c10::BFloat16* p) {
  // a bfloat16 is the top half of a float32: zero-extend to 32 bits and shift left by 16
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
#else
  float tmp[kV];
  for (int64_t i = 0; i < kV; ++i) tmp[i] = static_cast<float>(p[i]);
  return Vec::loadu(tmp);
#endif
}

inline void prefetch_l2(const char* p) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_prefetch(p, _MM_HINT_T1);
#else
  (void)p;
#endif
}

// Fully unrolled loops over the tile: GCC then keeps acc[NB][MB] in registers (left as a loop it
// keeps the array on the stack, and every FMA waits on a store and a reload: ~4x slower).
#define GPTFAST_UNROLL _Pragma("GCC unroll 16")

struct Epilogue {
  const float* scales;   // (N,) or null
  const float* bias;     // (N,) or null
};

// y[m, n0 + i] for i < NB, m < MB: the dot products of NB weight rows (from w, row length K) with MB
// rows of x (row stride ldx); y has row stride ldy. With `prefetch`, the NB rows after these are
// fetched into L2 meanwhile (harmless past the end of the weights: a prefetch never faults).
template <typename W, int NB, int MB>
void tile(const float* x, int64_t ldx, const W* w, int64_t K, int64_t n0, float* y, int64_t ldy,
          const Epilogue& ep, bool prefetch) {
  constexpr int64_t kLine = 64 / sizeof(W);       // weights per 64-byte line
  constexpr int64_t kChunks = kLine >= kV ? kLine / kV : 1;
  constexpr int64_t kStep = kChunks * kV;         // one line of each row per step
  const char* next = reinterpret_cast<const char*>(w + NB * K);
  Vec acc[NB][MB];
  GPTFAST_UNROLL
  for (int i = 0; i < NB; ++i)
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) acc[i][m] = Vec(0.f);
  int64_t k = 0;
  for (; k + kStep <= K; k += kStep, next += NB * 64) {
    if (prefetch) {
      GPTFAST_UNROLL
      for (int i = 0; i < NB; ++i) prefetch_l2(next + i * 64);
    }
    GPTFAST_UNROLL
    for (int64_t c = 0; c < kChunks; ++c) {
      Vec xv[MB];
      GPTFAST_UNROLL
      for (int m = 0; m < MB; ++m) xv[m] = Vec::loadu(x + m * ldx + k + c * kV);
      GPTFAST_UNROLL
      for (int i = 0; i < NB; ++i) {
        const Vec wv = load_w(w + i * K + k + c * kV);
        GPTFAST_UNROLL
        for (int m = 0; m < MB; ++m) acc[i][m] = at::vec::fmadd(wv, xv[m], acc[i][m]);
      }
    }
  }
  for (; k + kV <= K; k += kV) {                  // whole vectors left over after the last line
    Vec xv[MB];
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) xv[m] = Vec::loadu(x + m * ldx + k);
    GPTFAST_UNROLL
    for (int i = 0; i < NB; ++i) {
      const Vec wv = load_w(w + i * K + k);
      GPTFAST_UNROLL
      for (int m = 0; m < MB; ++m) acc[i][m] = at::vec::fmadd(wv, xv[m], acc[i][m]);
    }
  }
  GPTFAST_UNROLL
  for (int i = 0; i < NB; ++i) {
    const int64_t n = n0 + i;
    const W* wr = w + i * K;
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) {
      float s = sum_lanes(acc[i][m]);
      // the tail, as explicit FMAs: left to the compiler, `s += w * x` is contracted in some
      // instantiations and not in others, and a row's bits would depend on the path it took
      for (int64_t kk = k; kk < K; ++kk) s = std::fma(static_cast<float>(wr[kk]), x[m * ldx + kk], s);
      if (ep.scales) s = rounded(s * ep.scales[n]);   // (then the bias: no FMA, in any tile shape)
      if (ep.bias) s += ep.bias[n];
      y[m * ldy + n] = s;
    }
  }
}

// Output columns [n_begin, n_end) for all M rows of x: each tile of kNB weight rows is multiplied with
// the rows of x in passes of kMB, every pass widening the tile's int8/bfloat16 weights again in registers
// (the tile is in L1 after the first). A version that widened each tile once into a float32 buffer for
// the passes to read was 1.3-1.5x slower at M = 8 and 16 (the 2-core EPYC, AVX2, 2026-12-03: the
// buffer's stores and reloads cost more than the conversions they save; benchmarks/NOTES.md).
template <typename W>
void rows_kernel(const float* x, int64_t ldx, int64_t M, const W* w, int64_t K, float* y, int64_t N,
                 int64_t n_begin, int64_t n_end, const Epilogue& ep) {
  int64_t n = n_begin;
  if (M == 1)
    for (; n + kNB1 <= n_end; n += kNB1) tile<W, kNB1, 1>(x, ldx, w + n * K, K, n, y, N, ep, true);
#if defined(CPU_CAPABILITY_AVX512)
  if (M >= kMB8)
    for (; n + kNB8 <= n_end; n += kNB8) {
      const W* wt = w + n * K;
      int64_t m = 0;
      for (; m + kMB8 <= M; m += kMB8) tile<W, kNB8, kMB8>(x + m * ldx, ldx, wt, K, n, y + m * N, N, ep, m == 0);
      for (; m + kMB <= M; m += kMB) tile<W, kNB8, kMB>(x + m * ldx, ldx, wt, K, n, y + m * N, N, ep, false);
      switch (M - m) {                            // the last 1-3 rows of x
        case 3: tile<W, kNB8, 3>(x + m * ldx, ldx, wt, K, n, y + m * N, N, ep, false); break;
        case 2: tile<W, kNB8, 2>(x + m * ldx, ldx, wt, K, n, y + m * N, N, ep, false); break;
        case 1: tile<W, kNB8, 1>(x + m * ldx, ldx, wt, K, n, y + m * N, N, ep, false); break;
        default: break;
      }
    }
#endif
  for (; n + kNB <= n_end; n += kNB) {
    const W* wt = w + n * K;
    int64_t m = 0;
    bool first = true;                            // prefetch on the first pass over the tile only
    for (; m + kMB <= M; m += kMB, first = false)
      tile<W, kNB, kMB>(x + m * ldx, ldx, wt, K, n, y + m * N, N, ep, first);
    switch (M - m) {                              // the last 1-3 rows of x in one pass
      case 3: tile<W, kNB, 3>(x + m * ldx, ldx, wt, K, n, y + m * N, N, ep, first); break;
      case 2: tile<W, kNB, 2>(x + m * ldx, ldx, wt, K, n, y + m * N, N, ep, first); break;
      case 1: tile<W, kNB, 1>(x + m * ldx, ldx, wt, K, n, y + m * N, N, ep, first); break;
      default: break;
    }
  }
  for (; n < n_end; ++n)                          // fewer than kNB rows left
    for (int64_t m = 0; m < M; ++m) tile<W, 1, 1>(x + m * ldx, ldx, w + n * K, K, n, y + m * N, N, ep, false);
}

void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.defined() && x.scalar_type() == at::kFloat, "x: the CPU linear kernel takes float32 activations, got ",
              x.defined() ? c10::toString(x.scalar_type()) : "an undefined tensor");
  TORCH_CHECK(x.dim() >= 1, "x must have shape (..., K), got a 0-dim tensor");
  const auto wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16 || wt == at::kChar,
              "weight must be float32, bfloat16 or int8, got ", wt);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(-1), "weight must have shape (N, K) with K = x's last dim (",
              x.size(-1), "), got ", weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), "weight is on ", weight.device(), " but x is on ", x.device());
  TORCH_CHECK(wt != at::kChar || scales.has_value(), "int8 weights need scales (one float32 per output row)");
  for (auto [t, name] : {std::pair{&scales, "scales"}, std::pair{&bias, "bias"}}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    TORCH_CHECK(v.scalar_type() == at::kFloat, name, " must be float32, got ", v.scalar_type());
    TORCH_CHECK(v.dim() == 1 && v.size(0) == weight.size(0), name, " must have shape (", weight.size(0),
                ",) - one per output row - got ", v.sizes());
    TORCH_CHECK(v.device() == x.device(), name, " is on ", v.device(), " but x is on ", x.device());
  }
}

template <typename W>
void run_rows(const at::Tensor& x2, const at::Tensor& w, at::Tensor& y, const Epilogue& ep) {
  const int64_t M = x2.size(0), K = x2.size(1), N = w.size(0);
  const float* px = x2.data_ptr<float>();
  const W* pw = static_cast<const W*>(w.const_data_ptr());
  float* py = y.data_ptr<float>();
  // threads split the output columns in blocks of kRowBlock, each at least kMinBytesPerThread of
  // weights (scaled by the rows of x, which multiply the work per byte)
  const int64_t block_bytes = kRowBlock * K * static_cast<int64_t>(sizeof(W)) * (1 + (M - 1) / kMB);
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / std::max<int64_t>(block_bytes, 1));
  at::parallel_for(0, (N + kRowBlock - 1) / kRowBlock, grain, [&](int64_t b0, int64_t b1) {
    rows_kernel<W>(px, x2.stride(0), M, pw, K, py, N, b0 * kRowBlock, std::min(N, b1 * kRowBlock), ep);
  });
}

at::Tensor linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight_in, const std::optional<at::Tensor>& scales_in,
                          const std::optional<at::Tensor>& bias_in) {
  check_linear_args(x, weight_in, scales_in, bias_in);
  const int64_t K = x.size(-1), N = weight_in.size(0);
  at::Tensor x2 = x.reshape({-1, K});
  if (K > 0 && x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t M = x2.size(0);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  const at::Tensor weight = weight_in.contiguous();
  const std::optional<at::Tensor> scales = scales_in ? std::optional(scales_in->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> bias = bias_in ? std::optional(bias_in->contiguous()) : std::nullopt;
  if (M > kSkinnyRows) {                          // a matrix product: the GEMM library's job
    at::Tensor y = at::mm(x2, (weight.scalar_type() == at::kFloat ? weight : weight.to(at::kFloat)).t());
    if (scales) y.mul_(*scales);
    if (bias) y.add_(*bias);
    return y.view(out_sizes);
  }
  at::Tensor y = at::empty({M, N}, x.options());
  maybe_poison(y);
  const Epilogue ep{scales ? scales->data_ptr<float>() : nullptr, bias ? bias->data_ptr<float>() : nullptr};
  if (M > 0 && N > 0) {
    switch (weight.scalar_type()) {
      case at::kFloat: run_rows<float>(x2, weight, y, ep); break;
      case at::kBFloat16: run_rows<c10::BFloat16>(x2, weight, y, ep); break;
      default: run_rows<int8_t>(x2, weight, y, ep); break;
    }
  }
  return y.view(out_sizes);
}

}  // namespace

void linear_columns(const float* x, int64_t ldx, int64_t M, const at::Tensor& w, const float* scales,
                    const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  const Epilogue ep{scales, bias};
  const int64_t K = w.size(1);
  switch (w.scalar_type()) {      // rows_kernel reads its `N` argument as y's row stride only
    case at::kFloat: rows_kernel<float>(x, ldx, M, w.const_data_ptr<float>(), K, y, ldy, n_begin, n_end, ep); break;
    case at::kBFloat16:
      rows_kernel<c10::BFloat16>(x, ldx, M, w.const_data_ptr<c10::BFloat16>(), K, y, ldy, n_begin, n_end, ep);
      break;
    default: rows_kernel<int8_t>(x, ldx, M, w.const_data_ptr<int8_t>(), K, y, ldy, n_begin, n_end, ep); break;
  }
}

FusedLinear fused_layer(const char* name, const at::Tensor& w, const std::optional<at::Tensor>& scales,
                        const std::optional<at::Tensor>& bias, int64_t N, int64_t K) {
  const auto wt = w.scalar_type();
  const bool four = wt == at::kByte;                       // 4-bit: (N, Kp / 2) with (N, groups) scales
  const int64_t width = four ? w8a8_padded_k(K) / 2 : K;
  TORCH_CHECK((wt == at::kFloat || wt == at::kBFloat16 || wt == at::kChar || four) && w.dim() == 2 &&
                  w.size(1) == width && (N < 0 || w.size(0) == N) && w.is_contiguous() && w.device().is_cpu(),
              name, " weight must be a contiguous float32, bfloat16 or int8 (", N < 0 ? std::string("N") : std::to_string(N),
              ", ", K, ") or 4-bit uint8 (N, ", w8a8_padded_k(K) / 2, ") CPU tensor, got ", wt, " ", w.sizes());
  TORCH_CHECK((wt != at::kChar && !four) || scales.has_value(), name, " weight is ", four ? "4-bit" : "int8",
              " and needs scales");
  const int64_t rows = w.size(0);
  int64_t groups = 0;
  if (four) {
    const at::Tensor& s = *scales;
    const int64_t Kp = w8a8_padded_k(K);
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(0) == rows && s.is_contiguous() &&
                    (s.size(1) == Kp / 32 || s.size(1) == Kp / 64),
                name, " scales must be a contiguous float32 (", rows, ", ", Kp / 32, " or ", Kp / 64, ") tensor");
    groups = s.size(1);
  }
  const float* ptr[2] = {nullptr, nullptr};
  for (int j = 0; j < 2; ++j) {
    const auto& t = j == 0 ? scales : bias;
    if (!t.has_value()) continue;
    if (j == 0 && four) {
      ptr[0] = t->data_ptr<float>();
      continue;
    }
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == rows && t->is_contiguous() &&
                    t->device().is_cpu(),
                name, j == 0 ? " scales" : " bias", " must be a contiguous float32 (", rows, ",) CPU tensor");
    ptr[j] = t->data_ptr<float>();
  }
  return {w, ptr[0], groups, ptr[1], rows};
}

void fused_columns(const FusedLinear& L, const float* x, int64_t ldx, const int8_t* q, const float* sx, int64_t M,
                   float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  if (q == nullptr)
    linear_columns(x, ldx, M, L.w, L.scales, L.bias, y, ldy, n_begin, n_end);
  else if (L.groups > 0)
    int4_columns(q, sx, M, L.w, L.scales, L.groups, L.bias, y, ldy, n_begin, n_end);
  else
    w8a8_columns(q, sx, M, L.w, L.scales, L.bias, y, ldy, n_begin, n_end);
}

void check_int8_activations(bool on, const FusedLinear& L, const char* name) {
  const auto wt = L.w.scalar_type();
  TORCH_CHECK(!on || wt == at::kChar || wt == at::kByte, "int8_activations needs int8 or 4-bit weights: ", name,
              " is ", wt);
  TORCH_CHECK(on || wt != at::kByte, name, " weight is 4-bit: it needs int8_activations");
}

static void linear_kernels(torch::Library& m) {
  m.impl("linear_fwd", &linear_fwd_cpu);
}
GPTFAST_CPU_KERNELS(linear_kernels);

}  // namespace gptfast
