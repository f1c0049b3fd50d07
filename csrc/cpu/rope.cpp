// RoPE (rotary position embedding: Llama, Qwen3) forward/backward on CPU: the queries and keys of a step
// rotated in one call, rows in parallel, each row's two halves vectorized with at::vec.
//   x1, x2 = x[:h], x[h:] (h = head_dim / 2);  out = (x1 c - x2 s, x2 c + x1 s)   c, s = cos, sin of the row's position
// The backward rotates the gradient by the opposite angle: (d1 c + d2 s, d2 c - d1 s). q and k may be strided
// views (a projection's (B, T, H, hs) output transposed to (B, H, T, hs)): rows are read where they lie and the
// outputs written contiguous, so the transpose costs no copy. bfloat16/float16 read and written as such, the math
// in float32 (vec_io.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../common.h"
#include "decode_parts.h"
#include "kernels.h"
#include "vec_io.h"

#ifndef GPTFAST_ISA_MODULE   // the schemas once, in gptfast._C (the AVX-512 module adds kernels only)
TORCH_LIBRARY_FRAGMENT(gptfast, m) {
  // q (B, Hq, T, D), k (B, Hk, T, D) rotated by the angles of their T positions: cos, sin (T, D / 2), any float dtype.
  m.def("rope_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor q_out, Tensor k_out)");
  // The gradients of q and k from those of the outputs (the rotation by the opposite angles).
  m.def("rope_bwd(Tensor dq, Tensor dk, Tensor cos, Tensor sin) -> (Tensor dq_in, Tensor dk_in)");
}
#endif

namespace gptfast {
namespace {

using at::vec::Vectorized;

// One vector of a row's rotation: lanes i of both halves. sign = -1 rotates back (the backward).
template <typename A>
inline void rotate_vec(const Vectorized<A>& x1, const Vectorized<A>& x2, const Vectorized<A>& c,
                       const Vectorized<A>& s, Vectorized<A>& y1, Vectorized<A>& y2, bool back) {
  if (back) {
    y1 = x1 * c + x2 * s;
    y2 = x2 * c - x1 * s;
  } else {
    y1 = x1 * c - x2 * s;
    y2 = x2 * c + x1 * s;
  }
}

// One row of 2h values from x into y (contiguous), with its position's cos/sin (h each). The last, partial vector
// goes through the same code, padded: a row's bits do not depend on h's remainder or on where the row sits.
template <typename T, typename A = acc_t<T>>
void rotate_row(const T* x, T* y, const A* cos, const A* sin, int64_t h, bool back) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  Vec y1, y2;
  int64_t i = 0;
  for (; i + V <= h; i += V) {
    rotate_vec(load_acc(x + i), load_acc(x + h + i), Vec::loadu(cos + i), Vec::loadu(sin + i), y1, y2, back);
    store_acc(y1, y + i);
    store_acc(y2, y + h + i);
  }
  if (i < h) {
    const int64_t n = h - i;
    T a[V] = {}, b[V] = {}, o1[V], o2[V];
    A c[V] = {}, s[V] = {};
    std::copy(x + i, x + h, a);
    std::copy(x + h + i, x + 2 * h, b);
    std::copy(cos + i, cos + h, c);
    std::copy(sin + i, sin + h, s);
    rotate_vec(load_acc(a), load_acc(b), Vec::loadu(c), Vec::loadu(s), y1, y2, back);
    store_acc(y1, o1);
    store_acc(y2, o2);
    std::copy(o1, o1 + n, y + i);
    std::copy(o2, o2 + n, y + h + i);
  }
}

// Every row of x (B, H, T, D; last dim contiguous, any other strides) rotated into a new contiguous tensor.
template <typename T, typename A = acc_t<T>>
void rotate_all(const at::Tensor& x, at::Tensor& y, const A* cos, const A* sin, bool back) {
  const int64_t B = x.size(0), H = x.size(1), T_ = x.size(2), D = x.size(3), h = D / 2;
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2);
  const T* px = x.data_ptr<T>();
  T* py = y.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * H * T_, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r % T_, bh = r / T_, hh = bh % H, b = bh / H;
      rotate_row<T>(px + b * sb + hh * sh + t * st, py + r * D, cos + t * h, sin + t * h, h, back);
    }
  });
}

void check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                     const char* qn, const char* kn) {
  check_float(q, qn);
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, qn,
              ": the CPU RoPE supports float32, float64, bfloat16 and float16, got ", t);
  check_same(k, kn, q, qn);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, qn, " and ", kn, " must be (B, heads, T, head_dim), got ", q.sizes(),
              " and ", k.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), kn, " must be (B, heads, T, ",
              "head_dim) like ", qn, " ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(q.size(3) % 2 == 0, "head_dim must be even, got ", q.size(3));
  for (auto [tab, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {   // any float dtype: read as A
    check_float(*tab, name);
    TORCH_CHECK(tab->device() == q.device(), name, " is on ", tab->device(), " but ", qn, " is on ", q.device());
    TORCH_CHECK(tab->dim() == 2 && tab->size(0) == q.size(2) && tab->size(1) == q.size(3) / 2, name,
                " must be (T, head_dim / 2) = (", q.size(2), ", ", q.size(3) / 2, "), got ", tab->sizes());
  }
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos_in,
                                            const at::Tensor& sin_in, bool back) {
  check_rope_args(q_in, k_in, cos_in, sin_in, back ? "dq" : "q", back ? "dk" : "k");
  const at::Tensor q = q_in.stride(-1) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(-1) == 1 ? k_in : k_in.contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  maybe_poison(q_out), maybe_poison(k_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_cpu", [&] {
    using A = acc_t<scalar_t>;
    const at::Tensor cos = cos_in.to(c10::CppTypeToScalarType<A>::value).contiguous();   // the tables in A: tiny
    const at::Tensor sin = sin_in.to(c10::CppTypeToScalarType<A>::value).contiguous();
    rotate_all<scalar_t>(q, q_out, cos.data_ptr<A>(), sin.data_ptr<A>(), back);
    rotate_all<scalar_t>(k, k_out, cos.data_ptr<A>(), sin.data_ptr<A>(), back);
  });
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> rope_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                const at::Tensor& sin) {
  return rope_cpu(q, k, cos, sin, /*back=*/false);
}

std::tuple<at::Tensor, at::Tensor> rope_bwd_cpu(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& cos,
                                                const at::Tensor& sin) {
  return rope_cpu(dq, dk, cos, sin, /*back=*/true);
}

}  // namespace

void rope_row_f32(const float* x, float* y, const float* cos, const float* sin, int64_t half) {
  rotate_row<float>(x, y, cos, sin, half, /*back=*/false);
}

static void rope_kernels(torch::Library& m) {
  m.impl("rope_fwd", &rope_fwd_cpu);
  m.impl("rope_bwd", &rope_bwd_cpu);
}
GPTFAST_CPU_KERNELS(rope_kernels);

}  // namespace gptfast
