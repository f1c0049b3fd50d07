// Emulated float16 storage type (see cuda_runtime.h here): GCC's _Float16, round to nearest even.
#pragma once
struct __half {
  _Float16 v;
};
inline __half __float2half_rn(float x) { return {static_cast<_Float16>(x)}; }
inline float __half2float(__half h) { return static_cast<float>(h.v); }
