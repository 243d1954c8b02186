// dedup-stats: what deduplication saved in an image, and what optimal
// dedup would store at other cluster sizes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qcow2dedup/image.h"

namespace qcow2dedup {

struct HistogramBucket {
  uint64_t refcount_min = 0, refcount_max = 0;
  uint64_t stored_clusters = 0;  // host data clusters with a refcount in range
  uint64_t references = 0;       // guest clusters pointing at them
};

struct SharedCluster {
  uint64_t host_offset = 0;
  uint64_t refcount = 0;
  std::vector<uint64_t> guest_offsets;  // some of them
};

struct DedupStats {
  std::string filename;
  uint64_t virtual_size = 0;
  uint64_t cluster_size = 0;
  uint64_t guest_clusters = 0;
  uint64_t data_clusters = 0;    // guest clusters that hold data
  uint64_t zero_clusters = 0;    // guest clusters that read as zero
  uint64_t stored_clusters = 0;  // distinct host data clusters
  double dedup_ratio = 1.0;      // data / stored
  uint64_t saved_bytes = 0;
  double saving_percent = 0;
  struct Metadata {
    uint64_t l1 = 0, l2 = 0, refcount = 0, index = 0;
    uint64_t total() const { return l1 + l2 + refcount + index; }
  } metadata;
  std::vector<HistogramBucket> histogram;
  std::vector<SharedCluster> top;
};

Result<DedupStats> ComputeDedupStats(const std::string& path, size_t top_count = 10,
                                     bool force_share = false);

struct Simulation {
  uint64_t cluster_size = 0;
  uint64_t clusters = 0;  // in the virtual disk
  uint64_t nonzero = 0;
  uint64_t unique = 0;    // what optimal dedup stores
  double ratio = 1.0;     // nonzero / unique
  uint64_t estimated_image_size = 0;
};

// One pass over the device, every cluster size at once.
Result<std::vector<Simulation>> SimulateDedup(BlockDevice& device, const std::vector<uint64_t>& cluster_sizes,
                                              ProgressFn progress = {});

}  // namespace qcow2dedup
