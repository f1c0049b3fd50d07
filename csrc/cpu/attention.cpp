// Causal (or full) scaled dot-product attention on CPU, FlashAttention-style.
//
// q, k, v, o: (B, H, T, D) contiguous; lse: (B, H, T). The (T, T) score matrix is never built:
// the forward walks key tiles of kBK columns for each tile of kBQ query rows, keeping a running
// row max m, normalizer l and output accumulator (online softmax), and saves
// lse = m + log(l); K is transposed once per call (not once per tile pair) so the score
// micro-kernel streams it. The backward recomputes probabilities P = exp(S - lse) tile by tile.
// With enough heads to keep every thread busy it makes one pass per head: each tile pair's S, P
// and dS are computed once and feed dV, dK and dQ together (a head's dQ belongs to one task, so
// no two threads add into the same output). With few heads it makes two deterministic passes,
// one parallel over key tiles (dK, dV) and one over query tiles (dQ). Causal tiles above the
// diagonal are skipped. Calls with at most kRowsKernelMaxQ query rows (decoding with a KV cache)
// take a kernel of their own that reads K and V in place (attention_fwd_rows_kernel).
//
// Dropout (on the softmax weights, after normalization) uses the counter-based hash of
// dropout_hash.h, so the mask is regenerated in the backward rather than stored.
//   O = Z V, Z = P * M / (1 - p);  dV = Z^T dO;  dZ = dO V^T;  dP = dZ * M / (1 - p);
//   dS = P * (dP - Delta), Delta = rowsum(dO * O);  dQ = scale dS K;  dK = scale dS^T Q.
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
#include "decode_parts.h"
#include "kernels.h"
#include "vec_io.h"
#include "../dropout_hash.h"

#ifndef GPTFAST_KERNELS_ONLY   // the schemas once, in gptfast._C (the AVX-512 module adds kernels only)
TORCH_LIBRARY_FRAGMENT(gptfast, m) {
  // Scaled dot-product attention on (B, H, T, D); lse (B, H, T) is the softmax log-normalizer.
  // seed: a one-element int64 tensor (a tensor, not an int, so drawing it stays inside a
  // torch.compile graph); it keys the counter-based dropout RNG of csrc/dropout_hash.h.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, float dropout_p, Tensor seed) -> (Tensor o, Tensor lse)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal, float scale, float dropout_p, Tensor seed) -> (Tensor dq, Tensor dk, Tensor dv)");
}
#endif

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

