// Vector loads and stores that let one kernel body serve every storage type: values are computed
// in acc_t<T> - T itself for float32/float64, float32 for bfloat16/float16 - and converted at the
// load and at the store, in registers. So a 16-bit tensor is read and written at 2 bytes an
// element, with no widened copy of it anywhere.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace gptfast {

template <typename T>
using acc_t = at::opmath_type<T>;

// Vectorized<acc_t<T>>::size() elements of p
template <typename T>
inline at::vec::Vectorized<acc_t<T>> load_acc(const T* p) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return at::vec::Vectorized<T>::loadu(p);
  } else {
    at::vec::Vectorized<float> out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

// The sum of a vector's lanes, by shuffles (cheaper than a store and a scalar loop; the decoding
// attention kernel takes one per key).
template <typename T>
inline T sum_lanes(const at::vec::Vectorized<T>& v) {
  using Vec = at::vec::Vectorized<T>;
  return at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, v);
}

template <typename T>
inline void store_acc(const at::vec::Vectorized<acc_t<T>>& v, T* p) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, at::vec::Vectorized<float>::size());
  }
}

// Non-temporal ("streaming") stores, for outputs too large to stay in cache: a normal store first
// reads each cache line it writes (read-for-ownership), a streaming store does not - one pass over
// memory instead of two for a write-only output. Only float32 streams; p must be aligned to the
// vector width (see can_stream). Streamed writes are weakly ordered: end each thread's share of
// the work with stream_fence().
template <typename T>
inline void store_acc_stream(const at::vec::Vectorized<acc_t<T>>& v, T* p) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v);
    return;
  }
#endif
  store_acc(v, p);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// Outputs from this size on are written with streaming stores. Measured on the 2-core EPYC (Zen 3,
// 2026-12-02, LayerNorm forward 768 columns): at 2048 rows (6 MB) streaming makes the op 1.3x
// faster alone but a reader right after it slower (its output no longer in cache: y.sum() 0.61 ->
// 0.81 ms); at 8192 rows (25 MB, out of cache either way) it wins with the reader too (4.9 -> 4.4 ms).
constexpr int64_t kStreamBytes = int64_t(16) << 20;

// Whether rows of `row_len` elements written from `base` can all take streaming stores (float32,
// every row starting on a 64-byte line) and should (`total_bytes` at least kStreamBytes).
template <typename T>
inline bool can_stream(const T* base, int64_t row_len, int64_t total_bytes) {
  return std::is_same_v<T, float> && reinterpret_cast<std::uintptr_t>(base) % 64 == 0 &&
         (row_len * int64_t(sizeof(T))) % 64 == 0 && total_bytes >= kStreamBytes;
}

}  // namespace gptfast
