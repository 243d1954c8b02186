// How far the write path shares one stored cluster.
#pragma once

#include <algorithm>
#include <cstdint>

namespace qcow2dedup {

// The most references the write path gives one stored cluster: half the
// largest refcount the width holds, at least 1. An internal snapshot
// (qemu-img snapshot -c) adds a reference for every L2 entry, doubling a
// shared cluster's refcount, and must still fit. At 1 and 2 bits this is 1:
// nothing is shared.
inline uint64_t ShareLimit(uint32_t refcount_bits) {
  const uint64_t max = refcount_bits >= 64 ? ~0ull : (1ull << refcount_bits) - 1;
  return std::max<uint64_t>(1, max / 2);
}

}  // namespace qcow2dedup
