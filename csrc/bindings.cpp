// The Python module gptfast._C (pybind11): everything that is not an op. The ops themselves are
// registered with the dispatcher (each kernel file's TORCH_LIBRARY_FRAGMENT) and reached as torch.ops.gptfast.*.
// Kept in its own file, including only pybind11, so it compiles quickly.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdio>
#include <string>
#include <vector>

#if __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

#include "cpu/bind_kernels.h"
#include "cpu/bpe_train.h"

#ifndef TORCH_VERSION
#define TORCH_VERSION "unknown"
#endif

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gptfast compiled extension: build information and the BPE training loop";
  m.def("build_info", [] {
    py::dict info;
    std::vector<std::string> backends{"cpu"};
#ifdef GPTFAST_WITH_CUDA
    backends.push_back("cuda");
    info["cuda_archs"] = std::string("see TORCH_CUDA_ARCH_LIST of the build");
#else
    info["cuda_archs"] = std::string("none");
#endif
    info["compiled_backends"] = backends;
    info["cpu_isa"] = std::string(gptfast::cpu_kernels_isa());   // of this module's build (see also _C_avx512)
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
#ifdef GPTFAST_SOURCE_HASH_HEX
    char hash[17];
    std::snprintf(hash, sizeof hash, "%016llx", static_cast<unsigned long long>(GPTFAST_SOURCE_HASH_HEX));
    info["source_hash"] = std::string(hash);
#else
    info["source_hash"] = std::string("unknown");
#endif
    info["torch_version"] = std::string(TORCH_VERSION);
    return info;
  }, "What this build of gptfast._C contains and was compiled against.");
  m.def("bpe_learn_merges", &gptfast::bpe_learn_merges, py::arg("words"), py::arg("counts"),
        py::arg("num_merges"), py::arg("first_id") = 256,
        "BPE training loop: merges (a, b, new_id), most frequent pair first, ties to the smallest pair.");
  gptfast::bind_cpu_kernels(m);
}
