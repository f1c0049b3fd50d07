// LayerNorm forward/backward on CPU: rows in parallel, each row vectorized with at::vec.
//
// Forward, per row of C values: one pass for the statistics (sums of x - x[0] and its square;
// shifting by the row's first element keeps E[d^2] - E[d]^2 from cancelling catastrophically when
// |mean| >> std), then one pass writing y = (x - mean) * rstd * weight + bias.
// Backward: dx per row; dweight/dbias summed per fixed block of rows, then the blocks summed in a
// fixed order (column_sums.h), so results do not depend on the number of threads. bfloat16/float16
// tensors are read and written as such; the math, the statistics and the dweight/dbias sums are
// float32 (vec_io.h).
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
#include <vector>

#include "../common.h"
#include "column_sums.h"
#include "decode_parts.h"
#include "kernels.h"
#include "vec_io.h"

#ifndef GPTFAST_ISA_MODULE   // the schemas once, in gptfast._C (the AVX-512 module adds kernels only)
TORCH_LIBRARY_FRAGMENT(gptfast, m) {
  // LayerNorm over the last dim. mean/rstd: one per row, float32 (float64 for float64 x).
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor dx, Tensor dweight, Tensor dbias)");
}
#endif

namespace gptfast {
namespace {

using at::vec::Vectorized;

// T: the storage type of x, weight, bias, y; A = acc_t<T> the math and the statistics (float32
// for bfloat16/float16 storage)
template <typename T, typename A = acc_t<T>>
void layer_norm_fwd_row(const T* x, const T* w, const T* b, T* y, A* mean_out, A* rstd_out, int64_t C,
                        double eps, bool stream) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const A shift = x[0];
  // two independent accumulator chains per sum, so the adds are not bound by FMA latency
  Vec vs0(0), vss0(0), vs1(0), vss1(0), vshift(shift);
  int64_t i = 0;
  for (; i + 2 * V <= C; i += 2 * V) {
    Vec d0 = load_acc(x + i) - vshift, d1 = load_acc(x + i + V) - vshift;
    vs0 = vs0 + d0;
    vs1 = vs1 + d1;
    vss0 = at::vec::fmadd(d0, d0, vss0);
    vss1 = at::vec::fmadd(d1, d1, vss1);
  }
  for (; i + V <= C; i += V) {
    Vec d = load_acc(x + i) - vshift;
    vs0 = vs0 + d;
    vss0 = at::vec::fmadd(d, d, vss0);
  }
  A s = sum_lanes(vs0 + vs1), ss = sum_lanes(vss0 + vss1);
  for (; i < C; ++i) {
    A d = A(x[i]) - shift;
    s += d;
    ss += d * d;
  }
  const A mean_shifted = s / C;
  const A var = std::max<A>(ss / C - mean_shifted * mean_shifted, A(0));  // biased variance
  const A mean = shift + mean_shifted;
  const A rstd = A(1) / std::sqrt(var + static_cast<A>(eps));
  *mean_out = mean;
  *rstd_out = rstd;
  const Vec vmean(mean), vrstd(rstd);
  if (stream) {      // C is a multiple of the vector width (can_stream)
    for (i = 0; i < C; i += V)
      store_acc_stream(at::vec::fmadd((load_acc(x + i) - vmean) * vrstd, load_acc(w + i), load_acc(b + i)), y + i);
    return;
  }
  for (i = 0; i + V <= C; i += V) {
    Vec xhat = (load_acc(x + i) - vmean) * vrstd;
    store_acc(at::vec::fmadd(xhat, load_acc(w + i), load_acc(b + i)), y + i);
  }
  for (; i < C; ++i) y[i] = static_cast<T>((A(x[i]) - mean) * rstd * A(w[i]) + A(b[i]));
}

template <typename T, typename A = acc_t<T>>
void layer_norm_bwd_row(const T* dy, const T* x, const T* w, A mean, A rstd, T* dx, A* dw_acc, A* db_acc,
                        int64_t C, bool stream) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Vec vmean(mean), vrstd(rstd);
  // sums over the row of g = dy * w and of g * xhat
  Vec vg(0), vgx(0);
  int64_t i = 0;
  for (; i + V <= C; i += V) {
    Vec xhat = (load_acc(x + i) - vmean) * vrstd;
    Vec dyv = load_acc(dy + i);
    Vec g = dyv * load_acc(w + i);
    vg = vg + g;
    vgx = at::vec::fmadd(g, xhat, vgx);
    at::vec::fmadd(dyv, xhat, Vec::loadu(dw_acc + i)).store(dw_acc + i);
    (Vec::loadu(db_acc + i) + dyv).store(db_acc + i);
  }
  A sg = sum_lanes(vg), sgx = sum_lanes(vgx);
  for (; i < C; ++i) {
    A xhat = (A(x[i]) - mean) * rstd;
    A g = A(dy[i]) * A(w[i]);
    sg += g;
    sgx += g * xhat;
    dw_acc[i] += A(dy[i]) * xhat;
    db_acc[i] += A(dy[i]);
  }
  const A a = sg / C, c = sgx / C;
  const Vec va(a), vc(c);
  if (stream) {      // C is a multiple of the vector width (can_stream)
    for (i = 0; i < C; i += V) {
      Vec xhat = (load_acc(x + i) - vmean) * vrstd;
      store_acc_stream(vrstd * (load_acc(dy + i) * load_acc(w + i) - va - xhat * vc), dx + i);
    }
    return;
  }
  for (i = 0; i + V <= C; i += V) {
    Vec xhat = (load_acc(x + i) - vmean) * vrstd;
    Vec g = load_acc(dy + i) * load_acc(w + i);
    store_acc(vrstd * (g - va - xhat * vc), dx + i);
  }
  for (; i < C; ++i) {
    A xhat = (A(x[i]) - mean) * rstd;
    dx[i] = static_cast<T>(rstd * (A(dy[i]) * A(w[i]) - a - xhat * c));
  }
}

