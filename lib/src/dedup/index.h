// The dedup index: which host clusters hold the data with a given hash.
// One entry per stored cluster, so a digest may name several copies (a
// copy stored again past the share limit, or written by QEMU): freeing one
// copy must leave the others findable.
// Kept compact because it grows with the stored data: a key of the first
// 160 bits of the SHA-256, a 32-bit host cluster number and a chain link,
// 28 bytes an entry plus 2 to 4 bytes of buckets. Entries live in fixed-size
// blocks, so growing never holds an old and a new copy of them at once.
// MemoryBytes is exact and an insert's growth known in advance, so that a
// session can cap it (-o index_memory, session_index.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "dedup/sha256.h"

namespace qcow2dedup {

class DedupIndex {
 public:
  static constexpr size_t kKeyBytes = 20;
  static constexpr uint64_t kMaxCluster = 0xfffffffeull;

  // A host cluster holding data with this digest, if known: the copy
  // inserted last, which is the one most likely to take more references.
  std::optional<uint64_t> Find(const Digest& d) const {
    if (buckets_.empty()) return std::nullopt;
    for (uint32_t i = buckets_[Bucket(d)]; i != kNil; i = At(i).next)
      if (std::memcmp(At(i).key, d.data(), kKeyBytes) == 0) return At(i).cluster;
    return std::nullopt;
  }

  // The lowest host cluster holding data with this digest, if known (the
  // copy that in-place dedup keeps, so that freed space gathers at the end).
  std::optional<uint64_t> FindLowest(const Digest& d) const {
    std::optional<uint64_t> low;
    if (buckets_.empty()) return low;
    for (uint32_t i = buckets_[Bucket(d)]; i != kNil; i = At(i).next)
      if (std::memcmp(At(i).key, d.data(), kKeyBytes) == 0 && (!low || At(i).cluster < *low)) low = At(i).cluster;
    return low;
  }

  // Every host cluster holding data with this digest, newest first.
  std::vector<uint64_t> FindAll(const Digest& d) const {
    std::vector<uint64_t> all;
    if (buckets_.empty()) return all;
    for (uint32_t i = buckets_[Bucket(d)]; i != kNil; i = At(i).next)
      if (std::memcmp(At(i).key, d.data(), kKeyBytes) == 0) all.push_back(At(i).cluster);
    return all;
  }

  bool Contains(const Digest& d, uint64_t cluster) const {
    if (buckets_.empty()) return false;
    for (uint32_t i = buckets_[Bucket(d)]; i != kNil; i = At(i).next)
      if (At(i).cluster == cluster && std::memcmp(At(i).key, d.data(), kKeyBytes) == 0) return true;
    return false;
  }

  // Adds the pair (digest, cluster); adding a pair already held does nothing.
  void Insert(const Digest& d, uint64_t cluster);
  // Forgets the pair (digest, cluster); true if it was held.
  bool Remove(const Digest& d, uint64_t cluster);
  // Forgets every entry that maps to cluster (a slow scan, for the rare case
  // where the cluster's data no longer matches its key).
  void RemoveCluster(uint64_t cluster);
  void Clear();

  size_t size() const { return live_; }
  // Heap bytes the index holds (for the memory benchmark, and the cap of
  // -o index_memory).
  size_t MemoryBytes() const {
    return Bytes(blocks_.size(), blocks_.capacity(), buckets_.capacity());
  }
  // What MemoryBytes would be after Insert adds a pair it does not hold
  // yet: Insert sizes every container itself, so this is exact.
  size_t MemoryBytesAfterInsert() const;

  // Visits (key prefix, cluster) for every entry.
  template <class F>
  void ForEach(F f) const {
    for (uint32_t i = 0; i < used_; ++i)
      if (At(i).cluster != kNil) f(At(i).key, uint64_t(At(i).cluster));
  }
  // The same, in ascending order of order(key prefix, cluster): a stable
  // order for the bytes on disk. Costs 4 bytes an entry while it runs.
  template <class O, class F>
  void ForEachSortedBy(O order, F f) const {
    std::vector<uint32_t> slots;
    slots.reserve(live_);
    for (uint32_t i = 0; i < used_; ++i)
      if (At(i).cluster != kNil) slots.push_back(i);
    std::sort(slots.begin(), slots.end(), [&](uint32_t a, uint32_t b) {
      const uint64_t x = order(At(a).key, uint64_t(At(a).cluster)), y = order(At(b).key, uint64_t(At(b).cluster));
      return x != y ? x < y : a < b;
    });
    for (uint32_t i : slots) f(At(i).key, uint64_t(At(i).cluster));
  }

 private:
  static constexpr uint32_t kNil = 0xffffffffu;
  struct Entry {
    uint8_t key[kKeyBytes];
    uint32_t cluster;
    uint32_t next;
  };
  static_assert(sizeof(Entry) == 28);
  static constexpr uint32_t kBlockShift = 12;  // 4096 entries, 112 KiB a block
  static constexpr uint32_t kBlockEntries = 1u << kBlockShift;
  Entry& At(uint32_t i) { return blocks_[i >> kBlockShift][i & (kBlockEntries - 1)]; }
  const Entry& At(uint32_t i) const { return blocks_[i >> kBlockShift][i & (kBlockEntries - 1)]; }
  size_t Bucket(const Digest& d) const {
    uint64_t h;
    std::memcpy(&h, d.data(), 8);
    return h & (buckets_.size() - 1);
  }
  void Rehash(size_t buckets);
  static size_t Bytes(size_t blocks, size_t block_slots, size_t buckets) {
    return blocks * kBlockEntries * sizeof(Entry) + block_slots * sizeof(void*) + buckets * sizeof(uint32_t);
  }
  // The capacity of blocks_ once it holds n blocks (grown by Insert alone).
  static size_t BlockSlotsFor(size_t n, size_t now) { return n <= now ? now : std::max<size_t>(4, now * 2); }
  // Buckets after the next insert (Rehash sizes the vector exactly).
  size_t BucketsAfterInsert() const {
    return live_ + 1 > 2 * buckets_.size() ? std::max<size_t>(1024, buckets_.size() * 2) : buckets_.capacity();
  }

  std::vector<std::unique_ptr<Entry[]>> blocks_;
  uint32_t used_ = 0;  // slots handed out so far
  std::vector<uint32_t> buckets_;
  // Freed slots, linked through their next fields: a removal never takes
  // memory, so a capped index stays under its cap whatever is removed.
  uint32_t free_head_ = kNil;
  size_t live_ = 0;
};

}  // namespace qcow2dedup
