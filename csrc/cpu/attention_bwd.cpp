// The backward of the CPU attention (attention_fwd.cpp): probabilities recomputed tile by tile from the saved
// log-sum-exp, never stored.
//   O = Z V, Z = P * M / (1 - p);  dV = Z^T dO;  dZ = dO V^T;  dP = dZ * M / (1 - p);
//   dS = P * (dP - Delta), Delta = rowsum(dO * O);  dQ = scale dS K;  dK = scale dS^T Q.
// With enough heads to keep every thread busy it makes one pass per key/value head: each tile pair's S, P and dS
// are computed once and feed dV, dK and dQ together (a head's dQ, and a key/value head's dK and dV summed over the
// query heads that read it, belong to one task, so no two threads add into the same output). With few heads it makes two deterministic passes, one parallel over key tiles (dK, dV) and one
// over query tiles (dQ). Each pass walks the same (query tile, key tile) step, `tile_pair` below, written once.
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
  // The gradients of attention_fwd's o for q, k, v from dout, the forward's o and lse (the weights recomputed).
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal, float scale, float dropout_p, Tensor seed) -> (Tensor dq, Tensor dk, Tensor dv)");
}
#endif

namespace gptfast {
namespace {

// What one thread of the backward works with: its scratch tiles, the head it is on, and where the gradients of a
// (query tile, key tile) pair go.
template <typename S, typename T = acc_t<S>>
struct BwdWork {
  static constexpr bool kConvert = !std::is_same_v<S, T>;
  const AttnArgs<S>& a;
  const S* dout;
  const T *lse, *delta;
  ScratchTile<T> kt, vt, z, ds, q_buf, go_buf, k_buf;   // 16-bit storage: the Q, dO and K tiles as float32
  int64_t bh = 0, kvh = 0;                                // the query head, and the key/value head it reads
  uint32_t head_key = 0;
  const T* k_rows = nullptr;                              // the loaded key tile's K rows (as T)

  BwdWork(const AttnArgs<S>& args, const S* dout_, const T* lse_, const T* delta_)
      : a(args), dout(dout_), lse(lse_), delta(delta_), kt(args.D * kBK), vt(args.D * kBK), z(kBQ * kBK),
        ds(kBQ * kBK), q_buf(kConvert ? kBQ * args.D : 0), go_buf(kConvert ? kBQ * args.D : 0),
        k_buf(kConvert ? kBK * args.D : 0) {}

  void start_head(int64_t head) {
    bh = head;
    kvh = head / a.group;
    head_key = dropout_head_key(a.seed, static_cast<uint32_t>(bh));
  }

  void load_key_tile(int64_t k0, int64_t nk) {            // K and V of keys [k0, k0 + nk), transposed; K's rows
    load_transposed(a.k + kvh * a.Tk * a.D, k0, nk, a.D, kt.data());
    load_transposed(a.v + kvh * a.Tk * a.D, k0, nk, a.D, vt.data());
    k_rows = as_acc(a.k + (kvh * a.Tk + k0) * a.D, nk * a.D, k_buf.data());
  }

  // P = exp(S - lse) into z (then Z = dropout(P)) and dS * scale into ds, both (kBQ x kBK), zero outside the
  // valid (causal, in-range) entries of query rows [q0, q0 + nq) x keys [k0, k0 + nk).
  void tile_grads(int64_t q0, int64_t nq, int64_t k0, int64_t nk, const T* q, const T* go) {
    const int64_t off = a.Tk - a.Tq;
    tile_dot(q, nq, a.D, kt.data(), kBK, a.scale, z.data());       // S
    tile_dot(go, nq, a.D, vt.data(), kBK, T(1), ds.data());        // dZ = dO V^T
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t row = q0 + i;
      const int64_t ncols = std::max<int64_t>(0, std::min(nk, visible_cols(a, row) - k0));
      T* zrow = z.data() + i * kBK;
      T* dsrow = ds.data() + i * kBK;
      exp_shifted(zrow, ncols, lse[bh * a.Tq + row]);  // P
      const T dlt = delta[bh * a.Tq + row];
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
  }

