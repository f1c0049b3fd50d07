// The hot loop of byte-level BPE training: pair counting and merging (twin of
// gptfast/tokenizer/bpe.py:learn_merges; both must produce identical merges).
#pragma once
#include <cstdint>
#include <tuple>
#include <vector>

namespace gptfast {

// words: distinct pre-tokenized chunks as token ids; counts: their frequencies.
// Returns (a, b, new_id) for each merge, new_id = first_id, first_id + 1, ...
// Each round merges the most frequent adjacent pair; ties go to the smallest (a, b).
std::vector<std::tuple<int64_t, int64_t, int64_t>> bpe_learn_merges(std::vector<std::vector<int64_t>> words,
                                                                    const std::vector<int64_t>& counts,
                                                                    int64_t num_merges, int64_t first_id);

}  // namespace gptfast
