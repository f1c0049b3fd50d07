// Emulated WMMA (see cuda_runtime.h here). Every lane holds the whole 16x16 tile of a fragment
// (the hardware spreads it over the warp in an undocumented layout, which correct code never
// relies on). Loads check the hardware's rules: 256-bit aligned pointers, ldm a multiple of 8
// elements for 16-bit types and of 4 for float. Stores are done by lane 0 alone, so a reader that
// does not __syncwarp after a store sees stale data here too.
#pragma once
#include <cassert>
#include <cstdint>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation knows m16n16k16 only");
  float x[256];   // element (i, j) at x[16 i + j]
};

inline float elem(float v) { return v; }
inline float elem(__half v) { return __half2float(v); }
inline float elem(__nv_bfloat16 v) { return __bfloat162float(v); }

inline void check(const void* p, unsigned ldm, unsigned bytes) {
  assert(reinterpret_cast<uintptr_t>(p) % 32 == 0 && "WMMA pointers must be 256-bit aligned");
  assert(ldm % (16 / bytes) == 0 && "WMMA ldm must be a multiple of 16 bytes");
  (void)p;
  (void)ldm;
  (void)bytes;
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  check(p, ldm, sizeof(T));
  constexpr bool row = std::is_same<Layout, row_major>::value;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[16 * i + j] = elem(row ? p[i * ldm + j] : p[i + j * ldm]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  check(p, ldm, 4);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[16 * i + j] = l == mem_row_major ? p[i * ldm + j] : p[i + j * ldm];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  check(p, ldm, 4);
  if ((threadIdx.x & 31) != 0) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) (l == mem_row_major ? p[i * ldm + j] : p[i + j * ldm]) = f.x[16 * i + j];
}

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float v) {
  for (float& e : f.x) e = v;
}

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[16 * i + j];
      for (int k = 0; k < 16; ++k) s += a.x[16 * i + k] * b.x[16 * k + j];
      out[16 * i + j] = s;
    }
  for (int e = 0; e < 256; ++e) d.x[e] = out[e];
}
}  // namespace wmma
}  // namespace nvcuda
