// Shared by the two attention implementations (attention.cu: plain fp32 math for every dtype;
// attention_tc.cu: tensor-core WMMA for fp16/bf16): dropout decisions, shared-memory opt-in.
#pragma once
#include <cstdlib>
#include <cstring>

#include "../dropout_hash.h"
#include "attention.h"
#include "common.cuh"

namespace gptfast {
namespace cuda {

struct Dropout {
  bool on;
  float keep_scale;
  uint32_t threshold;
  uint64_t seed;
  __device__ __forceinline__ bool keep(uint32_t head_key, int64_t row, int64_t col) const {
    return dropout_keep(dropout_row_key(head_key, static_cast<uint32_t>(row)), static_cast<uint32_t>(col), threshold);
  }
};

inline Dropout make_dropout(float p, uint64_t seed) {
  return Dropout{p > 0.f, p > 0.f ? 1.f / (1.f - p) : 1.f, p > 0.f ? dropout_threshold(p) : 0u, seed};
}

template <typename Kernel>
inline int set_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return 0;
  return static_cast<int>(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(bytes)));
}

// The tensor-core kernels (attention_tc.cu): fp16/bf16 with head dims a multiple of 16.
// GPTFAST_CUDA_ATTENTION=simt forces the plain kernels (to compare the two).
inline bool attention_tensor_cores(DType dt, int64_t D) {
  const char* force = std::getenv("GPTFAST_CUDA_ATTENTION");
  if (force != nullptr && std::strcmp(force, "simt") == 0) return false;
  return dt != kF32 && D % 16 == 0 && D <= kMaxHeadDim;
}

int attention_fwd_tc(DType dt, const void* q, const void* k, const void* v, void* o, float* lse, int64_t BH,
                     int64_t T, int64_t Tk, int D, bool causal, float scale, Dropout drop, cudaStream_t stream,
                     int group);
int attention_bwd_tc(DType dt, const void* dout, const void* q, const void* k, const void* v, const float* lse,
                     const float* delta, void* dq, void* dk, void* dv, int64_t BH, int64_t T, int64_t Tk, int D,
                     bool causal, float scale, Dropout drop, cudaStream_t stream, int group);

}  // namespace cuda
}  // namespace gptfast
