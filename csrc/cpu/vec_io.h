// Vector loads and stores that let one kernel body serve every storage type: values are computed
// in acc_t<T> - T itself for float32/float64, float32 for bfloat16/float16 - and converted at the
// load and at the store, in registers. So a 16-bit tensor is read and written at 2 bytes an
// element, with no widened copy of it anywhere.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

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

template <typename T>
inline void store_acc(const at::vec::Vectorized<acc_t<T>>& v, T* p) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, at::vec::Vectorized<float>::size());
  }
}

}  // namespace gptfast
