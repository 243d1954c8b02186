// convert -c: compression on the pipeline's worker threads, right after
// hashing. Only the first chunk to see a digest compresses its cluster; a
// duplicate is linked by the write path and never compressed. (When two
// chunks in flight hold the same data and the later one claimed it, the
// write path compresses the earlier one's copy itself: rare, and correct.)
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <unordered_set>
#include <vector>

#include "format/header.h"
#include "qcow2dedup/image.h"

namespace qcow2dedup {

class ChunkCompressor {
 public:
  ChunkCompressor(CompressionType type, uint64_t cluster_size) : type_(type), cs_(cluster_size) {}
  // Marks every write of data to be stored compressed, and compresses (into
  // out, which it sizes) those whose data this convert has not seen yet.
  // Thread-safe.
  void Run(std::span<ClusterWrite> writes, std::vector<uint8_t>& out);

 private:
  CompressionType type_;
  uint64_t cs_;
  std::mutex mutex_;
  // The first 64 bits of each digest seen: a collision only moves one
  // cluster's compression to the write path.
  std::unordered_set<uint64_t> seen_;
};

// A compressor for dst's compression type.
std::unique_ptr<ChunkCompressor> MakeChunkCompressor(Image& dst);

}  // namespace qcow2dedup
