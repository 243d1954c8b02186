// check: recount every reference to every host cluster, compare with the
// stored refcounts, rehash the stored data against the dedup index, and
// optionally repair. Reports the way `qemu-img check` does.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
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

// Which part of the image a finding is about. All but kDedupIndex and
// kCompressedData are the qcow2 structure, whose findings qemu-img check
// prints too.
enum class FindingArea {
  kRefcounts,    // the refcount table, its blocks, and the counts in them
  kL1Table,
  kL2Tables,
  kCopiedFlags,  // OFLAG_COPIED against the refcount
  kSnapshots,
  kBitmaps,
  kOverlaps,     // metadata sharing its cluster (QEMU only sees a low refcount)
  kDedupIndex,   // ours: qemu-img knows nothing of it
  kCompressedData,  // ours: compressed guest data that does not decompress (qemu-img check does not read data)
};

// What a finding says: the first word of qemu-img's line.
enum class FindingKind {
  kError,     // "ERROR": a corruption, or what stopped the check
  kLeak,      // "Leaked"
  kRepaired,  // "Repairing": found and mended
  kNote,      // anything else said along the way ("Rebuilding refcount structure")
};

struct Finding {
  FindingArea area = FindingArea::kRefcounts;
  FindingKind kind = FindingKind::kNote;
  std::optional<uint64_t> cluster;  // the host cluster it is about, where there is one
  std::string text;                 // the whole line, worded as qemu-img words it
};

struct DedupFindings {
  bool present = false;         // our header extension exists
  bool in_sync = false;         // our autoclear bit was set
  bool index_loaded = false;    // the stored index was readable and whole
  uint64_t indexed = 0;         // entries in the stored index
  uint64_t stored_clusters = 0; // uncompressed data clusters hashed
  // Compressed copies hashed (each distinct descriptor decompressed once).
  // The index holds none of them: the writer finds them by decompressing.
  uint64_t compressed_clusters = 0;
  uint64_t mismatched = 0;      // entries whose hash is not their cluster's
  uint64_t stale = 0;           // entries for clusters that hold no data
  uint64_t missing = 0;         // stored clusters the index lacks
  // Copies of data stored before them, plain or compressed (missed dedup):
  // stored_clusters + compressed_clusters - duplicates distinct clusters.
  uint64_t duplicates = 0;
  // The header's bound on duplicates stored for lack of index memory
  // (OpenOptions::index_memory); 0 when no cap was reached.
  uint64_t memory_misses = 0;
  bool unreadable = false;      // in sync, but not whole: its place or its digest is wrong
  bool rebuilt = false;         // repair rewrote the index from the data
  // An unreadable index is wrong even when there is nothing stored to miss.
  uint64_t errors() const {
    const uint64_t n = mismatched + stale + missing;
    return !in_sync ? 0 : n || !unreadable ? n : 1;
  }
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
  uint64_t corruptions = 0;  // as qemu-img counts them
  // Ours: metadata sharing its cluster with other metadata or data where
  // the refcount does not show it, so that qemu-img counts nothing there.
  uint64_t overlaps = 0;
  // Ours: compressed copies (distinct descriptors, the active L2 tables' and
  // the snapshots') whose bytes do not decompress to one cluster: corrupted
  // guest data, which QEMU fails to read. Not in corruptions (qemu-img
  // check reads no data), but the exit code is 2; no repair can mend it.
  uint64_t bad_compressed = 0;
  uint64_t leaks_fixed = 0;
  uint64_t corruptions_fixed = 0;
  // The check gave up half way (QEMU's check returns an error there):
  // check_errors says so too, and the counts are not a summary.
  bool stopped = false;
  std::vector<Finding> findings;  // in the order qemu-img prints them
  DedupFindings dedup;
};

Result<CheckReport> CheckImage(const std::string& path, CheckOptions options);

// The same on a file the caller has opened and locked (read-write to repair).
// name goes into the report.
Result<CheckReport> CheckFile(File& file, const std::string& name, RepairMode repair, const ProgressFn& progress);

// qemu-img check's exit code for a finished check: 0 clean, 2 corruptions
// (ours too: overlaps, a wrong in-sync index, bad compressed data), 3 leaks
// only. (1, could not check, is for a failed CheckImage.)
int CheckExitCode(const CheckReport& r);

}  // namespace qcow2dedup

#pragma GCC visibility pop
