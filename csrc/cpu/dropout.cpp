// Dropout fused with the residual add, on CPU: y = residual + dropout(x), and dropout's backward.
//
// x is read as rows of its last dimension C; element (row, col) is kept when the counter-based hash of
// (seed, 0, row, col) says so (csrc/dropout_hash.h - the attention dropout's RNG, with one "head"), and
// then scaled by 1 / (1 - p). So no mask is ever stored: the backward regenerates it from the seed, and
// every backend drops the same elements. Per row: the keep factors (scale or 0) of a tile of columns are
// computed first - a loop of 32-bit integer math the compiler vectorizes - then y = x * f + residual
// with at::vec. Storage types: x, residual and y may differ (bf16 x, float32 residual stream under
// autocast); the math runs in float32 (float64 for float64 tensors).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "../dropout_hash.h"
#include "kernels.h"
#include "vec_io.h"

#ifndef GPTFAST_ISA_MODULE   // the schemas once, in gptfast._C (the AVX-512 module adds kernels only)
TORCH_LIBRARY_FRAGMENT(gptfast, m) {
  // Dropout fused with the residual add: y = residual + dropout(x). x is read as rows of its last dim C; element
  // (row, col) is kept with probability 1 - p (then scaled by 1 / (1 - p)) by the counter-based RNG of
  // csrc/dropout_hash.h keyed by (seed, 0, row, col), so no mask is stored. residual absent: plain dropout. y
  // has residual's dtype (x's without one): x bfloat16/float16 may add into a float32 residual. dropout_bwd:
  // dx = dy * keep / (1 - p), the same mask, written in `dtype` (x's).
  m.def("dropout_add_fwd(Tensor x, Tensor? residual, float p, Tensor seed) -> Tensor");
  m.def("dropout_bwd(Tensor dy, float p, Tensor seed, ScalarType dtype) -> Tensor");
}
#endif

namespace gptfast {
namespace {

constexpr int64_t kTile = 512;        // columns whose factors are computed at once (2 KiB of float32)

template <typename In, typename Out>
struct DropoutArgs {
  const In* x;
  const Out* residual;                // nullptr: plain dropout
  Out* y;
  int64_t rows, C;
  uint64_t seed;
  uint32_t threshold;
  acc_t<In> scale;
};

template <typename In, typename Out>
void dropout_rows(const DropoutArgs<In, Out>& a, int64_t r0, int64_t r1) {
  using A = acc_t<In>;
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t V = Vec::size();
  static_assert(std::is_same_v<A, acc_t<Out>>, "x and y must share their math type");
  alignas(64) A f[kTile];
  const uint32_t head_key = dropout_head_key(a.seed, 0), threshold = a.threshold;
  const A scale = a.scale;                    // locals: a store to f cannot alias them, so the loop vectorizes
  for (int64_t r = r0; r < r1; ++r) {
    const uint32_t row_key = dropout_row_key(head_key, static_cast<uint32_t>(r));
    const In* x = a.x + r * a.C;
    const Out* res = a.residual ? a.residual + r * a.C : nullptr;
    Out* y = a.y + r * a.C;
    for (int64_t c0 = 0; c0 < a.C; c0 += kTile) {
      const int64_t n = std::min(kTile, a.C - c0);
      const uint32_t col_key = static_cast<uint32_t>(c0) + row_key;
      for (int64_t c = 0; c < n; ++c) {       // vectorized by the compiler: vpmulld, shifts, compare, blend
        const uint32_t h = mix32(static_cast<uint32_t>(c) + col_key);
        f[c] = (h >> 8) >= threshold ? scale : A(0);
      }
      int64_t c = 0;
      for (; c + V <= n; c += V) {
        Vec v = load_acc(x + c0 + c) * Vec::loadu(f + c);
        if (res) v = v + load_acc(res + c0 + c);
        store_acc(v, y + c0 + c);
      }
      for (; c < n; ++c) {
        A v = A(x[c0 + c]) * f[c];
        if (res) v += A(res[c0 + c]);
        y[c0 + c] = static_cast<Out>(v);
      }
    }
  }
}

template <typename In, typename Out>
void run_dropout(const at::Tensor& x, const at::Tensor* residual, at::Tensor& y, double p, uint64_t seed) {
  const int64_t C = x.dim() ? x.size(-1) : 1;
  const int64_t rows = C ? x.numel() / C : 0;
  DropoutArgs<In, Out> a{x.data_ptr<In>(), residual ? residual->data_ptr<Out>() : nullptr, y.data_ptr<Out>(), rows, C,
                         seed, dropout_threshold(p), static_cast<acc_t<In>>(1.0 / (1.0 - p))};
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { dropout_rows(a, r0, r1); });
}

// x's storage type In, y's Out: the same, or one of them float32 and the other bfloat16/float16.
void dispatch(const at::Tensor& x, const at::Tensor* residual, at::Tensor& y, double p, uint64_t seed) {
  const auto in = x.scalar_type(), out = y.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in, "dropout_cpu", [&] {
    using In = scalar_t;
    if (out == in) {
      run_dropout<In, In>(x, residual, y, p, seed);
    } else if constexpr (std::is_same_v<In, at::BFloat16> || std::is_same_v<In, at::Half>) {
      TORCH_CHECK(out == at::kFloat, "dropout: a ", in, " input can write float32 or ", in, ", not ", out);
      run_dropout<In, float>(x, residual, y, p, seed);
    } else if constexpr (std::is_same_v<In, float>) {
      TORCH_CHECK(out == at::kBFloat16 || out == at::kHalf, "dropout: a float32 input can write float32, bfloat16 "
                  "or float16, not ", out);
      if (out == at::kBFloat16) run_dropout<float, at::BFloat16>(x, residual, y, p, seed);
      else run_dropout<float, at::Half>(x, residual, y, p, seed);
    } else {
      TORCH_CHECK(false, "dropout: a float64 input writes float64, not ", out);
    }
  });
}

