// The dedup index: which host clusters hold the data with a given hash.
// One entry per stored cluster, so a digest may name several copies (a
// copy stored again past the share limit, or written by QEMU): freeing one
// copy must leave the others findable.
// Kept compact because it grows with the stored data: a key of the first
// 160 bits of the SHA-256, a 32-bit host cluster number and a chain link,
// 28 bytes an entry plus 2 to 4 bytes of buckets.
#pragma once

#include <cstdint>
#include <cstring>
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
    for (uint32_t i = buckets_[Bucket(d)]; i != kNil; i = entries_[i].next)
      if (std::memcmp(entries_[i].key, d.data(), kKeyBytes) == 0) return entries_[i].cluster;
    return std::nullopt;
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
  // Heap bytes the index holds (for the memory benchmark).
  size_t MemoryBytes() const {
    return entries_.capacity() * sizeof(Entry) + buckets_.capacity() * sizeof(uint32_t) +
           free_.capacity() * sizeof(uint32_t);
  }

  // Visits (key prefix, cluster) for every entry.
  template <class F>
  void ForEach(F f) const {
    for (const Entry& e : entries_)
      if (e.cluster != kNil) f(e.key, uint64_t(e.cluster));
  }

 private:
  static constexpr uint32_t kNil = 0xffffffffu;
  struct Entry {
    uint8_t key[kKeyBytes];
    uint32_t cluster;
    uint32_t next;
  };
  static_assert(sizeof(Entry) == 28);
  size_t Bucket(const Digest& d) const {
    uint64_t h;
    std::memcpy(&h, d.data(), 8);
    return h & (buckets_.size() - 1);
  }
  void Rehash(size_t buckets);

  std::vector<Entry> entries_;
  std::vector<uint32_t> buckets_;
  std::vector<uint32_t> free_;
  size_t live_ = 0;
};

}  // namespace qcow2dedup
