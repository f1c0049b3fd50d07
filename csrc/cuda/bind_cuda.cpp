// Torch glue for the CUDA kernels: check the tensors, pick the dtype, launch on PyTorch's current
// stream of the tensors' device, turn a launch error into an exception. Registered for the same
// schemas as the CPU kernels (csrc/ops.cpp). Uses only device-generic c10 APIs and kernels.h (no
// CUDA headers), so it also syntax-checks against a CPU-only torch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common.h"
#include "kernels.h"

namespace gptfast {
namespace {

namespace kc = gptfast::cuda;

kc::DType dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kc::kF32;
    case at::kHalf: return kc::kF16;
    case at::kBFloat16: return kc::kBF16;
    default:
      TORCH_CHECK(false, name, ": the CUDA kernels support float32, float16 and bfloat16, got ", t.scalar_type());
  }
}

void* current_stream(const at::Tensor& t) {
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(t.device()).native_handle();
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, ": CUDA error ", err, " (", kc::error_string(err), ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                                   const at::Tensor& bias_in, double eps) {
  check_float(x_in, "x");
  const auto dt = dtype_code(x_in, "x");
  check_same(weight_in, "weight", x_in, "x");
  check_same(bias_in, "bias", x_in, "x");
  const int64_t C = x_in.size(-1);
  TORCH_CHECK(weight_in.dim() == 1 && weight_in.size(0) == C, "weight must have shape (", C, ",), got ", weight_in.sizes());
  TORCH_CHECK(bias_in.dim() == 1 && bias_in.size(0) == C, "bias must have shape (", C, ",), got ", bias_in.sizes());
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous(), b = bias_in.contiguous();
  auto stat_sizes = x.sizes().vec();
  stat_sizes.pop_back();
  at::Tensor y = at::empty_like(x), mean = at::empty(stat_sizes, x.options().dtype(at::kFloat)),
             rstd = at::empty(stat_sizes, x.options().dtype(at::kFloat));
  maybe_poison(y), maybe_poison(mean), maybe_poison(rstd);
  check_launch(kc::layer_norm_fwd(dt, x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), mean.data_ptr<float>(),
                                  rstd.data_ptr<float>(), x.numel() / C, C, static_cast<float>(eps), current_stream(x)),
               "layer_norm_fwd");
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                                   const at::Tensor& weight_in, const at::Tensor& mean_in,
                                                                   const at::Tensor& rstd_in) {
  const auto dt = dtype_code(x_in, "x");
  check_same(dy_in, "dy", x_in, "x");
  check_same(weight_in, "weight", x_in, "x");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "dy must have x's shape ", x_in.sizes(), ", got ", dy_in.sizes());
  const int64_t C = x_in.size(-1), rows = x_in.numel() / C;
  for (auto [t, name] : {std::pair{&mean_in, "mean"}, std::pair{&rstd_in, "rstd"}}) {
    check_stat(*t, name, x_in, at::kFloat);
    TORCH_CHECK(t->numel() == rows, name, " must hold one value per row of x (", rows, "), got ", t->numel());
  }
  c10::DeviceGuard guard(x_in.device());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), w = weight_in.contiguous(),
                   mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor dx = at::empty_like(x), dw = at::empty_like(w), db = at::empty_like(w);
  at::Tensor scratch = at::empty({2 * std::max<int64_t>(kc::layer_norm_bwd_scratch_floats(rows, C), 1)},
                                 x.options().dtype(at::kFloat));
  maybe_poison(dx), maybe_poison(dw), maybe_poison(db);
  check_launch(kc::layer_norm_bwd(dt, dy.data_ptr(), x.data_ptr(), w.data_ptr(), mean.data_ptr<float>(),
                                  rstd.data_ptr<float>(), dx.data_ptr(), dw.data_ptr(), db.data_ptr(),
                                  scratch.data_ptr<float>(), rows, C, current_stream(x)),
               "layer_norm_bwd");
  return {dx, dw, db};
}

at::Tensor gelu_fwd_cuda(const at::Tensor& x_in) {
  check_float(x_in, "x");
  const auto dt = dtype_code(x_in, "x");
  c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  maybe_poison(y);
  check_launch(kc::gelu_fwd(dt, x.data_ptr(), y.data_ptr(), x.numel(), current_stream(x)), "gelu_fwd");
  return y;
}

at::Tensor gelu_bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x_in) {
  const auto dt = dtype_code(x_in, "x");
  check_same(dy_in, "dy", x_in, "x");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "dy must have x's shape ", x_in.sizes(), ", got ", dy_in.sizes());
  c10::DeviceGuard guard(x_in.device());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  maybe_poison(dx);
  check_launch(kc::gelu_bwd(dt, dy.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(), current_stream(x)), "gelu_bwd");
  return dx;
}

