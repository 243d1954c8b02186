// The refcount histogram's power-of-two buckets: 1, 2, 3-4, 5-8, 9-16, ...
#pragma once

#include <bit>
#include <cstdint>
#include <vector>

#include "qcow2dedup/stats.h"

namespace qcow2dedup {

// Bucket k holds refcounts (2^(k-1), 2^k]; bucket 0 holds 1.
inline unsigned HistogramBucketOf(uint64_t refcount) { return refcount <= 1 ? 0 : unsigned(std::bit_width(refcount - 1)); }

class RefcountHistogram {
 public:
  void Add(uint64_t refcount) {
    const unsigned k = HistogramBucketOf(refcount);
    if (k >= buckets_.size()) {
      const size_t from = buckets_.size();
      buckets_.resize(k + 1);
      for (size_t i = from; i <= k; ++i) {
        buckets_[i].refcount_min = i == 0 ? 1 : (1ull << (i - 1)) + 1;
        buckets_[i].refcount_max = 1ull << i;
      }
    }
    ++buckets_[k].stored_clusters;
    buckets_[k].references += refcount;
  }
  std::vector<HistogramBucket> Take() { return std::move(buckets_); }

 private:
  std::vector<HistogramBucket> buckets_;
};

}  // namespace qcow2dedup