  // One (query tile, key tile) pair, the key tile loaded: its P and dS, then dV += Z^T dO and dK += dS^T Q into
  // dk_acc/dv_acc (kBK x D) where given, dQ += dS K into dq_rows (the tile's nq x D) where given.
  void tile_pair(int64_t q0, int64_t k0, int64_t nk, T* dk_acc, T* dv_acc, T* dq_rows) {
    const int64_t nq = std::min(kBQ, a.Tq - q0), D = a.D;
    const T* q = as_acc(a.q + (bh * a.Tq + q0) * D, nq * D, q_buf.data());
    const T* go = as_acc(dout + (bh * a.Tq + q0) * D, nq * D, go_buf.data());
    tile_grads(q0, nq, k0, nk, q, go);
    if (dv_acc) tile_accumulate(z.data(), 1, kBK, nk, nq, go, D, dv_acc);                       // dV += Z^T dO
    if (dk_acc) tile_accumulate(ds.data(), 1, kBK, nk, nq, q, D, dk_acc);                       // dK += dS^T Q
    if (dq_rows) tile_accumulate(ds.data(), kBK, 1, nq, nk, k_rows, D, dq_rows);                  // dQ += dS K
  }

  // The first query tile that sees key k0 (causal: rows before k0 - off see none of these keys).
  int64_t first_query_tile(int64_t k0) const {
    const int64_t first_row = a.causal ? std::max<int64_t>(0, k0 - (a.Tk - a.Tq)) : 0;
    return first_row / kBQ * kBQ;
  }
};

// One pass, one task per key/value head: key tiles in order, for each the query tiles of every query head reading
// it (grouped-query: group heads; else one) that see it; dK, dV and dQ together. dK and dV of a key tile sum over
// the group's heads in a fixed order, in one task: no two threads add into the same output.
template <typename S, typename T = acc_t<S>>
void backward_by_head(const AttnArgs<S>& a, int64_t BH, const S* dout, const T* lse, const T* delta, S* dq, S* dk,
                      S* dv) {
  const int64_t Tq = a.Tq, Tk = a.Tk, D = a.D, G = a.group;
  at::parallel_for(0, BH / G, 1, [&](int64_t begin, int64_t end) {
    BwdWork<S> w(a, dout, lse, delta);
    ScratchTile<T> dk_acc(kBK * D), dv_acc(kBK * D), dq_buf(BwdWork<S>::kConvert ? G * Tq * D : 0);  // dQ in float32
    for (int64_t kvh = begin; kvh < end; ++kvh) {
      auto dq_head = [&](int64_t g) -> T* {
        if constexpr (BwdWork<S>::kConvert) return dq_buf.data() + g * Tq * D; else return dq + (kvh * G + g) * Tq * D;
      };
      for (int64_t g = 0; g < G; ++g) std::fill(dq_head(g), dq_head(g) + Tq * D, T(0));
      for (int64_t k0 = 0; k0 < Tk; k0 += kBK) {
        const int64_t nk = std::min(kBK, Tk - k0);
        w.start_head(kvh * G);
        w.load_key_tile(k0, nk);
        std::fill(dk_acc.begin(), dk_acc.end(), T(0));
        std::fill(dv_acc.begin(), dv_acc.end(), T(0));
        for (int64_t g = 0; g < G; ++g) {
          w.start_head(kvh * G + g);
          for (int64_t q0 = w.first_query_tile(k0); q0 < Tq; q0 += kBQ)
            w.tile_pair(q0, k0, nk, dk_acc.data(), dv_acc.data(), dq_head(g) + q0 * D);
        }
        at::vec::convert(dk_acc.data(), dk + (kvh * Tk + k0) * D, nk * D);
        at::vec::convert(dv_acc.data(), dv + (kvh * Tk + k0) * D, nk * D);
      }
      if constexpr (BwdWork<S>::kConvert)
        for (int64_t g = 0; g < G; ++g) at::vec::convert(dq_head(g), dq + (kvh * G + g) * Tq * D, Tq * D);
    }
  });
}

// Few heads: pass 1, dK and dV, one task per (key/value head, key tile); for each query head reading it, query
// tiles from the diagonal down.
template <typename S, typename T = acc_t<S>>
void backward_dk_dv(const AttnArgs<S>& a, int64_t BH, const S* dout, const T* lse, const T* delta, S* dk, S* dv) {
  const int64_t Tq = a.Tq, Tk = a.Tk, D = a.D, G = a.group, n_kt = (Tk + kBK - 1) / kBK;
  at::parallel_for(0, BH / G * n_kt, 1, [&](int64_t begin, int64_t end) {
    BwdWork<S> w(a, dout, lse, delta);
    ScratchTile<T> dk_acc(kBK * D), dv_acc(kBK * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kvh = task / n_kt, k0 = (task % n_kt) * kBK, nk = std::min(kBK, Tk - k0);
      w.start_head(kvh * G);
      w.load_key_tile(k0, nk);
      std::fill(dk_acc.begin(), dk_acc.end(), T(0));
      std::fill(dv_acc.begin(), dv_acc.end(), T(0));
      for (int64_t g = 0; g < G; ++g) {
        w.start_head(kvh * G + g);
        for (int64_t q0 = w.first_query_tile(k0); q0 < Tq; q0 += kBQ)
          w.tile_pair(q0, k0, nk, dk_acc.data(), dv_acc.data(), nullptr);
      }
      at::vec::convert(dk_acc.data(), dk + (kvh * Tk + k0) * D, nk * D);
      at::vec::convert(dv_acc.data(), dv + (kvh * Tk + k0) * D, nk * D);
    }
  });
}

// Few heads: pass 2, dQ, one task per (head, query tile); key tiles up to the diagonal.
template <typename S, typename T = acc_t<S>>
void backward_dq(const AttnArgs<S>& a, int64_t BH, const S* dout, const T* lse, const T* delta, S* dq) {
  const int64_t Tq = a.Tq, Tk = a.Tk, off = a.Tk - a.Tq, D = a.D, n_qt = (Tq + kBQ - 1) / kBQ;
  at::parallel_for(0, BH * n_qt, 1, [&](int64_t begin, int64_t end) {
    BwdWork<S> w(a, dout, lse, delta);
    ScratchTile<T> dq_buf(BwdWork<S>::kConvert ? kBQ * D : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_qt, q0 = (task % n_qt) * kBQ, nq = std::min(kBQ, Tq - q0);
      w.start_head(bh);
      T* dq_tile;
      if constexpr (BwdWork<S>::kConvert) dq_tile = dq_buf.data(); else dq_tile = dq + (bh * Tq + q0) * D;
      std::fill(dq_tile, dq_tile + nq * D, T(0));
      const int64_t kv_end = a.causal ? std::min(Tk, q0 + nq + off) : Tk;
      for (int64_t k0 = 0; k0 < kv_end; k0 += kBK) {
        const int64_t nk = std::min(kBK, kv_end - k0);
        w.load_key_tile(k0, nk);
        w.tile_pair(q0, k0, nk, nullptr, nullptr, dq_tile);
      }
      if constexpr (BwdWork<S>::kConvert) at::vec::convert(dq_tile, dq + (bh * Tq + q0) * D, nq * D);
    }
  });
}

template <typename S, typename T = acc_t<S>>
void attention_bwd_kernel(const AttnArgs<S>& a, int64_t BH, const S* dout, const T* lse, const T* delta,
                          S* dq, S* dk, S* dv) {
  if (BH / a.group >= 2 * at::get_num_threads()) {
    backward_by_head(a, BH, dout, lse, delta, dq, dk, dv);
    return;
  }
  backward_dk_dv(a, BH, dout, lse, delta, dk, dv);
  backward_dq(a, BH, dout, lse, delta, dq);
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

static void attention_bwd_kernels(torch::Library& m) { m.impl("attention_bwd", &attention_bwd_cpu); }
GPTFAST_CPU_KERNELS(attention_bwd_kernels);

}  // namespace gptfast