uint64_t seed_value(const at::Tensor& seed) {
  return static_cast<uint64_t>(seed.to(at::kCPU).item<int64_t>());
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, bool causal, double scale,
                                                      double dropout_p, const at::Tensor& seed) {
  check_attention_args(q_in, k_in, v_in, dropout_p, seed, kc::kMaxHeadDim, "CUDA");
  const auto dt = dtype_code(q_in, "q");
  c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  at::Tensor o = at::empty_like(q), lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  maybe_poison(o), maybe_poison(lse);
  check_launch(kc::attention_fwd(dt, q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr<float>(),
                                 B * H, T, k.size(2), D, causal, static_cast<float>(scale),
                                 static_cast<float>(dropout_p), seed_value(seed), current_stream(q)),
               "attention_fwd");
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& o_in, const at::Tensor& lse_in, bool causal, double scale, double dropout_p,
    const at::Tensor& seed) {
  check_attention_args(q_in, k_in, v_in, dropout_p, seed, kc::kMaxHeadDim, "CUDA");
  const auto dt = dtype_code(q_in, "q");
  check_attention_bwd_args(dout_in, o_in, lse_in, q_in);
  c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), dout = dout_in.contiguous(),
                   o = o_in.contiguous(), lse = lse_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor delta = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  maybe_poison(dq), maybe_poison(dk), maybe_poison(dv);
  check_launch(kc::attention_bwd(dt, dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
                                 lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(),
                                 dv.data_ptr(), B * H, T, k.size(2), D, causal, static_cast<float>(scale),
                                 static_cast<float>(dropout_p), seed_value(seed), current_stream(q)),
               "attention_bwd");
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cuda(const at::Tensor& logits_in,
                                                                      const at::Tensor& targets_in,
                                                                      int64_t ignore_index, bool compute_grad) {
  check_float(logits_in, "logits");
  const auto dt = dtype_code(logits_in, "logits");
  TORCH_CHECK(logits_in.dim() == 2, "logits must have shape (N, V), got ", logits_in.sizes());
  TORCH_CHECK(targets_in.scalar_type() == at::kLong && targets_in.dim() == 1 && targets_in.size(0) == logits_in.size(0),
              "targets must be int64 of shape (", logits_in.size(0), ",)");
  TORCH_CHECK(targets_in.device() == logits_in.device(), "targets is on ", targets_in.device(), " but logits is on ",
              logits_in.device());
  c10::DeviceGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous(), targets = targets_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor loss = at::empty({N}, logits.options().dtype(at::kFloat)), lse = at::empty_like(loss);
  at::Tensor dlogits = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  maybe_poison(loss), maybe_poison(lse), maybe_poison(dlogits);
  check_launch(kc::cross_entropy_fwd(dt, logits.data_ptr(), targets.data_ptr<int64_t>(), loss.data_ptr<float>(),
                                     lse.data_ptr<float>(), compute_grad ? dlogits.data_ptr() : nullptr, N, V,
                                     ignore_index, compute_grad, current_stream(logits)),
               "cross_entropy_fwd");
  return {loss, lse, dlogits};
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& dlogits_in, const at::Tensor& grad_in) {
  const auto dt = dtype_code(dlogits_in, "dlogits");
  TORCH_CHECK(dlogits_in.dim() == 2, "dlogits must have shape (N, V), got ", dlogits_in.sizes());
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == dlogits_in.size(0), "grad_loss must have shape (",
              dlogits_in.size(0), ",), got ", grad_in.sizes());
  c10::DeviceGuard guard(dlogits_in.device());
  const at::Tensor dl = dlogits_in.contiguous(), grad = grad_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(dl);
  maybe_poison(out);
  check_launch(kc::cross_entropy_bwd(dt, dl.data_ptr(), grad.data_ptr<float>(), out.data_ptr(), dl.size(0), dl.size(1),
                                     current_stream(dl)),
               "cross_entropy_bwd");
  return out;
}

}  // namespace