template <typename S, typename T = acc_t<S>>
void attention_fwd_kernel(const AttnArgs<S>& a, int64_t BH, S* o, T* lse) {
  const int64_t Tq = a.Tq, Tk = a.Tk, off = a.Tk - a.Tq, D = a.D, n_qt = (Tq + kBQ - 1) / kBQ;
  constexpr bool kConvert = !std::is_same_v<S, T>;
  at::parallel_for(0, BH * n_qt, 1, [&](int64_t begin, int64_t end) {
    ScratchTile<T> s(kBQ * kBK), acc(kBQ * D);
    ScratchTile<T> q_buf(kConvert ? kBQ * D : 0), v_buf(kConvert ? kBK * D : 0);   // 16-bit tiles as float32
    T m[kBQ], l[kBQ];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_qt, q0 = (task % n_qt) * kBQ, nq = std::min(kBQ, Tq - q0);
      const S* v = a.v + bh * Tk * D;
      const T* q_tile = as_acc(a.q + (bh * Tq + q0) * D, nq * D, q_buf.data());
      const uint32_t head_key = dropout_head_key(a.seed, static_cast<uint32_t>(bh));
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(m, m + kBQ, -std::numeric_limits<T>::infinity());
      std::fill(l, l + kBQ, T(0));
      const int64_t kv_end = a.causal ? std::min(Tk, q0 + nq + off) : Tk;
      for (int64_t k0 = 0; k0 < kv_end; k0 += kBK) {
        const int64_t nk = std::min(kBK, kv_end - k0);
        tile_dot(q_tile, nq, D, a.kt + bh * D * a.ldkt + k0, a.ldkt, a.scale, s.data());  // S = scale Q K^T
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t row = q0 + i;
          const int64_t ncols = std::min(nk, visible_cols(a, row) - k0);
          T* srow = s.data() + i * kBK;
          if (ncols <= 0) {                                               // fully masked (causal)
            std::fill(srow, srow + kBK, T(0));
            continue;
          }
          const T m_new = row_max(srow, ncols, m[i]);
          const T alpha = std::exp(m[i] - m_new);  // rescales what was accumulated so far
          const T row_sum = exp_shifted(srow, ncols, m_new);
          std::fill(srow + ncols, srow + kBK, T(0));
          l[i] = l[i] * alpha + row_sum;
          m[i] = m_new;
          if (alpha != T(1)) scale_row(acc.data() + i * D, D, alpha);
          if (a.threshold) {                                              // dropout after softmax
            const uint32_t row_key = dropout_row_key(head_key, static_cast<uint32_t>(row + off));
            for (int64_t j = 0; j < ncols; ++j)
              srow[j] = dropout_keep(row_key, static_cast<uint32_t>(k0 + j), a.threshold) ? srow[j] * a.keep_scale : T(0);
          }
        }
        tile_accumulate(s.data(), kBK, 1, nq, nk, as_acc(v + k0 * D, nk * D, v_buf.data()), D, acc.data());  // O += P V
      }
      for (int64_t i = 0; i < nq; ++i) {
        const T inv_l = T(1) / l[i];
        S* out = o + (bh * Tq + q0 + i) * D;
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<S>(acc[i * D + d] * inv_l);
        lse[bh * Tq + q0 + i] = m[i] + std::log(l[i]);
      }
    }
  });
}

