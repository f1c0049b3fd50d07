// Cross-entropy over the vocabulary in CUDA: one block per row, two sweeps (max and sum of
// exponentials; then, when asked, dlogits = softmax - onehot), fp32 math.
#include <cfloat>

#include "common.cuh"
#include "cross_entropy.h"

namespace gptfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ float block_reduce(float v, bool is_max, float* shared) {
  v = is_max ? warp_max(v) : warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  __syncthreads();                                     // `shared` may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float r = is_max ? -FLT_MAX : 0.f;
  for (int w = 0; w < kThreads / 32; ++w) r = is_max ? fmaxf(r, shared[w]) : r + shared[w];   // fixed order
  return r;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ce_fwd_kernel(const T* __restrict__ logits,
                                                          const int64_t* __restrict__ targets, float* __restrict__ loss,
                                                          float* __restrict__ lse_out, T* __restrict__ dlogits,
                                                          int64_t V, int64_t ignore_index, bool compute_grad) {
  __shared__ float shared[kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  float m = -FLT_MAX;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) m = fmaxf(m, to_f(x[i]));
  m = block_reduce(m, true, shared);
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) s += __expf(to_f(x[i]) - m);
  const float lse = m + __logf(block_reduce(s, false, shared));
  const int64_t t = targets[row];
  const bool ignored = t == ignore_index;
  if (threadIdx.x == 0) {
    loss[row] = ignored ? 0.f : lse - to_f(x[t]);
    lse_out[row] = lse;
  }
  if (!compute_grad) return;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float g = ignored ? 0.f : __expf(to_f(x[i]) - lse) - (i == t ? 1.f : 0.f);
    dlogits[row * V + i] = from_f<T>(g);
  }
}

template <typename T>
__global__ void ce_bwd_kernel(const T* __restrict__ dlogits, const float* __restrict__ grad, T* __restrict__ out,
                              int64_t V) {
  const int64_t row = blockIdx.x;
  const float g = grad[row];
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) out[row * V + i] = from_f<T>(to_f(dlogits[row * V + i]) * g);
}

}  // namespace

int cross_entropy_fwd(DType dt, const void* logits, const int64_t* targets, float* loss, float* lse, void* dlogits,
                      int64_t N, int64_t V, int64_t ignore_index, bool compute_grad, void* stream) {
  if (N == 0) return 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    ce_fwd_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(logits), targets, loss, lse, static_cast<T*>(dlogits), V, ignore_index, compute_grad);
    return launch_status();
  });
}

int cross_entropy_bwd(DType dt, const void* dlogits, const float* grad, void* out, int64_t N, int64_t V, void* stream) {
  if (N == 0) return 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    ce_bwd_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(dlogits), grad, static_cast<T*>(out), V);
    return launch_status();
  });
}

}  // namespace cuda
}  // namespace gptfast
