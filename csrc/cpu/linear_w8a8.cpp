// The int8 x int8 linear layer for decoding on CPU: y (M, N) = (sx[m] q(x)[m]) . (scales[n] w[n]) [+ bias[n]],
// with W int8 (N, K) as gptfast.quantize stores it (symmetric per output row) and each row of x quantized here,
// per call, to int8 (symmetric per row: sx = absmax / 127, q = round(x / sx)).
//
// Why: the widen-to-float kernel (linear.cpp) turns every weight into a float and spends one FMA per weight per
// row of x; with 8 rows (a batch of sequences) that is compute-bound at a quarter of the read bandwidth. Here the
// products are integer dot products with int32 accumulation, 64 of them an instruction (AVX-512 VNNI `vpdpbusd`:
// u8 x s8, four products summed into each int32 lane), the weights never widened.
//
//   VNNI: vpdpbusd wants one unsigned operand. x's int8 q is flipped to q + 128 (one xor a vector of x, shared by
//         the tile's weight rows), and sum((q + 128) w) - 128 sum(w) = sum(q w), sum(w) by one more vpdpbusd with
//         ones per weight vector (shared by the rows of x): M + 1 instructions per 64 weights for M rows of x.
//   AVX-VNNI (either build, where the CPU has it and lacks AVX-512 VNNI: Intel's client cores): the same on ymm.
//   AVX2 (no VNNI: the 2-core EPYC): vpmaddubsw(|q|, sign(w, q)) pairs products into int16 - |q| <= 127 and
//         |w| <= 127 keep each pair below 32767, no saturation - then vpmaddwd with ones into int32.
//   generic: int32 loops.
// Every path computes the same exact int32 sums, so the output is bit-for-bit the same on every ISA and for a
// row alone or in a batch: y = float(acc) * sx[m] * scales[n] (+ bias[n]) in that order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "../common.h"
#include "decode_parts.h"
#include "int8_paths.h"
#include "kernels.h"

#ifndef GPTFAST_ISA_MODULE   // the schemas once, in gptfast._C (the AVX-512 module adds kernels only)
TORCH_LIBRARY_FRAGMENT(gptfast, m) {
  // An int8 x int8 linear layer for inference: each row of x (..., K) float32 quantized to int8 (symmetric, per
  // row), multiplied with weight (N, K) int8 by integer dot products, y = acc * row scale * scales[n] + bias[n].
  // path: the instructions ("vnni", "avxvnni", "avx2", "generic"; None: the best this CPU has) - tests run each one
  // here.
  m.def("linear_w8a8_fwd(Tensor x, Tensor weight, Tensor scales, Tensor? bias, str? path=None) -> Tensor");
}
#endif

namespace gptfast {
namespace {

constexpr int64_t kPad = 64;                  // x's quantized rows are padded with zeros to a multiple of this
constexpr int64_t kMaxK = 65536;              // (q + 128) * w summed over K stays inside int32
constexpr int64_t kRowBlock = 24;             // weight rows a thread takes at a time
constexpr int64_t kMinBytesPerThread = 64 * 1024;

// Row m of x to int8: sx[m] = absmax / 127, q = round-half-even(x * (127 / absmax)), zeros to the padded length.
void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q, int64_t Kp, float* sx) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    sx[m] = amax / 127.f;
    int8_t* qr = q + m * Kp;
    for (int64_t k = 0; k < K; ++k)
      qr[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(xr[k] * inv))));
    std::fill(qr + K, qr + Kp, int8_t(0));
  }
}

struct Out {
  const float* sx;       // (M,) x's row scales
  const float* scales;   // (N,) the weights' row scales
  const float* bias;     // (N,) or null
  float* y;
  int64_t ldy;
};

inline void store(const Out& o, int64_t m, int64_t n, int32_t acc) {
  float s = rounded(static_cast<float>(acc) * o.sx[m] * o.scales[n]);   // (then the bias: no FMA, on any path)
  if (o.bias) s += o.bias[n];
  o.y[m * o.ldy + n] = s;
}

// The reference loop: every ISA's result (exact int32 sums).
void dot_generic(const int8_t* q, int64_t Kp, int64_t M, const int8_t* w, int64_t K, int64_t n0, int64_t n1,
                 const Out& o) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      int32_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += int32_t(q[m * Kp + k]) * int32_t(w[n * K + k]);
      store(o, m, n, acc);
    }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define GPTFAST_UNROLL _Pragma("GCC unroll 16")

