// BPE training loop with incrementally maintained pair counts and a lazy max-heap.
#include "bpe_train.h"

#include <algorithm>
#include <queue>
#include <stdexcept>
#include <unordered_map>

namespace gptfast {
namespace {

using Pair = uint64_t;  // (a << 32) | b
inline Pair make_pair_key(int64_t a, int64_t b) { return (static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b); }
inline int64_t first_of(Pair p) { return static_cast<int64_t>(p >> 32); }
inline int64_t second_of(Pair p) { return static_cast<int64_t>(p & 0xffffffffu); }

std::vector<int64_t> merge_word(const std::vector<int64_t>& w, int64_t a, int64_t b, int64_t new_id) {
  std::vector<int64_t> out;
  out.reserve(w.size());
  for (size_t i = 0; i < w.size();) {
    if (i + 1 < w.size() && w[i] == a && w[i + 1] == b) {
      out.push_back(new_id);
      i += 2;
    } else {
      out.push_back(w[i++]);
    }
  }
  return out;
}

using PairCounts = std::unordered_map<Pair, int64_t>;
using PairWords = std::unordered_map<Pair, std::vector<int64_t>>;   // pair -> words holding it (may repeat)

// Every adjacent pair's count over the words (each word weighted by its count), and the words holding it.
void count_pairs(const std::vector<std::vector<int64_t>>& words, const std::vector<int64_t>& counts,
                 PairCounts& pair_counts, PairWords& where) {
  for (size_t idx = 0; idx < words.size(); ++idx) {
    const auto& w = words[idx];
    for (size_t i = 0; i + 1 < w.size(); ++i) {
      Pair p = make_pair_key(w[i], w[i + 1]);
      pair_counts[p] += counts[idx];
      where[p].push_back(static_cast<int64_t>(idx));
    }
  }
}

// Rewrites the words in `holders` with the merge (a, b) -> new_id, taking their old pairs out of the counts and
// putting their new ones in; returns the pairs whose count changed (sorted, unique).
std::vector<Pair> apply_merge(std::vector<std::vector<int64_t>>& words, const std::vector<int64_t>& counts,
                              const std::vector<int64_t>& holders, int64_t a, int64_t b, int64_t new_id,
                              PairCounts& pair_counts, PairWords& where) {
  std::vector<Pair> changed;
  for (int64_t idx : holders) {
    auto& w = words[idx];
    const int64_t f = counts[idx];
    for (size_t i = 0; i + 1 < w.size(); ++i) {
      Pair p = make_pair_key(w[i], w[i + 1]);
      pair_counts[p] -= f;
      changed.push_back(p);
    }
    w = merge_word(w, a, b, new_id);
    for (size_t i = 0; i + 1 < w.size(); ++i) {
      Pair p = make_pair_key(w[i], w[i + 1]);
      pair_counts[p] += f;
      where[p].push_back(idx);
      changed.push_back(p);
    }
  }
  std::sort(changed.begin(), changed.end());
  changed.erase(std::unique(changed.begin(), changed.end()), changed.end());
  return changed;
}

}  // namespace

std::vector<std::tuple<int64_t, int64_t, int64_t>> bpe_learn_merges(std::vector<std::vector<int64_t>> words,
                                                                    const std::vector<int64_t>& counts,
                                                                    int64_t num_merges, int64_t first_id) {
  if (words.size() != counts.size()) throw std::invalid_argument("words and counts differ in length");
  for (const auto& w : words)
    for (int64_t t : w)
      if (t < 0 || t > 0xffffffffLL) throw std::invalid_argument("token ids must fit in 32 bits");
  PairCounts pair_counts;
  PairWords where;
  count_pairs(words, counts, pair_counts, where);
  // max-heap on (count, -a, -b): highest count first, then the smallest pair
  using Entry = std::tuple<int64_t, int64_t, int64_t>;
  std::priority_queue<Entry> heap;
  for (const auto& [p, c] : pair_counts) heap.emplace(c, -first_of(p), -second_of(p));

  std::vector<std::tuple<int64_t, int64_t, int64_t>> merges;
  while (static_cast<int64_t>(merges.size()) < num_merges && !heap.empty()) {
    auto [count, na, nb] = heap.top();
    heap.pop();
    const Pair best = make_pair_key(-na, -nb);
    auto it = pair_counts.find(best);
    if (count == 0 || it == pair_counts.end() || it->second != count) continue;  // stale entry
    const int64_t new_id = first_id + static_cast<int64_t>(merges.size());
    merges.emplace_back(-na, -nb, new_id);
    std::vector<int64_t> holders = std::move(where[best]);
    where.erase(best);
    std::sort(holders.begin(), holders.end());
    holders.erase(std::unique(holders.begin(), holders.end()), holders.end());
    for (Pair p : apply_merge(words, counts, holders, -na, -nb, new_id, pair_counts, where)) {
      auto pc = pair_counts.find(p);
      if (pc->second > 0) {
        heap.emplace(pc->second, -first_of(p), -second_of(p));
      } else {
        pair_counts.erase(pc);
      }
    }
  }
  return merges;
}

}  // namespace gptfast