template <typename S, typename T = acc_t<S>>
void attention_bwd_kernel(const AttnArgs<S>& a, int64_t BH, const S* dout, const T* lse, const T* delta,
                          S* dq, S* dk, S* dv) {
  const int64_t Tq = a.Tq, Tk = a.Tk, off = a.Tk - a.Tq, D = a.D;
  constexpr bool kConvert = !std::is_same_v<S, T>;
  // For the tile pair (query rows [q0, q0 + nq), keys [k0, k0 + nk)) of head bh: recompute
  // P = exp(S - lse) into z (then Z = dropout(P)) and dS * scale into ds, both (kBQ x kBK),
  // zero outside the valid (causal, in-range) entries. kt/vt: transposed K and V tiles; q, go: the
  // query rows' Q and dO tiles (as T).
  auto tile_grads = [&](int64_t bh, int64_t q0, int64_t nq, int64_t k0, int64_t nk, const T* kt, const T* vt,
                        const T* q, const T* go, uint32_t head_key, T* z, T* ds) {
    tile_dot(q, nq, D, kt, kBK, a.scale, z);       // S
    tile_dot(go, nq, D, vt, kBK, T(1), ds);        // dZ = dO V^T
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t row = q0 + i;
      const int64_t ncols = std::max<int64_t>(0, std::min(nk, visible_cols(a, row) - k0));
      T* zrow = z + i * kBK;
      T* dsrow = ds + i * kBK;
      exp_shifted(zrow, ncols, lse[bh * Tq + row]);  // P
      const T dlt = delta[bh * Tq + row];
      if (a.threshold) {
        const uint32_t row_key = dropout_row_key(head_key, static_cast<uint32_t>(row + off));
        for (int64_t j = 0; j < ncols; ++j) {
          const bool keep = dropout_keep(row_key, static_cast<uint32_t>(k0 + j), a.threshold);
          const T dp = keep ? dsrow[j] * a.keep_scale : T(0);
          dsrow[j] = zrow[j] * (dp - dlt) * a.scale;
          zrow[j] = keep ? zrow[j] * a.keep_scale : T(0);
        }
      } else {
        for (int64_t j = 0; j < ncols; ++j) dsrow[j] = zrow[j] * (dsrow[j] - dlt) * a.scale;
      }
      std::fill(zrow + ncols, zrow + kBK, T(0));
      std::fill(dsrow + ncols, dsrow + kBK, T(0));
    }
  };

  const int64_t n_kt = (Tk + kBK - 1) / kBK;
  if (BH >= 2 * at::get_num_threads()) {
    // One pass, one task per head: key tiles in order, for each the query tiles that see it.
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
      ScratchTile<T> kt(D * kBK), vt(D * kBK), z(kBQ * kBK), ds(kBQ * kBK), dk_acc(kBK * D), dv_acc(kBK * D);
      // 16-bit storage: the Q, dO and K tiles as float32, and the head's dQ summed in float32
      ScratchTile<T> q_buf(kConvert ? kBQ * D : 0), go_buf(kConvert ? kBQ * D : 0), k_buf(kConvert ? kBK * D : 0),
          dq_buf(kConvert ? Tq * D : 0);
      for (int64_t bh = begin; bh < end; ++bh) {
        const uint32_t head_key = dropout_head_key(a.seed, static_cast<uint32_t>(bh));
        T* dq_head;
        if constexpr (kConvert) dq_head = dq_buf.data(); else dq_head = dq + bh * Tq * D;
        std::fill(dq_head, dq_head + Tq * D, T(0));
        for (int64_t k0 = 0; k0 < Tk; k0 += kBK) {
          const int64_t nk = std::min(kBK, Tk - k0);
          load_transposed(a.k + bh * Tk * D, k0, nk, D, kt.data());
          load_transposed(a.v + bh * Tk * D, k0, nk, D, vt.data());
          std::fill(dk_acc.begin(), dk_acc.end(), T(0));
          std::fill(dv_acc.begin(), dv_acc.end(), T(0));
          const int64_t first_row = a.causal ? std::max<int64_t>(0, k0 - off) : 0;
          const T* k_rows = as_acc(a.k + (bh * Tk + k0) * D, nk * D, k_buf.data());
          for (int64_t q0 = (first_row / kBQ) * kBQ; q0 < Tq; q0 += kBQ) {
            const int64_t nq = std::min(kBQ, Tq - q0);
            const T* q = as_acc(a.q + (bh * Tq + q0) * D, nq * D, q_buf.data());
            const T* go = as_acc(dout + (bh * Tq + q0) * D, nq * D, go_buf.data());
            tile_grads(bh, q0, nq, k0, nk, kt.data(), vt.data(), q, go, head_key, z.data(), ds.data());
            tile_accumulate(z.data(), 1, kBK, nk, nq, go, D, dv_acc.data());                 // dV += Z^T dO
            tile_accumulate(ds.data(), 1, kBK, nk, nq, q, D, dk_acc.data());                 // dK += dS^T Q
            tile_accumulate(ds.data(), kBK, 1, nq, nk, k_rows, D, dq_head + q0 * D);         // dQ += dS K
          }
          at::vec::convert(dk_acc.data(), dk + (bh * Tk + k0) * D, nk * D);
          at::vec::convert(dv_acc.data(), dv + (bh * Tk + k0) * D, nk * D);
        }
        if constexpr (kConvert) at::vec::convert(dq_head, dq + bh * Tq * D, Tq * D);
      }
    });
    return;
  }

  // Few heads: two passes. Pass 1: dK, dV, one task per (bh, key tile); query tiles from the diagonal down.
  at::parallel_for(0, BH * n_kt, 1, [&](int64_t begin, int64_t end) {
    ScratchTile<T> kt(D * kBK), vt(D * kBK), z(kBQ * kBK), ds(kBQ * kBK), dk_acc(kBK * D), dv_acc(kBK * D);
    ScratchTile<T> q_buf(kConvert ? kBQ * D : 0), go_buf(kConvert ? kBQ * D : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_kt, k0 = (task % n_kt) * kBK, nk = std::min(kBK, Tk - k0);
      const uint32_t head_key = dropout_head_key(a.seed, static_cast<uint32_t>(bh));
      load_transposed(a.k + bh * Tk * D, k0, nk, D, kt.data());
      load_transposed(a.v + bh * Tk * D, k0, nk, D, vt.data());
      std::fill(dk_acc.begin(), dk_acc.end(), T(0));
      std::fill(dv_acc.begin(), dv_acc.end(), T(0));
      // causal: query rows before k0 - off see none of these keys
      const int64_t first_row = a.causal ? std::max<int64_t>(0, k0 - off) : 0;
      for (int64_t q0 = (first_row / kBQ) * kBQ; q0 < Tq; q0 += kBQ) {
        const int64_t nq = std::min(kBQ, Tq - q0);
        const T* q = as_acc(a.q + (bh * Tq + q0) * D, nq * D, q_buf.data());
        const T* go = as_acc(dout + (bh * Tq + q0) * D, nq * D, go_buf.data());
        tile_grads(bh, q0, nq, k0, nk, kt.data(), vt.data(), q, go, head_key, z.data(), ds.data());
        tile_accumulate(z.data(), 1, kBK, nk, nq, go, D, dv_acc.data());  // dV += Z^T dO
        tile_accumulate(ds.data(), 1, kBK, nk, nq, q, D, dk_acc.data());  // dK += dS^T Q
      }
      at::vec::convert(dk_acc.data(), dk + (bh * Tk + k0) * D, nk * D);
      at::vec::convert(dv_acc.data(), dv + (bh * Tk + k0) * D, nk * D);
    }
  });

  // Pass 2: dQ, one task per (bh, query tile); key tiles up to the diagonal.
  const int64_t n_qt = (Tq + kBQ - 1) / kBQ;
  at::parallel_for(0, BH * n_qt, 1, [&](int64_t begin, int64_t end) {
    ScratchTile<T> kt(D * kBK), vt(D * kBK), z(kBQ * kBK), ds(kBQ * kBK);
    ScratchTile<T> q_buf(kConvert ? kBQ * D : 0), go_buf(kConvert ? kBQ * D : 0), k_buf(kConvert ? kBK * D : 0),
        dq_buf(kConvert ? kBQ * D : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_qt, q0 = (task % n_qt) * kBQ, nq = std::min(kBQ, Tq - q0);
      const uint32_t head_key = dropout_head_key(a.seed, static_cast<uint32_t>(bh));
      T* dq_tile;
      if constexpr (kConvert) dq_tile = dq_buf.data(); else dq_tile = dq + (bh * Tq + q0) * D;
      std::fill(dq_tile, dq_tile + nq * D, T(0));
      const T* q = as_acc(a.q + (bh * Tq + q0) * D, nq * D, q_buf.data());
      const T* go = as_acc(dout + (bh * Tq + q0) * D, nq * D, go_buf.data());
      const int64_t kv_end = a.causal ? std::min(Tk, q0 + nq + off) : Tk;
      for (int64_t k0 = 0; k0 < kv_end; k0 += kBK) {
        const int64_t nk = std::min(kBK, kv_end - k0);
        load_transposed(a.k + bh * Tk * D, k0, nk, D, kt.data());
        load_transposed(a.v + bh * Tk * D, k0, nk, D, vt.data());
        tile_grads(bh, q0, nq, k0, nk, kt.data(), vt.data(), q, go, head_key, z.data(), ds.data());
        tile_accumulate(ds.data(), kBK, 1, nq, nk, as_acc(a.k + (bh * Tk + k0) * D, nk * D, k_buf.data()), D,
                        dq_tile);                                                          // dQ += dS K
      }
      if constexpr (kConvert) at::vec::convert(dq_tile, dq + (bh * Tq + q0) * D, nq * D);
    }
  });
}

