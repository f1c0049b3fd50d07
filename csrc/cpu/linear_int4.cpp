// The 4-bit linear layer for decoding on CPU: weights in groups of 32 or 64 along K, 4 bits each with a float32
// scale a group (gptfast.quantize(model, "int4")), times activations quantized to int8 per row (as the w8a8 kernel does):
//   y[m, n] = sx[m] * sum_g scales[n, g] * sum_{k in g} q[m, k] w[n, k]      (+ bias[n])
//
// Why: decoding reads every weight once a token; 4 bits (+ 32 bits a group of 32: 5 bits a weight) is 0.63x the
// bytes of int8 with its row scale. The products stay integer dot products: the weights are kept as unsigned
// nibbles u = w + 8 (w in [-7, 7]), the unsigned operand of `vpdpbusd` (AVX-512 VNNI), the int8 row of x the signed
// one, and the accumulator of each 4-product lane starts at -8 x (the lane's sum of x), so that it ends at the exact
// sum of w x. Each lane's int32 sum then goes to float and is multiplied by its group's scale (a group of 32 is 8
// lanes of a 64-weight vector) into float32 lane accumulators.
//
// Layout (quantize.py pack_int4): a row of K weights, padded with zeros to a multiple of 64, is Kp / 2 bytes; each
// 64 weights are 32 bytes whose low nibbles are weights 0..31 and high nibbles weights 32..63 - so an AND and a
// shift give the two halves of a vector in order. scales (N, Kp / group).
//   AVX-512 VNNI: 64 weights a vpdpbusd, tiles of 4 weight rows x 4 rows of x (or 8 x 1).
//   AVX2 (no VNNI): vpmaddubsw (u8 nibble x s8: pairs stay below 2 * 15 * 127, no saturation) + vpmaddwd; a ymm is
//   32 weights, one group of 32 (half of one of 64).
//   AVX-VNNI (ymm vpdpbusd, where the CPU has it: Intel's client cores): AVX2's tile, one instruction a sum - the
//   same int32 sums and float steps, so the AVX2 path's bits.
//   generic: loops.
// The float sums of the lanes differ between paths in the last bits (tested to 1e-6 of each other); on one path a
// row of x gets the same bits alone or in a batch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
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
  // A 4-bit linear layer for inference: x (..., K) float32 quantized to int8 per row, weight (N, Kp / 2) uint8 (two
  // 4-bit weights a byte, Kp = K rounded up to 64; quantize.py pack_int4), scales (N, Kp / group) float32 with group
  // 32 or 64, bias (N,) or None. path: "vnni", "avxvnni", "avx2", "generic" or None (the best this CPU has).
  m.def("linear_int4_fwd(Tensor x, Tensor weight, Tensor scales, Tensor? bias, str? path=None) -> Tensor");
}
#endif

namespace gptfast {
namespace {

constexpr int64_t kRowBlock = 24;
constexpr int64_t kMinBytesPerThread = 64 * 1024;

struct Out {
  const float* sx;       // (M,) x's row scales
  const float* scales;   // (N, G) the groups' scales
  int64_t G;             // groups a row
  const float* bias;     // (N,) or null
  float* y;
  int64_t ldy;
};

inline void store(const Out& o, int64_t m, int64_t n, float acc) {
  float s = rounded(acc * o.sx[m]);                 // (then the bias: no FMA, on any path)
  if (o.bias) s += o.bias[n];
  o.y[m * o.ldy + n] = s;
}

// The reference loop: for each group the exact int32 sum, times the group's scale, summed in float in order.
void dot_generic(const int8_t* q, int64_t Kp, int64_t M, const uint8_t* w, int64_t group, int64_t n0, int64_t n1,
                 const Out& o) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < o.G; ++g) {
        int32_t s = 0;
        for (int64_t k = g * group; k < (g + 1) * group; ++k) {
          const uint8_t b = w[n * (Kp / 2) + (k / 64) * 32 + (k % 32)];
          const int32_t u = (k % 64) < 32 ? (b & 0x0F) : (b >> 4);
          s += (u - 8) * int32_t(q[m * Kp + k]);
        }
        acc += static_cast<float>(s) * o.scales[n * o.G + g];
      }
      store(o, m, n, acc);
    }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define GPTFAST_UNROLL _Pragma("GCC unroll 16")

