// RMSNorm forward/backward on CPU (Llama, Qwen3): rows in parallel, each row vectorized with at::vec.
//
// Forward, per row of C values: one pass for the sum of squares (two accumulator chains), rstd =
// 1 / sqrt(mean(x^2) + eps), then one pass writing y = x * rstd * weight. Only rstd (one float a row)
// is kept for the backward.
// Backward, with xhat = x * rstd and g = dy * weight: dx = rstd * (g - xhat * mean(g * xhat)) per row;
// dweight = sum over rows of dy * xhat, summed per fixed block of rows then the blocks in a fixed order
// (column_sums.h): the same bits whatever the thread count. bfloat16/float16 tensors are read and written
// as such; the math and the sums are float32 (vec_io.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>

#include "../common.h"
#include "column_sums.h"
#include "decode_parts.h"
#include "kernels.h"
#include "vec_io.h"

#ifndef GPTFAST_ISA_MODULE   // the schemas once, in gptfast._C (the AVX-512 module adds kernels only)
TORCH_LIBRARY_FRAGMENT(gptfast, m) {
  // RMSNorm over the last dim. rstd: one per row, float32 (float64 for float64 x).
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor dx, Tensor dweight)");
}
#endif

namespace gptfast {
namespace {

using at::vec::Vectorized;

template <typename T, typename A = acc_t<T>>
void rms_norm_fwd_row(const T* x, const T* w, T* y, A* rstd_out, int64_t C, double eps, bool stream) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  Vec vss0(0), vss1(0);
  int64_t i = 0;
  for (; i + 2 * V <= C; i += 2 * V) {
    Vec a = load_acc(x + i), b = load_acc(x + i + V);
    vss0 = at::vec::fmadd(a, a, vss0);
    vss1 = at::vec::fmadd(b, b, vss1);
  }
  for (; i + V <= C; i += V) {
    Vec a = load_acc(x + i);
    vss0 = at::vec::fmadd(a, a, vss0);
  }
  A ss = sum_lanes(vss0 + vss1);
  for (; i < C; ++i) ss += A(x[i]) * A(x[i]);
  const A rstd = A(1) / std::sqrt(ss / C + static_cast<A>(eps));
  *rstd_out = rstd;
  const Vec vrstd(rstd);
  if (stream) {      // C is a multiple of the vector width (can_stream)
    for (i = 0; i < C; i += V) store_acc_stream(load_acc(x + i) * vrstd * load_acc(w + i), y + i);
    return;
  }
  for (i = 0; i + V <= C; i += V) store_acc(load_acc(x + i) * vrstd * load_acc(w + i), y + i);
  for (; i < C; ++i) y[i] = static_cast<T>(A(x[i]) * rstd * A(w[i]));
}

template <typename T, typename A = acc_t<T>>
void rms_norm_bwd_row(const T* dy, const T* x, const T* w, A rstd, T* dx, A* dw_acc, int64_t C, bool stream) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Vec vrstd(rstd);
  Vec vgx(0);                                 // sum over the row of g * xhat
  int64_t i = 0;
  for (; i + V <= C; i += V) {
    Vec xhat = load_acc(x + i) * vrstd, dyv = load_acc(dy + i);
    vgx = at::vec::fmadd(dyv * load_acc(w + i), xhat, vgx);
    at::vec::fmadd(dyv, xhat, Vec::loadu(dw_acc + i)).store(dw_acc + i);
  }
  A sgx = sum_lanes(vgx);
  for (; i < C; ++i) {
    A xhat = A(x[i]) * rstd;
    sgx += A(dy[i]) * A(w[i]) * xhat;
    dw_acc[i] += A(dy[i]) * xhat;
  }
  const A c = sgx / C;
  const Vec vc(c);
  if (stream) {
    for (i = 0; i < C; i += V) {
      Vec xhat = load_acc(x + i) * vrstd;
      store_acc_stream(vrstd * (load_acc(dy + i) * load_acc(w + i) - xhat * vc), dx + i);
    }
    return;
  }
  for (i = 0; i + V <= C; i += V) {
    Vec xhat = load_acc(x + i) * vrstd;
    store_acc(vrstd * (load_acc(dy + i) * load_acc(w + i) - xhat * vc), dx + i);
  }
  for (; i < C; ++i) dx[i] = static_cast<T>(rstd * (A(dy[i]) * A(w[i]) - A(x[i]) * rstd * c));
}

