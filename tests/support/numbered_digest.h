// Distinct digests for index tests: the SHA-256 of a number.
#pragma once

#include <cstdint>

#include "dedup/sha256.h"
#include "format/endian.h"

namespace testing {

inline qcow2dedup::Digest NumberedDigest(uint64_t n) {
  uint8_t b[8];
  qcow2dedup::StoreBe64(b, n);
  return qcow2dedup::Sha256(b);
}

}  // namespace testing
