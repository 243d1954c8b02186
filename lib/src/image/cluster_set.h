// A set of host cluster numbers as one bit each: the writer notes clusters
// whose refcount crossed 1 for every shared cluster of a convert, and a
// hash-table node per cluster would cost more than the dedup index itself.
#pragma once

#include <cstdint>
#include <vector>

namespace qcow2dedup {

class ClusterSet {
 public:
  void Insert(uint64_t c) {
    if (c >= bits_.size()) bits_.resize(std::max<uint64_t>(c + 1, bits_.size() + bits_.size() / 2));
    if (!bits_[c]) ++count_;
    bits_[c] = true;
  }
  bool Contains(uint64_t c) const { return c < bits_.size() && bits_[c]; }
  void Erase(uint64_t c) {
    if (Contains(c)) {
      bits_[c] = false;
      --count_;
    }
  }
  bool empty() const { return count_ == 0; }
  void Clear() {
    bits_.assign(bits_.size(), false);
    count_ = 0;
  }

 private:
  std::vector<bool> bits_;
  uint64_t count_ = 0;
};

}  // namespace qcow2dedup
