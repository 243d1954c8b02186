// dedup: deduplicate an image where it lies (one that QEMU wrote, say):
// every stored data cluster is hashed, every guest cluster whose data is
// stored more than once is linked to one copy, zeros are no longer stored,
// the other copies are freed and their space given back to the file system.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "qcow2dedup/image.h"

#pragma GCC visibility push(default)  // the public API: exported from the shared library

namespace qcow2dedup {

struct DedupOptions {
  CacheMode cache = CacheMode::kWriteback;
  ProgressFn hashing;    // over the stored clusters
  ProgressFn relinking;  // over the L2 tables
  uint64_t metadata_cache_bytes = 0;
  uint64_t index_memory = 0;  // as OpenOptions::index_memory
  // Flush (in the crash-safe order) after relinking every this many bytes of
  // guest space, so that a crash keeps the relinking done until then; 0:
  // only when the metadata cache is full, and at the end.
  uint64_t flush_interval = 0;
  std::unique_ptr<File> file;  // instead of opening the path (tests)
};

struct DedupResult {
  std::string filename;
  uint64_t cluster_size = 0;
  uint64_t stored_before = 0;    // distinct data clusters the image stored
  uint64_t stored_after = 0;
  uint64_t relinked = 0;         // guest clusters linked to another copy
  uint64_t zeroed = 0;           // guest clusters of zeros no longer stored
  uint64_t freed_clusters = 0;   // host clusters whose last reference went
  // Stored clusters the index had no room for (index_memory): not
  // deduplicated, and what the image's header now counts as missed.
  uint64_t unindexed = 0;
  uint64_t file_size_before = 0, file_size_after = 0;
  uint64_t disk_usage_before = 0, disk_usage_after = 0;  // bytes allocated (du)
};

Result<DedupResult> DeduplicateImage(const std::string& path, DedupOptions options);

}  // namespace qcow2dedup

#pragma GCC visibility pop
