// The dedup index in memory: which host clusters hold data with a given
// fingerprint. One entry per stored cluster, so a fingerprint may name
// several copies (a copy stored again past the share limit, or written by
// QEMU): freeing one copy must leave the others findable.
//
// It grows with the stored data, so an entry is 8 bytes: the fingerprint
// (the first 40 bits of the SHA-256, or more) less the bits that pick its
// shard, and a 32-bit host cluster. A shard is a sorted array, so lookups
// are a binary search, the entries come out in fingerprint order without a
// sort, and a shard never holds more than a few thousand entries (they
// split as the index grows), so an insert moves a few KiB at most. Growth
// is in small steps per shard, in one region the index compacts itself
// (entry_region.h): no moment holds an old and a new copy of the whole
// index, and the C heap's holes are not paid for. About 9 bytes an entry
// in all.
//
// A fingerprint names candidates, not proof: two clusters are shared only
// once their full digests (or bytes) are found equal (digest_log.h).
// Its memory has a bound that depends on the number of entries alone, so
// that a session can cap it (-o index_memory, session_index.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "dedup/entry_region.h"
#include "dedup/sha256.h"

namespace qcow2dedup {

// The first kFingerprintBits of a SHA-256 digest (or of its leading bytes).
using Fingerprint = uint64_t;
constexpr uint32_t kFingerprintBits = 40;
Fingerprint FingerprintOf(const uint8_t* digest);
inline Fingerprint FingerprintOf(const Digest& d) { return FingerprintOf(d.data()); }

// Tests only: fingerprints keep their first n bits (the rest zero), so that
// different data collide on fingerprint while their digests differ
// (kFingerprintBits: the real fingerprint).
void SetFingerprintBitsForTesting(uint32_t n);

class DedupIndex {
 public:
  static constexpr uint64_t kMaxCluster = 0xfffffffeull;

  DedupIndex() = default;
  DedupIndex(DedupIndex&& o) noexcept { *this = std::move(o); }
  DedupIndex& operator=(DedupIndex&& o) noexcept;
  ~DedupIndex() { Clear(); }

  // A host cluster whose data has this fingerprint, if known: the highest
  // (in a growing image, the newest: the one most likely to take more
  // references).
  std::optional<uint64_t> Find(Fingerprint f) const;
  // The lowest one (the copy that in-place dedup keeps, so that freed space
  // gathers at the end).
  std::optional<uint64_t> FindLowest(Fingerprint f) const;
  // Every one, highest first.
  std::vector<uint64_t> FindAll(Fingerprint f) const;
  bool Contains(Fingerprint f, uint64_t cluster) const;

  // Adds the pair (fingerprint, cluster); adding a pair already held does nothing.
  void Insert(Fingerprint f, uint64_t cluster);
  // Forgets the pair; true if it was held.
  bool Remove(Fingerprint f, uint64_t cluster);
  // Forgets every entry that maps to cluster (a slow scan, for the rare case
  // where the cluster's data no longer matches its entry).
  void RemoveCluster(uint64_t cluster);
  void Clear();

  // The same, by digest.
  std::optional<uint64_t> Find(const Digest& d) const { return Find(FingerprintOf(d)); }
  std::optional<uint64_t> FindLowest(const Digest& d) const { return FindLowest(FingerprintOf(d)); }
  std::vector<uint64_t> FindAll(const Digest& d) const { return FindAll(FingerprintOf(d)); }
  bool Contains(const Digest& d, uint64_t cluster) const { return Contains(FingerprintOf(d), cluster); }
  void Insert(const Digest& d, uint64_t cluster) { Insert(FingerprintOf(d), cluster); }
  bool Remove(const Digest& d, uint64_t cluster) { return Remove(FingerprintOf(d), cluster); }

  size_t size() const { return live_; }
  // Bytes the index holds (for the memory benchmark).
  size_t MemoryBytes() const { return shards_.capacity() * sizeof(Shard) + region_.top() * sizeof(uint64_t); }
  // What MemoryBytes can be at most while the index holds n entries,
  // whatever their fingerprints and whatever was removed before (each
  // shard's slack is kept small both ways): what -o index_memory caps, so
  // that the cap holds for any data in any order.
  static uint64_t BoundBytes(uint64_t n);
  // The most entries whose bound fits in bytes.
  static uint64_t EntriesWithin(uint64_t bytes);

  // Visits (fingerprint, cluster) for every entry, in ascending order of
  // fingerprint, then cluster.
  template <class F>
  void ForEach(F f) const {
    for (size_t s = 0; s < shards_.size(); ++s) {
      const uint64_t* at = At(shards_[s]);
      const uint64_t high = (uint64_t(s) << (kFingerprintBits - shard_bits_)) & ~kTagMask;
      for (uint32_t i = 0; i < shards_[s].size; ++i) f(high | (at[i] >> 32), at[i] & 0xffffffffu);
    }
  }

 private:
  // An entry: the fingerprint's low 32 bits above the cluster, so that
  // sorting entries sorts by fingerprint (the shard holds the bits above).
  static constexpr uint64_t kTagMask = 0xffffffffull;
  static constexpr uint32_t kMinShardBits = 8;   // the fingerprint's bits above the tag
  static constexpr uint32_t kSplitAt = 2048;     // mean entries a shard before all split
  struct Shard {
    uint64_t offset = 0;  // in region_
    uint32_t size = 0, capacity = 0;
  };
  uint64_t* At(const Shard& s) const { return region_.data() + s.offset; }
  static uint64_t Entry(Fingerprint f, uint64_t cluster) { return (f & kTagMask) << 32 | cluster; }
  size_t ShardOf(Fingerprint f) const { return size_t(f >> (kFingerprintBits - shard_bits_)); }
  // The first entry of shard s at or after e.
  uint32_t LowerBound(const Shard& s, uint64_t e) const;
  static uint32_t Slack(uint32_t size) { return std::max<uint32_t>(4, size / 8); }
  static uint32_t GrownCapacity(uint32_t capacity) { return capacity + Slack(capacity); }
  static uint64_t ShardsFor(uint64_t n);
  void Split();
  void Grow(Shard& s);
  void Shrink(Shard& s);
  // Slides every shard down over the room others left (garbage_).
  void Compact();
  void NoteGarbage(uint64_t entries);

  std::vector<Shard> shards_;
  EntryRegion region_;
  uint64_t garbage_ = 0;  // entries of region_ below its top that no shard uses
  uint32_t shard_bits_ = kMinShardBits;
  size_t live_ = 0;
};

}  // namespace qcow2dedup