void check_rms_args(const at::Tensor& x, const at::Tensor& weight) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must have a non-empty last dimension, got shape ", x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble || xt == at::kBFloat16 || xt == at::kHalf,
              "x: the CPU RMSNorm supports float32, float64, bfloat16 and float16, got ", xt);
  check_same(weight, "weight", x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight must have shape (", x.size(-1),
              ",) to match x's last dim, got ", weight.sizes());
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                    double eps) {
  check_rms_args(x_in, weight_in);
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t C = x.size(-1), N = x.numel() / C;
  at::Tensor y = at::empty_like(x);
  auto stat_sizes = x.sizes().vec();
  stat_sizes.pop_back();
  at::Tensor rstd = at::empty(stat_sizes, x.options().dtype(stat_dtype(x.scalar_type())));
  maybe_poison(y), maybe_poison(rstd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t *px = x.data_ptr<scalar_t>(), *pw = weight.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    A* pr = rstd.data_ptr<A>();
    const bool stream = can_stream(py, C, y.nbytes());
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_norm_fwd_row(px + r * C, pw, py + r * C, pr + r, C, eps, stream);
      if (stream) stream_fence();
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                    const at::Tensor& weight_in, const at::Tensor& rstd_in) {
  check_rms_args(x_in, weight_in);
  check_same(dy_in, "dy", x_in, "x");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "dy must have x's shape ", x_in.sizes(), ", got ", dy_in.sizes());
  const int64_t C = x_in.size(-1), N = x_in.numel() / C;
  check_stat(rstd_in, "rstd", x_in, stat_dtype(x_in.scalar_type()));
  TORCH_CHECK(rstd_in.numel() == N, "rstd must hold one value per row of x (", N, "), got ", rstd_in.numel());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous(),
                   rstd = rstd_in.contiguous();
  at::Tensor dx = at::empty_like(x), dweight = at::empty_like(weight);
  maybe_poison(dx), maybe_poison(dweight);
  const int64_t rows_in_block = rows_per_block(N);
  const int64_t n_blocks = (N + rows_in_block - 1) / rows_in_block;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t *pdy = dy.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>(), *pw = weight.data_ptr<scalar_t>();
    const A* pr = rstd.data_ptr<A>();
    scalar_t* pdx = dx.data_ptr<scalar_t>();
    thread_local PartialSums partial;         // dweight's partial sums, one row per block, zeroed by its thread
    A* pdw = static_cast<A*>(partial.get(sizeof(A) * std::max<int64_t>(n_blocks, 1) * C));
    const bool stream = can_stream(pdx, C, dx.nbytes());
    at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        std::fill(pdw + blk * C, pdw + (blk + 1) * C, A(0));
        const int64_t r_end = std::min(N, (blk + 1) * rows_in_block);
        for (int64_t r = blk * rows_in_block; r < r_end; ++r)
          rms_norm_bwd_row(pdy + r * C, px + r * C, pw, pr[r], pdx + r * C, pdw + blk * C, C, stream);
      }
      if (stream) stream_fence();
    });
    sum_blocks(pdw, n_blocks, C, dweight.data_ptr<scalar_t>());
  });
  return {dx, dweight};
}

}  // namespace

void rms_norm_row_f32(const float* x, const float* weight, float* y, int64_t C, double eps) {
  float rstd;
  rms_norm_fwd_row<float>(x, weight, y, &rstd, C, eps, /*stream=*/false);
}

static void rms_norm_kernels(torch::Library& m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
}
GPTFAST_CPU_KERNELS(rms_norm_kernels);

}  // namespace gptfast
