// Refcount entries of any width from 1 to 64 bits, packed in a block.
// Widths below a byte fill each byte from its least significant bit, as QEMU does.
#pragma once

#include <cstdint>

namespace qcow2dedup {

inline uint64_t GetRefcount(const uint8_t* block, uint32_t order, uint64_t i) {
  switch (order) {
    case 0: return (block[i / 8] >> (i % 8)) & 1;
    case 1: return (block[i / 4] >> (2 * (i % 4))) & 3;
    case 2: return (block[i / 2] >> (4 * (i % 2))) & 15;
    case 3: return block[i];
    default: {
      const uint32_t bytes = 1u << (order - 3);
      const uint8_t* p = block + i * bytes;
      uint64_t v = 0;
      for (uint32_t k = 0; k < bytes; ++k) v = (v << 8) | p[k];
      return v;
    }
  }
}

inline void SetRefcount(uint8_t* block, uint32_t order, uint64_t i, uint64_t v) {
  if (order < 3) {
    const uint32_t bits = 1u << order, per_byte = 8 / bits;
    const uint32_t shift = bits * uint32_t(i % per_byte);
    const uint8_t mask = uint8_t(((1u << bits) - 1) << shift);
    block[i / per_byte] = uint8_t((block[i / per_byte] & ~mask) | ((v << shift) & mask));
    return;
  }
  const uint32_t bytes = 1u << (order - 3);
  uint8_t* p = block + i * bytes;
  for (uint32_t k = bytes; k-- > 0;) {
    p[k] = uint8_t(v);
    v >>= 8;
  }
}

}  // namespace qcow2dedup