// Forward for a few query rows: decoding with a KV cache (Tq = 1 new position against Tk cached ones).
// The tiled kernel would transpose all of K into a padded copy on every call (a pass over the whole
// cache, per layer and token) and fill 32-row tiles with one row. Here each query row reads the K and
// V rows where they lie: row-major within a head, at the head and batch strides of the tensors, so a
// prefix slice of a preallocated cache is not copied either. s_j = scale q.k_j over the visible keys,
// then the softmax and o = sum_j p_j v_j, with the tiled kernel's lse and dropout (same hash; the
// normalizer sums the weights before dropout, as there).
constexpr int64_t kRowsKernelMaxQ = 8;   // calls with up to this many query rows take it

struct HeadStrides {          // element strides of a (B, H, T, D) tensor whose rows are D apart
  int64_t b, h;
};

// s[j] = alpha * dot(q, k + j * D) for j < n, q already in T. Four keys at a time: four independent
// FMA chains instead of one.
template <typename S, typename T>
void row_scores(const T* q, const S* k, int64_t n, int64_t D, T alpha, T* s) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t Dv = D / V * V;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const S *k0 = k + j * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
    Vec a0(0), a1(0), a2(0), a3(0);
    for (int64_t d = 0; d < Dv; d += V) {
      const Vec qv = Vec::loadu(q + d);
      a0 = at::vec::fmadd(qv, load_acc(k0 + d), a0);
      a1 = at::vec::fmadd(qv, load_acc(k1 + d), a1);
      a2 = at::vec::fmadd(qv, load_acc(k2 + d), a2);
      a3 = at::vec::fmadd(qv, load_acc(k3 + d), a3);
    }
    T d0 = sum_lanes(a0), d1 = sum_lanes(a1), d2 = sum_lanes(a2), d3 = sum_lanes(a3);
    for (int64_t d = Dv; d < D; ++d) {
      d0 += q[d] * T(k0[d]);
      d1 += q[d] * T(k1[d]);
      d2 += q[d] * T(k2[d]);
      d3 += q[d] * T(k3[d]);
    }
    s[j] = alpha * d0, s[j + 1] = alpha * d1, s[j + 2] = alpha * d2, s[j + 3] = alpha * d3;
  }
  for (; j < n; ++j) {
    const S* kj = k + j * D;
    Vec acc(0);
    for (int64_t d = 0; d < Dv; d += V) acc = at::vec::fmadd(Vec::loadu(q + d), load_acc(kj + d), acc);
    T dot = sum_lanes(acc);
    for (int64_t d = Dv; d < D; ++d) dot += q[d] * T(kj[d]);
    s[j] = alpha * dot;
  }
}

