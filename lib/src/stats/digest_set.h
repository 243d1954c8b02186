// A set of 128-bit digest prefixes, for counting the distinct clusters of
// disks too large for std::set. 256 open-addressing tables of bare 16-byte
// slots (linear probing), each kept 70% to 87.5% full by growing 1.25x at a
// time: 18 to 23 bytes per distinct digest, and growing one table at a time
// needs only 1/256 more for a moment. A 1 TiB disk of distinct 4K clusters
// (2^28 of them) takes about 5.5 GiB. 128 bits keep the chance that two
// different clusters collide below 2^-64 even for 2^32 clusters.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

namespace qcow2dedup {

class DigestSet {
 public:
  static constexpr size_t kKeyBytes = 16;

  // Adds the first kKeyBytes of a digest; true if it was not there yet.
  bool Insert(const uint8_t* digest) {
    Slot k;
    std::memcpy(&k, digest, sizeof k);
    // The all-zero key marks empty slots, so it is kept beside the tables.
    if (k.lo == 0 && k.hi == 0) {
      if (has_zero_key_) return false;
      has_zero_key_ = true;
      ++size_;
      return true;
    }
    Table& t = tables_[k.hi >> 56];
    if ((t.size + 1) * 8 > t.slots.size() * 7) Grow(t);
    if (!Place(t.slots, k)) return false;
    ++t.size;
    ++size_;
    return true;
  }

  size_t size() const { return size_; }
  size_t MemoryBytes() const {
    size_t bytes = 0;
    for (const Table& t : tables_) bytes += t.slots.capacity() * sizeof(Slot);
    return bytes;
  }

 private:
  struct Slot {
    uint64_t lo = 0, hi = 0;
  };
  static_assert(sizeof(Slot) == kKeyBytes);
  struct Table {
    std::vector<Slot> slots;
    size_t size = 0;
  };

  // Digests are uniformly distributed: lo scaled to the table is the home slot.
  static bool Place(std::vector<Slot>& slots, const Slot& k) {
    const size_t n = slots.size();
    size_t i = size_t((unsigned __int128)k.lo * n >> 64);
    for (;;) {
      Slot& s = slots[i];
      if (s.lo == 0 && s.hi == 0) {
        s = k;
        return true;
      }
      if (s.lo == k.lo && s.hi == k.hi) return false;
      if (++i == n) i = 0;
    }
  }

  static void Grow(Table& t) {
    std::vector<Slot> old;
    old.swap(t.slots);
    t.slots.assign(old.empty() ? 64 : old.size() + old.size() / 4, Slot{});
    for (const Slot& s : old)
      if (s.lo != 0 || s.hi != 0) Place(t.slots, s);
  }

  std::array<Table, 256> tables_;
  size_t size_ = 0;
  bool has_zero_key_ = false;
};

}  // namespace qcow2dedup