inline float hsum256_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The int32 lanes' sums init + u . x over each lane's 4 bytes (u unsigned nibbles, x signed). AVX2: vpmaddubsw
// pairs (u <= 15, |x| <= 127: no saturation) then vpmaddwd; AVX-VNNI: one vpdpbusd, written as VEX-encoded inline
// asm so that one tile template serves both paths without compiling the AVX2 one for AVX-VNNI ("x": ymm0-15, the
// registers VEX can name).
template <bool kVnni>
inline __m256i dot4(__m256i init, __m256i u, __m256i x) {
  if constexpr (kVnni) {
    asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(init) : "x"(u), "x"(x));
    return init;
  } else {
    return _mm256_add_epi32(init, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
  }
}

// AVX2 / AVX-VNNI: NB weight rows x MB rows of x, 64 weights (one 32-byte block a row: the low nibbles are weights
// 0..31, the high 32..63) a step, each block loaded once. The int32 sums start at -8 x (each lane's sum of its 4 x,
// times 8: the nibbles are w + 8); a group of 64 sums both halves in int32 before its one convert and FMA, a group
// of 32 converts each half.
template <int NB, int MB, int kGroup, bool kVnni>
void tile_ymm(const int8_t* q, int64_t Kp, const uint8_t* w, int64_t n0, const Out& o, bool prefetch = false) {
  const __m256i ones8 = _mm256_set1_epi8(1), low4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  __m256 acc[NB][MB];
  GPTFAST_UNROLL
  for (int i = 0; i < NB; ++i)
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) acc[i][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 64) {
    if (prefetch && (k & 127) == 0) {                     // a line of each of the next NB rows every 128 weights
      GPTFAST_UNROLL
      for (int i = 0; i < NB; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + NB + i) * (Kp / 2) + k / 2), _MM_HINT_T1);
    }
    __m256i xlo[MB], xhi[MB], init_lo[MB], init_hi[MB];
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) {
      xlo[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * Kp + k));
      xhi[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * Kp + k + 32));
      init_lo[m] = _mm256_sub_epi32(zero, _mm256_slli_epi32(dot4<kVnni>(zero, ones8, xlo[m]), 3));
      init_hi[m] = _mm256_sub_epi32(zero, _mm256_slli_epi32(dot4<kVnni>(zero, ones8, xhi[m]), 3));
      if constexpr (kGroup == 64) init_lo[m] = _mm256_add_epi32(init_lo[m], init_hi[m]);
    }
    GPTFAST_UNROLL
    for (int i = 0; i < NB; ++i) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + i) * (Kp / 2) + k / 2));
      const __m256i ulo = _mm256_and_si256(b, low4), uhi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
      const float* sc = o.scales + (n0 + i) * o.G + k / kGroup;
      if constexpr (kGroup == 64) {
        const __m256 s = _mm256_set1_ps(sc[0]);
        GPTFAST_UNROLL
        for (int m = 0; m < MB; ++m) {
          const __m256i d = dot4<kVnni>(dot4<kVnni>(init_lo[m], ulo, xlo[m]), uhi, xhi[m]);
          acc[i][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc[i][m]);
        }
      } else {
        const __m256 s0 = _mm256_set1_ps(sc[0]), s1 = _mm256_set1_ps(sc[1]);
        GPTFAST_UNROLL
        for (int m = 0; m < MB; ++m) {
          acc[i][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4<kVnni>(init_lo[m], ulo, xlo[m])), s0, acc[i][m]);
          acc[i][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4<kVnni>(init_hi[m], uhi, xhi[m])), s1, acc[i][m]);
        }
      }
    }
  }
  GPTFAST_UNROLL
  for (int i = 0; i < NB; ++i)
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) store(o, m, n0 + i, hsum256_ps(acc[i][m]));
}

template <int kGroup, bool kVnni>
void dot_ymm_group(const int8_t* q, int64_t Kp, int64_t M, const uint8_t* w, int64_t n0, int64_t n1, const Out& o) {
  auto at = [&](int64_t m) { return Out{o.sx + m, o.scales, o.G, o.bias, o.y + m * o.ldy, o.ldy}; };
  int64_t n = n0;
  if (M == 1)                                              // the next 4 rows prefetched meanwhile
    for (; n + 4 <= n1; n += 4) tile_ymm<4, 1, kGroup, kVnni>(q, Kp, w, n, o, true);
  for (; n + 2 <= n1; n += 2) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) tile_ymm<2, 2, kGroup, kVnni>(q + m * Kp, Kp, w, n, at(m));
    if (m < M) tile_ymm<2, 1, kGroup, kVnni>(q + m * Kp, Kp, w, n, at(m));
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) tile_ymm<1, 1, kGroup, kVnni>(q + m * Kp, Kp, w, n, at(m));
}

