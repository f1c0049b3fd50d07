// Torch glue of the dropout CUDA kernels (dropout.cu): check the tensors, pick the dtype, launch on PyTorch's
// current stream of the tensors' device, turn a launch error into an exception. Registered for the schemas
// beside the CPU kernels (csrc/cpu/dropout.cpp).
#include <optional>

#include "glue.h"
#include "dropout.h"

namespace gptfast {
namespace {

using namespace glue;

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

}  // namespace

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("dropout_add_fwd", &dropout_add_fwd_cuda);
  m.impl("dropout_bwd", &dropout_bwd_cuda);
}

}  // namespace gptfast
