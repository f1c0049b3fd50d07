// Scaled dot-product attention in CUDA (plain fp32 path for every dtype; FlashAttention-2 layout).
//
// Forward: a block owns 16 query rows of one (batch, head); 8 threads per row. Key/value tiles of
// 32 rows are staged in shared memory (as fp32), scores and an online softmax are kept per row,
// each thread accumulates 1/8 of the row's output dims. Causal tiles past the diagonal are never
// loaded. lse = m + log(l) is saved for the backward.
// Backward: delta = rowsum(dO * O); then one kernel per key tile for dK, dV and one per query tile
// for dQ, both recomputing P = exp(S - lse) - no atomics, deterministic.
// Dropout: the counter-based hash of ../dropout_hash.h, so masks equal the other backends'.
//
// This is the correctness-first version, used for float32 and for head dims that are not a multiple
// of 16; fp16/bf16 with D % 16 == 0 go to the tensor-core kernels of attention_tc.cu.
#include <cfloat>

#include "attention_common.cuh"

namespace gptfast {
namespace cuda {
namespace {

constexpr int kRowsQ = 16;        // query rows per block (forward, dQ)
constexpr int kThreadsPerRow = 8;
constexpr int kThreads = kRowsQ * kThreadsPerRow;   // 128
constexpr int kTileK = 32;        // key rows per tile (forward)
constexpr int kTileKB = 16;       // key rows per tile (backward; bounded by shared memory at D=128)
constexpr int kDimsPerThread = kMaxHeadDim / kThreadsPerRow;   // 16

// max / sum over the 8 threads of one row (consecutive lanes, 8-aligned)
__device__ __forceinline__ float row_max(float v) {
  for (int off = 4; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float row_sum(float v) {
  for (int off = 4; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// rows [r0, r0 + n) of a (T, D) matrix -> shared fp32 with row pitch `pitch`; rows past T are zero
template <typename T>
__device__ void stage_rows(const T* __restrict__ src, int64_t r0, int n, int64_t T_, int D, float* dst, int pitch,
                           float mul = 1.f) {
  for (int idx = threadIdx.x; idx < n * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    dst[r * pitch + d] = (r0 + r < T_) ? to_f(src[(r0 + r) * D + d]) * mul : 0.f;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                            const T* __restrict__ v, T* __restrict__ o,
                                                            float* __restrict__ lse, int64_t Tq, int64_t Tk, int D,
                                                            bool causal, float scale, Dropout drop, int group) {
  extern __shared__ float smem[];
  float* Qs = smem;                              // kRowsQ x D (pre-scaled)
  float* Ks = Qs + kRowsQ * D;                   // kTileK x (D + 1)
  float* Vs = Ks + kTileK * (D + 1);             // kTileK x D
  float* Ps = Vs + kTileK * D;                   // kRowsQ x kTileK
  const int64_t bh = blockIdx.y;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kRowsQ;
  const int i = threadIdx.x / kThreadsPerRow, sub = threadIdx.x % kThreadsPerRow;
  const int64_t row = q0 + i;
  const int64_t off = Tk - Tq;                   // cached keys before the first query (KV cache)
  const T* qb = q + bh * Tq * D;
  const T* kb = k + (bh / group) * Tk * D;       // grouped-query: the K/V head this query head reads
  const T* vb = v + (bh / group) * Tk * D;
  const uint32_t head_key = drop.on ? dropout_head_key(drop.seed, static_cast<uint32_t>(bh)) : 0u;
  stage_rows(qb, q0, kRowsQ, Tq, D, Qs, D, scale);
  float acc[kDimsPerThread];
#pragma unroll
  for (int t = 0; t < kDimsPerThread; ++t) acc[t] = 0.f;
  float m = -FLT_MAX, l = 0.f;
  const int64_t kv_end = causal ? min(Tk, q0 + kRowsQ + off) : Tk;
  for (int64_t k0 = 0; k0 < kv_end; k0 += kTileK) {
    __syncthreads();                             // previous tile fully consumed
    stage_rows(kb, k0, kTileK, Tk, D, Ks, D + 1);
    stage_rows(vb, k0, kTileK, Tk, D, Vs, D);
    __syncthreads();
    float s[kTileK / kThreadsPerRow];            // 4 scores per thread
    float tile_max = -FLT_MAX;
#pragma unroll
    for (int c = 0; c < kTileK / kThreadsPerRow; ++c) {
      const int j = sub * (kTileK / kThreadsPerRow) + c;
      const int64_t col = k0 + j;
      float dot = 0.f;
      for (int d = 0; d < D; ++d) dot += Qs[i * D + d] * Ks[j * (D + 1) + d];
      const bool valid = col < Tk && !(causal && col > row + off);
      s[c] = valid ? dot : -FLT_MAX;
      tile_max = fmaxf(tile_max, s[c]);
    }
    const float m_new = fmaxf(m, row_max(tile_max));
    const float alpha = __expf(m - m_new);
    float psum = 0.f;
#pragma unroll
    for (int c = 0; c < kTileK / kThreadsPerRow; ++c) {
      const int j = sub * (kTileK / kThreadsPerRow) + c;
      float p = s[c] == -FLT_MAX ? 0.f : __expf(s[c] - m_new);
      psum += p;
      if (drop.on) p = drop.keep(head_key, row + off, k0 + j) ? p * drop.keep_scale : 0.f;
      Ps[i * kTileK + j] = p;
    }
    l = l * alpha + row_sum(psum);
    m = m_new;
    __syncwarp();                                // the row's 8 threads share one warp
#pragma unroll
    for (int t = 0; t < kDimsPerThread; ++t) {
      const int d = sub + kThreadsPerRow * t;
      if (d < D) {
        float a = acc[t] * alpha;
        for (int j = 0; j < kTileK; ++j) a += Ps[i * kTileK + j] * Vs[j * D + d];
        acc[t] = a;
      }
    }
  }
  if (row < Tq) {
    const float inv_l = 1.f / l;
#pragma unroll
    for (int t = 0; t < kDimsPerThread; ++t) {
      const int d = sub + kThreadsPerRow * t;
      if (d < D) o[(bh * Tq + row) * D + d] = from_f<T>(acc[t] * inv_l);
    }
    if (sub == 0) lse[bh * Tq + row] = m + __logf(l);
  }
}

template <typename T>
__global__ void attn_delta_kernel(const T* __restrict__ dout, const T* __restrict__ o, float* __restrict__ delta,
                                  int64_t rows, int D) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  float s = 0.f;
  for (int d = threadIdx.x & 31; d < D; d += 32) s += to_f(dout[r * D + d]) * to_f(o[r * D + d]);
  s = warp_sum(s);
  if ((threadIdx.x & 31) == 0) delta[r] = s;
}

// P, Z = dropout(P), and dS * scale for one (query row, key col) pair.
struct Grad {
  float z, ds;
};
__device__ __forceinline__ Grad pair_grad(float s_scaled, float dz, float lse_r, float delta_r, bool valid,
                                          bool keep, const Dropout& drop, float scale) {
  if (!valid) return {0.f, 0.f};
  const float p = __expf(s_scaled - lse_r);
  const float z = drop.on ? (keep ? p * drop.keep_scale : 0.f) : p;
  const float dp = drop.on ? (keep ? dz * drop.keep_scale : 0.f) : dz;
  return {z, p * (dp - delta_r) * scale};
}

// dK, dV for kTileKB keys of one (batch, K/V head), summed over the `group` query heads that read it in a fixed
// order; for each, query tiles of kRowsQ rows from the diagonal down.
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv, int64_t Tq,
    int64_t Tk, int D, bool causal, float scale, Dropout drop, int group) {
  extern __shared__ float smem[];
  float* Ks = smem;                              // kTileKB x (D + 1)
  float* Vs = Ks + kTileKB * (D + 1);            // kTileKB x (D + 1)
  float* Qs = Vs + kTileKB * (D + 1);            // kRowsQ x D
  float* Gs = Qs + kRowsQ * D;                   // kRowsQ x D (dO)
  float* Zs = Gs + kRowsQ * D;                   // kTileKB x kRowsQ
  float* Ss = Zs + kTileKB * kRowsQ;             // kTileKB x kRowsQ (dS * scale)
  const int64_t kvh = blockIdx.y;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTileKB;
  const int j = threadIdx.x / kThreadsPerRow, sub = threadIdx.x % kThreadsPerRow;   // key j of the tile
  const int64_t col = k0 + j;
  const int64_t off = Tk - Tq;
  stage_rows(k + kvh * Tk * D, k0, kTileKB, Tk, D, Ks, D + 1);
  stage_rows(v + kvh * Tk * D, k0, kTileKB, Tk, D, Vs, D + 1);
  float dk_acc[kDimsPerThread], dv_acc[kDimsPerThread];
#pragma unroll
  for (int t = 0; t < kDimsPerThread; ++t) dk_acc[t] = dv_acc[t] = 0.f;
  const int64_t first = causal ? (max(int64_t(0), k0 - off) / kRowsQ) * kRowsQ : 0;   // earlier rows see none
  for (int g = 0; g < group; ++g)                // the query heads reading this K/V head
  for (int64_t q0 = first; q0 < Tq; q0 += kRowsQ) {
    const int64_t bh = kvh * group + g;
    const T* qb = q + bh * Tq * D;
    const T* gb = dout + bh * Tq * D;
    const uint32_t head_key = drop.on ? dropout_head_key(drop.seed, static_cast<uint32_t>(bh)) : 0u;
    __syncthreads();
    stage_rows(qb, q0, kRowsQ, Tq, D, Qs, D);
    stage_rows(gb, q0, kRowsQ, Tq, D, Gs, D);
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kRowsQ / kThreadsPerRow; ++c) {    // 2 query rows per thread
      const int i = sub * (kRowsQ / kThreadsPerRow) + c;
      const int64_t row = q0 + i;
      float s = 0.f, dz = 0.f;
      for (int d = 0; d < D; ++d) {
        s += Qs[i * D + d] * Ks[j * (D + 1) + d];
        dz += Gs[i * D + d] * Vs[j * (D + 1) + d];
      }
      const bool valid = row < Tq && col < Tk && !(causal && col > row + off);
      const bool keep = drop.on && valid && drop.keep(head_key, row + off, col);
      const Grad g = pair_grad(s * scale, dz, valid ? lse[bh * Tq + row] : 0.f, valid ? delta[bh * Tq + row] : 0.f,
                               valid, keep, drop, scale);
      Zs[j * kRowsQ + i] = g.z;
      Ss[j * kRowsQ + i] = g.ds;
    }
    __syncwarp();                                // key j's 8 threads share one warp
#pragma unroll
    for (int t = 0; t < kDimsPerThread; ++t) {
      const int d = sub + kThreadsPerRow * t;
      if (d < D) {
        float a = dv_acc[t], b = dk_acc[t];
        for (int i = 0; i < kRowsQ; ++i) {
          a += Zs[j * kRowsQ + i] * Gs[i * D + d];
          b += Ss[j * kRowsQ + i] * Qs[i * D + d];
        }
        dv_acc[t] = a;
        dk_acc[t] = b;
      }
    }
  }
  if (col < Tk) {
#pragma unroll
    for (int t = 0; t < kDimsPerThread; ++t) {
      const int d = sub + kThreadsPerRow * t;
      if (d < D) {
        dk[(kvh * Tk + col) * D + d] = from_f<T>(dk_acc[t]);
        dv[(kvh * Tk + col) * D + d] = from_f<T>(dv_acc[t]);
      }
    }
  }
}

// dQ for kRowsQ query rows of one (batch, head); key tiles of kTileKB up to the diagonal.
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq, int64_t Tq, int64_t Tk, int D,
    bool causal, float scale, Dropout drop, int group) {
  extern __shared__ float smem[];
  float* Qs = smem;                              // kRowsQ x D
  float* Gs = Qs + kRowsQ * D;                   // kRowsQ x D (dO)
  float* Ks = Gs + kRowsQ * D;                   // kTileKB x (D + 1)
  float* Vs = Ks + kTileKB * (D + 1);            // kTileKB x (D + 1)
  float* Ss = Vs + kTileKB * (D + 1);            // kRowsQ x kTileKB (dS * scale)
  const int64_t bh = blockIdx.y;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kRowsQ;
  const int i = threadIdx.x / kThreadsPerRow, sub = threadIdx.x % kThreadsPerRow;
  const int64_t row = q0 + i;
  const int64_t off = Tk - Tq;
  const uint32_t head_key = drop.on ? dropout_head_key(drop.seed, static_cast<uint32_t>(bh)) : 0u;
  stage_rows(q + bh * Tq * D, q0, kRowsQ, Tq, D, Qs, D);
  stage_rows(dout + bh * Tq * D, q0, kRowsQ, Tq, D, Gs, D);
  const float lse_r = row < Tq ? lse[bh * Tq + row] : 0.f;
  const float delta_r = row < Tq ? delta[bh * Tq + row] : 0.f;
  float acc[kDimsPerThread];
#pragma unroll
  for (int t = 0; t < kDimsPerThread; ++t) acc[t] = 0.f;
  const int64_t kv_end = causal ? min(Tk, q0 + kRowsQ + off) : Tk;
  for (int64_t k0 = 0; k0 < kv_end; k0 += kTileKB) {
    __syncthreads();
    stage_rows(k + (bh / group) * Tk * D, k0, kTileKB, Tk, D, Ks, D + 1);
    stage_rows(v + (bh / group) * Tk * D, k0, kTileKB, Tk, D, Vs, D + 1);
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kTileKB / kThreadsPerRow; ++c) {   // 2 keys per thread
      const int j = sub * (kTileKB / kThreadsPerRow) + c;
      const int64_t col = k0 + j;
      float s = 0.f, dz = 0.f;
      for (int d = 0; d < D; ++d) {
        s += Qs[i * D + d] * Ks[j * (D + 1) + d];
        dz += Gs[i * D + d] * Vs[j * (D + 1) + d];
      }
      const bool valid = row < Tq && col < Tk && !(causal && col > row + off);
      const bool keep = drop.on && valid && drop.keep(head_key, row + off, col);
      Ss[i * kTileKB + j] = pair_grad(s * scale, dz, lse_r, delta_r, valid, keep, drop, scale).ds;
    }
    __syncwarp();
#pragma unroll
    for (int t = 0; t < kDimsPerThread; ++t) {
      const int d = sub + kThreadsPerRow * t;
      if (d < D) {
        float a = acc[t];
        for (int j = 0; j < kTileKB; ++j) a += Ss[i * kTileKB + j] * Ks[j * (D + 1) + d];
        acc[t] = a;
      }
    }
  }
  if (row < Tq) {
#pragma unroll
    for (int t = 0; t < kDimsPerThread; ++t) {
      const int d = sub + kThreadsPerRow * t;
      if (d < D) dq[(bh * Tq + row) * D + d] = from_f<T>(acc[t]);
    }
  }
}

}  // namespace

int attention_fwd(DType dt, const void* q, const void* k, const void* v, void* o, float* lse, int64_t BH, int64_t T,
                  int64_t Tk, int64_t D, bool causal, float scale, float dropout_p, uint64_t seed, void* stream,
                  int64_t group) {
  if (D < 1 || D > kMaxHeadDim || Tk < T || group < 1 || BH % group) return static_cast<int>(cudaErrorInvalidValue);
  if (BH == 0 || T == 0) return 0;
  const int d = static_cast<int>(D);
  if (attention_tensor_cores(dt, D))
    return attention_fwd_tc(dt, q, k, v, o, lse, BH, T, Tk, d, causal, scale, make_dropout(dropout_p, seed),
                            static_cast<cudaStream_t>(stream), static_cast<int>(group));
  const size_t smem = sizeof(float) * (kRowsQ * d + kTileK * (d + 1) + kTileK * d + kRowsQ * kTileK);
  return dispatch_dtype(dt, [&](auto tag) {
    using TT = decltype(tag);
    if (int err = set_smem(attn_fwd_kernel<TT>, smem)) return err;
    const dim3 grid(static_cast<unsigned>((T + kRowsQ - 1) / kRowsQ), static_cast<unsigned>(BH));
    attn_fwd_kernel<TT><<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const TT*>(q), static_cast<const TT*>(k), static_cast<const TT*>(v), static_cast<TT*>(o), lse, T, Tk,
        d, causal, scale, make_dropout(dropout_p, seed), static_cast<int>(group));
    return launch_status();
  });
}

int attention_bwd(DType dt, const void* dout, const void* q, const void* k, const void* v, const void* o,
                  const float* lse, float* delta, void* dq, void* dk, void* dv, int64_t BH, int64_t T, int64_t Tk,
                  int64_t D, bool causal, float scale, float dropout_p, uint64_t seed, void* stream, int64_t group) {
  if (D < 1 || D > kMaxHeadDim || Tk < T || group < 1 || BH % group) return static_cast<int>(cudaErrorInvalidValue);
  if (BH == 0 || T == 0) return 0;
  const int d = static_cast<int>(D);
  auto s = static_cast<cudaStream_t>(stream);
  const Dropout drop = make_dropout(dropout_p, seed);
  return dispatch_dtype(dt, [&](auto tag) {
    using TT = decltype(tag);
    const TT *pq = static_cast<const TT*>(q), *pk = static_cast<const TT*>(k), *pv = static_cast<const TT*>(v),
             *pdo = static_cast<const TT*>(dout), *po = static_cast<const TT*>(o);
    const int64_t rows = BH * T;
    attn_delta_kernel<TT><<<static_cast<unsigned>((rows + 3) / 4), 128, 0, s>>>(pdo, po, delta, rows, d);
    if (int err = launch_status()) return err;
    if (attention_tensor_cores(dt, D))
      return attention_bwd_tc(dt, dout, q, k, v, lse, delta, dq, dk, dv, BH, T, Tk, d, causal, scale, drop, s,
                              static_cast<int>(group));
    const size_t smem_kv = sizeof(float) * (2 * kTileKB * (d + 1) + 2 * kRowsQ * d + 2 * kTileKB * kRowsQ);
    if (int err = set_smem(attn_bwd_dkdv_kernel<TT>, smem_kv)) return err;
    attn_bwd_dkdv_kernel<TT><<<dim3(static_cast<unsigned>((Tk + kTileKB - 1) / kTileKB),
                                    static_cast<unsigned>(BH / group)),
                               kThreads, smem_kv, s>>>(pq, pk, pv, pdo, lse, delta, static_cast<TT*>(dk),
                                                       static_cast<TT*>(dv), T, Tk, d, causal, scale, drop,
                                                       static_cast<int>(group));
    if (int err = launch_status()) return err;
    const size_t smem_q = sizeof(float) * (2 * kRowsQ * d + 2 * kTileKB * (d + 1) + kRowsQ * kTileKB);
    if (int err = set_smem(attn_bwd_dq_kernel<TT>, smem_q)) return err;
    attn_bwd_dq_kernel<TT><<<dim3(static_cast<unsigned>((T + kRowsQ - 1) / kRowsQ), static_cast<unsigned>(BH)),
                             kThreads, smem_q, s>>>(pq, pk, pv, pdo, lse, delta, static_cast<TT*>(dq), T, Tk, d,
                                                    causal, scale, drop, static_cast<int>(group));
    return launch_status();
  });
}

}  // namespace cuda
}  // namespace gptfast
