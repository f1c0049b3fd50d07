// The integer-dot-product linear layers of inference in CUDA (the GPU twins of csrc/cpu/linear_w8a8.cpp and
// linear_int4.cpp): the rows of x quantized to int8 (one block a row), then one warp per output row streaming its
// weights in 16-byte packs and summing products with `__dp4a` (four int8 products and an add, exact in int32).
//
//   w8a8: each lane's 16 weights x 16 int8 of each row of x = 4 dp4a; y = float(acc) * sx * scales (+ bias), the
//         CPU kernel's order, no contraction (__fmul_rn / __fadd_rn): the CPU kernel's bits.
//   int4: 16 bytes of a packed row are 16 low nibbles (weights j) and 16 high ones (weights 32 + j) of one 64-weight
//         block (ops/linear_int4.py pack_int4); the nibbles u = w + 8 are unsigned 0..15, so u . x - 8 sum(x) is the
//         exact sum of w x (sum(x) by dp4a with ones); each half's int sum times its group's scale into a float
//         accumulator (float sums in another order than the CPU's: within 1e-6).
// The decoding step reads each weight once: 1 byte (w8a8) or half a byte (int4) a weight against the HBM floor.
#include "common.cuh"
#include "linear_int8_dot.h"

namespace gptfast {
namespace cuda {
namespace {

constexpr int kWarps = 4;                 // output rows a block of the dot kernels
constexpr int kQuantizeThreads = 128;     // threads quantizing one row

__device__ __forceinline__ int warp_sum_int(int v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__global__ void quantize_rows_kernel(const float* __restrict__ x, int64_t ldx, int64_t K, int8_t* __restrict__ q,
                                     int64_t Kp, float* __restrict__ sx) {
  __shared__ float warp_amax[kQuantizeThreads / 32];
  const int64_t m = blockIdx.x;
  const float* xr = x + m * ldx;
  float amax = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(xr[k]));
  amax = warp_max(amax);
  if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = 0.f;
  for (int i = 0; i < kQuantizeThreads / 32; ++i) amax = fmaxf(amax, warp_amax[i]);
  const float inv = amax > 0.f ? __fdiv_rn(127.f, amax) : 0.f;   // IEEE division, as the CPU's 127.f / amax
  if (threadIdx.x == 0) sx[m] = __fdiv_rn(amax, 127.f);
  for (int64_t k = threadIdx.x; k < Kp; k += blockDim.x) {
    const int v = k < K ? __float2int_rn(__fmul_rn(xr[k], inv)) : 0;   // half to even, as nearbyint
    q[m * Kp + k] = static_cast<int8_t>(max(-127, min(127, v)));
  }
}

// four int8 lanes of a and b multiplied and summed into c
__device__ __forceinline__ int dot4(unsigned a, unsigned b, int c) {
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
}

template <int MB>
__global__ void w8a8_rows_kernel(const int8_t* __restrict__ q, int64_t Kp, const float* __restrict__ sx,
                                 const int8_t* __restrict__ w, const float* __restrict__ scales,
                                 const float* __restrict__ bias, float* __restrict__ y, int M, int64_t N, int64_t K,
                                 bool packed) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (n >= N) return;                                     // a whole warp leaves together
  const int8_t* wr = w + n * K;
  int acc[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) acc[m] = 0;
  int64_t tail = 0;
  if (packed) {                                           // lanes take turns over the row's 16-byte packs
    for (int64_t p = lane; p < K / 16; p += 32) {
      const uint4 wv = *reinterpret_cast<const uint4*>(wr + p * 16);
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m >= M) break;
        const uint4 xv = *reinterpret_cast<const uint4*>(q + m * Kp + p * 16);
        acc[m] = dot4(wv.w, xv.w, dot4(wv.z, xv.z, dot4(wv.y, xv.y, dot4(wv.x, xv.x, acc[m]))));
      }
    }
    tail = K / 16 * 16;
  }
  for (int64_t k = tail + lane; k < K; k += 32) {
    const int wk = wr[k];
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (m >= M) break;
      acc[m] += wk * static_cast<int>(q[m * Kp + k]);
    }
  }
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    if (m >= M) break;
    const int s = warp_sum_int(acc[m]);
    if (lane == 0) {
      const float v = __fmul_rn(__fmul_rn(static_cast<float>(s), sx[m]), scales[n]);
      y[m * N + n] = bias ? __fadd_rn(v, bias[n]) : v;
    }
  }
}