void check_ln_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must have a non-empty last dimension, got shape ",
              x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble || xt == at::kBFloat16 || xt == at::kHalf,
              "x: the CPU LayerNorm supports float32, float64, bfloat16 and float16, got ", xt);
  check_same(weight, "weight", x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight must have shape (",
              x.size(-1), ",) to match x's last dim, got ", weight.sizes());
  if (bias.defined()) {
    check_same(bias, "bias", x, "x");
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(-1), "bias must have shape (", x.size(-1),
                ",) to match x's last dim, got ", bias.sizes());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x_in,
                                                                  const at::Tensor& weight_in,
                                                                  const at::Tensor& bias_in, double eps) {
  check_ln_args(x_in, weight_in, bias_in);
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const int64_t C = x.size(-1), N = x.numel() / C;
  at::Tensor y = at::empty_like(x);
  auto stat_sizes = x.sizes().vec();
  stat_sizes.pop_back();
  at::Tensor mean = at::empty(stat_sizes, x.options().dtype(stat_dtype(x.scalar_type())));
  at::Tensor rstd = at::empty_like(mean);
  maybe_poison(y), maybe_poison(mean), maybe_poison(rstd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t *px = x.data_ptr<scalar_t>(), *pw = weight.data_ptr<scalar_t>(),
                   *pb = bias.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    A *pm = mean.data_ptr<A>(), *pr = rstd.data_ptr<A>();
    const bool stream = can_stream(py, C, y.nbytes());
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        layer_norm_fwd_row(px + r * C, pw, pb, py + r * C, pm + r, pr + r, C, eps, stream);
      if (stream) stream_fence();
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& dy_in,
                                                                  const at::Tensor& x_in,
                                                                  const at::Tensor& weight_in,
                                                                  const at::Tensor& mean_in,
                                                                  const at::Tensor& rstd_in) {
  check_ln_args(x_in, weight_in, at::Tensor());
  check_same(dy_in, "dy", x_in, "x");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "dy must have x's shape ", x_in.sizes(), ", got ",
              dy_in.sizes());
  const int64_t C = x_in.size(-1), N = x_in.numel() / C;
  for (auto [t, name] : {std::pair{&mean_in, "mean"}, std::pair{&rstd_in, "rstd"}}) {
    check_stat(*t, name, x_in, stat_dtype(x_in.scalar_type()));
    TORCH_CHECK(t->numel() == N, name, " must hold one value per row of x (", N, "), got ", t->numel());
  }
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous(),
                   mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dweight = at::empty_like(weight), dbias = at::empty_like(weight);
  maybe_poison(dx), maybe_poison(dweight), maybe_poison(dbias);
  const int64_t rows_in_block = rows_per_block(N);
  const int64_t n_blocks = (N + rows_in_block - 1) / rows_in_block;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t *pdy = dy.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>(), *pw = weight.data_ptr<scalar_t>();
    const A *pm = mean.data_ptr<A>(), *pr = rstd.data_ptr<A>();
    scalar_t* pdx = dx.data_ptr<scalar_t>();
    // partial sums per block of rows: [dweight blocks | dbias blocks], each block zeroed by its thread
    thread_local PartialSums partial;
    A* pdw = static_cast<A*>(partial.get(sizeof(A) * 2 * std::max<int64_t>(n_blocks, 1) * C));
    A* pdb = pdw + std::max<int64_t>(n_blocks, 1) * C;
    const bool stream = can_stream(pdx, C, dx.nbytes());
    at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        std::fill(pdw + blk * C, pdw + (blk + 1) * C, A(0));
        std::fill(pdb + blk * C, pdb + (blk + 1) * C, A(0));
        const int64_t r_end = std::min(N, (blk + 1) * rows_in_block);
        for (int64_t r = blk * rows_in_block; r < r_end; ++r)
          layer_norm_bwd_row(pdy + r * C, px + r * C, pw, pm[r], pr[r], pdx + r * C, pdw + blk * C,
                             pdb + blk * C, C, stream);
      }
      if (stream) stream_fence();
    });
    sum_blocks(pdw, n_blocks, C, dweight.data_ptr<scalar_t>());
    sum_blocks(pdb, n_blocks, C, dbias.data_ptr<scalar_t>());
  });
  return {dx, dweight, dbias};
}

}  // namespace

void layer_norm_row_f32(const float* x, const float* weight, const float* bias, float* y, int64_t C, double eps) {
  float mean, rstd;
  layer_norm_fwd_row<float>(x, weight, bias, y, &mean, &rstd, C, eps, /*stream=*/false);
}

static void layer_norm_kernels(torch::Library& m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}
GPTFAST_CPU_KERNELS(layer_norm_kernels);

}  // namespace gptfast
