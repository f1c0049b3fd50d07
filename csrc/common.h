// Shared helpers for the gptfast C++ ops: argument checks with clear messages, output poisoning.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace gptfast {

// When on (tests), freshly allocated outputs are filled with NaN before a kernel runs, so an
// element the kernel forgets to write shows up instead of passing by luck.
bool poison_outputs();
void set_poison_outputs(bool on);
void maybe_poison(at::Tensor& t);

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_float(t, name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

inline void check_stat(const at::Tensor& t, const char* name, const at::Tensor& ref, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, name, " must have dtype ", want, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but x is on ", ref.device());
}

// Statistics (mean, rstd, logsumexp) are float32, or float64 for float64 inputs.
inline at::ScalarType stat_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace gptfast
