// check: recount every reference to every host cluster, compare with the
// stored refcounts, rehash the stored data against the dedup index, and
// optionally repair. Reports the way `qemu-img check` does.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qcow2dedup/image.h"

#pragma GCC visibility push(default)  // the public API: exported from the shared library

namespace qcow2dedup {

enum class RepairMode { kNone, kLeaks, kAll };

struct CheckOptions {
  RepairMode repair = RepairMode::kNone;
  bool force_share = false;
  ProgressFn progress;
  std::unique_ptr<File> file;  // instead of opening the path (tests)
};

struct DedupFindings {
  bool present = false;         // our header extension exists
  bool in_sync = false;         // our autoclear bit was set
  bool index_loaded = false;    // the stored index was readable and whole
  uint64_t indexed = 0;         // entries in the stored index
  uint64_t stored_clusters = 0; // uncompressed data clusters hashed
  uint64_t mismatched = 0;      // entries whose hash is not their cluster's
  uint64_t stale = 0;           // entries for clusters that hold no data
  uint64_t missing = 0;         // stored clusters the index lacks
  uint64_t duplicates = 0;      // clusters stored more than once (missed dedup)
  bool rebuilt = false;         // repair rewrote the index from the data
  uint64_t errors() const { return in_sync ? mismatched + stale + missing : 0; }
};

struct CheckReport {
  std::string filename;
  uint64_t check_errors = 0;
  uint64_t image_end_offset = 0;
  uint64_t total_clusters = 0;
  uint64_t allocated_clusters = 0;
  uint64_t fragmented_clusters = 0;
  uint64_t compressed_clusters = 0;
  uint64_t leaks = 0;
  uint64_t corruptions = 0;
  uint64_t leaks_fixed = 0;
  uint64_t corruptions_fixed = 0;
  std::vector<std::string> messages;  // one finding a line, as qemu-img prints them
  DedupFindings dedup;
};

Result<CheckReport> CheckImage(const std::string& path, CheckOptions options);

// The same on a file the caller has opened and locked (read-write to repair).
// name goes into the report.
Result<CheckReport> CheckFile(File& file, const std::string& name, RepairMode repair, const ProgressFn& progress);

// qemu-img check's exit code for a finished check: 0 clean, 2 corruptions,
// 3 leaks only. (1, could not check, is for a failed CheckImage.)
int CheckExitCode(const CheckReport& r);

}  // namespace qcow2dedup

#pragma GCC visibility pop
