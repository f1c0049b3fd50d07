// Scaled dot-product attention on tensor cores: fp16/bf16 inputs, WMMA 16x16x16 matrix products
// with fp32 accumulation, FlashAttention-2 structure. Head dims D = 16, 32, ..., 128.
//
// Forward: a block owns 64 query rows of one (batch, head), 4 warps x 16 rows. Per tile of 64 keys:
//   S = Q K^T        (per warp: 16 x 64, fp32, tensor cores)  -> shared
//   online softmax   (2 lanes per row: running max m and sum l; P = exp(S - m) in fp16/bf16)
//   O = alpha O + P V (O kept in shared fp32 so each row can be rescaled by its alpha)
// Causal tiles past the diagonal are never loaded; lse = m + log(l) is saved for the backward.
// Backward (delta = rowsum(dO * O) from attention.cu), two kernels, no atomics, deterministic:
//   dK, dV: a block owns 64 keys (4 warps x 16); per query tile S^T = K Q^T, P = exp(S - lse),
//           dV += Z^T dO (Z = dropout(P)), dP^T = V dO^T, dS = P (dP - delta) scale, dK += dS^T Q,
//           accumulated in WMMA fragments (registers) over all query tiles;
//   dQ:     a block owns 64 query rows; per key tile the same S, dP, dS, then dQ += dS K.
// P and dS are rounded to the input precision before their matrix products, as in FlashAttention.
// Dropout decisions come from the same counter-based hash as every other backend.
#include <mma.h>

#include <cfloat>
#include <initializer_list>
#include <type_traits>

#include "attention_common.cuh"

