// Torch glue of the rms_norm CUDA kernels (rms_norm.cu): check the tensors, pick the dtype, launch on PyTorch's
// current stream of the tensors' device, turn a launch error into an exception. Registered for the schemas
// beside the CPU kernels (csrc/cpu/rms_norm.cpp).
#include "glue.h"
#include "rms_norm.h"

namespace gptfast {
namespace {

using namespace glue;

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  check_float(x_in, "x");
  const auto dt = dtype_code(x_in, "x");
  check_same(weight_in, "weight", x_in, "x");
  const int64_t C = x_in.size(-1);
  TORCH_CHECK(weight_in.dim() == 1 && weight_in.size(0) == C, "weight must have shape (", C, ",), got ", weight_in.sizes());
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous();
  auto stat_sizes = x.sizes().vec();
  stat_sizes.pop_back();
  at::Tensor y = at::empty_like(x), rstd = at::empty(stat_sizes, x.options().dtype(at::kFloat));
  maybe_poison(y), maybe_poison(rstd);
  check_launch(kc::rms_norm_fwd(dt, x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), x.numel() / C, C,
                                static_cast<float>(eps), current_stream(x)),
               "rms_norm_fwd");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                     const at::Tensor& weight_in, const at::Tensor& rstd_in) {
  const auto dt = dtype_code(x_in, "x");
  check_same(dy_in, "dy", x_in, "x");
  check_same(weight_in, "weight", x_in, "x");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "dy must have x's shape ", x_in.sizes(), ", got ", dy_in.sizes());
  const int64_t C = x_in.size(-1), rows = x_in.numel() / C;
  check_stat(rstd_in, "rstd", x_in, at::kFloat);
  TORCH_CHECK(rstd_in.numel() == rows, "rstd must hold one value per row of x (", rows, "), got ", rstd_in.numel());
  c10::DeviceGuard guard(x_in.device());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), w = weight_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor dx = at::empty_like(x), dw = at::empty_like(w);
  at::Tensor scratch = at::empty({std::max<int64_t>(kc::rms_norm_bwd_scratch_floats(rows, C), 1)},
                                 x.options().dtype(at::kFloat));
  maybe_poison(dx), maybe_poison(dw);
  check_launch(kc::rms_norm_bwd(dt, dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr<float>(), dx.data_ptr(),
                                dw.data_ptr(), scratch.data_ptr<float>(), rows, C, current_stream(x)),
               "rms_norm_bwd");
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda);
}

}  // namespace gptfast
