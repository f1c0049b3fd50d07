// gptfast CUDA kernels: raw pointers, sizes and a stream; no torch headers, so each .cu compiles
// fast with plain nvcc and can be tested standalone (test_kernels.cu). Every launcher returns the
// cudaError_t of its launches as an int (0 = success), which the torch glue (bind_cuda.cpp) turns
// into an exception; `stream` is a cudaStream_t passed as void* so the glue needs no CUDA headers.
//
// dtype codes: 0 = float32, 1 = float16, 2 = bfloat16. Statistics (mean, rstd, lse) are float32.
#pragma once
#include <cstdint>

namespace gptfast {
namespace cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

const char* error_string(int err);

// LayerNorm over rows of C: y = (x - mean) * rstd * w + b.
int layer_norm_fwd(DType dt, const void* x, const void* w, const void* b, void* y, float* mean, float* rstd,
                   int64_t rows, int64_t C, float eps, void* stream);
// dx per row; dweight/dbias summed over rows in a fixed order (deterministic). `scratch` holds
// 2 * layer_norm_bwd_scratch_floats(rows, C) floats.
int64_t layer_norm_bwd_scratch_floats(int64_t rows, int64_t C);
int layer_norm_bwd(DType dt, const void* dy, const void* x, const void* w, const float* mean, const float* rstd,
                   void* dx, void* dw, void* db, float* scratch, int64_t rows, int64_t C, void* stream);

// GELU, tanh approximation, elementwise over n values.
int gelu_fwd(DType dt, const void* x, void* y, int64_t n, void* stream);
int gelu_bwd(DType dt, const void* dy, const void* x, void* dx, int64_t n, void* stream);

// y = residual + dropout(x) over n values seen as rows of C (residual may be null: plain dropout); x in
// dtype `in`, residual and y in `out`. Also dropout's backward (x = dy, residual null, out = dx's dtype).
int dropout_add(DType in, DType out, const void* x, const void* residual, void* y, int64_t n, int64_t C,
                uint64_t seed, float p, void* stream);

// Attention on contiguous q (BH, T, D) and k, v (BH, Tk, D), Tk >= T, D <= 128; lse (BH, T) float32.
// With Tk > T the queries are the last T of Tk positions (a KV cache): query row r sits at position
// r + Tk - T, which is also the row its dropout decisions use. Dropout (p > 0) uses the
// counter-based hash of dropout_hash.h keyed by `seed`.
constexpr int kMaxHeadDim = 128;
int attention_fwd(DType dt, const void* q, const void* k, const void* v, void* o, float* lse, int64_t BH, int64_t T,
                  int64_t Tk, int64_t D, bool causal, float scale, float dropout_p, uint64_t seed, void* stream);
// `delta` (BH, T) float32 scratch; dq like q, dk and dv like k.
int attention_bwd(DType dt, const void* dout, const void* q, const void* k, const void* v, const void* o,
                  const float* lse, float* delta, void* dq, void* dk, void* dv, int64_t BH, int64_t T, int64_t Tk,
                  int64_t D, bool causal, float scale, float dropout_p, uint64_t seed, void* stream);

// Cross-entropy per row of logits (N, V) against int64 targets: loss and lse float32; with
// compute_grad, dlogits = softmax - onehot (0 for ignored rows). Backward: dlogits * grad[row].
int cross_entropy_fwd(DType dt, const void* logits, const int64_t* targets, float* loss, float* lse, void* dlogits,
                      int64_t N, int64_t V, int64_t ignore_index, bool compute_grad, void* stream);
int cross_entropy_bwd(DType dt, const void* dlogits, const float* grad, void* out, int64_t N, int64_t V, void* stream);

// The linear layer of decoding: y (M, N) = x (M, K) @ W^T [* scales] [+ bias] for 1 <= M <= kLinearMaxRows.
// x (row stride ldx), bias and y of dtype xt (y contiguous); W (N, K) contiguous of weight type wt;
// scales (N,) float32 or null (int8 weights need them); bias null for none. Math in float32.
enum WDType : int { kWF32 = 0, kWBF16 = 1, kWI8 = 2 };
constexpr int kLinearMaxRows = 16;
int linear_fwd(DType xt, WDType wt, const void* x, int64_t ldx, const void* w, const float* scales, const void* bias,
               void* y, int64_t M, int64_t N, int64_t K, void* stream);

}  // namespace cuda
}  // namespace gptfast
