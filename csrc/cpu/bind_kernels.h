// The Python functions every module holding a CPU-kernel build exposes (gptfast._C and
// gptfast._C_avx512): register its kernels, say which ISA they were compiled for, poison outputs.
#pragma once
#include <pybind11/pybind11.h>

#include "kernels.h"

namespace gptfast {
bool poison_outputs();
void set_poison_outputs(bool on);

inline void bind_cpu_kernels(pybind11::module_& m) {
  m.def("register_cpu_kernels", &register_cpu_kernels,
        "Register this module's CPU kernels with the dispatcher (once per process, one module only).");
  m.def("cpu_kernels_registered", &cpu_kernels_registered);
  m.def("cpu_kernels_isa", &cpu_kernels_isa, "The instruction set these CPU kernels were compiled for.");
  m.def("set_poison_outputs", &set_poison_outputs, pybind11::arg("on"),
        "Fill op outputs with NaN before kernels write them (testing aid).");
  m.def("poison_outputs", &poison_outputs);
}
}  // namespace gptfast
