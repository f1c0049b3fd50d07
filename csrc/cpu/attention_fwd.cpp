// Causal (or full) scaled dot-product attention on CPU, FlashAttention-style: the forward (the backward:
// attention_bwd.cpp; calls with a few query rows, decoding: attention_decode.cpp).
//
// q, o: (B, H, T, D), k, v: (B, Hk, T, D) contiguous, Hk dividing H (grouped-query attention: query head h
// reads K/V head h / (H / Hk), no repeated copies); lse: (B, H, T). The (T, T) score matrix is never built:
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
#include "../dropout_hash.h"
#include "kernels.h"
#include "vec_io.h"
#include "attention_tiles.h"

#ifndef GPTFAST_ISA_MODULE   // the schemas once, in gptfast._C (the AVX-512 module adds kernels only)
TORCH_LIBRARY_FRAGMENT(gptfast, m) {
  // Scaled dot-product attention: q (B, H, T, D), k and v (B, Hk, Tk, D) with Hk dividing H (grouped-query);
  // lse (B, H, T) is the softmax log-normalizer.
  // seed: a one-element int64 tensor (a tensor, not an int, so drawing it stays inside a
  // torch.compile graph); it keys the counter-based dropout RNG of csrc/dropout_hash.h.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, float dropout_p, Tensor seed) -> (Tensor o, Tensor lse)");
}
#endif

namespace gptfast {
namespace {

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
      const int64_t kvh = bh / a.group;                                   // its key/value head
      const S* v = a.v + kvh * Tk * D;
      const T* q_tile = as_acc(a.q + (bh * Tq + q0) * D, nq * D, q_buf.data());
      const uint32_t head_key = dropout_head_key(a.seed, static_cast<uint32_t>(bh));
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(m, m + kBQ, -std::numeric_limits<T>::infinity());
      std::fill(l, l + kBQ, T(0));
      const int64_t kv_end = a.causal ? std::min(Tk, q0 + nq + off) : Tk;
      for (int64_t k0 = 0; k0 < kv_end; k0 += kBK) {
        const int64_t nk = std::min(kBK, kv_end - k0);
        tile_dot(q_tile, nq, D, a.kt + kvh * D * a.ldkt + k0, a.ldkt, a.scale, s.data());  // S = scale Q K^T
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, bool causal, double scale,
                                                     double dropout_p, const at::Tensor& seed) {
  check_qkv(q_in, k_in, v_in, dropout_p, seed);
  const int64_t B = q_in.size(0), H = q_in.size(1), T_ = q_in.size(2);
  const at::Tensor q = q_in.contiguous();
  if (T_ <= kRowsKernelMaxQ)                 // decoding: K and V read in place, no transposed copy
    return attention_fwd_rows_cpu(q, k_in, v_in, causal, scale, dropout_p, seed);
  at::Tensor o = at::empty_like(q);
  at::Tensor lse = at::empty({B, H, T_}, q.options().dtype(stat_dtype(q.scalar_type())));
  const at::Tensor k = k_in.contiguous(), v = v_in.contiguous();
  // K^T per head, (B, H, D, Tk rounded up to whole key tiles), the padding zeros: one transposing
  // copy here instead of one per (query tile, key tile) pair in the kernel
  const int64_t Tk = k.size(2), Tk_pad = (Tk + kBK - 1) / kBK * kBK;
  // (in the statistics dtype: for 16-bit K this copy is also the conversion to float32)
  at::Tensor kt = at::zeros({B, k.size(1), k.size(3), Tk_pad}, k.options().dtype(stat_dtype(k.scalar_type())));
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

static void attention_fwd_kernels(torch::Library& m) { m.impl("attention_fwd", &attention_fwd_cpu); }
GPTFAST_CPU_KERNELS(attention_fwd_kernels);

}  // namespace gptfast
