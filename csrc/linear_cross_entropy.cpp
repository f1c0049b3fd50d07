// The LM head and the loss in one op: mean cross-entropy of hidden (N, C) @ weight (V, C)^T against
// targets (N,), without ever holding the (N, V) logits.
//
// Rows go in chunks of `chunk_rows`. For each chunk: logits = h_c W^T (one GEMM, ATen/BLAS), reduced
// row by row to its loss with the log-sum-exp in float32 (float64 for float64 inputs); with
// compute_grad the chunk's logits become its gradient softmax - onehot in place and feed two more
// GEMMs right away: dH_c = dL_c W and dW += dL_c^T h_c. So peak extra memory is one chunk of logits
// (plus dW, which any backward of the LM head produces), never N x V. The forward returns the
// gradients of the mean loss; the backward only scales them by the upstream gradient (a scalar).
//
// Device-generic: ATen GEMMs everywhere; the per-row step is our vectorized kernel on CPU and ATen
// ops elsewhere. Registered as CompositeExplicitAutograd (autograd and the fake kernel: Python).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "cpu/cross_entropy.h"

TORCH_LIBRARY_FRAGMENT(gptfast, m) {
  // The LM head fused with the loss: mean cross-entropy of hidden (N, C) @ weight (V, C)^T against
  // targets (N,), rows in chunks of chunk_rows so the (N, V) logits never exist; loss is a 0-dim float32
  // (float64 for float64 inputs). With compute_grad, also the gradients of that mean loss for hidden and
  // weight, which the backward only scales by the upstream gradient.
  m.def("linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor targets, int ignore_index, int chunk_rows, bool compute_grad) -> (Tensor loss, Tensor grad_hidden, Tensor grad_weight)");
}