namespace gptfast {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockRows = 16 * kWarps;   // query rows (forward, dQ) or keys (dK/dV) per block
constexpr int kTile = 64;                 // keys (forward, dQ) or query rows (dK/dV) per inner tile
constexpr int kLdF = kTile + 4;           // pitch of fp32 per-warp tiles (a multiple of 4 floats)
constexpr int kLdH = kTile + 8;           // pitch of 16-bit per-warp tiles (a multiple of 8 halves)

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

__host__ __device__ constexpr size_t round128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Rows [r0, r0 + n) of a (T, D) matrix into shared memory with pitch ld (elements); rows past T
// are zero. 16-byte copies when the rows are 16-byte aligned (D % 8 == 0 and an aligned base).
template <typename T>
__device__ void stage(const T* __restrict__ src, int64_t r0, int n, int64_t T_, int D, T* dst, int ld, bool vec) {
  if (vec) {
    const int chunks = D / 8;
    for (int idx = threadIdx.x; idx < n * chunks; idx += blockDim.x) {
      const int r = idx / chunks, c = (idx % chunks) * 8;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r0 + r < T_) val = *reinterpret_cast<const uint4*>(src + (r0 + r) * D + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < n * D; idx += blockDim.x) {
      const int r = idx / D, c = idx % D;
      dst[r * ld + c] = (r0 + r < T_) ? src[(r0 + r) * D + c] : from_f<T>(0.f);
    }
  }
}

// acc (16 x 16n) = A (16 x 16k, row-major, lda) * B^T where B is (16n x 16k) row-major (ldb):
// the "times a transposed tile" product of S = Q K^T, dP = dO V^T, S^T = K Q^T, dP^T = V dO^T.
template <typename T>
__device__ __forceinline__ void mma_abt(FragC& acc, const T* a, int lda, const T* b, int ldb, int k16) {
  FragA<T> fa;
  FragBCol<T> fb;
  for (int kk = 0; kk < k16; ++kk) {
    wmma::load_matrix_sync(fa, a + 16 * kk, lda);
    wmma::load_matrix_sync(fb, b + 16 * kk, ldb);
    wmma::mma_sync(acc, fa, fb, acc);
  }
}

// One warp: a 16 x 64 tile of A B^T into fp32 shared memory `out` (pitch kLdF).
template <typename T>
__device__ __forceinline__ void warp_abt_tile(const T* a, const T* b, int ld, int D, float* out) {
  for (int j = 0; j < kTile / 16; ++j) {
    FragC acc;
    wmma::fill_fragment(acc, 0.f);
    mma_abt(acc, a, ld, b + 16 * j * ld, ld, D / 16);
    wmma::store_matrix_sync(out + 16 * j, acc, kLdF, wmma::mem_row_major);
  }
}

// One warp: acc[n] += X (16 x 64, pitch kLdH) * Y (64 x 16*ND, row-major, pitch ld).
template <typename T, int ND>
__device__ __forceinline__ void warp_accumulate(FragC (&acc)[ND], const T* x, const T* y, int ld) {
  FragA<T> fa;
  FragBRow<T> fb;
#pragma unroll
  for (int kk = 0; kk < kTile / 16; ++kk) {
    wmma::load_matrix_sync(fa, x + 16 * kk, kLdH);
#pragma unroll
    for (int n = 0; n < ND; ++n) {
      wmma::load_matrix_sync(fb, y + 16 * kk * ld + 16 * n, ld);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

// One warp writes 16 rows of fragments (rows row0.., 16*ND columns) to global memory as T, through
// a 16 x 16 fp32 shared scratch. Rows at or past T_ (the matrix's row count) are not written.
template <typename T, int ND>
__device__ void warp_store_rows(const FragC (&acc)[ND], float* scratch, T* __restrict__ dst, int64_t row0, int64_t T_,
                                int D) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int n = 0; n < ND; ++n) {
    wmma::store_matrix_sync(scratch, acc[n], kLdF, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int r = e / 16, c = e % 16;
      if (row0 + r < T_) dst[(row0 + r) * D + 16 * n + c] = from_f<T>(scratch[r * kLdF + c]);
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
struct FwdSmem {
  size_t q, k, v, s, p, o, total;
  __host__ __device__ FwdSmem(int D, size_t elem) {
    const size_t tile = round128(size_t(kBlockRows) * (D + 8) * elem);
    q = 0;
    k = q + tile;
    v = k + tile;
    s = v + tile;                                                   // kWarps x 16 x kLdF fp32
    p = s + round128(size_t(kWarps) * 16 * kLdF * 4);               // kWarps x 16 x kLdH T
    o = p + round128(size_t(kWarps) * 16 * kLdH * elem);            // kWarps x 16 x (D + 4) fp32
    total = o + round128(size_t(kWarps) * 16 * (D + 4) * 4);
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) attn_fwd_tc_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                               const T* __restrict__ v, T* __restrict__ o,
                                                               float* __restrict__ lse, int64_t Tq, int64_t Tk, int D,
                                                               bool causal, float scale, Dropout drop, bool vec,
                                                               int group) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  const FwdSmem L(D, sizeof(T));
  const int ld = D + 8, ldo = D + 4;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  T* Qs = reinterpret_cast<T*>(smem + L.q);                          // 64 x ld
  T* Ks = reinterpret_cast<T*>(smem + L.k);                          // 64 x ld
  T* Vs = reinterpret_cast<T*>(smem + L.v);                          // 64 x ld
  float* Sw = reinterpret_cast<float*>(smem + L.s) + warp * 16 * kLdF;   // this warp's 16 x 64 scores
  T* Pw = reinterpret_cast<T*>(smem + L.p) + warp * 16 * kLdH;           // its 16 x 64 probabilities
  float* Ow = reinterpret_cast<float*>(smem + L.o) + warp * 16 * ldo;    // its 16 x D output rows

  const int64_t bh = blockIdx.y;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int64_t wrow0 = q0 + 16 * warp;                              // first query row of this warp
  const int r = lane / 2, half = lane % 2;                           // softmax: 2 lanes per row
  const int64_t row = wrow0 + r;
  const int64_t off = Tk - Tq;                                       // cached keys before the first query
  const T* qb = q + bh * Tq * D;
  const T* kb = k + (bh / group) * Tk * D;                           // grouped-query: the shared K/V head
  const T* vb = v + (bh / group) * Tk * D;
  const uint32_t head_key = drop.on ? dropout_head_key(drop.seed, static_cast<uint32_t>(bh)) : 0u;

  stage(qb, q0, kBlockRows, Tq, D, Qs, ld, vec);
  for (int e = lane; e < 16 * D; e += 32) Ow[(e / D) * ldo + e % D] = 0.f;
  float m = -FLT_MAX, l = 0.f;                                       // this lane's row statistics

  const int64_t kv_end = causal ? min(Tk, q0 + kBlockRows + off) : Tk;
  for (int64_t k0 = 0; k0 < kv_end; k0 += kTile) {
    __syncthreads();                                                 // previous K, V tiles consumed
    stage(kb, k0, kTile, Tk, D, Ks, ld, vec);
    stage(vb, k0, kTile, Tk, D, Vs, ld, vec);
    __syncthreads();

    warp_abt_tile(Qs + 16 * warp * ld, Ks, ld, D, Sw);              // S = Q K^T (unscaled)
    __syncwarp();
    const int c0 = half * (kTile / 2);
    float tile_max = -FLT_MAX;
    for (int c = c0; c < c0 + kTile / 2; ++c) {
      const int64_t col = k0 + c;
      const bool valid = col < Tk && !(causal && col > row + off);
      const float s = valid ? Sw[r * kLdF + c] * scale : -FLT_MAX;
      Sw[r * kLdF + c] = s;
      tile_max = fmaxf(tile_max, s);
    }
    const float m_new = fmaxf(m, fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1)));
    const float alpha = __expf(m - m_new);
    float psum = 0.f;
    for (int c = c0; c < c0 + kTile / 2; ++c) {
      const float s = Sw[r * kLdF + c];
      float p = s == -FLT_MAX ? 0.f : __expf(s - m_new);
      psum += p;
      if (drop.on) p = drop.keep(head_key, row + off, k0 + c) ? p * drop.keep_scale : 0.f;
      Pw[r * kLdH + c] = from_f<T>(p);
    }
    l = l * alpha + psum + __shfl_xor_sync(0xffffffffu, psum, 1);
    m = m_new;
    for (int d = half; d < D; d += 2) Ow[r * ldo + d] *= alpha;
    __syncwarp();

    // O += P V, 16 output columns at a time, through the fp32 rows in shared memory.
    for (int n = 0; n < D / 16; ++n) {
      FragC acc;
      wmma::load_matrix_sync(acc, Ow + 16 * n, ldo, wmma::mem_row_major);
      FragA<T> fa;
      FragBRow<T> fb;
      for (int kk = 0; kk < kTile / 16; ++kk) {
        wmma::load_matrix_sync(fa, Pw + 16 * kk, kLdH);
        wmma::load_matrix_sync(fb, Vs + 16 * kk * ld + 16 * n, ld);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(Ow + 16 * n, acc, ldo, wmma::mem_row_major);
    }
    __syncwarp();
  }
  __syncwarp();
  if (row < Tq) {
    const float inv_l = 1.f / l;
    T* orow = o + (bh * Tq + row) * D;
    for (int d = half; d < D; d += 2) orow[d] = from_f<T>(Ow[r * ldo + d] * inv_l);
    if (half == 0) lse[bh * Tq + row] = m + __logf(l);
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
struct BwdSmem {
  size_t a, b, c, d, s, dp, x, stats, total;
  __host__ __device__ BwdSmem(int D, size_t elem) {
    const size_t tile = round128(size_t(kBlockRows) * (D + 8) * elem);
    a = 0;                                                          // four 64 x (D + 8) tiles
    b = a + tile;
    c = b + tile;
    d = c + tile;
    s = d + tile;                                                   // kWarps x 16 x kLdF fp32 (S or P)
    dp = s + round128(size_t(kWarps) * 16 * kLdF * 4);              // kWarps x 16 x kLdF fp32 (dP)
    x = dp + round128(size_t(kWarps) * 16 * kLdF * 4);              // kWarps x 16 x kLdH T (Z or dS)
    stats = x + round128(size_t(kWarps) * 16 * kLdH * elem);        // lse, delta of a query tile
    total = stats + round128(2 * kTile * 4);
  }
};

// The backward kernels' shared memory by slot: four 64 x (D + 8) tiles (which operand sits where is
// each kernel's choice), this warp's fp32 tiles for S (or P) and dP and its 16-bit tile for Z or dS,
// and the lse / delta of a query tile.
template <typename T>
struct BwdTiles {
  T *a, *b, *c, *d, *x;
  float *s, *dp, *lse, *delta;
  __device__ BwdTiles(unsigned char* smem, int D, int warp) {
    const BwdSmem L(D, sizeof(T));
    a = reinterpret_cast<T*>(smem + L.a);
    b = reinterpret_cast<T*>(smem + L.b);
    c = reinterpret_cast<T*>(smem + L.c);
    d = reinterpret_cast<T*>(smem + L.d);
    s = reinterpret_cast<float*>(smem + L.s) + warp * 16 * kLdF;
    dp = reinterpret_cast<float*>(smem + L.dp) + warp * 16 * kLdF;
    x = reinterpret_cast<T*>(smem + L.x) + warp * 16 * kLdH;
    lse = reinterpret_cast<float*>(smem + L.stats);
    delta = lse + kTile;
  }
};

// Elementwise step of the backward for one (query, key) pair: P from the saved lse; Z = dropout(P);
// dS = P (dropout'(dP) - delta) * scale.
struct PairGrad {
  float z, ds;
};
__device__ __forceinline__ PairGrad pair_grad_tc(float s, float dp, float lse_r, float delta_r, bool valid, bool keep,
                                                 const Dropout& drop, float scale) {
  if (!valid) return {0.f, 0.f};
  const float p = __expf(s * scale - lse_r);
  const float z = drop.on ? (keep ? p * drop.keep_scale : 0.f) : p;
  const float dz = drop.on ? (keep ? dp * drop.keep_scale : 0.f) : dp;
  return {z, p * (dz - delta_r) * scale};
}

// dK, dV for 64 keys of one (batch, head): warp w owns keys k0 + 16w ... k0 + 16w + 15.
template <typename T, int ND>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_tc_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv, int64_t Tq,
    int64_t Tk, bool causal, float scale, Dropout drop, bool vec, int group) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int D = 16 * ND;
  constexpr int ld = D + 8;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const BwdTiles<T> t(smem, D, warp);
  T *Ks = t.a, *Vs = t.b;                    // this block's 64 keys (and values) x ld
  T *Qs = t.c, *Gs = t.d;                    // 64 queries x ld, and their dO
  float *Sw = t.s, *Dw = t.dp;               // S^T (16 keys x 64 queries), dP^T
  T* Xw = t.x;                               // Z^T, then dS^T
  float *Ls = t.lse, *Ds = t.delta;          // lse and delta of the query tile

  const int64_t kvh = blockIdx.y;                                    // a K/V head: dK, dV sum over `group` heads
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int64_t wkey0 = k0 + 16 * warp;
  const int r = lane / 2, half = lane % 2;                           // 2 lanes per key row
  const int64_t key = wkey0 + r;
  const int64_t off = Tk - Tq;
  stage(k + kvh * Tk * D, k0, kBlockRows, Tk, D, Ks, ld, vec);
  stage(v + kvh * Tk * D, k0, kBlockRows, Tk, D, Vs, ld, vec);
  FragC dk_acc[ND], dv_acc[ND];
#pragma unroll
  for (int n = 0; n < ND; ++n) {
    wmma::fill_fragment(dk_acc[n], 0.f);
    wmma::fill_fragment(dv_acc[n], 0.f);
  }
  // causal: query rows before k0 - off see none of these keys
  const int64_t first = causal ? max(int64_t(0), k0 - off) / kTile * kTile : 0;
  for (int g = 0; g < group; ++g)                                    // the query heads reading this K/V head
  for (int64_t q0 = first; q0 < Tq; q0 += kTile) {
    const int64_t bh = kvh * group + g;
    const T* qb = q + bh * Tq * D;
    const T* gb = dout + bh * Tq * D;
    const uint32_t head_key = drop.on ? dropout_head_key(drop.seed, static_cast<uint32_t>(bh)) : 0u;
    __syncthreads();
    stage(qb, q0, kTile, Tq, D, Qs, ld, vec);
    stage(gb, q0, kTile, Tq, D, Gs, ld, vec);
    for (int i = threadIdx.x; i < kTile; i += blockDim.x) {
      const bool in = q0 + i < Tq;
      Ls[i] = in ? lse[bh * Tq + q0 + i] : 0.f;
      Ds[i] = in ? delta[bh * Tq + q0 + i] : 0.f;
    }
    __syncthreads();

    warp_abt_tile(Ks + 16 * warp * ld, Qs, ld, D, Sw);              // S^T = K Q^T
    warp_abt_tile(Vs + 16 * warp * ld, Gs, ld, D, Dw);              // dP^T = V dO^T
    __syncwarp();
    const int c0 = half * (kTile / 2);
    for (int c = c0; c < c0 + kTile / 2; ++c) {                      // c: query within the tile
      const int64_t qrow = q0 + c;
      const bool valid = qrow < Tq && key < Tk && !(causal && key > qrow + off);
      const bool keep = drop.on && valid && drop.keep(head_key, qrow + off, key);
      const PairGrad g = pair_grad_tc(Sw[r * kLdF + c], Dw[r * kLdF + c], Ls[c], Ds[c], valid, keep, drop, scale);
      Xw[r * kLdH + c] = from_f<T>(g.z);
      Sw[r * kLdF + c] = g.ds;                                        // keep dS until Z has been used
    }
    __syncwarp();
    warp_accumulate<T, ND>(dv_acc, Xw, Gs, ld);                      // dV += Z^T dO
    __syncwarp();
    for (int c = c0; c < c0 + kTile / 2; ++c) Xw[r * kLdH + c] = from_f<T>(Sw[r * kLdF + c]);
    __syncwarp();
    warp_accumulate<T, ND>(dk_acc, Xw, Qs, ld);                      // dK += dS^T Q  (scale is in dS)
    __syncwarp();
  }
  warp_store_rows<T, ND>(dk_acc, Sw, dk + kvh * Tk * D, wkey0, Tk, D);
  warp_store_rows<T, ND>(dv_acc, Sw, dv + kvh * Tk * D, wkey0, Tk, D);
#endif
}

// dQ for 64 query rows of one (batch, head): warp w owns rows q0 + 16w ... q0 + 16w + 15.
template <typename T, int ND>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_tc_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq, int64_t Tq, int64_t Tk,
    bool causal, float scale, Dropout drop, bool vec, int group) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int D = 16 * ND;
  constexpr int ld = D + 8;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const BwdTiles<T> t(smem, D, warp);
  T *Qs = t.a, *Gs = t.b;                    // this block's 64 queries x ld, and their dO
  T *Ks = t.c, *Vs = t.d;                    // a tile of 64 keys (and values) x ld
  float *Sw = t.s, *Dw = t.dp;               // S (16 queries x 64 keys), dP
  T* Xw = t.x;                               // dS

  const int64_t bh = blockIdx.y;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int64_t wrow0 = q0 + 16 * warp;
  const int r = lane / 2, half = lane % 2;
  const int64_t row = wrow0 + r;
  const uint32_t head_key = drop.on ? dropout_head_key(drop.seed, static_cast<uint32_t>(bh)) : 0u;
  const int64_t off = Tk - Tq;
  stage(q + bh * Tq * D, q0, kBlockRows, Tq, D, Qs, ld, vec);
  stage(dout + bh * Tq * D, q0, kBlockRows, Tq, D, Gs, ld, vec);
  const float lse_r = row < Tq ? lse[bh * Tq + row] : 0.f;
  const float delta_r = row < Tq ? delta[bh * Tq + row] : 0.f;
  FragC dq_acc[ND];
#pragma unroll
  for (int n = 0; n < ND; ++n) wmma::fill_fragment(dq_acc[n], 0.f);
  const int64_t kv_end = causal ? min(Tk, q0 + kBlockRows + off) : Tk;
  for (int64_t k0 = 0; k0 < kv_end; k0 += kTile) {
    __syncthreads();
    stage(k + (bh / group) * Tk * D, k0, kTile, Tk, D, Ks, ld, vec);
    stage(v + (bh / group) * Tk * D, k0, kTile, Tk, D, Vs, ld, vec);
    __syncthreads();

    warp_abt_tile(Qs + 16 * warp * ld, Ks, ld, D, Sw);              // S = Q K^T
    warp_abt_tile(Gs + 16 * warp * ld, Vs, ld, D, Dw);              // dP = dO V^T
    __syncwarp();
    const int c0 = half * (kTile / 2);
    for (int c = c0; c < c0 + kTile / 2; ++c) {                      // c: key within the tile
      const int64_t col = k0 + c;
      const bool valid = row < Tq && col < Tk && !(causal && col > row + off);
      const bool keep = drop.on && valid && drop.keep(head_key, row + off, col);
      Xw[r * kLdH + c] = from_f<T>(
          pair_grad_tc(Sw[r * kLdF + c], Dw[r * kLdF + c], lse_r, delta_r, valid, keep, drop, scale).ds);
    }
    __syncwarp();
    warp_accumulate<T, ND>(dq_acc, Xw, Ks, ld);                      // dQ += dS K
    __syncwarp();
  }
  warp_store_rows<T, ND>(dq_acc, Sw, dq + bh * Tq * D, wrow0, Tq, D);
#endif
}

#ifndef GPTFAST_KERNELS_ONLY   // tests/cuda_emulation/attention_tc_emulated.cpp launches the kernels itself
template <typename T, int ND>
int launch_bwd(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, T* dq, T* dk,
               T* dv, int64_t BH, int64_t Tq, int64_t Tk, bool causal, float scale, Dropout drop, bool vec,
               cudaStream_t s, int group) {
  const size_t smem = BwdSmem(16 * ND, sizeof(T)).total;
  const dim3 key_grid(static_cast<unsigned>((Tk + kBlockRows - 1) / kBlockRows), static_cast<unsigned>(BH / group));
  const dim3 query_grid(static_cast<unsigned>((Tq + kBlockRows - 1) / kBlockRows), static_cast<unsigned>(BH));
  if (int err = set_smem(attn_bwd_dkdv_tc_kernel<T, ND>, smem)) return err;
  attn_bwd_dkdv_tc_kernel<T, ND><<<key_grid, kThreads, smem, s>>>(q, k, v, dout, lse, delta, dk, dv, Tq, Tk, causal,
                                                                  scale, drop, vec, group);
  if (int err = launch_status()) return err;
  if (int err = set_smem(attn_bwd_dq_tc_kernel<T, ND>, smem)) return err;
  attn_bwd_dq_tc_kernel<T, ND><<<query_grid, kThreads, smem, s>>>(q, k, v, dout, lse, delta, dq, Tq, Tk, causal, scale,
                                                                  drop, vec, group);
  return launch_status();
}

// Call f(std::integral_constant<int, D / 16>) for D in 16, 32, ..., 128.
template <typename F>
int dispatch_head_dim(int D, F&& f) {
  switch (D / 16) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

template <typename F>
int dispatch_half(DType dt, F&& f) {
  if (dt == kF16) return f(__half{});
  if (dt == kBF16) return f(__nv_bfloat16{});
  return static_cast<int>(cudaErrorInvalidValue);
}

bool rows_aligned(std::initializer_list<const void*> ptrs, int D) {
  if (D % 8) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

#endif  // GPTFAST_KERNELS_ONLY
}  // namespace

#ifndef GPTFAST_KERNELS_ONLY
int attention_fwd_tc(DType dt, const void* q, const void* k, const void* v, void* o, float* lse, int64_t BH,
                     int64_t T, int64_t Tk, int D, bool causal, float scale, Dropout drop, cudaStream_t stream,
                     int group) {
  if (D % 16 || D < 16 || D > kMaxHeadDim) return static_cast<int>(cudaErrorInvalidValue);
  const bool vec = rows_aligned({q, k, v}, D);
  return dispatch_half(dt, [&](auto tag) {
    using TT = decltype(tag);
    const size_t smem = FwdSmem(D, sizeof(TT)).total;
    if (int err = set_smem(attn_fwd_tc_kernel<TT>, smem)) return err;
    const dim3 grid(static_cast<unsigned>((T + kBlockRows - 1) / kBlockRows), static_cast<unsigned>(BH));
    attn_fwd_tc_kernel<TT><<<grid, kThreads, smem, stream>>>(static_cast<const TT*>(q), static_cast<const TT*>(k),
                                                             static_cast<const TT*>(v), static_cast<TT*>(o), lse, T, Tk,
                                                             D, causal, scale, drop, vec, group);
    return launch_status();
  });
}

int attention_bwd_tc(DType dt, const void* dout, const void* q, const void* k, const void* v, const float* lse,
                     const float* delta, void* dq, void* dk, void* dv, int64_t BH, int64_t T, int64_t Tk, int D,
                     bool causal, float scale, Dropout drop, cudaStream_t stream, int group) {
  if (D % 16 || D < 16 || D > kMaxHeadDim) return static_cast<int>(cudaErrorInvalidValue);
  const bool vec = rows_aligned({q, k, v, dout}, D);
  return dispatch_half(dt, [&](auto tag) {
    using TT = decltype(tag);
    return dispatch_head_dim(D, [&](auto nd) {
      return launch_bwd<TT, decltype(nd)::value>(
          static_cast<const TT*>(q), static_cast<const TT*>(k), static_cast<const TT*>(v),
          static_cast<const TT*>(dout), lse, delta, static_cast<TT*>(dq), static_cast<TT*>(dk), static_cast<TT*>(dv),
          BH, T, Tk, causal, scale, drop, vec, stream, group);
    });
  });
}
#endif  // GPTFAST_KERNELS_ONLY

}  // namespace cuda
}  // namespace gptfast
