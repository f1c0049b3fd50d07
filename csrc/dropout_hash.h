// The counter-based RNG behind attention dropout, defined once for every backend.
//
// Whether attention weight (bh, row, col) is kept depends only on (seed, bh, row, col), so a
// backward pass regenerates the forward's mask without storing it, and the reference (PyTorch),
// C++, CUDA and Triton implementations drop exactly the same weights. Its Python twin is
// gptfast/ops/dropout_rng.py; keep the two identical.
//
//   h    = mix32(col + mix32(row + mix32(bh + mix32(seed_lo + mix32(seed_hi)))))   (mod 2^32)
//   keep = (h >> 8) >= threshold,  threshold = floor(p * 2^24)
//
// mix32 is the "lowbias32" integer finalizer (xor-shift / multiply rounds). The 24 high bits act
// as a uniform number in [0, 2^24), so the keep rate is 1 - p to within 2^-24.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GPTFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GPTFAST_HOST_DEVICE inline
#endif

namespace gptfast {

GPTFAST_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Per (seed, batch*head): fold the seed and the head index into one 32-bit key.
GPTFAST_HOST_DEVICE uint32_t dropout_head_key(uint64_t seed, uint32_t bh) {
  const uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(seed >> 32);
  return mix32(bh + mix32(lo + mix32(hi)));
}

// Per row of the attention matrix (a query position).
GPTFAST_HOST_DEVICE uint32_t dropout_row_key(uint32_t head_key, uint32_t row) {
  return mix32(row + head_key);
}

GPTFAST_HOST_DEVICE bool dropout_keep(uint32_t row_key, uint32_t col, uint32_t threshold) {
  return (mix32(col + row_key) >> 8) >= threshold;
}

// floor(p * 2^24): p = 0 keeps everything.
GPTFAST_HOST_DEVICE uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 16777216.0);
}

}  // namespace gptfast
