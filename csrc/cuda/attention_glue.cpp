// Torch glue of the attention CUDA kernels (attention.cu): check the tensors, pick the dtype, launch on PyTorch's
// current stream of the tensors' device, turn a launch error into an exception. Registered for the schemas
// beside the CPU kernels (csrc/cpu/attention_fwd.cpp, attention_bwd.cpp).
#include "glue.h"
#include "attention.h"

namespace gptfast {
namespace {

using namespace glue;

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
                                 static_cast<float>(dropout_p), seed_value(seed), current_stream(q),
                                 H / k.size(1)),   // grouped-query: query heads per K/V head
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
                                 static_cast<float>(dropout_p), seed_value(seed), current_stream(q),
                                 H / k.size(1)),
               "attention_bwd");
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace gptfast
