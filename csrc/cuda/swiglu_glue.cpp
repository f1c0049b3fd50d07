// Torch glue of the swiglu CUDA kernels (swiglu.cu): check the tensors, pick the dtype, launch on PyTorch's
// current stream of the tensors' device, turn a launch error into an exception. Registered for the schemas
// beside the CPU kernels (csrc/cpu/swiglu.cpp).
#include "glue.h"
#include "swiglu.h"

namespace gptfast {
namespace {

using namespace glue;

at::Tensor swiglu_fwd_cuda(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_float(gate_in, "gate");
  const auto dt = dtype_code(gate_in, "gate");
  check_same(up_in, "up", gate_in, "gate");
  TORCH_CHECK(up_in.sizes() == gate_in.sizes(), "up must have gate's shape ", gate_in.sizes(), ", got ", up_in.sizes());
  c10::DeviceGuard guard(gate_in.device());
  const at::Tensor g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor y = at::empty_like(g);
  maybe_poison(y);
  check_launch(kc::swiglu_fwd(dt, g.data_ptr(), u.data_ptr(), y.data_ptr(), g.numel(), current_stream(g)), "swiglu_fwd");
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& dy_in, const at::Tensor& gate_in,
                                                   const at::Tensor& up_in) {
  const auto dt = dtype_code(gate_in, "gate");
  check_same(dy_in, "dy", gate_in, "gate");
  check_same(up_in, "up", gate_in, "gate");
  TORCH_CHECK(dy_in.sizes() == gate_in.sizes() && up_in.sizes() == gate_in.sizes(),
              "dy and up must have gate's shape ", gate_in.sizes());
  c10::DeviceGuard guard(gate_in.device());
  const at::Tensor dy = dy_in.contiguous(), g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  maybe_poison(dg), maybe_poison(du);
  check_launch(kc::swiglu_bwd(dt, dy.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(), g.numel(),
                              current_stream(g)),
               "swiglu_bwd");
  return {dg, du};
}

}  // namespace

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("swiglu_fwd", &swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &swiglu_bwd_cuda);
}

}  // namespace gptfast
