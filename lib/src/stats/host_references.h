// How many active L2 entries point at each host cluster. Counters live in
// pages of 64K clusters, created only where data is referenced, so memory
// follows the clusters the image stores (4 bytes each: 1 GiB for a
// fully-written 1 TiB image at 4K clusters, 64 MiB at 64K) and not the size
// a sparse or hostile file claims.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

namespace qcow2dedup {

class HostReferences {
 public:
  void Add(uint64_t cluster) {
    uint32_t& c = Page(cluster >> kPageBits)[cluster & (kPageSize - 1)];
    if (c != UINT32_MAX) ++c;  // saturates: a statistic, not a refcount
  }

  // Calls f(cluster, references) for every referenced cluster, in ascending order.
  template <class F>
  void ForEach(F f) const {
    std::vector<uint64_t> keys;
    keys.reserve(pages_.size());
    for (const auto& [k, p] : pages_) keys.push_back(k);
    std::sort(keys.begin(), keys.end());
    for (uint64_t k : keys) {
      const uint32_t* p = pages_.at(k).get();
      for (uint64_t i = 0; i < kPageSize; ++i)
        if (p[i]) f((k << kPageBits) | i, uint64_t(p[i]));
    }
  }

 private:
  static constexpr uint32_t kPageBits = 16;
  static constexpr uint64_t kPageSize = 1ull << kPageBits;

  uint32_t* Page(uint64_t key) {
    // L2 entries mostly point at ascending clusters: remember the last page.
    if (last_ && last_key_ == key) return last_;
    auto& p = pages_[key];
    if (!p) p.reset(new uint32_t[kPageSize]());
    last_key_ = key;
    last_ = p.get();
    return last_;
  }

  std::unordered_map<uint64_t, std::unique_ptr<uint32_t[]>> pages_;
  uint64_t last_key_ = 0;
  uint32_t* last_ = nullptr;
};

}  // namespace qcow2dedup