inline int32_t hsum256(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// AVX2: NB weight rows x MB rows of x, 32 products per vpmaddubsw; the K tail (under 32) in scalar.
template <int NB, int MB>
void tile_avx2(const int8_t* q, int64_t Kp, const int8_t* w, int64_t K, int64_t n0, const Out& o,
               bool prefetch = false) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[NB][MB];
  GPTFAST_UNROLL
  for (int i = 0; i < NB; ++i)
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) acc[i][m] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (prefetch && (k & 63) == 0) {                      // a line of each of the next NB rows every 64 weights
      GPTFAST_UNROLL
      for (int i = 0; i < NB; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + NB + i) * K + k), _MM_HINT_T1);
    }
    __m256i xa[MB], xs[MB];
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) {
      xs[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * Kp + k));
      xa[m] = _mm256_abs_epi8(xs[m]);
    }
    GPTFAST_UNROLL
    for (int i = 0; i < NB; ++i) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + i) * K + k));
      GPTFAST_UNROLL
      for (int m = 0; m < MB; ++m) {
        const __m256i p = _mm256_maddubs_epi16(xa[m], _mm256_sign_epi8(wv, xs[m]));
        acc[i][m] = _mm256_add_epi32(acc[i][m], _mm256_madd_epi16(p, ones));
      }
    }
  }
  GPTFAST_UNROLL
  for (int i = 0; i < NB; ++i)
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) {
      int32_t s = hsum256(acc[i][m]);
      for (int64_t kk = k; kk < K; ++kk) s += int32_t(q[m * Kp + kk]) * int32_t(w[(n0 + i) * K + kk]);
      store(o, m, n0 + i, s);
    }
}

void dot_avx2(const int8_t* q, int64_t Kp, int64_t M, const int8_t* w, int64_t K, int64_t n0, int64_t n1,
              const Out& o) {
  int64_t n = n0;
  if (M == 1)                                     // one row of x: 8 weight rows a tile, the next 8 prefetched
    for (; n + 8 <= n1; n += 8) tile_avx2<8, 1>(q, Kp, w, K, n, o, true);
  for (; n + 2 <= n1; n += 2) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
      const Out om{o.sx + m, o.scales, o.bias, o.y + m * o.ldy, o.ldy};
      tile_avx2<2, 2>(q + m * Kp, Kp, w, K, n, om);
    }
    if (m < M) tile_avx2<2, 1>(q + m * Kp, Kp, w, K, n, Out{o.sx + m, o.scales, o.bias, o.y + m * o.ldy, o.ldy});
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m)
      tile_avx2<1, 1>(q + m * Kp, Kp, w, K, n, Out{o.sx + m, o.scales, o.bias, o.y + m * o.ldy, o.ldy});
}
// AVX-VNNI (ymm vpdpbusd, either build on a CPU that has it): the VNNI tile on 32 bytes - q + 128 against the
// weights plus the weights' sum for the correction - with AVX2's scalar K tail (no byte-masked loads).
#define GPTFAST_AVX_VNNI __attribute__((target("avx2,avxvnni")))

template <int NB, int MB>
GPTFAST_AVX_VNNI inline void tile_avx_vnni(const int8_t* q, int64_t Kp, const int8_t* w, int64_t K, int64_t n0,
                                           const Out& o, bool prefetch = false) {
  const __m256i ones = _mm256_set1_epi8(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256i acc[NB][MB], wsum[NB];
  GPTFAST_UNROLL
  for (int i = 0; i < NB; ++i) {
    wsum[i] = _mm256_setzero_si256();
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) acc[i][m] = _mm256_setzero_si256();
  }
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (prefetch && (k & 63) == 0) {
      GPTFAST_UNROLL
      for (int i = 0; i < NB; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + NB + i) * K + k), _MM_HINT_T1);
    }
    __m256i xv[MB];
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m)                                                   // q + 128
      xv[m] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * Kp + k)), flip);
    GPTFAST_UNROLL
    for (int i = 0; i < NB; ++i) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + i) * K + k));
      wsum[i] = _mm256_dpbusd_avx_epi32(wsum[i], ones, wv);
      GPTFAST_UNROLL
      for (int m = 0; m < MB; ++m) acc[i][m] = _mm256_dpbusd_avx_epi32(acc[i][m], xv[m], wv);
    }
  }
  GPTFAST_UNROLL
  for (int i = 0; i < NB; ++i) {
    const int32_t ws = hsum256(wsum[i]);
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) {
      int32_t s = hsum256(acc[i][m]) - 128 * ws;
      for (int64_t kk = k; kk < K; ++kk) s += int32_t(q[m * Kp + kk]) * int32_t(w[(n0 + i) * K + kk]);
      store(o, m, n0 + i, s);
    }
  }
}

