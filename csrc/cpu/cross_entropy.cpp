// Cross-entropy over the vocabulary on CPU: rows in parallel, each row vectorized.
//   lse = max + log(sum exp(x - max));  loss = lse - x[target];  dlogits = exp(x - lse) - onehot.
// Nothing but dlogits (when asked for) outlives the forward: no probabilities tensor. bfloat16/float16
// logits are read as such and the math runs in float32 (vec_io.h); loss and lse are float32.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "../common.h"
#include "kernels.h"
#include "vec_io.h"
#include "cross_entropy.h"

#ifndef GPTFAST_ISA_MODULE   // the schemas once, in gptfast._C (the AVX-512 module adds kernels only)
TORCH_LIBRARY_FRAGMENT(gptfast, m) {
  // Cross-entropy of each row of logits (N, V) against targets (N,): per-row loss and lse (float32,
  // float64 for float64 logits); with compute_grad, also dlogits = softmax - onehot (0 for rows
  // whose target is ignore_index), which the backward only scales by each row's upstream gradient.
  m.def("cross_entropy_fwd(Tensor logits, Tensor targets, int ignore_index, bool compute_grad) -> (Tensor loss, Tensor lse, Tensor dlogits)");
  m.def("cross_entropy_bwd(Tensor dlogits, Tensor grad_loss) -> Tensor");
}
#endif

