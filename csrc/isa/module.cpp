// gptfast._C_avx512: the CPU kernels of csrc/cpu/ compiled for AVX-512 (flags: gptfast/_build_meta.py),
// as a module of their own with hidden symbols, so none of its code can stand in for the AVX2
// build's. Loaded and registered only on a CPU that has AVX-512 (gptfast/compiled.py).
#include <pybind11/pybind11.h>

#include "../cpu/bind_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gptfast CPU kernels built for one instruction set (registered on demand)";
  gptfast::bind_cpu_kernels(m);
}
