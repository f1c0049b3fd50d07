// Which instructions the integer-dot-product kernels (linear_w8a8.cpp, linear_int4.cpp) run: "vnni" (AVX-512 VNNI
// vpdpbusd, in the AVX-512 build on a CPU that has it), "avx2" (vpmaddubsw + vpmaddwd) or "generic" (loops). Header
// only: each ISA build compiles it with its own CPU_CAPABILITY macros.
#pragma once
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

namespace gptfast {

// The best path this build and this CPU have.
inline const char* int8_dot_path_here() {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  return vnni ? "vnni" : "avx2";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "generic";
#endif
}

// `wanted` if this build and CPU run it (an error naming the paths that run here otherwise), else the best. Tests
// run every path a CPU has; they compute the same sums.
inline const char* choose_int8_dot_path(const std::optional<c10::string_view>& wanted) {
  const char* best = int8_dot_path_here();
  if (!wanted.has_value()) return best;
  const std::string w(*wanted), b(best);
  TORCH_CHECK(w == "generic" || w == b || (w == "avx2" && b == "vnni"), "path ", w,
              " does not run here (this build and CPU: ", b, b == "generic" ? "" : ", generic",
              b == "vnni" ? ", avx2" : "", ")");
  return w == "generic" ? "generic" : w == "avx2" ? "avx2" : "vnni";
}

}  // namespace gptfast
