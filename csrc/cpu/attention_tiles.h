// The pieces the CPU attention kernels share (attention_fwd.cpp, attention_bwd.cpp, attention_decode.cpp): the
// arguments, the tile sizes, the two micro-kernels of the tiled kernels (S = Q K^T on a tile, out += W M), the
// online-softmax helpers, per-thread scratch tiles and the argument checks. Everything here has internal linkage:
// each ISA build of each file gets its own copy.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <vector>

#include "../common.h"
#include "../dropout_hash.h"
#include "decode_parts.h"
#include "kernels.h"
#include "vec_io.h"

namespace gptfast {
namespace {

constexpr int64_t kBQ = 32;      // query rows per tile
constexpr int64_t kBK = 64;      // key columns per tile
constexpr int64_t kMaxHeadDim = 256;

// S: the storage type of q, k, v, o and the gradients; T = acc_t<S> the math (float32 for bfloat16
// and float16 storage, whose tiles are converted to float32 as they are loaded - vec_io.h)
template <typename S>
struct AttnArgs {
  using T = acc_t<S>;
  const S *q, *k, *v;
  const T* kt;            // forward only: K transposed per head, (BH, D, ldkt) with zero-padded columns
  int64_t ldkt;
  int64_t Tq, Tk, D;      // query rows, key rows (Tk >= Tq: queries are the last Tq positions)
  bool causal;
  T scale;
  double p;               // dropout probability
  T keep_scale;           // 1 / (1 - p)
  uint32_t threshold;     // integer dropout threshold, 0 when p == 0
  uint64_t seed;
  int64_t group = 1;      // query heads per key/value head (grouped-query attention): query head bh reads K/V head bh / group
};

// Number of key columns query row `row` may see, counting from column 0: with a cache of
// Tk - Tq earlier keys, query row r sits at absolute position r + Tk - Tq.
template <typename A>
inline int64_t visible_cols(const A& a, int64_t row) { return a.causal ? row + a.Tk - a.Tq + 1 : a.Tk; }

using at::vec::Vectorized;

// kt (D x kBK) <- transpose of rows [k0, k0 + nk) of x (T x D); unused columns zeroed.
template <typename S, typename T>
void load_transposed(const S* __restrict__ x, int64_t k0, int64_t nk, int64_t D, T* __restrict__ kt) {
  for (int64_t d = 0; d < D; ++d) {
    T* dst = kt + d * kBK;
    for (int64_t j = 0; j < nk; ++j) dst[j] = static_cast<T>(x[(k0 + j) * D + d]);
    for (int64_t j = nk; j < kBK; ++j) dst[j] = T(0);
  }
}

// Micro-kernel 1: S[r, 0..kBK) = alpha * sum_d A[r, d] * Bt[d * ldb + 0..kBK)   for r < n_rows.
// A is (n_rows x D) row-major, Bt a transposed tile (D rows of at least kBK columns, leading
// dimension ldb). Four rows at a time share every load of Bt; the 4 x 2 vector accumulators stay
// in registers across the d loop.
template <typename T>
void tile_dot(const T* __restrict__ A, int64_t n_rows, int64_t D, const T* __restrict__ Bt, int64_t ldb, T alpha,
              T* __restrict__ S) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  static_assert(kBK % (2 * V) == 0, "tile width must be a multiple of two vectors");
  const Vec valpha(alpha);
  int64_t r = 0;
  for (; r + 4 <= n_rows; r += 4) {
    const T* a0 = A + r * D;
    for (int64_t c = 0; c < kBK; c += 2 * V) {
      Vec acc[4][2] = {{Vec(0), Vec(0)}, {Vec(0), Vec(0)}, {Vec(0), Vec(0)}, {Vec(0), Vec(0)}};
      for (int64_t d = 0; d < D; ++d) {
        const Vec b0 = Vec::loadu(Bt + d * ldb + c), b1 = Vec::loadu(Bt + d * ldb + c + V);
        for (int rr = 0; rr < 4; ++rr) {
          const Vec a(a0[rr * D + d]);
          acc[rr][0] = at::vec::fmadd(a, b0, acc[rr][0]);
          acc[rr][1] = at::vec::fmadd(a, b1, acc[rr][1]);
        }
      }
      for (int rr = 0; rr < 4; ++rr) {
        (acc[rr][0] * valpha).store(S + (r + rr) * kBK + c);
        (acc[rr][1] * valpha).store(S + (r + rr) * kBK + c + V);
      }
    }
  }
  for (; r < n_rows; ++r) {
    for (int64_t c = 0; c < kBK; c += 2 * V) {
      Vec acc0(0), acc1(0);
      for (int64_t d = 0; d < D; ++d) {
        const Vec a(A[r * D + d]);
        acc0 = at::vec::fmadd(a, Vec::loadu(Bt + d * ldb + c), acc0);
        acc1 = at::vec::fmadd(a, Vec::loadu(Bt + d * ldb + c + V), acc1);
      }
      (acc0 * valpha).store(S + r * kBK + c);
      (acc1 * valpha).store(S + r * kBK + c + V);
    }
  }
}

// Micro-kernel 2: out[r, 0..D) += sum_{c < n_cols} W[r * rs + c * cs] * M[c, 0..D)   for r < n_rows.
// M is (n_cols x D) row-major; the strides let W be read transposed (rs = 1, cs = kBK) for
// products like P^T dO. Four output rows at a time share every load of M, and each block of
// 4 rows x 2 vectors of out stays in registers over c: 8 FMAs per 2 loads and 4 broadcasts.
template <typename T>
void tile_accumulate(const T* __restrict__ W, int64_t rs, int64_t cs, int64_t n_rows, int64_t n_cols,
                     const T* __restrict__ M, int64_t D, T* __restrict__ out) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  int64_t r = 0;
  for (; r + 4 <= n_rows; r += 4) {
    const T* w = W + r * rs;
    T* o = out + r * D;
    int64_t d0 = 0;
    for (; d0 + 2 * V <= D; d0 += 2 * V) {
      Vec acc[4][2];
      for (int rr = 0; rr < 4; ++rr) {
        acc[rr][0] = Vec::loadu(o + rr * D + d0);
        acc[rr][1] = Vec::loadu(o + rr * D + d0 + V);
      }
      for (int64_t c = 0; c < n_cols; ++c) {
        const Vec m0 = Vec::loadu(M + c * D + d0), m1 = Vec::loadu(M + c * D + d0 + V);
        for (int rr = 0; rr < 4; ++rr) {
          const Vec wc(w[rr * rs + c * cs]);
          acc[rr][0] = at::vec::fmadd(wc, m0, acc[rr][0]);
          acc[rr][1] = at::vec::fmadd(wc, m1, acc[rr][1]);
        }
      }
      for (int rr = 0; rr < 4; ++rr) {
        acc[rr][0].store(o + rr * D + d0);
        acc[rr][1].store(o + rr * D + d0 + V);
      }
    }
    for (; d0 + V <= D; d0 += V) {
      Vec acc[4];
      for (int rr = 0; rr < 4; ++rr) acc[rr] = Vec::loadu(o + rr * D + d0);
      for (int64_t c = 0; c < n_cols; ++c) {
        const Vec m0 = Vec::loadu(M + c * D + d0);
        for (int rr = 0; rr < 4; ++rr) acc[rr] = at::vec::fmadd(Vec(w[rr * rs + c * cs]), m0, acc[rr]);
      }
      for (int rr = 0; rr < 4; ++rr) acc[rr].store(o + rr * D + d0);
    }
    for (; d0 < D; ++d0) {
      for (int rr = 0; rr < 4; ++rr) {
        T acc = o[rr * D + d0];
        for (int64_t c = 0; c < n_cols; ++c) acc += w[rr * rs + c * cs] * M[c * D + d0];
        o[rr * D + d0] = acc;
      }
    }
  }
  for (; r < n_rows; ++r) {                       // the last n_rows % 4 rows, one at a time
    const T* w = W + r * rs;
    T* o = out + r * D;
    int64_t d0 = 0;
    for (; d0 + V <= D; d0 += V) {
      Vec acc = Vec::loadu(o + d0);
      for (int64_t c = 0; c < n_cols; ++c) acc = at::vec::fmadd(Vec(w[c * cs]), Vec::loadu(M + c * D + d0), acc);
      acc.store(o + d0);
    }
    for (; d0 < D; ++d0) {
      T acc = o[d0];
      for (int64_t c = 0; c < n_cols; ++c) acc += w[c * cs] * M[c * D + d0];
      o[d0] = acc;
    }
  }
}

