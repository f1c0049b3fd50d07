// Torch glue of the rope CUDA kernel (rope.cu): check the tensors, pick the dtype, launch on PyTorch's current
// stream of the tensors' device, turn a launch error into an exception. Registered for the schemas beside the
// CPU kernels (csrc/cpu/rope.cpp).
#include "glue.h"
#include "rope.h"

namespace gptfast {
namespace {

using namespace glue;

at::Tensor rotate(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, bool back, const char* name) {
  const at::Tensor x = x_in.stride(-1) == 1 ? x_in : x_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  maybe_poison(y);
  check_launch(kc::rope_rotate(dtype_code(x, name), x.data_ptr(), y.data_ptr(), cos.data_ptr<float>(),
                               sin.data_ptr<float>(), x.size(0), x.size(1), x.size(2), x.size(3), x.stride(0),
                               x.stride(1), x.stride(2), back, current_stream(x)),
               name);
  return y;
}

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_in,
                                             const at::Tensor& sin_in, bool back) {
  check_float(q, "q");
  check_same(k, "k", q, "q");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.size(0) == q.size(0) && k.size(2) == q.size(2) &&
                  k.size(3) == q.size(3) && q.size(3) % 2 == 0,
              "q and k must be (B, heads, T, head_dim) with the same B, T and an even head_dim, got ", q.sizes(),
              " and ", k.sizes());
  for (auto [t, name] : {std::pair{&cos_in, "cos"}, std::pair{&sin_in, "sin"}}) {
    check_float(*t, name);
    TORCH_CHECK(t->device() == q.device(), name, " is on ", t->device(), " but q is on ", q.device());
    TORCH_CHECK(t->dim() == 2 && t->size(0) == q.size(2) && t->size(1) == q.size(3) / 2, name,
                " must be (T, head_dim / 2), got ", t->sizes());
  }
  c10::DeviceGuard guard(q.device());
  const at::Tensor cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  const char* name = back ? "rope_bwd" : "rope_fwd";
  return {rotate(q, cos, sin, back, name), rotate(k, cos, sin, back, name)};
}

std::tuple<at::Tensor, at::Tensor> rope_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                 const at::Tensor& sin) {
  return rope_cuda(q, k, cos, sin, false);
}

std::tuple<at::Tensor, at::Tensor> rope_bwd_cuda(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& cos,
                                                 const at::Tensor& sin) {
  return rope_cuda(dq, dk, cos, sin, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("rope_fwd", &rope_fwd_cuda);
  m.impl("rope_bwd", &rope_bwd_cuda);
}

}  // namespace gptfast
