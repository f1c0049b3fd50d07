// Per-column sums over many rows (a norm's dweight, dbias), reproducible whatever the thread count:
// each fixed block of rows sums into its own partial row, then the blocks are summed in a fixed order.
// Used by the backward passes of LayerNorm and RMSNorm.
#pragma once
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "vec_io.h"

namespace gptfast {

// The blocking depends on N only (so results do not depend on the thread count): at most kMaxBlocks blocks of at
// least 32 rows, so the partials stay a small fraction of the bytes moved however many rows there are.
constexpr int64_t kMaxBlocks = 32;
inline int64_t rows_per_block(int64_t N) { return std::max<int64_t>(32, (N + kMaxBlocks - 1) / kMaxBlocks); }

// The partial sums' memory: kept by the calling thread from one backward to the next (grown when a
// wider row needs more; 256 B per column at most), on 64-byte lines. Allocated per call (a zero-filled
// 192 KB tensor at C = 768) it was one more block freed at the top of glibc's heap: one process timed
// a 2048x768 LayerNorm forward+backward at 6.4 ms with ~3,000 page faults a call, glibc giving back and the
// next call re-faulting the 12 MB of y and dx (benchmarks/NOTES.md).
class PartialSums {
 public:
  ~PartialSums() { std::free(p_); }
  void* get(size_t bytes) {
    if (bytes > bytes_) {
      std::free(p_);
      bytes_ = (bytes + 63) / 64 * 64;
      p_ = std::aligned_alloc(64, bytes_);
      if (p_ == nullptr) bytes_ = 0;
      TORCH_CHECK(p_ != nullptr, "norm backward: out of memory for ", bytes, " bytes of partial sums");
    }
    return p_;
  }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// The fixed-order reduction of per-block partial sums (few blocks: one thread, vectorized): each column's sum
// over the n_blocks partial rows of `partial` (n_blocks, C), rounded once into out's dtype (16-bit too).
template <typename T, typename A = acc_t<T>>
void sum_blocks(const A* partial, int64_t n_blocks, int64_t C, T* out) {
  using Vec = at::vec::Vectorized<A>;
  int64_t c = 0;
  for (; c + Vec::size() <= C; c += Vec::size()) {
    Vec s(0);
    for (int64_t blk = 0; blk < n_blocks; ++blk) s = s + Vec::loadu(partial + blk * C + c);
    store_acc(s, out + c);
  }
  for (; c < C; ++c) {
    A s = 0;
    for (int64_t blk = 0; blk < n_blocks; ++blk) s += partial[blk * C + c];
    out[c] = static_cast<T>(s);
  }
}

}  // namespace gptfast
