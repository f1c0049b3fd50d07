// What every CUDA op's torch glue (<op>_glue.cpp) shares: the dtype code of a tensor, PyTorch's current stream
// of its device, a launch error turned into an exception, the dropout seed's value. Device-generic c10 APIs
// only (no CUDA headers), so the glue also syntax-checks against a CPU-only torch.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cstdint>

#include "../common.h"
#include "kernels.h"

namespace gptfast {
namespace glue {

namespace kc = gptfast::cuda;

inline kc::DType dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kc::kF32;
    case at::kHalf: return kc::kF16;
    case at::kBFloat16: return kc::kBF16;
    default:
      TORCH_CHECK(false, name, ": the CUDA kernels support float32, float16 and bfloat16, got ", t.scalar_type());
  }
}

inline void* current_stream(const at::Tensor& t) {
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(t.device()).native_handle();
}

inline void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, ": CUDA error ", err, " (", kc::error_string(err), ")");
}

inline uint64_t seed_value(const at::Tensor& seed) {
  return static_cast<uint64_t>(seed.to(at::kCPU).item<int64_t>());
}

}  // namespace glue
}  // namespace gptfast
