// Big-endian integers usable directly as fields of on-disk structs (as in
// mold): reading a field decodes it, assigning encodes it.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace qcow2dedup {

template <class T>
class BigEndian {
  static_assert(std::is_unsigned_v<T>);

 public:
  BigEndian() = default;
  BigEndian(T v) { *this = v; }
  operator T() const {
    T v = 0;
    for (size_t i = 0; i < sizeof(T); ++i) v = T((v << 8) | bytes_[i]);
    return v;
  }
  BigEndian& operator=(T v) {
    for (size_t i = sizeof(T); i-- > 0;) {
      bytes_[i] = uint8_t(v);
      v = T(v >> 8);
    }
    return *this;
  }

 private:
  uint8_t bytes_[sizeof(T)] = {};
};

using be16 = BigEndian<uint16_t>;
using be32 = BigEndian<uint32_t>;
using be64 = BigEndian<uint64_t>;
static_assert(sizeof(be64) == 8 && alignof(be64) == 1);

inline uint64_t LoadBe64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return __builtin_bswap64(v);
}
inline void StoreBe64(uint8_t* p, uint64_t v) {
  v = __builtin_bswap64(v);
  std::memcpy(p, &v, 8);
}

}  // namespace qcow2dedup
