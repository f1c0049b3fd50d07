// The CUDA launchers of attention.cu (see kernels.h for the conventions).
#pragma once
#include <cstdint>

#include "kernels.h"

namespace gptfast {
namespace cuda {

// Attention on contiguous q (BH, T, D) and k, v (BH / group, Tk, D), Tk >= T, D <= 128; lse (BH, T) float32.
// group > 1 is grouped-query attention: query head bh reads K/V head bh / group (no repeated K/V).
// With Tk > T the queries are the last T of Tk positions (a KV cache): query row r sits at position
// r + Tk - T, which is also the row its dropout decisions use. Dropout (p > 0) uses the
// counter-based hash of dropout_hash.h keyed by `seed`.
constexpr int kMaxHeadDim = 128;
int attention_fwd(DType dt, const void* q, const void* k, const void* v, void* o, float* lse, int64_t BH, int64_t T,
                  int64_t Tk, int64_t D, bool causal, float scale, float dropout_p, uint64_t seed, void* stream,
                  int64_t group = 1);
// `delta` (BH, T) float32 scratch; dq like q, dk and dv like k (summed over each K/V head's group).
int attention_bwd(DType dt, const void* dout, const void* q, const void* k, const void* v, const void* o,
                  const float* lse, float* delta, void* dq, void* dk, void* dv, int64_t BH, int64_t T, int64_t Tk,
                  int64_t D, bool causal, float scale, float dropout_p, uint64_t seed, void* stream,
                  int64_t group = 1);

}  // namespace cuda
}  // namespace gptfast