template <bool kVnni>
void dot_ymm(const int8_t* q, int64_t Kp, int64_t M, const uint8_t* w, int64_t group, int64_t n0, int64_t n1,
             const Out& o) {
  if (group == 64) return dot_ymm_group<64, kVnni>(q, Kp, M, w, n0, n1, o);
  dot_ymm_group<32, kVnni>(q, Kp, M, w, n0, n1, o);
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
#define GPTFAST_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

// AVX-512 VNNI: NB weight rows x MB rows of x, 64 weights (32 bytes) a step; the next NB rows' bytes prefetched.
template <int NB, int MB>
GPTFAST_VNNI inline void tile_vnni(const int8_t* q, int64_t Kp, const uint8_t* w, int64_t group, int64_t n0,
                                   const Out& o, bool prefetch) {
  const __m512i ones = _mm512_set1_epi8(1);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const int64_t row_bytes = Kp / 2;
  __m512 acc[NB][MB];
  GPTFAST_UNROLL
  for (int i = 0; i < NB; ++i)
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) acc[i][m] = _mm512_setzero_ps();
  const char* next = reinterpret_cast<const char*>(w + (n0 + NB) * row_bytes);
  for (int64_t k = 0; k < Kp; k += 64) {
    if (prefetch && (k & 127) == 0) {                     // a line of each next row every 128 weights
      GPTFAST_UNROLL
      for (int i = 0; i < NB; ++i) _mm_prefetch(next + i * row_bytes + k / 2, _MM_HINT_T1);
    }
    __m512i xv[MB], init[MB];
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) {
      xv[m] = _mm512_loadu_si512(q + m * Kp + k);
      // the accumulator starts at -8 x (each lane's sum of its 4 x): the nibbles are w + 8
      init[m] = _mm512_sub_epi32(_mm512_setzero_si512(),
                                 _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, xv[m]), 3));
    }
    GPTFAST_UNROLL
    for (int i = 0; i < NB; ++i) {
      const int64_t n = n0 + i;
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * row_bytes + k / 2));
      const __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low4)),
                                           _mm256_and_si256(_mm256_srli_epi16(b, 4), low4), 1);
      const float* sc = o.scales + n * o.G + k / group;
      const __m512 s = group == 64 ? _mm512_set1_ps(sc[0])
                                   : _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(sc[0])),
                                                        _mm256_set1_ps(sc[1]), 1);
      GPTFAST_UNROLL
      for (int m = 0; m < MB; ++m)
        acc[i][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init[m], u, xv[m])), s, acc[i][m]);
    }
  }
  GPTFAST_UNROLL
  for (int i = 0; i < NB; ++i)
    GPTFAST_UNROLL
    for (int m = 0; m < MB; ++m) store(o, m, n0 + i, _mm512_reduce_add_ps(acc[i][m]));
}

GPTFAST_VNNI void dot_vnni(const int8_t* q, int64_t Kp, int64_t M, const uint8_t* w, int64_t group, int64_t n0,
                           int64_t n1, const Out& o) {
  auto at = [&](int64_t m) { return Out{o.sx + m, o.scales, o.G, o.bias, o.y + m * o.ldy, o.ldy}; };
  int64_t n = n0;
  if (M == 1)
    for (; n + 8 <= n1; n += 8) tile_vnni<8, 1>(q, Kp, w, group, n, o, true);
  for (; n + 4 <= n1; n += 4) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile_vnni<4, 4>(q + m * Kp, Kp, w, group, n, at(m), m == 0);
    switch (M - m) {
      case 3: tile_vnni<4, 3>(q + m * Kp, Kp, w, group, n, at(m), m == 0); break;
      case 2: tile_vnni<4, 2>(q + m * Kp, Kp, w, group, n, at(m), m == 0); break;
      case 1: tile_vnni<4, 1>(q + m * Kp, Kp, w, group, n, at(m), m == 0); break;
      default: break;
    }
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) tile_vnni<1, 1>(q + m * Kp, Kp, w, group, n, at(m), false);
}
#endif

