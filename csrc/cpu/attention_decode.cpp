// Attention for a few query rows on CPU: decoding with a KV cache (attention_fwd.cpp sends calls with at most
// kRowsKernelMaxQ query rows here), and one row of it for the fused decoding block (decode_parts.h).
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
#include "attention_tiles.h"

namespace gptfast {
namespace {

// Forward for a few query rows: decoding with a KV cache (Tq = 1 new position against Tk cached ones).
// The tiled kernel would transpose all of K into a padded copy on every call (a pass over the whole
// cache, per layer and token) and fill 32-row tiles with one row. Here each query row reads the K and
// V rows where they lie: row-major within a head, at the head and batch strides of the tensors, so a
// prefix slice of a preallocated cache is not copied either. s_j = scale q.k_j over the visible keys,
// then the softmax and o = sum_j p_j v_j, with the tiled kernel's lse and dropout (same hash; the
// normalizer sums the weights before dropout, as there).
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
      const int64_t b = bh / H, kvh = (bh % H) / a.group;              // grouped-query: the shared K/V head
      attention_rows_head(a, bh, a.k + b * ks.b + kvh * ks.h, a.v + b * vs.b + kvh * vs.h, a.q + bh * Tq * D,
                          o + bh * Tq * D, lse + bh * Tq, s.data(), q.data(), acc.data());
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_rows_cpu(const at::Tensor& q, const at::Tensor& k_in,
                                                          const at::Tensor& v_in, bool causal, double scale,
                                                          double dropout_p, const at::Tensor& seed) {
  const int64_t B = q.size(0), H = q.size(1);
  const at::Tensor k = rows_d_apart(k_in), v = rows_d_apart(v_in);
  at::Tensor o = at::empty_like(q);
  at::Tensor lse = at::empty({B, H, q.size(2)}, q.options().dtype(stat_dtype(q.scalar_type())));
  maybe_poison(o), maybe_poison(lse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd_rows_cpu", [&] {
    using T = acc_t<scalar_t>;
    auto a = make_args<scalar_t>(q, k, v, causal, scale, dropout_p, seed);
    attention_fwd_rows_kernel<scalar_t>(a, B, H, {k.stride(0), k.stride(1)}, {v.stride(0), v.stride(1)},
                                        o.data_ptr<scalar_t>(), lse.data_ptr<T>());
  });
  return {o, lse};
}

void attention_last_row_f32(const float* q, const float* k, const float* v, int64_t n_keys, int64_t D, float scale,
                            float* out, float* scratch) {
  AttnArgs<float> a{q, k, v, nullptr, 0, /*Tq=*/1, /*Tk=*/n_keys, D, /*causal=*/true, scale, 0.0, 1.0f, 0u, 0};
  float lse;
  attention_rows_head<float>(a, 0, k, v, q, out, &lse, scratch, scratch + n_keys, scratch + n_keys + D);
}

}  // namespace gptfast