// s[j] <- exp(s[j] - shift) for j < n, vectorized; returns the sum of the new s[j].
template <typename T>
T exp_shifted(T* s, int64_t n, T shift) {
  using Vec = Vectorized<T>;
  const Vec vshift(shift);
  Vec vsum(0);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec e = (Vec::loadu(s + j) - vshift).exp();
    e.store(s + j);
    vsum = vsum + e;
  }
  T sum = sum_lanes(vsum);
  for (; j < n; ++j) sum += (s[j] = std::exp(s[j] - shift));
  return sum;
}

// max(init, s[0..n)), vectorized.
template <typename T>
T row_max(const T* s, int64_t n, T init) {
  using Vec = Vectorized<T>;
  int64_t j = 0;
  T best = init;
  if (n >= Vec::size()) {
    Vec vmax = Vec::loadu(s);
    for (j = Vec::size(); j + Vec::size() <= n; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
    best = std::max(best, at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vmax));
  }
  for (; j < n; ++j) best = std::max(best, s[j]);
  return best;
}

// Per-thread scratch tiles on 64-byte lines, zero-filled like std::vector<T>(n). std::vector only
// guarantees 16 bytes, so depending on the allocator's history a tile's 32-byte vector loads could
// straddle two cache lines on every other access - a slowdown of up to ~30% that came and went
// between builds and processes with the same code.
template <typename T>
class ScratchTile {
 public:
  explicit ScratchTile(int64_t n) : n_(n) {
    if (n_ > 0) {
      const size_t bytes = (static_cast<size_t>(n_) * sizeof(T) + 63) / 64 * 64;
      p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(p_ != nullptr, "attention: out of memory for a ", bytes, "-byte scratch tile");
      std::fill(p_, p_ + n_, T(0));
    }
  }
  ~ScratchTile() { std::free(p_); }
  ScratchTile(const ScratchTile&) = delete;
  ScratchTile& operator=(const ScratchTile&) = delete;
  T* data() { return p_; }
  T* begin() { return p_; }
  T* end() { return p_ + n_; }
  T& operator[](int64_t i) { return p_[i]; }

