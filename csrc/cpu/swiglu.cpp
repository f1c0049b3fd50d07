// SwiGLU (Llama, Qwen3's feed-forward activation) forward/backward on CPU, vectorized with at::vec, chunks in
// parallel; bfloat16/float16 tensors are read and written as such, the math in float32 (vec_io.h).
//   y = silu(g) * u = g * s * u,   s = sigmoid(g) = 1 / (1 + exp(-g))
//   dg = dy * u * s * (1 + g (1 - s)),   du = dy * g * s
// One pass reads g and u and writes y: the textbook's silu(g) temporary (written, read back, kept by autograd)
// never exists; the backward recomputes s from g, so nothing but the inputs is saved.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../common.h"
#include "decode_parts.h"
#include "kernels.h"
#include "vec_io.h"

#ifndef GPTFAST_ISA_MODULE   // the schemas once, in gptfast._C (the AVX-512 module adds kernels only)
TORCH_LIBRARY_FRAGMENT(gptfast, m) {
  // silu(gate) * up, elementwise; gate and up of one shape and dtype.
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor dgate, Tensor dup)");
}
#endif

namespace gptfast {
namespace {

using at::vec::Vectorized;
constexpr int64_t kGrain = 32768;

// One vector of the math. The last, partial vector of a span goes through the same code (padded), never a scalar
// loop: an element's result must not depend on where it sits in the tensor.
template <typename A>
inline Vectorized<A> swiglu_vec(const Vectorized<A>& g, const Vectorized<A>& u) {
  const Vectorized<A> one(1);
  return g / (one + g.neg().exp()) * u;
}

template <typename A>
inline void swiglu_grad_vec(const Vectorized<A>& dy, const Vectorized<A>& g, const Vectorized<A>& u,
                            Vectorized<A>& dg, Vectorized<A>& du) {
  const Vectorized<A> one(1);
  const Vectorized<A> s = one / (one + g.neg().exp());
  du = dy * g * s;
  dg = dy * u * s * at::vec::fmadd(g, one - s, one);
}

template <typename T>
void swiglu_fwd_span(const T* g, const T* u, T* y, int64_t n) {
  constexpr int64_t V = Vectorized<acc_t<T>>::size();
  int64_t i = 0;
  for (; i + V <= n; i += V) store_acc(swiglu_vec(load_acc(g + i), load_acc(u + i)), y + i);
  if (i < n) {                                                      // the tail: one padded vector
    T gs[V] = {}, us[V] = {}, ys[V];
    std::copy(g + i, g + n, gs);
    std::copy(u + i, u + n, us);
    store_acc(swiglu_vec(load_acc(gs), load_acc(us)), ys);
    std::copy(ys, ys + (n - i), y + i);
  }
}

template <typename T>
void swiglu_bwd_span(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t n) {
  using Vec = Vectorized<acc_t<T>>;
  constexpr int64_t V = Vec::size();
  Vec vdg, vdu;
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    swiglu_grad_vec(load_acc(dy + i), load_acc(g + i), load_acc(u + i), vdg, vdu);
    store_acc(vdg, dg + i);
    store_acc(vdu, du + i);
  }
  if (i < n) {
    T dys[V] = {}, gs[V] = {}, us[V] = {}, dgs[V], dus[V];
    std::copy(dy + i, dy + n, dys);
    std::copy(g + i, g + n, gs);
    std::copy(u + i, u + n, us);
    swiglu_grad_vec(load_acc(dys), load_acc(gs), load_acc(us), vdg, vdu);
    store_acc(vdg, dgs);
    store_acc(vdu, dus);
    std::copy(dgs, dgs + (n - i), dg + i);
    std::copy(dus, dus + (n - i), du + i);
  }
}

void check_swiglu_args(const at::Tensor& gate, const at::Tensor& up) {
  check_float(gate, "gate");
  const auto t = gate.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
              "gate: the CPU SwiGLU supports float32, float64, bfloat16 and float16, got ", t);
  check_same(up, "up", gate, "gate");
  TORCH_CHECK(up.sizes() == gate.sizes(), "up must have gate's shape ", gate.sizes(), ", got ", up.sizes());
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_swiglu_args(gate_in, up_in);
  const at::Tensor g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor y = at::empty_like(g);
  maybe_poison(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu_fwd_cpu", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *pu = u.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
      swiglu_fwd_span(pg + begin, pu + begin, py + begin, end - begin);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& gate_in,
                                                  const at::Tensor& up_in) {
  check_swiglu_args(gate_in, up_in);
  check_same(dy_in, "dy", gate_in, "gate");
  TORCH_CHECK(dy_in.sizes() == gate_in.sizes(), "dy must have gate's shape ", gate_in.sizes(), ", got ",
              dy_in.sizes());
  const at::Tensor dy = dy_in.contiguous(), g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  maybe_poison(dg), maybe_poison(du);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu_bwd_cpu", [&] {
    const scalar_t *pdy = dy.data_ptr<scalar_t>(), *pg = g.data_ptr<scalar_t>(), *pu = u.data_ptr<scalar_t>();
    scalar_t *pdg = dg.data_ptr<scalar_t>(), *pdu = du.data_ptr<scalar_t>();
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
      swiglu_bwd_span(pdy + begin, pg + begin, pu + begin, pdg + begin, pdu + begin, end - begin);
    });
  });
  return {dg, du};
}

}  // namespace

void swiglu_span_f32(const float* gate, const float* up, float* y, int64_t n) { swiglu_fwd_span<float>(gate, up, y, n); }

static void swiglu_kernels(torch::Library& m) {
  m.impl("swiglu_fwd", &swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &swiglu_bwd_cpu);
}
GPTFAST_CPU_KERNELS(swiglu_kernels);

}  // namespace gptfast
