// Torch glue of the gelu CUDA kernels (gelu.cu): check the tensors, pick the dtype, launch on PyTorch's
// current stream of the tensors' device, turn a launch error into an exception. Registered for the schemas
// beside the CPU kernels (csrc/cpu/gelu.cpp).
#include "glue.h"
#include "gelu.h"

namespace gptfast {
namespace {

using namespace glue;

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

}  // namespace

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("gelu_fwd", &gelu_fwd_cuda);
  m.impl("gelu_bwd", &gelu_bwd_cuda);
}

}  // namespace gptfast
