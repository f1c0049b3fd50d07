// RMSNorm forward/backward in CUDA (Llama, Qwen3). One warp per row of C values, fp32 math.
//
// Forward: the lanes stride over the row for the sum of squares (a warp reduction), then write
// y = x * rstd * w. Backward: dx = rstd * (g - xhat * mean(g * xhat)) per row (g = dy * w,
// xhat = x * rstd); dweight from column-parallel partial sums over fixed chunks of rows, then a
// fixed-order sum of the chunks - deterministic, no atomics. The row is read twice (from L1/L2 the
// second time); a register-resident packed path (as the LayerNorm kernel has) is the next version once a
// GPU has measured this one.
#include "common.cuh"
#include "rms_norm.h"

namespace gptfast {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kRowsPerChunk = 256;    // dweight partial sums

template <typename T>
__global__ void rms_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                        float* __restrict__ rstd, int64_t rows, int C, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * C;
  float ss = 0.f;
  for (int i = lane; i < C; i += 32) {
    const float v = to_f(xr[i]);
    ss += v * v;
  }
  const float rs = rsqrtf(warp_sum(ss) / C + eps);
  for (int i = lane; i < C; i += 32) y[row * C + i] = from_f<T>(to_f(xr[i]) * rs * to_f(w[i]));
  if (lane == 0) rstd[row] = rs;
}

template <typename T>
__global__ void rms_bwd_dx(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                           const float* __restrict__ rstd, T* __restrict__ dx, int64_t rows, int C) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const float rs = rstd[row];
  float sgx = 0.f;
  for (int i = lane; i < C; i += 32) sgx += to_f(dy[row * C + i]) * to_f(w[i]) * to_f(x[row * C + i]) * rs;
  const float c = warp_sum(sgx) / C;
  for (int i = lane; i < C; i += 32) {
    const float xh = to_f(x[row * C + i]) * rs;
    dx[row * C + i] = from_f<T>(rs * (to_f(dy[row * C + i]) * to_f(w[i]) - xh * c));
  }
}

// One thread per column, one block row per chunk of kRowsPerChunk rows: coalesced across columns.
template <typename T>
__global__ void rms_bwd_dw_partial(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ rstd,
                                   float* __restrict__ part, int64_t rows, int C) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= C) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRowsPerChunk;
  const int64_t r1 = r0 + kRowsPerChunk < rows ? r0 + kRowsPerChunk : rows;
  float s = 0.f;
  for (int64_t r = r0; r < r1; ++r) s += to_f(dy[r * C + col]) * to_f(x[r * C + col]) * rstd[r];
  part[static_cast<int64_t>(blockIdx.y) * C + col] = s;
}

template <typename T>
__global__ void rms_bwd_dw_final(const float* __restrict__ part, T* __restrict__ dw, int chunks, int C) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= C) return;
  float s = 0.f;
  for (int ch = 0; ch < chunks; ++ch) s += part[static_cast<int64_t>(ch) * C + col];   // fixed order
  dw[col] = from_f<T>(s);
}

}  // namespace

int rms_norm_fwd(DType dt, const void* x, const void* w, void* y, float* rstd, int64_t rows, int64_t C, float eps,
                 void* stream) {
  if (rows == 0) return 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock)), block(32 * kWarpsPerBlock);
    rms_fwd<T><<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), rstd, rows, static_cast<int>(C), eps);
    return launch_status();
  });
}

int64_t rms_norm_bwd_scratch_floats(int64_t rows, int64_t C) {
  return ((rows + kRowsPerChunk - 1) / kRowsPerChunk) * C;
}

int rms_norm_bwd(DType dt, const void* dy, const void* x, const void* w, const float* rstd, void* dx, void* dw,
                 float* scratch, int64_t rows, int64_t C, void* stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    auto s = static_cast<cudaStream_t>(stream);
    const T *pdy = static_cast<const T*>(dy), *px = static_cast<const T*>(x);
    if (rows > 0) {
      const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock)), block(32 * kWarpsPerBlock);
      rms_bwd_dx<T><<<grid, block, 0, s>>>(pdy, px, static_cast<const T*>(w), rstd, static_cast<T*>(dx), rows,
                                           static_cast<int>(C));
      if (int err = launch_status()) return err;
    }
    const int chunks = static_cast<int>((rows + kRowsPerChunk - 1) / kRowsPerChunk);
    const unsigned col_blocks = static_cast<unsigned>((C + 255) / 256);
    if (chunks > 0) {
      rms_bwd_dw_partial<T><<<dim3(col_blocks, chunks), 256, 0, s>>>(pdy, px, rstd, scratch, rows, static_cast<int>(C));
      if (int err = launch_status()) return err;
    }
    rms_bwd_dw_final<T><<<col_blocks, 256, 0, s>>>(scratch, static_cast<T*>(dw), chunks, static_cast<int>(C));
    return launch_status();
  });
}

}  // namespace cuda
}  // namespace gptfast