GPTFAST_AVX_VNNI void dot_avx_vnni(const int8_t* q, int64_t Kp, int64_t M, const int8_t* w, int64_t K, int64_t n0,
                                   int64_t n1, const Out& o) {
  auto at = [&](int64_t m) { return Out{o.sx + m, o.scales, o.bias, o.y + m * o.ldy, o.ldy}; };
  int64_t n = n0;
  if (M == 1)
    for (; n + 4 <= n1; n += 4) tile_avx_vnni<4, 1>(q, Kp, w, K, n, o, true);
  for (; n + 2 <= n1; n += 2) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) tile_avx_vnni<2, 2>(q + m * Kp, Kp, w, K, n, at(m));
    if (m < M) tile_avx_vnni<2, 1>(q + m * Kp, Kp, w, K, n, at(m));
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) tile_avx_vnni<1, 1>(q + m * Kp, Kp, w, K, n, at(m));
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
#define GPTFAST_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

// AVX-512 VNNI: NB weight rows x MB rows of x, 64 products per vpdpbusd; the K tail read with a byte mask (x's
// padding is zeros, the masked weights are zeros: they add nothing). The next NB rows are prefetched into L2.
template <int NB, int MB>
GPTFAST_VNNI inline void tile_vnni(const int8_t* q, int64_t Kp, const int8_t* w, int64_t K, int64_t n0,
                                   const Out& o, bool prefetch) {
  const __m512i ones = _mm512_set1_epi8(1), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[NB][MB], wsum[NB];
  GPTFAST_UNROLL
  for (int i = 0; i < NB; ++i) {
    wsum[i] = _mm512_setzero_si512();
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) acc[i][m] = _mm512_setzero_si512();
  }
  const char* next = reinterpret_cast<const char*>(w + (n0 + NB) * K);
  for (int64_t k = 0; k < K; k += 64, next += NB * 64) {
    const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
    if (prefetch) {
      GPTFAST_UNROLL
      for (int i = 0; i < NB; ++i) _mm_prefetch(next + i * 64, _MM_HINT_T1);
    }
    __m512i xv[MB];
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_xor_si512(_mm512_loadu_si512(q + m * Kp + k), flip);   // q + 128
    GPTFAST_UNROLL
    for (int i = 0; i < NB; ++i) {
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, w + (n0 + i) * K + k);
      wsum[i] = _mm512_dpbusd_epi32(wsum[i], ones, wv);
      GPTFAST_UNROLL
      for (int m = 0; m < MB; ++m) acc[i][m] = _mm512_dpbusd_epi32(acc[i][m], xv[m], wv);
    }
  }
  GPTFAST_UNROLL
  for (int i = 0; i < NB; ++i) {
    const int32_t ws = _mm512_reduce_add_epi32(wsum[i]);
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) store(o, m, n0 + i, _mm512_reduce_add_epi32(acc[i][m]) - 128 * ws);
  }
}

GPTFAST_VNNI void dot_vnni(const int8_t* q, int64_t Kp, int64_t M, const int8_t* w, int64_t K, int64_t n0,
                           int64_t n1, const Out& o) {
  int64_t n = n0;
  if (M == 1)
    for (; n + 8 <= n1; n += 8) tile_vnni<8, 1>(q, Kp, w, K, n, o, true);
  for (; n + 4 <= n1; n += 4) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      tile_vnni<4, 4>(q + m * Kp, Kp, w, K, n, Out{o.sx + m, o.scales, o.bias, o.y + m * o.ldy, o.ldy}, m == 0);
    const Out om{o.sx + m, o.scales, o.bias, o.y + m * o.ldy, o.ldy};
    switch (M - m) {
      case 3: tile_vnni<4, 3>(q + m * Kp, Kp, w, K, n, om, m == 0); break;
      case 2: tile_vnni<4, 2>(q + m * Kp, Kp, w, K, n, om, m == 0); break;
      case 1: tile_vnni<4, 1>(q + m * Kp, Kp, w, K, n, om, m == 0); break;
      default: break;
    }
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m)
      tile_vnni<1, 1>(q + m * Kp, Kp, w, K, n, Out{o.sx + m, o.scales, o.bias, o.y + m * o.ldy, o.ldy}, false);
}
#endif

