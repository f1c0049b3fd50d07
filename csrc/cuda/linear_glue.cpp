// Torch glue of the linear CUDA kernels (linear.cu): check the tensors, pick the dtype, launch on PyTorch's
// current stream of the tensors' device, turn a launch error into an exception. Registered for the schemas
// beside the CPU kernels (csrc/cpu/linear.cpp).
#include <ATen/ops/mm.h>

#include <optional>

#include "glue.h"
#include "linear.h"

namespace gptfast {
namespace {

using namespace glue;

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

}  // namespace

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("linear_fwd", &linear_fwd_cuda);
}

}  // namespace gptfast