// out[0..D) += sum_{j < n} w[j] * v[j * D + 0..D), a vector of out held in a register over j.
template <typename S, typename T>
void row_weighted_sum(const T* w, const S* v, int64_t n, int64_t D, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  int64_t d = 0;
  for (; d + V <= D; d += V) {
    Vec acc = Vec::loadu(out + d);
    for (int64_t j = 0; j < n; ++j) acc = at::vec::fmadd(Vec(w[j]), load_acc(v + j * D + d), acc);
    acc.store(out + d);
  }
  for (; d < D; ++d) {
    T acc = out[d];
    for (int64_t j = 0; j < n; ++j) acc += w[j] * T(v[j * D + d]);
    out[d] = acc;
  }
}

// One head (index bh) of attention_fwd_rows_kernel: its query rows against the keys and values at k
// and v (rows D apart), into o (that head's Tq x D) and lse (Tq). Scratch s (Tq * Tk), q and acc (Tq * D).
template <typename S, typename T = acc_t<S>>
void attention_rows_head(const AttnArgs<S>& a, int64_t bh, const S* k, const S* v, const S* q_in, S* o, T* lse,
                         T* s, T* q, T* acc) {
  const int64_t Tq = a.Tq, Tk = a.Tk, off = a.Tk - a.Tq, D = a.D;
  for (int64_t i = 0; i < Tq * D; ++i) q[i] = static_cast<T>(q_in[i]);
  int64_t n[kRowsKernelMaxQ] = {};                                   // visible keys per row, >= 1
  for (int64_t r = 0; r < Tq; ++r) n[r] = std::min(Tk, visible_cols(a, r));
  for (int64_t k0 = 0; k0 < n[Tq - 1]; k0 += kBK)                  // S = scale Q K^T
    for (int64_t r = 0; r < Tq; ++r)
      if (k0 < n[r]) row_scores(q + r * D, k + k0 * D, std::min(kBK, n[r] - k0), D, a.scale, s + r * Tk + k0);
  T l[kRowsKernelMaxQ];
  for (int64_t r = 0; r < Tq; ++r) {                                 // softmax numerators, lse
    T* srow = s + r * Tk;
    const T m = row_max(srow, n[r], -std::numeric_limits<T>::infinity());
    l[r] = exp_shifted(srow, n[r], m);
    lse[r] = m + std::log(l[r]);
    if (a.threshold) {                                               // dropout after softmax
      const uint32_t row_key = dropout_row_key(dropout_head_key(a.seed, static_cast<uint32_t>(bh)),
                                               static_cast<uint32_t>(r + off));
      for (int64_t j = 0; j < n[r]; ++j)
        srow[j] = dropout_keep(row_key, static_cast<uint32_t>(j), a.threshold) ? srow[j] * a.keep_scale : T(0);
    }
  }
  std::fill(acc, acc + Tq * D, T(0));
  for (int64_t k0 = 0; k0 < n[Tq - 1]; k0 += kBK)                  // O = P V
    for (int64_t r = 0; r < Tq; ++r)
      if (k0 < n[r]) row_weighted_sum(s + r * Tk + k0, v + k0 * D, std::min(kBK, n[r] - k0), D, acc + r * D);
  for (int64_t r = 0; r < Tq; ++r) {
    const T inv_l = T(1) / l[r];
    S* out = o + r * D;
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<S>(acc[r * D + d] * inv_l);
  }
}

