// Torch glue of the layer_norm CUDA kernels (layer_norm.cu): check the tensors, pick the dtype, launch on PyTorch's
// current stream of the tensors' device, turn a launch error into an exception. Registered for the schemas
// beside the CPU kernels (csrc/cpu/layer_norm.cpp).
#include <utility>

#include "glue.h"
#include "layer_norm.h"

namespace gptfast {
namespace {

using namespace glue;

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

}  // namespace

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}

}  // namespace gptfast
