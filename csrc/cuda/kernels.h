// gptfast CUDA kernels: raw pointers, sizes and a stream; no torch headers, so each .cu compiles
// fast with plain nvcc and can be tested standalone (test_kernels.cu). Every launcher returns the
// cudaError_t of its launches as an int (0 = success), which the torch glue (<op>_glue.cpp) turns
// into an exception; `stream` is a cudaStream_t passed as void* so the glue needs no CUDA headers.
// Each op declares its launchers in its own header (<op>.h) beside its kernels (<op>.cu).
//
// dtype codes: 0 = float32, 1 = float16, 2 = bfloat16. Statistics (mean, rstd, lse) are float32.
#pragma once
#include <cstdint>

namespace gptfast {
namespace cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

const char* error_string(int err);

}  // namespace cuda
}  // namespace gptfast
