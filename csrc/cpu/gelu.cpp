// GELU (tanh approximation) forward/backward on CPU, vectorized with at::vec, chunks in parallel;
// bfloat16/float16 tensors are read and written as such, the math in float32 (vec_io.h).
//   y  = 0.5 x (1 + tanh(u)),  u = k0 (x + k1 x^3),  k0 = sqrt(2/pi), k1 = 0.044715
//   dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k0 (1 + 3 k1 x^2),  t = tanh(u)
// computed through the identity 0.5 (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + exp(-2u)): one exp
// instead of a tanh (cheaper, and exact in exact arithmetic), so with s = sigmoid(2u):
//   y = x s,   dy/dx = s + 2 x s (1 - s) u'.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "decode_parts.h"
#include "kernels.h"
#include "vec_io.h"

#ifndef GPTFAST_ISA_MODULE   // the schemas once, in gptfast._C (the AVX-512 module adds kernels only)
TORCH_LIBRARY_FRAGMENT(gptfast, m) {
  // GELU, tanh approximation.
  m.def("gelu_fwd(Tensor x) -> Tensor");
  m.def("gelu_bwd(Tensor dy, Tensor x) -> Tensor");
}
#endif

namespace gptfast {
namespace {

using at::vec::Vectorized;
constexpr double kK0 = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kK1 = 0.044715;
constexpr int64_t kGrain = 32768;

// The math of one vector of GELU, forward and backward. The last, partial vector of a span goes
// through the same code (padded with zeros), never through a scalar loop: std::exp and the vector exp
// round differently, and an element's result must not depend on where it sits in the tensor (a row
// alone gives the same bits as that row in a batch, and the fused decoding block as the op).
template <typename A>
inline at::vec::Vectorized<A> gelu_vec(const at::vec::Vectorized<A>& x) {
  using Vec = at::vec::Vectorized<A>;
  const Vec one(1), m2k0(-2 * kK0), k1(kK1);
  const Vec e = (m2k0 * at::vec::fmadd(k1 * x * x, x, x)).exp();     // exp(-2u)
  return x / (one + e);
}

template <typename A>
inline at::vec::Vectorized<A> gelu_grad_vec(const at::vec::Vectorized<A>& dy, const at::vec::Vectorized<A>& x) {
  using Vec = at::vec::Vectorized<A>;
  const Vec one(1), two(2), m2k0(-2 * kK0), k1(kK1), k0(kK0), three_k1(3 * kK1);
  const Vec x2 = x * x;
  const Vec sg = one / (one + (m2k0 * at::vec::fmadd(k1 * x2, x, x)).exp());   // sigmoid(2u)
  const Vec du = k0 * at::vec::fmadd(three_k1, x2, one);                      // u'
  return dy * (sg + two * x * sg * (one - sg) * du);
}

// T: the storage type; the math runs in A = acc_t<T> (float32 for bfloat16/float16 storage)
template <typename T>
void gelu_fwd_span(const T* x, T* y, int64_t n) {
  constexpr int64_t V = at::vec::Vectorized<acc_t<T>>::size();
  int64_t i = 0;
  for (; i + V <= n; i += V) store_acc(gelu_vec(load_acc(x + i)), y + i);
  if (i < n) {                                                      // the tail: one padded vector
    T xs[V] = {}, ys[V];
    std::copy(x + i, x + n, xs);
    store_acc(gelu_vec(load_acc(xs)), ys);
    std::copy(ys, ys + (n - i), y + i);
  }
}

template <typename T>
void gelu_bwd_span(const T* dy, const T* x, T* dx, int64_t n) {
  constexpr int64_t V = at::vec::Vectorized<acc_t<T>>::size();
  int64_t i = 0;
  for (; i + V <= n; i += V) store_acc(gelu_grad_vec(load_acc(dy + i), load_acc(x + i)), dx + i);
  if (i < n) {
    T dys[V] = {}, xs[V] = {}, dxs[V];
    std::copy(dy + i, dy + n, dys);
    std::copy(x + i, x + n, xs);
    store_acc(gelu_grad_vec(load_acc(dys), load_acc(xs)), dxs);
    std::copy(dxs, dxs + (n - i), dx + i);
  }
}

void check_gelu_x(const at::Tensor& x) {
  check_float(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "x: the CPU GELU supports float32, float64, bfloat16 and float16, got ", x.scalar_type());
}

at::Tensor gelu_fwd_cpu(const at::Tensor& x_in) {
  check_gelu_x(x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  maybe_poison(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gelu_fwd_cpu", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
      gelu_fwd_span(px + begin, py + begin, end - begin);
    });
  });
  return y;
}

at::Tensor gelu_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x_in) {
  check_gelu_x(x_in);
  check_same(dy_in, "dy", x_in, "x");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "dy must have x's shape ", x_in.sizes(), ", got ",
              dy_in.sizes());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  maybe_poison(dx);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gelu_bwd_cpu", [&] {
    const scalar_t *pdy = dy.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>();
    scalar_t* pdx = dx.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
      gelu_bwd_span(pdy + begin, px + begin, pdx + begin, end - begin);
    });
  });
  return dx;
}

}  // namespace

void gelu_span_f32(const float* x, float* y, int64_t n) { gelu_fwd_span<float>(x, y, n); }

static void gelu_kernels(torch::Library& m) {
  m.impl("gelu_fwd", &gelu_fwd_cpu);
  m.impl("gelu_bwd", &gelu_bwd_cpu);
}
GPTFAST_CPU_KERNELS(gelu_kernels);

}  // namespace gptfast
