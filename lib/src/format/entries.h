// L1, L2 and refcount-table entries, and compressed-cluster descriptors.
#pragma once

#include <cstdint>

namespace qcow2dedup {

constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;  // bits 9-55
constexpr uint64_t kFlagCopied = 1ull << 63;
constexpr uint64_t kFlagCompressed = 1ull << 62;
constexpr uint64_t kFlagZero = 1ull << 0;
// Bits that must be zero in a standard L2 entry (1-8 and 56-61).
constexpr uint64_t kL2ReservedMask = 0x3f000000000001feull;
constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;
constexpr uint64_t kRefTableReservedMask = 0x1ffull;

// Extended L2 subcluster bitmaps: allocated bits low, zero bits high.
constexpr uint64_t kAllSubclustersAllocated = 0x00000000ffffffffull;
constexpr uint64_t kAllSubclustersZero = 0xffffffff00000000ull;

inline uint64_t L1Offset(uint64_t e) { return e & kOffsetMask; }
inline uint64_t L2Offset(uint64_t e) { return e & kOffsetMask; }
inline bool IsCompressed(uint64_t e) { return e & kFlagCompressed; }
inline uint64_t RefTableOffset(uint64_t e) { return e & ~kRefTableReservedMask; }

// A compressed cluster's place: a byte offset and how many bytes to read.
struct CompressedDescriptor {
  uint64_t offset;
  uint64_t bytes;     // from offset; may run a little past the real data
  uint64_t sectors;   // 512-byte sectors the data touches
};

inline CompressedDescriptor DecodeCompressed(uint64_t entry, uint32_t cluster_bits) {
  const uint32_t x = 62 - (cluster_bits - 8);
  const uint64_t offset = entry & ((1ull << x) - 1);
  const uint64_t sectors = ((entry & ~kFlagCopied & ~kFlagCompressed) >> x) + 1;
  return {offset, sectors * 512 - (offset & 511), sectors};
}

inline uint64_t EncodeCompressed(uint64_t offset, uint64_t bytes, uint32_t cluster_bits) {
  const uint32_t x = 62 - (cluster_bits - 8);
  const uint64_t sectors = ((offset & 511) + bytes + 511) / 512;
  return kFlagCompressed | ((sectors - 1) << x) | offset;
}

// The host clusters a compressed cluster's bytes touch.
inline uint64_t FirstHostCluster(const CompressedDescriptor& d, uint32_t cluster_bits) {
  return d.offset >> cluster_bits;
}
inline uint64_t LastHostCluster(const CompressedDescriptor& d, uint32_t cluster_bits) {
  uint64_t end = (d.offset & ~511ull) + d.sectors * 512 - 1;
  return end >> cluster_bits;
}

}  // namespace qcow2dedup
