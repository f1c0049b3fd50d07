// Which instructions the integer-dot-product kernels (int8 and 4-bit weights x int8 rows of x) run: "vnni" (AVX-512 VNNI
// vpdpbusd, in the AVX-512 build on a CPU that has it), "avxvnni" (the same instruction on ymm registers, AVX-VNNI:
// either build, on a CPU that has it), "avx2" (vpmaddubsw + vpmaddwd) or "generic" (loops). Header only: each ISA
// build compiles it with its own CPU_CAPABILITY macros.
#pragma once
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace gptfast {

// Whether the CPU has AVX-VNNI (vpdpbusd on ymm registers, VEX-encoded: Intel's Alder Lake and later client
// cores, AMD Zen 5) - the AVX2 build's integer dot products where there is no AVX-512.
inline bool cpu_has_avx_vnni() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  static const bool has = __builtin_cpu_supports("avxvnni");
  return has;
#else
  return false;
#endif
}

// The best path this build and this CPU have: "vnni" (AVX-512 VNNI, zmm), "avxvnni" (AVX-VNNI, ymm), "avx2"
// (vpmaddubsw + vpmaddwd) or "generic".
inline const char* best_int8_dot_path() {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  return vnni ? "vnni" : cpu_has_avx_vnni() ? "avxvnni" : "avx2";
#elif defined(CPU_CAPABILITY_AVX2)
  return cpu_has_avx_vnni() ? "avxvnni" : "avx2";
#else
  return "generic";
#endif
}

// Every path this build and CPU run, best last.
inline std::vector<const char*> int8_dot_paths_here() {
  const std::string best = best_int8_dot_path();
  if (best == "generic") return {"generic"};
  std::vector<const char*> paths{"generic", "avx2"};
  if (cpu_has_avx_vnni()) paths.push_back("avxvnni");
  if (best == "vnni") paths.push_back("vnni");
  return paths;
}

// The path the kernels take by default: the best here, or GPTFAST_INT8_DOT_PATH where it names one that runs here
// (to measure a lesser CPU's path on this one, e.g. "avx2" for an AVX2-only EPYC; an unknown name is an error).
inline const char* int8_dot_path_here() {
  static const char* path = [] {
    const char* env = std::getenv("GPTFAST_INT8_DOT_PATH");
    if (env == nullptr || *env == '\0') return best_int8_dot_path();
    std::string here;
    for (const char* p : int8_dot_paths_here()) {
      if (std::strcmp(env, p) == 0) return p;
      here += here.empty() ? p : std::string(", ") + p;
    }
    TORCH_CHECK(false, "GPTFAST_INT8_DOT_PATH=", env, " does not run here (this build and CPU: ", here, ")");
    return best_int8_dot_path();
  }();
  return path;
}

// `wanted` if this build and CPU run it (an error naming the paths that run here otherwise), else the best. Tests
// run every path a CPU has; they compute the same sums.
inline const char* choose_int8_dot_path(const std::optional<c10::string_view>& wanted) {
  if (!wanted.has_value()) return int8_dot_path_here();
  const std::string w(*wanted);
  std::string here;
  for (const char* p : int8_dot_paths_here()) {
    if (w == p) return p;
    here += here.empty() ? p : std::string(", ") + p;
  }
  TORCH_CHECK(false, "path ", w, " does not run here (this build and CPU: ", here, ")");
  return nullptr;
}

// The path's name, compared (the dispatch of the kernels).
inline bool is_path(const char* path, const char* name) { return std::strcmp(path, name) == 0; }

}  // namespace gptfast
