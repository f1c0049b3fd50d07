// The pieces of the CPU kernels that the fused decoding block (decode_block.cpp) runs inside one
// parallel region: each is the very loop the standalone op runs, on a part of the work a caller
// chooses, so the fused block computes every element with the same instructions in the same order as
// the ops one by one (bit-for-bit the same results: tested).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace gptfast {

// Threads of the fused block split a linear layer's output columns in blocks of this many: a multiple
// of the linear kernel's row block (linear.cpp checks) and of 16 floats, so each thread's span of a
// row starts on a whole vector of the widest ISA (the GELU over it then takes no scalar tail that the
// standalone op would compute in its vector loop).
constexpr int64_t kDecodeColumnBlock = 48;

// y[m * ldy + n] = (x[m] . w[n]) [* scales[n]] [+ bias[n]] for m < M, n in [n_begin, n_end): the
// decoding linear kernel (linear.cpp) on float32 x (row stride ldx) and w (N, K) contiguous in
// float32, bfloat16 or int8; scales and bias may be null.
void linear_columns(const float* x, int64_t ldx, int64_t M, const at::Tensor& w, const float* scales,
                    const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end);

// The int8 x int8 products (linear_w8a8.cpp): rows of x quantized to int8 (symmetric per row) into q, each row
// padded with zeros to w8a8_padded_k(K) bytes, scales sx (M); then y[m * ldy + n] = sum_k q[m, k] w[n, k] (exact, in
// int32) * sx[m] * scales[n] [+ bias[n]] for n in [n_begin, n_end), w (N, K) int8 contiguous: what linear_w8a8 does
// with the same rows.
int64_t w8a8_padded_k(int64_t K);
void w8a8_quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q, float* sx);
void w8a8_columns(const int8_t* q, const float* sx, int64_t M, const at::Tensor& w, const float* scales,
                  const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end);

// The 4-bit products (linear_int4.cpp) on rows quantized as above: w (N, Kp / 2) uint8 packed by
// ops/linear_int4.py's pack_int4, scales (N, groups) float32; y[m * ldy + n] for n in [n_begin, n_end).
void int4_columns(const int8_t* q, const float* sx, int64_t M, const at::Tensor& w, const float* scales,
                  int64_t groups, const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end);

// A linear layer as the fused steps read it: w (N, K) float32, bfloat16 or int8 (scales (N,)), or 4-bit uint8
// (N, Kp / 2) with scales (N, groups); bias (N,) or null. fused_layer checks a call's tensors (naming the layer).
struct FusedLinear {
  at::Tensor w;
  const float* scales;
  int64_t groups;          // 4-bit: scales a row; else 0
  const float* bias;
  int64_t N;
};
FusedLinear fused_layer(const char* name, const at::Tensor& w, const std::optional<at::Tensor>& scales,
                        const std::optional<at::Tensor>& bias, int64_t N, int64_t K);

// Columns [n_begin, n_end) of y (row stride ldy) for M rows: float rows x (row stride ldx) through linear_columns,
// or, with int8 activations (q non-null), their quantized copy q, sx through w8a8_columns / int4_columns.
void fused_columns(const FusedLinear& L, const float* x, int64_t ldx, const int8_t* q, const float* sx, int64_t M,
                   float* y, int64_t ldy, int64_t n_begin, int64_t n_end);

// With int8 activations every layer must be int8 or 4-bit, and 4-bit layers need int8 activations.
void check_int8_activations(bool on, const FusedLinear& L, const char* name);

// One row of LayerNorm in float32 (layer_norm.cpp's row loop, without its statistics outputs).
void layer_norm_row_f32(const float* x, const float* weight, const float* bias, float* y, int64_t C, double eps);

// y[i] = gelu(x[i]) for i < n, tanh approximation (gelu.cpp's loop); y may be x.
void gelu_span_f32(const float* x, float* y, int64_t n);

// One row of RMSNorm in float32 (rms_norm.cpp's row loop, without its statistics output); y may be x.
void rms_norm_row_f32(const float* x, const float* weight, float* y, int64_t C, double eps);

// One head's row of 2 * half values rotated by its position's angles, cos/sin (half each): rope.cpp's row loop; y
// may be x.
void rope_row_f32(const float* x, float* y, const float* cos, const float* sin, int64_t half);

// y[i] = silu(gate[i]) * up[i] for i < n (swiglu.cpp's loop); y may be gate.
void swiglu_span_f32(const float* gate, const float* up, float* y, int64_t n);

// Causal attention of one query row, the newest of n_keys positions, over keys and values stored
// row-major (n_keys x D) at k and v: out (D) = softmax(scale q K^T) V, as the attention op's
// few-rows kernel computes it (attention_decode.cpp). scratch: n_keys + 2 * D floats.
void attention_last_row_f32(const float* q, const float* k, const float* v, int64_t n_keys, int64_t D, float scale,
                            float* out, float* scratch);

}  // namespace gptfast