void dot_columns(const int8_t* q, int64_t Kp, int64_t M, const uint8_t* w, int64_t group, int64_t n0, int64_t n1,
                 const Out& o, const char* path) {
#if defined(CPU_CAPABILITY_AVX512)
  if (is_path(path, "vnni")) return dot_vnni(q, Kp, M, w, group, n0, n1, o);
#endif
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if (is_path(path, "avxvnni")) return dot_ymm<true>(q, Kp, M, w, group, n0, n1, o);
  if (is_path(path, "avx2")) return dot_ymm<false>(q, Kp, M, w, group, n0, n1, o);
#endif
  dot_generic(q, Kp, M, w, group, n0, n1, o);
}

// The group size of a layer (32 or 64) from its shapes, checked.
int64_t group_of(const at::Tensor& weight, const at::Tensor& scales, int64_t K) {
  const int64_t Kp = w8a8_padded_k(K);
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 2 && weight.size(1) == Kp / 2,
              "weight must be uint8 (N, Kp / 2) - two 4-bit weights a byte, Kp = K = ", K, " rounded up to 64 - got ",
              weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.size(0) == weight.size(0) &&
                  (scales.size(1) == Kp / 32 || scales.size(1) == Kp / 64),
              "scales must be float32 (N, Kp / 32) or (N, Kp / 64) - one per group of 32 or 64 - got ",
              scales.scalar_type(), " ", scales.sizes());
  return Kp / scales.size(1);
}

at::Tensor linear_int4_fwd_cpu(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& scales_in,
                               const std::optional<at::Tensor>& bias_in,
                               const std::optional<c10::string_view> path_in) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.device().is_cpu(),
              "x: the CPU 4-bit linear takes float32 (..., K) CPU activations, got ", x.scalar_type(), " ", x.sizes());
  const int64_t K = x.size(-1);
  TORCH_CHECK(K <= 65536, "K must be at most 65536 (the int32 sums), got ", K);
  const int64_t group = group_of(weight_in, scales_in, K), N = weight_in.size(0);
  TORCH_CHECK(!bias_in || (bias_in->scalar_type() == at::kFloat && bias_in->dim() == 1 && bias_in->size(0) == N),
              "bias must be float32 (", N, ",) - one per output row");
  at::Tensor x2 = x.reshape({-1, K});
  if (K > 0 && x2.stride(1) != 1) x2 = x2.contiguous();
  const at::Tensor w = weight_in.contiguous(), scales = scales_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in ? std::optional(bias_in->contiguous()) : std::nullopt;
  const int64_t M = x2.size(0), Kp = w8a8_padded_k(K);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  maybe_poison(y);
  if (M == 0 || N == 0) return y.view(out_sizes);
  at::Tensor q = at::empty({M, std::max<int64_t>(Kp, 1)}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({M}, x.options());
  w8a8_quantize_rows(x2.data_ptr<float>(), x2.stride(0), M, K, q.data_ptr<int8_t>(), sx.data_ptr<float>());
  const Out o{sx.data_ptr<float>(), scales.data_ptr<float>(), scales.size(1), bias ? bias->data_ptr<float>() : nullptr,
              y.data_ptr<float>(), N};
  const char* path = choose_int8_dot_path(path_in);
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / std::max<int64_t>(kRowBlock * Kp / 2, 1));
  at::parallel_for(0, (N + kRowBlock - 1) / kRowBlock, grain, [&](int64_t b0, int64_t b1) {
    dot_columns(q.data_ptr<int8_t>(), Kp, M, w.data_ptr<uint8_t>(), group, b0 * kRowBlock, std::min(N, b1 * kRowBlock),
                o, path);
  });
  return y.view(out_sizes);
}

}  // namespace

void int4_columns(const int8_t* q, const float* sx, int64_t M, const at::Tensor& w, const float* scales,
                  int64_t groups, const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  const int64_t Kp = w.size(1) * 2;
  static const char* path = int8_dot_path_here();
  dot_columns(q, Kp, M, w.const_data_ptr<uint8_t>(), Kp / groups, n_begin, n_end, Out{sx, scales, groups, bias, y, ldy},
              path);
}

static void linear_int4_kernels(torch::Library& m) { m.impl("linear_int4_fwd", &linear_int4_fwd_cpu); }
GPTFAST_CPU_KERNELS(linear_int4_kernels);

}  // namespace gptfast