template <typename S, typename T = acc_t<S>>
void attention_fwd_rows_kernel(const AttnArgs<S>& a, int64_t B, int64_t H, HeadStrides ks, HeadStrides vs,
                               S* o, T* lse) {
  const int64_t Tq = a.Tq, Tk = a.Tk, D = a.D;
  // One task per head, its (up to kRowsKernelMaxQ) query rows together, keys in chunks of kBK: each
  // chunk of K (then of V) comes from memory once and from L1 for the head's other rows.
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    ScratchTile<T> s(Tq * Tk), q(Tq * D), acc(Tq * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      attention_rows_head(a, bh, a.k + b * ks.b + h * ks.h, a.v + b * vs.b + h * vs.h, a.q + bh * Tq * D,
                          o + bh * Tq * D, lse + bh * Tq, s.data(), q.data(), acc.data());
    }
  });
}

// t itself when each head's rows are D elements apart (contiguous, or a prefix slice along T of a
// longer cache: only the batch and head strides differ), else a contiguous copy
at::Tensor rows_d_apart(const at::Tensor& t) {
  return t.stride(3) == 1 && t.stride(2) == t.size(3) ? t : t.contiguous();
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
                     static_cast<uint64_t>(seed.item<int64_t>())};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, bool causal, double scale,
                                                     double dropout_p, const at::Tensor& seed) {
  check_qkv(q_in, k_in, v_in, dropout_p, seed);
  const int64_t B = q_in.size(0), H = q_in.size(1), T_ = q_in.size(2);
  const at::Tensor q = q_in.contiguous();
  at::Tensor o = at::empty_like(q);
  at::Tensor lse = at::empty({B, H, T_}, q.options().dtype(stat_dtype(q.scalar_type())));
  if (T_ <= kRowsKernelMaxQ) {              // decoding: K and V read in place, no transposed copy
    const at::Tensor k = rows_d_apart(k_in), v = rows_d_apart(v_in);
    maybe_poison(o), maybe_poison(lse);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd_rows_cpu", [&] {
      using T = acc_t<scalar_t>;
      auto a = make_args<scalar_t>(q, k, v, causal, scale, dropout_p, seed);
      attention_fwd_rows_kernel<scalar_t>(a, B, H, {k.stride(0), k.stride(1)}, {v.stride(0), v.stride(1)},
                                          o.data_ptr<scalar_t>(), lse.data_ptr<T>());
    });
    return {o, lse};
  }
  const at::Tensor k = k_in.contiguous(), v = v_in.contiguous();
  // K^T per head, (B, H, D, Tk rounded up to whole key tiles), the padding zeros: one transposing
  // copy here instead of one per (query tile, key tile) pair in the kernel
  const int64_t Tk = k.size(2), Tk_pad = (Tk + kBK - 1) / kBK * kBK;
  // (in the statistics dtype: for 16-bit K this copy is also the conversion to float32)
  at::Tensor kt = at::zeros({B, H, k.size(3), Tk_pad}, k.options().dtype(stat_dtype(k.scalar_type())));
  kt.narrow(3, 0, Tk).copy_(k.transpose(2, 3));
  maybe_poison(o), maybe_poison(lse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd_cpu", [&] {
    using T = acc_t<scalar_t>;
    auto a = make_args<scalar_t>(q, k, v, causal, scale, dropout_p, seed);
    a.kt = kt.data_ptr<T>();
    a.ldkt = kt.size(3);
    attention_fwd_kernel<scalar_t>(a, B * H, o.data_ptr<scalar_t>(), lse.data_ptr<T>());
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& o_in, const at::Tensor& lse_in, bool causal, double scale, double dropout_p,
    const at::Tensor& seed) {
  check_qkv(q_in, k_in, v_in, dropout_p, seed);
  check_attention_bwd_args(dout_in, o_in, lse_in, q_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(),
                   dout = dout_in.contiguous(), o = o_in.contiguous(), lse = lse_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T_ = q.size(2), D = q.size(3);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor delta = at::empty({B, H, T_}, lse.options());
  maybe_poison(dq), maybe_poison(dk), maybe_poison(dv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_bwd_cpu", [&] {
    using T = acc_t<scalar_t>;
    const scalar_t *pdo = dout.data_ptr<scalar_t>(), *po = o.data_ptr<scalar_t>();
    T* pdelta = delta.data_ptr<T>();
    at::parallel_for(0, B * H * T_, 256, [&](int64_t begin, int64_t end) {  // Delta = rowsum(dO * O)
      for (int64_t r = begin; r < end; ++r) {
        T s = 0;
        for (int64_t d = 0; d < D; ++d) s += static_cast<T>(pdo[r * D + d]) * static_cast<T>(po[r * D + d]);
        pdelta[r] = s;
      }
    });
    auto a = make_args<scalar_t>(q, k, v, causal, scale, dropout_p, seed);
    attention_bwd_kernel<scalar_t>(a, B * H, pdo, lse.data_ptr<T>(), pdelta,
                                   dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace

void attention_last_row_f32(const float* q, const float* k, const float* v, int64_t n_keys, int64_t D, float scale,
                            float* out, float* scratch) {
  AttnArgs<float> a{q, k, v, nullptr, 0, /*Tq=*/1, /*Tk=*/n_keys, D, /*causal=*/true, scale, 0.0, 1.0f, 0u, 0};
  float lse;
  attention_rows_head<float>(a, 0, k, v, q, out, &lse, scratch, scratch + n_keys, scratch + n_keys + D);
}

static void attention_kernels(torch::Library& m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}
GPTFAST_CPU_KERNELS(attention_kernels);

}  // namespace gptfast