void check_dropout(const at::Tensor& x, double p, const at::Tensor& seed) {
  check_float(x, "x");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "seed must be a one-element int64 tensor, got ",
              seed.scalar_type(), " with ", seed.numel(), " elements");
}

at::Tensor dropout_add_fwd_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in, double p,
                               const at::Tensor& seed) {
  check_dropout(x_in, p, seed);
  const at::Tensor x = x_in.contiguous();
  at::Tensor residual;
  if (residual_in.has_value()) {
    check_float(*residual_in, "residual");
    TORCH_CHECK(residual_in->sizes() == x.sizes(), "residual must have x's shape ", x.sizes(), ", got ",
                residual_in->sizes());
    TORCH_CHECK(residual_in->device() == x.device(), "residual is on ", residual_in->device(), " but x is on ",
                x.device());
    residual = residual_in->contiguous();
  }
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(residual.defined() ? residual.scalar_type() : x.scalar_type()));
  maybe_poison(y);
  dispatch(x, residual.defined() ? &residual : nullptr, y, p, static_cast<uint64_t>(seed.item<int64_t>()));
  return y;
}

at::Tensor dropout_bwd_cpu(const at::Tensor& dy_in, double p, const at::Tensor& seed, at::ScalarType dtype) {
  check_dropout(dy_in, p, seed);
  const at::Tensor dy = dy_in.contiguous();
  at::Tensor dx = at::empty(dy.sizes(), dy.options().dtype(dtype));
  maybe_poison(dx);
  dispatch(dy, nullptr, dx, p, static_cast<uint64_t>(seed.item<int64_t>()));
  return dx;
}

}  // namespace

static void dropout_kernels(torch::Library& m) {
  m.impl("dropout_add_fwd", &dropout_add_fwd_cpu);
  m.impl("dropout_bwd", &dropout_bwd_cpu);
}
GPTFAST_CPU_KERNELS(dropout_kernels);

}  // namespace gptfast