template <int MB>
__global__ void int4_rows_kernel(const int8_t* __restrict__ q, int64_t Kp, const float* __restrict__ sx,
                                 const uint8_t* __restrict__ w, const float* __restrict__ scales, int64_t groups,
                                 const float* __restrict__ bias, float* __restrict__ y, int M, int64_t N) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (n >= N) return;
  const uint8_t* wr = w + n * (Kp / 2);
  const float* sr = scales + n * groups;
  const bool g64 = groups * 64 == Kp;
  float acc[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) acc[m] = 0.f;
  for (int64_t p = lane; p < Kp / 32; p += 32) {          // 16 bytes: half of the 32-byte block p / 2
    const int64_t block = p / 2, k_lo = block * 64 + (p % 2) * 16, k_hi = k_lo + 32;
    const uint4 b = *reinterpret_cast<const uint4*>(wr + p * 16);
    const unsigned words[4] = {b.x, b.y, b.z, b.w};
    const float s_lo = g64 ? sr[block] : sr[2 * block], s_hi = g64 ? s_lo : sr[2 * block + 1];
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (m >= M) break;
      const uint4 xl = *reinterpret_cast<const uint4*>(q + m * Kp + k_lo);
      const uint4 xh = *reinterpret_cast<const uint4*>(q + m * Kp + k_hi);
      const unsigned xlo[4] = {xl.x, xl.y, xl.z, xl.w}, xhi[4] = {xh.x, xh.y, xh.z, xh.w};
      int lo = 0, hi = 0, sum_lo = 0, sum_hi = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        lo = dot4(words[i] & 0x0F0F0F0Fu, xlo[i], lo);
        hi = dot4((words[i] >> 4) & 0x0F0F0F0Fu, xhi[i], hi);
        sum_lo = dot4(0x01010101u, xlo[i], sum_lo);
        sum_hi = dot4(0x01010101u, xhi[i], sum_hi);
      }
      lo -= 8 * sum_lo;                                   // the nibbles are w + 8
      hi -= 8 * sum_hi;
      acc[m] = g64 ? fmaf(static_cast<float>(lo + hi), s_lo, acc[m])
                   : fmaf(static_cast<float>(hi), s_hi, fmaf(static_cast<float>(lo), s_lo, acc[m]));
    }
  }
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    if (m >= M) break;
    const float s = warp_sum(acc[m]);
    if (lane == 0) {
      const float v = __fmul_rn(s, sx[m]);
      y[m * N + n] = bias ? __fadd_rn(v, bias[n]) : v;
    }
  }
}

}  // namespace

int quantize_rows_int8(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q, int64_t Kp, float* sx,
                       void* stream) {
  if (M < 1) return 0;
  quantize_rows_kernel<<<static_cast<unsigned>(M), kQuantizeThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, ldx, K, q, Kp, sx);
  return launch_status();
}

int linear_w8a8_fwd(const int8_t* q, int64_t Kp, const float* sx, const int8_t* w, const float* scales,
                    const float* bias, float* y, int64_t M, int64_t N, int64_t K, void* stream) {
  if (M < 1 || M > kInt8DotMaxRows || N < 1) return M == 0 || N == 0 ? 0 : static_cast<int>(cudaErrorInvalidValue);
  const bool packed = aligned16(w) && aligned16(q) && K % 16 == 0 && Kp % 16 == 0;
  const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps));
  const auto s = static_cast<cudaStream_t>(stream);
  const int rows = static_cast<int>(M);
  if (M == 1)
    w8a8_rows_kernel<1><<<grid, 32 * kWarps, 0, s>>>(q, Kp, sx, w, scales, bias, y, rows, N, K, packed);
  else if (M <= 4)
    w8a8_rows_kernel<4><<<grid, 32 * kWarps, 0, s>>>(q, Kp, sx, w, scales, bias, y, rows, N, K, packed);
  else
    w8a8_rows_kernel<kInt8DotMaxRows><<<grid, 32 * kWarps, 0, s>>>(q, Kp, sx, w, scales, bias, y, rows, N, K, packed);
  return launch_status();
}

int linear_int4_fwd(const int8_t* q, int64_t Kp, const float* sx, const uint8_t* w, const float* scales,
                    int64_t groups, const float* bias, float* y, int64_t M, int64_t N, void* stream) {
  if (M < 1 || M > kInt8DotMaxRows || N < 1) return M == 0 || N == 0 ? 0 : static_cast<int>(cudaErrorInvalidValue);
  if (Kp % 64 || !aligned16(w) || !aligned16(q) || (groups * 32 != Kp && groups * 64 != Kp))
    return static_cast<int>(cudaErrorInvalidValue);        // the glue pads, packs and aligns
  const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps));
  const auto s = static_cast<cudaStream_t>(stream);
  const int rows = static_cast<int>(M);
  if (M == 1)
    int4_rows_kernel<1><<<grid, 32 * kWarps, 0, s>>>(q, Kp, sx, w, scales, groups, bias, y, rows, N);
  else if (M <= 4)
    int4_rows_kernel<4><<<grid, 32 * kWarps, 0, s>>>(q, Kp, sx, w, scales, groups, bias, y, rows, N);
  else
    int4_rows_kernel<kInt8DotMaxRows><<<grid, 32 * kWarps, 0, s>>>(q, Kp, sx, w, scales, groups, bias, y, rows, N);
  return launch_status();
}

}  // namespace cuda
}  // namespace gptfast
