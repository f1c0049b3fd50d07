// Registration of the CPU kernels (each kernel file adds itself: kernels.h) and the output-poisoning switch
// they read.
// Part of every per-ISA build, so each module has its own switch; Python sets them all.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <memory>

#include "../common.h"
#include "kernels.h"

namespace gptfast {

static std::atomic<bool> g_poison{false};
bool poison_outputs() { return g_poison.load(std::memory_order_relaxed); }
void set_poison_outputs(bool on) { g_poison.store(on, std::memory_order_relaxed); }
void maybe_poison(at::Tensor& t) {
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

// The registrations live as long as the module: the Library object is never destroyed (a
// registration is undone when its Library goes away).
static std::unique_ptr<torch::Library> g_cpu_library;

std::vector<CpuKernels>& cpu_kernel_files() {
  static std::vector<CpuKernels> files;    // filled as the module loads, before Python can call anything
  return files;
}

static void register_all(torch::Library& m) {
  for (CpuKernels fn : cpu_kernel_files()) fn(m);
}

void register_cpu_kernels() {
  TORCH_CHECK(!g_cpu_library, "gptfast: the ", cpu_kernels_isa(), " CPU kernels are already registered");
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "gptfast", c10::DispatchKey::CPU, __FILE__,
                                              __LINE__);
  register_all(*lib);
  g_cpu_library = std::move(lib);
}

bool cpu_kernels_registered() { return static_cast<bool>(g_cpu_library); }

const char* cpu_kernels_isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "generic";
#endif
}

}  // namespace gptfast