void dot_columns(const int8_t* q, int64_t Kp, int64_t M, const int8_t* w, int64_t K, int64_t n0, int64_t n1,
                 const Out& o, const char* path) {
#if defined(CPU_CAPABILITY_AVX512)
  if (is_path(path, "vnni")) return dot_vnni(q, Kp, M, w, K, n0, n1, o);
#endif
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if (is_path(path, "avxvnni")) return dot_avx_vnni(q, Kp, M, w, K, n0, n1, o);
  if (is_path(path, "avx2")) return dot_avx2(q, Kp, M, w, K, n0, n1, o);
#endif
  dot_generic(q, Kp, M, w, K, n0, n1, o);
}

at::Tensor linear_w8a8_fwd_cpu(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& scales_in,
                               const std::optional<at::Tensor>& bias_in,
                               const std::optional<c10::string_view> path_in) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.device().is_cpu(),
              "x: the CPU int8 x int8 linear takes float32 (..., K) CPU activations, got ", x.scalar_type(), " ",
              x.sizes());
  const int64_t K = x.size(-1);
  TORCH_CHECK(weight_in.scalar_type() == at::kChar && weight_in.dim() == 2 && weight_in.size(1) == K,
              "weight must be int8 (N, K) with K = x's last dim (", K, "), got ", weight_in.scalar_type(), " ",
              weight_in.sizes());
  TORCH_CHECK(K <= kMaxK, "K must be at most ", kMaxK, " (the int32 sums), got ", K);
  const int64_t N = weight_in.size(0);
  for (auto [t, name] : {std::pair{&scales_in, "scales"}, std::pair{bias_in ? &*bias_in : nullptr, "bias"}}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == N, name,
                " must be float32 (", N, ",) - one per output row - got ", t->scalar_type(), " ", t->sizes());
  }
  at::Tensor x2 = x.reshape({-1, K});
  if (K > 0 && x2.stride(1) != 1) x2 = x2.contiguous();
  const at::Tensor w = weight_in.contiguous(), scales = scales_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in ? std::optional(bias_in->contiguous()) : std::nullopt;
  const int64_t M = x2.size(0), Kp = (K + kPad - 1) / kPad * kPad;
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  maybe_poison(y);
  if (M == 0 || N == 0) return y.view(out_sizes);
  at::Tensor q = at::empty({M, std::max<int64_t>(Kp, 1)}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({M}, x.options());
  quantize_rows(x2.data_ptr<float>(), x2.stride(0), M, K, q.data_ptr<int8_t>(), Kp, sx.data_ptr<float>());
  const Out o{sx.data_ptr<float>(), scales.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr,
              y.data_ptr<float>(), N};
  const char* path = choose_int8_dot_path(path_in);
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / std::max<int64_t>(kRowBlock * K, 1));
  at::parallel_for(0, (N + kRowBlock - 1) / kRowBlock, grain, [&](int64_t b0, int64_t b1) {
    dot_columns(q.data_ptr<int8_t>(), Kp, M, w.data_ptr<int8_t>(), K, b0 * kRowBlock, std::min(N, b1 * kRowBlock), o,
                path);
  });
  return y.view(out_sizes);
}

}  // namespace

int64_t w8a8_padded_k(int64_t K) { return (K + kPad - 1) / kPad * kPad; }

void w8a8_quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q, float* sx) {
  quantize_rows(x, ldx, M, K, q, w8a8_padded_k(K), sx);
}

void w8a8_columns(const int8_t* q, const float* sx, int64_t M, const at::Tensor& w, const float* scales,
                  const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  const int64_t K = w.size(1);
  static const char* path = int8_dot_path_here();
  dot_columns(q, w8a8_padded_k(K), M, w.const_data_ptr<int8_t>(), K, n_begin, n_end, Out{sx, scales, bias, y, ldy},
              path);
}

static void linear_w8a8_kernels(torch::Library& m) { m.impl("linear_w8a8_fwd", &linear_w8a8_fwd_cpu); }
GPTFAST_CPU_KERNELS(linear_w8a8_kernels);

}  // namespace gptfast