namespace gptfast {
namespace {

using at::vec::Vectorized;

// log-sum-exp of one row, in A = acc_t<T> (float32 for bfloat16/float16 logits)
template <typename T>
acc_t<T> row_lse(const T* x, int64_t V) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  A m = -std::numeric_limits<A>::infinity();
  int64_t i = 0;
  if (V >= W) {
    Vec vm = load_acc(x);
    for (i = W; i + W <= V; i += W) vm = at::vec::maximum(vm, load_acc(x + i));
    A lanes[W];
    vm.store(lanes);
    for (int64_t j = 0; j < W; ++j) m = std::max(m, lanes[j]);
  }
  for (; i < V; ++i) m = std::max(m, A(x[i]));
  Vec vs(0), vmax(m);
  for (i = 0; i + W <= V; i += W) vs = vs + (load_acc(x + i) - vmax).exp();
  A lanes[W];
  vs.store(lanes);
  A s = 0;
  for (int64_t j = 0; j < W; ++j) s += lanes[j];
  for (; i < V; ++i) s += std::exp(A(x[i]) - m);
  return m + std::log(s);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits_in,
                                                                     const at::Tensor& targets_in,
                                                                     int64_t ignore_index, bool compute_grad) {
  check_float(logits_in, "logits");
  TORCH_CHECK(logits_in.dim() == 2, "logits must have shape (N, V), got ", logits_in.sizes());
  const auto lt = logits_in.scalar_type();
  TORCH_CHECK(lt == at::kFloat || lt == at::kDouble || lt == at::kBFloat16 || lt == at::kHalf,
              "logits: the CPU cross-entropy supports float32, float64, bfloat16 and float16, got ", lt);
  TORCH_CHECK(targets_in.scalar_type() == at::kLong, "targets must be int64, got ", targets_in.scalar_type());
  TORCH_CHECK(targets_in.dim() == 1 && targets_in.size(0) == logits_in.size(0),
              "targets must have shape (N,) = (", logits_in.size(0), ",), got ", targets_in.sizes());
  TORCH_CHECK(targets_in.device() == logits_in.device(), "targets is on ", targets_in.device(),
              " but logits is on ", logits_in.device());
  const at::Tensor logits = logits_in.contiguous(), targets = targets_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t* tg = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r)
    TORCH_CHECK(tg[r] == ignore_index || (tg[r] >= 0 && tg[r] < V), "targets[", r, "] = ", tg[r],
                " is outside [0, ", V, ") and is not ignore_index (", ignore_index, ")");
  const auto stat = stat_dtype(logits.scalar_type());
  at::Tensor loss = at::empty({N}, logits.options().dtype(stat));
  at::Tensor lse = at::empty({N}, logits.options().dtype(stat));
  at::Tensor dlogits = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  maybe_poison(loss), maybe_poison(lse), maybe_poison(dlogits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    using Vec = Vectorized<A>;
    constexpr int64_t W = Vec::size();
    const scalar_t* x = logits.data_ptr<scalar_t>();
    A *pl = loss.data_ptr<A>(), *pz = lse.data_ptr<A>();
    scalar_t* pd = compute_grad ? dlogits.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = x + r * V;
        const A z = row_lse(row, V);
        const bool ignored = tg[r] == ignore_index;
        pz[r] = z;
        pl[r] = ignored ? A(0) : z - A(row[tg[r]]);
        if (!compute_grad) continue;
        scalar_t* g = pd + r * V;
        if (ignored) {
          std::fill(g, g + V, scalar_t(0));
          continue;
        }
        const Vec vz(z);
        int64_t i = 0;
        for (; i + W <= V; i += W) store_acc((load_acc(row + i) - vz).exp(), g + i);
        for (; i < V; ++i) g[i] = static_cast<scalar_t>(std::exp(A(row[i]) - z));
        // the target's entry from the exact probability, not from its rounded 16-bit copy
        g[tg[r]] = static_cast<scalar_t>(std::exp(A(row[tg[r]]) - z) - A(1));
      }
    });
  });
  return {loss, lse, dlogits};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& dlogits_in, const at::Tensor& grad_in) {
  check_float(dlogits_in, "dlogits");
  TORCH_CHECK(dlogits_in.dim() == 2, "dlogits must have shape (N, V) (was the forward run with "
              "compute_grad=True?), got ", dlogits_in.sizes());
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == dlogits_in.size(0), "grad_loss must have shape (",
              dlogits_in.size(0), ",), got ", grad_in.sizes());
  const at::Tensor dl = dlogits_in.contiguous(),
                   grad = grad_in.to(stat_dtype(dlogits_in.scalar_type())).contiguous();
  at::Tensor out = at::empty_like(dl);
  maybe_poison(out);
  const int64_t N = dl.size(0), V = dl.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dl.scalar_type(), "cross_entropy_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    using Vec = Vectorized<A>;
    const scalar_t* pd = dl.data_ptr<scalar_t>();
    const A* pg = grad.data_ptr<A>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const Vec g(pg[r]);
        int64_t i = 0;
        for (; i + Vec::size() <= V; i += Vec::size()) store_acc(load_acc(pd + r * V + i) * g, po + r * V + i);
        for (; i < V; ++i) po[r * V + i] = static_cast<scalar_t>(A(pd[r * V + i]) * pg[r]);
      }
    });
  });
  return out;
}

}  // namespace

void cross_entropy_rows_inplace_cpu(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                    at::Tensor& loss_rows, bool to_grad) {
  TORCH_CHECK(logits.is_contiguous() && targets.is_contiguous() && loss_rows.is_contiguous(),
              "cross_entropy_rows_inplace_cpu: contiguous tensors expected");
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t* tg = targets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cross_entropy_rows_inplace_cpu", [&] {
    using Vec = Vectorized<scalar_t>;
    constexpr int64_t W = Vec::size();
    scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* pl = loss_rows.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row = x + r * V;
        const bool ignored = tg[r] == ignore_index;
        const scalar_t z = row_lse(row, V);
        pl[r] = ignored ? scalar_t(0) : z - row[tg[r]];
        if (!to_grad) continue;
        if (ignored) {
          std::fill(row, row + V, scalar_t(0));
          continue;
        }
        const Vec vz(z);
        int64_t i = 0;
        for (; i + W <= V; i += W) (Vec::loadu(row + i) - vz).exp().store(row + i);
        for (; i < V; ++i) row[i] = std::exp(row[i] - z);
        row[tg[r]] -= scalar_t(1);
      }
    });
  });
}

static void cross_entropy_kernels(torch::Library& m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
}
GPTFAST_CPU_KERNELS(cross_entropy_kernels);

}  // namespace gptfast
