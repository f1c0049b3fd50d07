// Torch glue of the integer-dot-product CUDA kernels (linear_int8_dot.cu): check the tensors, quantize x's rows
// into a padded int8 buffer, launch the dot kernel 16 rows of x at a time on PyTorch's current stream. Registered
// for the schemas beside the CPU kernels (csrc/cpu/linear_w8a8.cpp, linear_int4.cpp).
#include <optional>

#include "glue.h"
#include "linear_int8_dot.h"

namespace gptfast {
namespace {

using namespace glue;

constexpr int64_t kMaxK = 65536;              // the int32 sums
int64_t padded_k(int64_t K) { return (K + 63) / 64 * 64; }

struct Quantized {
  at::Tensor x2, q, sx;                       // x as (M, K), its rows as int8 (M, Kp), their scales (M,)
  int64_t M, K, Kp;
};

// x (..., K) float32 on the GPU, quantized row by row (the CPU kernels' q and sx)
Quantized quantize(const at::Tensor& x, const std::optional<c10::string_view>& path) {
  TORCH_CHECK(!path.has_value(), "path names a CPU instruction path; the CUDA kernels have one (got ", *path, ")");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1,
              "x: the CUDA integer-dot-product kernels take float32 (..., K) activations, got ", x.scalar_type(), " ",
              x.sizes());
  const int64_t K = x.size(-1);
  TORCH_CHECK(K <= kMaxK, "K must be at most ", kMaxK, " (the int32 sums), got ", K);
  at::Tensor x2 = x.reshape({-1, K});
  if (K > 0 && x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t M = x2.size(0), Kp = padded_k(K);
  at::Tensor q = at::empty({M, std::max<int64_t>(Kp, 64)}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({M}, x.options());
  if (M > 0)
    check_launch(kc::quantize_rows_int8(x2.data_ptr<float>(), x2.stride(0), M, K, q.data_ptr<int8_t>(), Kp,
                                        sx.data_ptr<float>(), current_stream(x)),
                 "quantize_rows_int8");
  return {x2, q, sx, M, K, Kp};
}

void check_vector(const std::optional<at::Tensor>& t, const char* name, int64_t N, const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == N, name, " must be float32 (", N,
              ",) - one per output row - got ", t->scalar_type(), " ", t->sizes());
  TORCH_CHECK(t->device() == x.device(), name, " is on ", t->device(), " but x is on ", x.device());
}

at::Tensor output(const at::Tensor& x, int64_t M, int64_t N) {
  at::Tensor y = at::empty({M, N}, x.options());
  maybe_poison(y);
  return y;
}

at::Tensor out_view(const at::Tensor& y, const at::Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

at::Tensor linear_w8a8_fwd_cuda(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& scales_in,
                                const std::optional<at::Tensor>& bias_in,
                                const std::optional<c10::string_view> path) {
  c10::DeviceGuard guard(x.device());
  TORCH_CHECK(weight_in.scalar_type() == at::kChar && weight_in.dim() == 2 && weight_in.size(1) == x.size(-1),
              "weight must be int8 (N, K) with K = x's last dim (", x.size(-1), "), got ", weight_in.scalar_type(), " ",
              weight_in.sizes());
  TORCH_CHECK(weight_in.device() == x.device(), "weight is on ", weight_in.device(), " but x is on ", x.device());
  const int64_t N = weight_in.size(0);
  check_vector(scales_in, "scales", N, x);
  check_vector(bias_in, "bias", N, x);
  const Quantized a = quantize(x, path);
  const at::Tensor w = weight_in.contiguous(), scales = scales_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in ? std::optional(bias_in->contiguous()) : std::nullopt;
  at::Tensor y = output(x, a.M, N);
  for (int64_t m0 = 0; m0 < a.M && N > 0; m0 += kc::kInt8DotMaxRows)
    check_launch(kc::linear_w8a8_fwd(a.q.data_ptr<int8_t>() + m0 * a.Kp, a.Kp, a.sx.data_ptr<float>() + m0,
                                     w.data_ptr<int8_t>(), scales.data_ptr<float>(),
                                     bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>() + m0 * N,
                                     std::min<int64_t>(kc::kInt8DotMaxRows, a.M - m0), N, a.K, current_stream(x)),
                 "linear_w8a8_fwd");
  return out_view(y, x, N);
}

at::Tensor linear_int4_fwd_cuda(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& scales_in,
                                const std::optional<at::Tensor>& bias_in,
                                const std::optional<c10::string_view> path) {
  c10::DeviceGuard guard(x.device());
  const int64_t Kp = padded_k(x.size(-1));
  TORCH_CHECK(weight_in.scalar_type() == at::kByte && weight_in.dim() == 2 && weight_in.size(1) == Kp / 2,
              "weight must be uint8 (N, Kp / 2) - two 4-bit weights a byte, Kp = K = ", x.size(-1),
              " rounded up to 64 - got ", weight_in.scalar_type(), " ", weight_in.sizes());
  const int64_t N = weight_in.size(0);
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.dim() == 2 && scales_in.size(0) == N &&
                  (scales_in.size(1) == Kp / 32 || scales_in.size(1) == Kp / 64),
              "scales must be float32 (N, Kp / 32) or (N, Kp / 64) - one per group of 32 or 64 - got ",
              scales_in.scalar_type(), " ", scales_in.sizes());
  for (const at::Tensor* t : {&weight_in, &scales_in})
    TORCH_CHECK(t->device() == x.device(), "weight and scales must be on x's device ", x.device());
  check_vector(bias_in, "bias", N, x);
  const Quantized a = quantize(x, path);
  const at::Tensor w = weight_in.contiguous(), scales = scales_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in ? std::optional(bias_in->contiguous()) : std::nullopt;
  at::Tensor y = output(x, a.M, N);
  for (int64_t m0 = 0; m0 < a.M && N > 0 && Kp > 0; m0 += kc::kInt8DotMaxRows)
    check_launch(kc::linear_int4_fwd(a.q.data_ptr<int8_t>() + m0 * a.Kp, a.Kp, a.sx.data_ptr<float>() + m0,
                                     w.data_ptr<uint8_t>(), scales.data_ptr<float>(), scales.size(1),
                                     bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>() + m0 * N,
                                     std::min<int64_t>(kc::kInt8DotMaxRows, a.M - m0), N, current_stream(x)),
                 "linear_int4_fwd");
  if (Kp == 0 && bias) y.copy_(bias->expand({a.M, N}));   // K = 0: no products, the bias alone
  else if (Kp == 0) y.zero_();
  return out_view(y, x, N);
}

}  // namespace

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("linear_w8a8_fwd", &linear_w8a8_fwd_cuda);
  m.impl("linear_int4_fwd", &linear_int4_fwd_cuda);
}

}  // namespace gptfast