 private:
  int64_t n_;
  T* p_ = nullptr;
};

// x[0..n) *= alpha, vectorized.
template <typename T>
void scale_row(T* x, int64_t n, T alpha) {
  using Vec = Vectorized<T>;
  const Vec va(alpha);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= alpha;
}

// rows x D elements of src as T: src itself when S is T, else converted into buf (a tile's worth)
template <typename S, typename T>
const T* as_acc(const S* src, int64_t n, T* buf) {
  if constexpr (std::is_same_v<S, T>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double dropout_p,
               const at::Tensor& seed) {
  check_attention_args(q, k, v, dropout_p, seed, kMaxHeadDim, "CPU");
  const auto qt = q.scalar_type();
  TORCH_CHECK(qt == at::kFloat || qt == at::kDouble || qt == at::kBFloat16 || qt == at::kHalf,
              "q: the CPU attention supports float32, float64, bfloat16 and float16, got ", qt);
  TORCH_CHECK(q.size(2) >= 1, "q must have at least one position, got T=", q.size(2));
}

template <typename S, typename T = acc_t<S>>
AttnArgs<S> make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                      double scale, double dropout_p, const at::Tensor& seed) {
  return AttnArgs<S>{q.data_ptr<S>(), k.data_ptr<S>(), v.data_ptr<S>(), nullptr, 0, q.size(2), k.size(2), q.size(3),
                     causal,
                     static_cast<T>(scale), dropout_p, static_cast<T>(1.0 / (1.0 - dropout_p)),
                     dropout_p > 0 ? dropout_threshold(dropout_p) : 0u,
                     static_cast<uint64_t>(seed.item<int64_t>()), q.size(1) / k.size(1)};
}

// t itself when each head's rows are D elements apart (contiguous, or a prefix slice along T of a
// longer cache: only the batch and head strides differ), else a contiguous copy
at::Tensor rows_d_apart(const at::Tensor& t) {
  return t.stride(3) == 1 && t.stride(2) == t.size(3) ? t : t.contiguous();
}

}  // namespace

// The forward for at most kRowsKernelMaxQ query rows (decoding with a KV cache): attention_decode.cpp.
constexpr int64_t kRowsKernelMaxQ = 8;
std::tuple<at::Tensor, at::Tensor> attention_fwd_rows_cpu(const at::Tensor& q, const at::Tensor& k_in,
                                                          const at::Tensor& v_in, bool causal, double scale,
                                                          double dropout_p, const at::Tensor& seed);

}  // namespace gptfast