// The linear layer of decoding (csrc/cuda/linear.cu) for up to kc::kLinearMaxRows rows of x; more rows
// are a matrix product: at::mm (cuBLAS) on the weights widened to x's dtype.
at::Tensor linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight_in, const std::optional<at::Tensor>& scales_in,
                           const std::optional<at::Tensor>& bias_in) {
  check_float(x, "x");
  const auto xt = dtype_code(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have shape (..., K), got a 0-dim tensor");
  const int64_t K = x.size(-1), N = weight_in.size(0);
  kc::WDType wt;
  switch (weight_in.scalar_type()) {
    case at::kFloat: wt = kc::kWF32; break;
    case at::kBFloat16: wt = kc::kWBF16; break;
    case at::kChar: wt = kc::kWI8; break;
    default: TORCH_CHECK(false, "weight must be float32, bfloat16 or int8, got ", weight_in.scalar_type());
  }
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == K, "weight must have shape (N, K) with K = x's last dim (",
              K, "), got ", weight_in.sizes());
  TORCH_CHECK(weight_in.device() == x.device(), "weight is on ", weight_in.device(), " but x is on ", x.device());
  TORCH_CHECK(wt != kc::kWI8 || scales_in.has_value(), "int8 weights need scales (one float32 per output row)");
  for (auto [t, name, want] : {std::tuple{&scales_in, "scales", at::kFloat}, std::tuple{&bias_in, "bias", x.scalar_type()}}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->scalar_type() == want, name, " must be ", want, ", got ", (*t)->scalar_type());
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == N, name, " must have shape (", N, ",) - one per output row - got ",
                (*t)->sizes());
    TORCH_CHECK((*t)->device() == x.device(), name, " is on ", (*t)->device(), " but x is on ", x.device());
  }
  c10::DeviceGuard guard(x.device());
  at::Tensor x2 = x.reshape({-1, K});
  if (K > 0 && x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t M = x2.size(0);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  const at::Tensor w = weight_in.contiguous();
  const std::optional<at::Tensor> scales = scales_in ? std::optional(scales_in->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> bias = bias_in ? std::optional(bias_in->contiguous()) : std::nullopt;
  if (M > kc::kLinearMaxRows) {
    at::Tensor y = at::mm(x2, (w.scalar_type() == x.scalar_type() ? w : w.to(x.scalar_type())).t());
    if (scales) y.mul_(scales->to(x.scalar_type()));
    if (bias) y.add_(*bias);
    return y.view(out_sizes);
  }
  at::Tensor y = at::empty({M, N}, x.options());
  maybe_poison(y);
  if (M > 0 && N > 0)
    check_launch(kc::linear_fwd(xt, wt, x2.data_ptr(), x2.stride(0), w.data_ptr(),
                                scales ? scales->data_ptr<float>() : nullptr, bias ? bias->data_ptr() : nullptr,
                                y.data_ptr(), M, N, K, current_stream(x)),
                 "linear_fwd");
  return y.view(out_sizes);
}

void check_dropout_args(const at::Tensor& x, double p, const at::Tensor& seed) {
  check_float(x, "x");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "seed must be a one-element int64 tensor, got ",
              seed.scalar_type(), " with ", seed.numel(), " elements");
}

at::Tensor dropout_launch(const at::Tensor& x_in, const at::Tensor* residual, at::ScalarType out_dtype, double p,
                          const at::Tensor& seed) {
  const auto in = dtype_code(x_in, "x");
  c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor res = residual ? residual->contiguous() : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  const auto out = dtype_code(y, "the output");
  maybe_poison(y);
  const int64_t C = x.dim() ? x.size(-1) : 1;
  check_launch(kc::dropout_add(in, out, x.data_ptr(), res.defined() ? res.data_ptr() : nullptr, y.data_ptr(),
                               x.numel(), C, seed_value(seed), static_cast<float>(p), current_stream(x)),
               "dropout_add");
  return y;
}

at::Tensor dropout_add_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual, double p,
                                const at::Tensor& seed) {
  check_dropout_args(x, p, seed);
  if (!residual.has_value()) return dropout_launch(x, nullptr, x.scalar_type(), p, seed);
  check_float(*residual, "residual");
  TORCH_CHECK(residual->sizes() == x.sizes(), "residual must have x's shape ", x.sizes(), ", got ", residual->sizes());
  TORCH_CHECK(residual->device() == x.device(), "residual is on ", residual->device(), " but x is on ", x.device());
  return dropout_launch(x, &*residual, residual->scalar_type(), p, seed);
}

at::Tensor dropout_bwd_cuda(const at::Tensor& dy, double p, const at::Tensor& seed, at::ScalarType dtype) {
  check_dropout_args(dy, p, seed);
  return dropout_launch(dy, nullptr, dtype, p, seed);
}

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("dropout_add_fwd", &dropout_add_fwd_cuda);
  m.impl("dropout_bwd", &dropout_bwd_cuda);
  m.impl("linear_fwd", &linear_fwd_cuda);
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
  m.impl("gelu_fwd", &gelu_fwd_cuda);
  m.impl("gelu_bwd", &gelu_bwd_cuda);
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cuda);
}

}  // namespace gptfast
