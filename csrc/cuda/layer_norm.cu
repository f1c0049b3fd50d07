// LayerNorm forward/backward in CUDA. One warp per row of C values, fp32 statistics.
//
// Fast path (C a multiple of 16 bytes' worth of elements, at most 32 * kMaxPacks packs, 16-byte
// aligned pointers): each lane moves 16-byte packs and keeps its slice of the row in registers, so
// x is read from memory once. Otherwise a generic path re-reads the row (from L1/L2).
// dweight/dbias: column-parallel partial sums over fixed chunks of rows, then a fixed-order sum of
// the chunks - deterministic, no atomics.
// cuda_check: no spills (.ci/cuda_check.sh fails the build if a kernel here spills registers)
#include "common.cuh"
#include "layer_norm.h"

namespace gptfast {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxPacks = 8;          // C <= 32 * 8 * N: 1024 (fp32) or 2048 (fp16/bf16)
constexpr int kRowsPerChunk = 256;    // dweight/dbias partial sums

template <typename T>
__global__ void ln_fwd_packed(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                              T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd, int64_t rows,
                              int C, float eps) {
  constexpr int N = Pack<T>::N;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * C;
  const int packs = C / N;
  float v[kMaxPacks][N];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kMaxPacks; ++k) {
    const int p = lane + 32 * k;
    if (p < packs) {
      load_pack(xr + p * N, v[k]);
#pragma unroll
      for (int i = 0; i < N; ++i) sum += v[k][i];
    }
  }
  const float mu = warp_sum(sum) / C;
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < kMaxPacks; ++k) {
    if (lane + 32 * k < packs) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float d = v[k][i] - mu;
        sq += d * d;
      }
    }
  }
  const float rs = rsqrtf(warp_sum(sq) / C + eps);
#pragma unroll
  for (int k = 0; k < kMaxPacks; ++k) {
    const int p = lane + 32 * k;
    if (p < packs) {
      float wv[N], bv[N], out[N];
      load_pack(w + p * N, wv);
      load_pack(b + p * N, bv);
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = (v[k][i] - mu) * rs * wv[i] + bv[i];
      store_pack(y + row * C + p * N, out);
    }
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

template <typename T>
__global__ void ln_fwd_generic(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                               T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd, int64_t rows,
                               int C, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * C;
  float sum = 0.f;
  for (int i = lane; i < C; i += 32) sum += to_f(xr[i]);
  const float mu = warp_sum(sum) / C;
  float sq = 0.f;
  for (int i = lane; i < C; i += 32) {
    const float d = to_f(xr[i]) - mu;
    sq += d * d;
  }
  const float rs = rsqrtf(warp_sum(sq) / C + eps);
  for (int i = lane; i < C; i += 32) y[row * C + i] = from_f<T>((to_f(xr[i]) - mu) * rs * to_f(w[i]) + to_f(b[i]));
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w
template <typename T>
__global__ void ln_bwd_dx_packed(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                 const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                                 int64_t rows, int C) {
  constexpr int N = Pack<T>::N;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int packs = C / N;
  const float mu = mean[row], rs = rstd[row];
  float xh[kMaxPacks][N], g[kMaxPacks][N];
  float sg = 0.f, sgx = 0.f;
#pragma unroll
  for (int k = 0; k < kMaxPacks; ++k) {
    const int p = lane + 32 * k;
    if (p < packs) {
      float wv[N], dyv[N];
      load_pack(x + row * C + p * N, xh[k]);
      load_pack(dy + row * C + p * N, dyv);
      load_pack(w + p * N, wv);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        xh[k][i] = (xh[k][i] - mu) * rs;
        g[k][i] = dyv[i] * wv[i];
        sg += g[k][i];
        sgx += g[k][i] * xh[k][i];
      }
    }
  }
  const float a = warp_sum(sg) / C, c = warp_sum(sgx) / C;
#pragma unroll
  for (int k = 0; k < kMaxPacks; ++k) {
    const int p = lane + 32 * k;
    if (p < packs) {
      float out[N];
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = rs * (g[k][i] - a - xh[k][i] * c);
      store_pack(dx + row * C + p * N, out);
    }
  }
}

template <typename T>
__global__ void ln_bwd_dx_generic(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                  const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                                  int64_t rows, int C) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const float mu = mean[row], rs = rstd[row];
  float sg = 0.f, sgx = 0.f;
  for (int i = lane; i < C; i += 32) {
    const float g = to_f(dy[row * C + i]) * to_f(w[i]);
    sg += g;
    sgx += g * (to_f(x[row * C + i]) - mu) * rs;
  }
  const float a = warp_sum(sg) / C, c = warp_sum(sgx) / C;
  for (int i = lane; i < C; i += 32) {
    const float xh = (to_f(x[row * C + i]) - mu) * rs;
    dx[row * C + i] = from_f<T>(rs * (to_f(dy[row * C + i]) * to_f(w[i]) - a - xh * c));
  }
}

