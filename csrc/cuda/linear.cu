// The linear layer of decoding in CUDA: y (M, N) = x (M, K) @ W^T [* scales] [+ bias] for up to
// kLinearMaxRows rows of x, W (N, K) stored as float32, bfloat16 or int8 (weight-only quantization,
// one float32 scale per output row); x, bias and y float32, float16 or bfloat16; math in float32.
//
// A decoding step is a matrix-vector product: each weight is used once (per row of x), so the kernel
// is built to stream W at the memory's speed. One warp per output row: its 32 lanes read the row in
// 16-byte packs (16 int8, 8 bfloat16 or 4 float32 weights a lane, 512 bytes a warp per step),
// widen them to float32 in registers and multiply them with every row of x (MB accumulators a
// lane, MB >= M, in registers), then reduce across the warp. x is small and read through the caches.
// Rows or pointers that are not 16-byte aligned take the same loop one element at a time.
#include "common.cuh"
#include "linear.h"

namespace gptfast {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float w_to_f(float w) { return w; }
__device__ __forceinline__ float w_to_f(__nv_bfloat16 w) { return __bfloat162float(w); }
__device__ __forceinline__ float w_to_f(int8_t w) { return static_cast<float>(w); }

// P weights from a 16-byte pack at p, widened
template <typename W, int P>
__device__ __forceinline__ void load_w_pack(const W* p, float (&out)[P]) {
  union {
    uint4 raw;
    W v[P];
  } pk;
  pk.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < P; ++i) out[i] = w_to_f(pk.v[i]);
}

// P consecutive values of x at p (16-byte aligned when `packed`), as floats
template <typename X, int P>
__device__ __forceinline__ void load_x_run(const X* p, float (&out)[P]) {
  constexpr int N = Pack<X>::N;
  if constexpr (P % N == 0) {
#pragma unroll
    for (int c = 0; c < P / N; ++c) {
      float part[N];
      load_pack(p + c * N, part);
#pragma unroll
      for (int i = 0; i < N; ++i) out[c * N + i] = part[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < P; ++i) out[i] = to_f(p[i]);
  }
}

template <typename X, typename W, int MB>
__global__ void linear_rows_kernel(const X* __restrict__ x, int64_t ldx, const W* __restrict__ w,
                                   const float* __restrict__ scales, const X* __restrict__ bias, X* __restrict__ y,
                                   int M, int64_t N, int64_t K, bool packed) {
  constexpr int P = 16 / sizeof(W);                       // weights per lane per step
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (n >= N) return;                                     // a whole warp leaves together
  const W* wr = w + n * K;
  float acc[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) acc[m] = 0.f;
  int64_t tail = 0;                                       // where the one-at-a-time loop starts
  if (packed) {                                           // lanes take turns over the row's 16-byte packs
    const int64_t packs = K / P;
    for (int64_t p = lane; p < packs; p += 32) {
      const int64_t k0 = p * P;
      float wv[P];
      load_w_pack<W, P>(wr + k0, wv);
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m >= M) break;
        float xv[P];
        load_x_run<X, P>(x + m * ldx + k0, xv);
#pragma unroll
        for (int i = 0; i < P; ++i) acc[m] = fmaf(wv[i], xv[i], acc[m]);
      }
    }
    tail = packs * P;
  }
  for (int64_t k = tail + lane; k < K; k += 32) {
    const float wv = w_to_f(wr[k]);
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (m >= M) break;
      acc[m] = fmaf(wv, to_f(x[m * ldx + k]), acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    if (m >= M) break;
    float s = warp_sum(acc[m]);
    if (lane == 0) {
      if (scales) s *= scales[n];
      if (bias) s += to_f(bias[n]);
      y[m * N + n] = from_f<X>(s);
    }
  }
}

template <typename X, typename W>
int launch_typed(const void* x, int64_t ldx, const void* w, const float* scales, const void* bias, void* y, int M,
                 int64_t N, int64_t K, void* stream) {
  const bool packed = aligned16(w) && aligned16(x) && (K * sizeof(W)) % 16 == 0 && (ldx * sizeof(X)) % 16 == 0;
  const dim3 grid(static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const auto s = static_cast<cudaStream_t>(stream);
  const X* px = static_cast<const X*>(x);
  const W* pw = static_cast<const W*>(w);
  const X* pb = static_cast<const X*>(bias);
  X* py = static_cast<X*>(y);
  if (M <= 1)
    linear_rows_kernel<X, W, 1><<<grid, 32 * kWarpsPerBlock, 0, s>>>(px, ldx, pw, scales, pb, py, M, N, K, packed);
  else if (M <= 4)
    linear_rows_kernel<X, W, 4><<<grid, 32 * kWarpsPerBlock, 0, s>>>(px, ldx, pw, scales, pb, py, M, N, K, packed);
  else
    linear_rows_kernel<X, W, kLinearMaxRows><<<grid, 32 * kWarpsPerBlock, 0, s>>>(px, ldx, pw, scales, pb, py, M, N,
                                                                                  K, packed);
  return launch_status();
}

template <typename X>
int launch_for_x(WDType wt, const void* x, int64_t ldx, const void* w, const float* scales, const void* bias, void* y,
                 int M, int64_t N, int64_t K, void* stream) {
  switch (wt) {
    case kWF32: return launch_typed<X, float>(x, ldx, w, scales, bias, y, M, N, K, stream);
    case kWBF16: return launch_typed<X, __nv_bfloat16>(x, ldx, w, scales, bias, y, M, N, K, stream);
    case kWI8: return launch_typed<X, int8_t>(x, ldx, w, scales, bias, y, M, N, K, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int linear_fwd(DType xt, WDType wt, const void* x, int64_t ldx, const void* w, const float* scales, const void* bias,
               void* y, int64_t M, int64_t N, int64_t K, void* stream) {
  if (M < 1 || M > kLinearMaxRows || N < 1) return M == 0 || N == 0 ? 0 : static_cast<int>(cudaErrorInvalidValue);
  return dispatch_dtype(xt, [&](auto tag) {
    using X = decltype(tag);
    return launch_for_x<X>(wt, x, ldx, w, scales, bias, y, static_cast<int>(M), N, K, stream);
  });
}

}  // namespace cuda
}  // namespace gptfast
