// The CPU kernels as one unit that is compiled once per instruction set (ISA): the AVX2 build
// lives in gptfast._C, the AVX-512 build in gptfast._C_avx512 (csrc/isa/). Both define the same
// functions; Python loads the module for the running CPU and calls its register_cpu_kernels()
// exactly once, so the dispatcher never sees two CPU kernels for one op, and code compiled for
// AVX-512 never runs (nor gets linked into a caller) on a CPU without it.
//
// Each kernel file registers its own kernels: GPTFAST_CPU_KERNELS(fn) at file scope, fn(m) calling m.impl
// for the file's ops; its schemas sit beside them (TORCH_LIBRARY_FRAGMENT, in the default build only:
// GPTFAST_ISA_MODULE marks the AVX-512 module, which adds kernels to schemas gptfast._C defines).
#pragma once
#include <torch/library.h>

#include <vector>

namespace gptfast {

using CpuKernels = void (*)(torch::Library&);
std::vector<CpuKernels>& cpu_kernel_files();      // every file's registration function, in this module

struct AddCpuKernels {
  explicit AddCpuKernels(CpuKernels fn) { cpu_kernel_files().push_back(fn); }
};

// Registers this build's CPU kernels for every gptfast op; raises if kernels are already
// registered by this module (a second call) - another module's second registration is caught by
// the Python loader, which registers one module only.
void register_cpu_kernels();
bool cpu_kernels_registered();
// The instruction set this unit was compiled for: "avx512", "avx2" or "generic".
const char* cpu_kernels_isa();

}  // namespace gptfast

#ifdef GPTFAST_REGISTER_CPU_AT_LOAD
// The CMake build (one ISA, loaded with torch.ops.load_library, no Python loader): each file registers its
// kernels as the library loads.
#define GPTFAST_CPU_KERNELS(fn) \
  TORCH_LIBRARY_IMPL(gptfast, CPU, m) { fn(m); }
#else
#define GPTFAST_CPU_KERNELS(fn) static ::gptfast::AddCpuKernels gptfast_cpu_kernels_##fn(fn)
#endif