// One thread per column, one block row per chunk of kRowsPerChunk rows: coalesced across columns.
template <typename T>
__global__ void ln_bwd_dwdb_partial(const T* __restrict__ dy, const T* __restrict__ x,
                                    const float* __restrict__ mean, const float* __restrict__ rstd,
                                    float* __restrict__ part_w, float* __restrict__ part_b, int64_t rows, int C) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= C) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRowsPerChunk;
  const int64_t r1 = r0 + kRowsPerChunk < rows ? r0 + kRowsPerChunk : rows;
  float sw = 0.f, sb = 0.f;
  for (int64_t r = r0; r < r1; ++r) {
    const float d = to_f(dy[r * C + col]);
    sw += d * (to_f(x[r * C + col]) - mean[r]) * rstd[r];
    sb += d;
  }
  part_w[static_cast<int64_t>(blockIdx.y) * C + col] = sw;
  part_b[static_cast<int64_t>(blockIdx.y) * C + col] = sb;
}

template <typename T>
__global__ void ln_bwd_dwdb_final(const float* __restrict__ part_w, const float* __restrict__ part_b,
                                  T* __restrict__ dw, T* __restrict__ db, int chunks, int C) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= C) return;
  float sw = 0.f, sb = 0.f;
  for (int ch = 0; ch < chunks; ++ch) {   // fixed order: deterministic
    sw += part_w[static_cast<int64_t>(ch) * C + col];
    sb += part_b[static_cast<int64_t>(ch) * C + col];
  }
  dw[col] = from_f<T>(sw);
  db[col] = from_f<T>(sb);
}

template <typename T>
bool use_packed(int64_t C, std::initializer_list<const void*> ptrs) {
  constexpr int N = 16 / sizeof(T);
  if (C % N != 0 || C / N > 32 * kMaxPacks) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

}  // namespace

int layer_norm_fwd(DType dt, const void* x, const void* w, const void* b, void* y, float* mean, float* rstd,
                   int64_t rows, int64_t C, float eps, void* stream) {
  if (rows == 0) return 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock)), block(32 * kWarpsPerBlock);
    auto s = static_cast<cudaStream_t>(stream);
    const T *px = static_cast<const T*>(x), *pw = static_cast<const T*>(w), *pb = static_cast<const T*>(b);
    T* py = static_cast<T*>(y);
    if (use_packed<T>(C, {x, w, b, y}))
      ln_fwd_packed<T><<<grid, block, 0, s>>>(px, pw, pb, py, mean, rstd, rows, static_cast<int>(C), eps);
    else
      ln_fwd_generic<T><<<grid, block, 0, s>>>(px, pw, pb, py, mean, rstd, rows, static_cast<int>(C), eps);
    return launch_status();
  });
}

int64_t layer_norm_bwd_scratch_floats(int64_t rows, int64_t C) {
  return ((rows + kRowsPerChunk - 1) / kRowsPerChunk) * C;
}

int layer_norm_bwd(DType dt, const void* dy, const void* x, const void* w, const float* mean, const float* rstd,
                   void* dx, void* dw, void* db, float* scratch, int64_t rows, int64_t C, void* stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    auto s = static_cast<cudaStream_t>(stream);
    const T *pdy = static_cast<const T*>(dy), *px = static_cast<const T*>(x), *pw = static_cast<const T*>(w);
    if (rows > 0) {
      const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock)), block(32 * kWarpsPerBlock);
      if (use_packed<T>(C, {dy, x, w, dx}))
        ln_bwd_dx_packed<T><<<grid, block, 0, s>>>(pdy, px, pw, mean, rstd, static_cast<T*>(dx), rows, static_cast<int>(C));
      else
        ln_bwd_dx_generic<T><<<grid, block, 0, s>>>(pdy, px, pw, mean, rstd, static_cast<T*>(dx), rows, static_cast<int>(C));
      if (int err = launch_status()) return err;
    }
    const int chunks = static_cast<int>((rows + kRowsPerChunk - 1) / kRowsPerChunk);
    float* part_w = scratch;
    float* part_b = scratch + static_cast<int64_t>(chunks) * C;
    const unsigned col_blocks = static_cast<unsigned>((C + 255) / 256);
    if (chunks > 0) {
      ln_bwd_dwdb_partial<T><<<dim3(col_blocks, chunks), 256, 0, s>>>(pdy, px, mean, rstd, part_w, part_b, rows,
                                                                       static_cast<int>(C));
      if (int err = launch_status()) return err;
    }
    ln_bwd_dwdb_final<T><<<col_blocks, 256, 0, s>>>(part_w, part_b, static_cast<T*>(dw), static_cast<T*>(db), chunks,
                                                     static_cast<int>(C));
    return launch_status();
  });
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace cuda
}  // namespace gptfast