namespace gptfast {
namespace {

// loss_rows[r] = lse_r - logits[r, t_r] (0 for ignored rows); with to_grad, logits <- softmax - onehot.
void rows_to_loss_and_grad(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, at::Tensor& loss_rows,
                           bool to_grad) {
  if (logits.device().is_cpu()) {
    cross_entropy_rows_inplace_cpu(logits, targets, ignore_index, loss_rows, to_grad);
    return;
  }
  const at::Tensor valid = targets != ignore_index;
  const at::Tensor safe = at::where(valid, targets, at::zeros_like(targets)).unsqueeze(1);
  const at::Tensor lse = at::logsumexp(logits, {1});
  loss_rows.copy_(at::where(valid, lse - logits.gather(1, safe).squeeze(1), at::zeros_like(lse)));
  if (!to_grad) return;
  logits.sub_(lse.unsqueeze(1)).exp_();
  logits.scatter_add_(1, safe, -at::ones_like(safe, logits.options()));
  logits.mul_(valid.unsqueeze(1).to(logits.scalar_type()));
}

// grad_w (V, C, float32 for 16-bit inputs) = (first chunk) or += dL_c^T h_c. logits: the chunk's dL in the
// statistics dtype; dl: the same in the inputs' dtype (16-bit when wide).
void add_weight_grad(at::Tensor& grad_w, const at::Tensor& logits, const at::Tensor& dl, const at::Tensor& hc,
                     bool first, bool wide) {
  if (wide && hc.device().is_cpu()) {
    // CPU: dW from the float32 dL (and h_c, exact in float32) by one float32 GEMM into the sum. A 16-bit GEMM,
    // widened and added, would cost two extra passes over V x C per chunk: at Qwen3's vocabulary (151,936,
    // 110 rows a chunk) those passes took 3x the GEMM (2-core Xeon, benchmarks/NOTES.md).
    const at::Tensor hc32 = hc.to(logits.scalar_type());
    if (first) at::mm_out(grad_w, logits.t(), hc32); else grad_w.addmm_(logits.t(), hc32);
  } else if (wide && first) {
    grad_w.copy_(at::mm(dl.t(), hc));                       // half GEMM, widened into the float32 sum
  } else if (wide) {
    grad_w.add_(at::mm(dl.t(), hc));                        // float32 accumulation
  } else if (first) {
    at::mm_out(grad_w, dl.t(), hc);                         // dW = dL_0^T h_0
  } else {
    grad_w.addmm_(dl.t(), hc);                              // dW += dL_c^T h_c
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& targets_in, int64_t ignore_index,
    int64_t chunk_rows, bool compute_grad) {
  check_float(hidden_in, "hidden");
  TORCH_CHECK(hidden_in.dim() == 2, "hidden must have shape (N, C), got ", hidden_in.sizes());
  check_same(weight_in, "weight", hidden_in, "hidden");
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == hidden_in.size(1),
              "weight must have shape (V, C) with hidden's C = ", hidden_in.size(1), ", got ", weight_in.sizes());
  TORCH_CHECK(targets_in.scalar_type() == at::kLong, "targets must be int64, got ", targets_in.scalar_type());
  TORCH_CHECK(targets_in.dim() == 1 && targets_in.size(0) == hidden_in.size(0), "targets must have shape (N,) = (",
              hidden_in.size(0), ",), got ", targets_in.sizes());
  TORCH_CHECK(targets_in.device() == hidden_in.device(), "targets is on ", targets_in.device(), " but hidden is on ",
              hidden_in.device());
  TORCH_CHECK(chunk_rows >= 1, "chunk_rows must be >= 1, got ", chunk_rows);
  const at::Tensor h = hidden_in.contiguous(), w = weight_in.contiguous(), t = targets_in.contiguous();
  const int64_t N = h.size(0), C = h.size(1), V = w.size(0);
  const auto stat = stat_dtype(h.scalar_type());           // where the softmax statistics live
  const bool wide = h.scalar_type() != stat;               // float16/bfloat16 GEMMs, float32 softmax
  at::Tensor loss_rows = at::empty({N}, h.options().dtype(stat));
  at::Tensor grad_h = compute_grad ? at::empty_like(h) : at::empty({0}, h.options());
  // not zero-filled: the first chunk writes it, the others add to it (a V x C fill saved per step)
  at::Tensor grad_w = compute_grad ? at::empty({V, C}, w.options().dtype(stat)) : at::empty({0}, w.options());
  maybe_poison(loss_rows), maybe_poison(grad_h), maybe_poison(grad_w);   // every chunk writes all of its rows
  if (compute_grad && N == 0) grad_w.zero_();              // no chunk at all: no rows, no gradient
  // one chunk's logits, allocated once and reused: the only logits that ever exist
  at::Tensor chunk = at::empty({std::min(chunk_rows, N), V}, h.options());
  for (int64_t r0 = 0; r0 < N; r0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, N - r0);
    const at::Tensor hc = h.narrow(0, r0, n);
    at::Tensor logits = chunk.narrow(0, 0, n);
    at::mm_out(logits, hc, w.t());                          // (n, V)
    if (wide) logits = logits.to(stat);
    at::Tensor loss_c = loss_rows.narrow(0, r0, n);
    rows_to_loss_and_grad(logits, t.narrow(0, r0, n), ignore_index, loss_c, compute_grad);
    if (!compute_grad) continue;
    const at::Tensor dl = wide ? logits.to(h.scalar_type()) : logits;
    at::Tensor gh = grad_h.narrow(0, r0, n);
    at::mm_out(gh, dl, w);                                  // dH_c = dL_c W
    add_weight_grad(grad_w, logits, dl, hc, /*first=*/r0 == 0, wide);
  }
  const at::Tensor n_valid = (t != ignore_index).sum().to(stat);
  at::Tensor loss = loss_rows.sum() / n_valid;             // NaN when every target is ignored, as F.cross_entropy
  if (compute_grad) {
    // every target ignored: the loss is NaN but the gradient is zero, as F.cross_entropy's (no 0 * inf)
    const at::Tensor inv = at::where(n_valid > 0, n_valid.reciprocal(), at::zeros_like(n_valid));
    grad_h.mul_(inv.to(grad_h.scalar_type()));
    grad_w = grad_w.mul_(inv).to(w.scalar_type());          // in place: no second V x C buffer
  }
  return {loss, grad_h, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(gptfast, CompositeExplicitAutograd, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd);
}

}  // namespace gptfast
