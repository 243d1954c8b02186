// The scan under dedup-stats --simulate, one image or a fleet: a device
// read once in chunks, each chunk's clusters digested at every cluster size
// asked for.
//
// Hashing is the cost, so data is hashed once: every cluster of the
// smallest size gets its SHA-256, and a cluster of a larger size gets the
// SHA-256 of its sub-clusters' digests (zero sub-clusters as 32 zero bytes).
// Two larger clusters are equal exactly when all their sub-clusters are,
// so the counts are those of hashing every size in full (barring SHA-256
// collisions), at 32 / smallest size extra bytes hashed per size.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "dedup/sha256.h"
#include "qcow2dedup/image.h"
#include "qcow2dedup/stats.h"
#include "stats/digest_set.h"

namespace qcow2dedup {

// A multiple of the largest cluster size, so chunks cut no cluster.
constexpr uint64_t kScanChunkBytes = 8u << 20;

// One cluster size's view of a scan: this chunk's digests, and the counts
// over the device so far.
struct SizeScan {
  explicit SizeScan(uint64_t cs) : cs(cs) {}
  uint64_t cs;
  uint64_t nonzero = 0;
  uint64_t l2_tables = 0;  // L2 tables that map a non-zero cluster
  uint64_t last_table = UINT64_MAX;
  DigestSet unique;
  std::vector<uint32_t> fresh;  // this chunk's clusters seen for the first time
  // This chunk's clusters.
  std::vector<uint8_t> nonzero_flags;
  std::vector<Digest> digests;
};

struct ScanChunk {
  uint64_t offset = 0;
  uint64_t length = 0;        // device bytes; data is zero-padded past them
  std::vector<uint8_t> data;  // a whole number of the largest clusters
};

// InvalidArgument unless every size is a power of two from 512 to 2M.
Status ValidateClusterSizes(const std::vector<uint64_t>& sizes);

// One SizeScan per distinct size, smallest first.
std::vector<SizeScan> MakeSizeScans(std::vector<uint64_t> sizes);

// Reads the device once, in chunks (zero runs it reports skipped unread,
// by whole largest clusters), the next chunk read while on_chunk works on
// this one. on_chunk gets each chunk with its digests in scans; progress
// gets (bytes scanned, device size).
Status ScanDevice(BlockDevice& device, std::vector<SizeScan>& scans,
                  const std::function<Status(const ScanChunk&)>& on_chunk, const ProgressFn& progress);

// Counts a chunk's non-zero clusters, their L2 tables and the distinct ones
// (fresh: those new to the set).
void CountChunk(const ScanChunk& c, SizeScan& s);

// What a scan of a device of size bytes found at its cluster size (no
// compression figures).
Simulation ToSimulation(const SizeScan& s, uint64_t size);

}  // namespace qcow2dedup
