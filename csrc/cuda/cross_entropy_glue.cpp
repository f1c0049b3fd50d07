// Torch glue of the cross_entropy CUDA kernels (cross_entropy.cu): check the tensors, pick the dtype, launch on PyTorch's
// current stream of the tensors' device, turn a launch error into an exception. Registered for the schemas
// beside the CPU kernels (csrc/cpu/cross_entropy.cpp).
#include "glue.h"
#include "cross_entropy.h"

namespace gptfast {
namespace {

using namespace glue;

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

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cuda);
}

}  // namespace gptfast
