#include "dedup/index.h"

#include <algorithm>
#include <atomic>
#include <new>

#include "format/endian.h"

namespace qcow2dedup {

namespace {
std::atomic<uint32_t> fingerprint_bits{kFingerprintBits};  // SetFingerprintBitsForTesting

}  // namespace

Fingerprint FingerprintOf(const uint8_t* digest) {
  const Fingerprint f = LoadBe64(digest) >> (64 - kFingerprintBits);
  const uint32_t keep = fingerprint_bits.load(std::memory_order_relaxed);
  return keep >= kFingerprintBits ? f : f & ~((Fingerprint(1) << (kFingerprintBits - keep)) - 1);
}

void SetFingerprintBitsForTesting(uint32_t n) {
  fingerprint_bits.store(std::min(n, kFingerprintBits), std::memory_order_relaxed);
}

DedupIndex& DedupIndex::operator=(DedupIndex&& o) noexcept {
  if (this == &o) return *this;
  Clear();
  shards_ = std::move(o.shards_);
  region_.Swap(o.region_);
  garbage_ = o.garbage_;
  shard_bits_ = o.shard_bits_;
  live_ = o.live_;
  o.Clear();
  return *this;
}

uint32_t DedupIndex::LowerBound(const Shard& s, uint64_t e) const {
  const uint64_t* at = At(s);
  return uint32_t(std::lower_bound(at, at + s.size, e) - at);
}

std::optional<uint64_t> DedupIndex::Find(Fingerprint f) const {
  if (shards_.empty()) return std::nullopt;
  const Shard& s = shards_[ShardOf(f)];
  // Just past the last entry with this tag (no cluster number is all ones).
  const uint32_t i = LowerBound(s, Entry(f, 0xffffffffu));
  if (i == 0 || (At(s)[i - 1] >> 32) != (f & kTagMask)) return std::nullopt;
  return At(s)[i - 1] & 0xffffffffu;
}

std::optional<uint64_t> DedupIndex::FindLowest(Fingerprint f) const {
  if (shards_.empty()) return std::nullopt;
  const Shard& s = shards_[ShardOf(f)];
  const uint32_t i = LowerBound(s, Entry(f, 0));
  if (i == s.size || (At(s)[i] >> 32) != (f & kTagMask)) return std::nullopt;
  return At(s)[i] & 0xffffffffu;
}

std::vector<uint64_t> DedupIndex::FindAll(Fingerprint f) const {
  std::vector<uint64_t> all;
  if (shards_.empty()) return all;
  const Shard& s = shards_[ShardOf(f)];
  const uint64_t* at = At(s);
  for (uint32_t i = LowerBound(s, Entry(f, 0)); i < s.size && (at[i] >> 32) == (f & kTagMask); ++i)
    all.push_back(at[i] & 0xffffffffu);
  std::reverse(all.begin(), all.end());
  return all;
}

bool DedupIndex::Contains(Fingerprint f, uint64_t cluster) const {
  if (shards_.empty() || cluster > kMaxCluster) return false;
  const Shard& s = shards_[ShardOf(f)];
  const uint32_t i = LowerBound(s, Entry(f, cluster));
  return i < s.size && At(s)[i] == Entry(f, cluster);
}

void DedupIndex::Insert(Fingerprint f, uint64_t cluster) {
  if (cluster > kMaxCluster) return;  // beyond what we index: only a lost dedup chance
  if (shards_.empty()) shards_.resize(size_t(1) << shard_bits_);
  if (Contains(f, cluster)) return;
  if (live_ + 1 > size_t(kSplitAt) * shards_.size()) Split();
  Shard& s = shards_[ShardOf(f)];
  const uint64_t e = Entry(f, cluster);
  const uint32_t i = LowerBound(s, e);
  if (s.size == s.capacity) Grow(s);
  uint64_t* at = At(s);
  std::memmove(at + i + 1, at + i, size_t(s.size - i) * sizeof(uint64_t));
  at[i] = e;
  ++s.size;
  ++live_;
}

// Room for a few more entries: in place at the region's top, else a move
// there, which leaves the old place to the next compaction.
void DedupIndex::Grow(Shard& s) {
  const uint32_t grown = GrownCapacity(s.capacity);
  if (s.capacity && s.offset + s.capacity == region_.top()) {
    region_.Take(grown - s.capacity);
  } else {
    const uint64_t to = region_.Take(grown);
    std::memcpy(region_.data() + to, At(s), size_t(s.size) * sizeof(uint64_t));
    const uint64_t old = s.capacity;
    s.offset = to;
    s.capacity = grown;
    NoteGarbage(old);
    return;
  }
  s.capacity = grown;
}

void DedupIndex::NoteGarbage(uint64_t entries) {
  garbage_ += entries;
  if (garbage_ > region_.top() / 8) Compact();
}

void DedupIndex::Compact() {
  std::vector<uint32_t> order;
  order.reserve(shards_.size());
  for (uint32_t i = 0; i < shards_.size(); ++i)
    if (shards_[i].capacity) order.push_back(i);
  std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return shards_[a].offset < shards_[b].offset; });
  uint64_t top = 0;
  for (uint32_t i : order) {
    Shard& s = shards_[i];
    // Lowest first, so a shard only ever slides down over what is free.
    if (s.offset != top) std::memmove(region_.data() + top, At(s), size_t(s.size) * sizeof(uint64_t));
    s.offset = top;
    top += s.capacity;
  }
  region_.Lower(top);
  garbage_ = 0;
}

bool DedupIndex::Remove(Fingerprint f, uint64_t cluster) {
  if (shards_.empty() || cluster > kMaxCluster) return false;
  Shard& s = shards_[ShardOf(f)];
  const uint64_t e = Entry(f, cluster);
  const uint32_t i = LowerBound(s, e);
  uint64_t* at = At(s);
  if (i == s.size || at[i] != e) return false;
  std::memmove(at + i, at + i + 1, size_t(s.size - i - 1) * sizeof(uint64_t));
  --s.size;
  --live_;
  if (live_ == 0) Clear();
  else Shrink(s);
  return true;
}

void DedupIndex::RemoveCluster(uint64_t cluster) {
  for (Shard& s : shards_) {
    uint64_t* at = At(s);
    uint32_t kept = 0;
    for (uint32_t i = 0; i < s.size; ++i)
      if ((at[i] & 0xffffffffu) != cluster) at[kept++] = at[i];
    live_ -= s.size - kept;
    s.size = kept;
    Shrink(s);
  }
  if (live_ == 0) Clear();
}

// Gives room back, so that what BoundBytes promises holds after any mix of
// removals here and inserts elsewhere.
void DedupIndex::Shrink(Shard& s) {
  if (s.capacity <= s.size + 2 * Slack(s.size)) return;
  const uint32_t keep = GrownCapacity(s.size);
  const uint64_t freed = s.capacity - keep;
  s.capacity = keep;
  NoteGarbage(freed);
}

void DedupIndex::Clear() {
  std::vector<Shard>().swap(shards_);
  region_.Clear();
  garbage_ = 0;
  shard_bits_ = kMinShardBits;
  live_ = 0;
}

// Twice the shards, each old one cut in two where the next fingerprint bit
// changes: sorted by the bits below the shard's, its halves lie apart, so
// they stay where they are (the upper half keeps the room at the end).
void DedupIndex::Split() {
  std::vector<Shard> next(shards_.size() * 2);
  const uint32_t bit = kFingerprintBits - shard_bits_ - 1;  // within the tag, as shard_bits_ >= 8
  for (size_t i = 0; i < shards_.size(); ++i) {
    const Shard& old = shards_[i];
    const uint64_t* at = At(old);
    uint32_t c = 0;
    while (c < old.size && !((at[c] >> 32 >> bit) & 1)) ++c;
    const uint32_t upper = old.size - c, room = std::min(old.capacity - c, GrownCapacity(upper));
    next[2 * i] = Shard{old.offset, c, c};
    next[2 * i + 1] = Shard{old.offset + c, upper, room};
    garbage_ += old.capacity - c - room;  // more room than a shard this size keeps
  }
  shards_.swap(next);
  ++shard_bits_;
  NoteGarbage(0);
}

uint64_t DedupIndex::ShardsFor(uint64_t n) {
  uint64_t shards = uint64_t(1) << kMinShardBits;
  while (n > kSplitAt * shards) shards *= 2;
  return shards;
}

uint64_t DedupIndex::BoundBytes(uint64_t n) {
  if (n == 0) return 0;  // an empty index frees everything
  // A shard of s entries has room for at most s + 2 * Slack(s) <= 1.25 s + 8,
  // and the room no shard uses is at most an eighth of the region.
  const uint64_t shards = ShardsFor(n);
  const uint64_t room = n + n / 4 + 8 * shards;
  return shards * sizeof(Shard) + sizeof(uint64_t) * (room + room / 7 + 1);
}

uint64_t DedupIndex::EntriesWithin(uint64_t bytes) {
  uint64_t lo = 0, hi = bytes / sizeof(uint64_t) + 1;  // BoundBytes(hi) > bytes
  while (hi - lo > 1) {
    const uint64_t mid = lo + (hi - lo) / 2;
    (BoundBytes(mid) <= bytes ? lo : hi) = mid;
  }
  return lo;
}

}  // namespace qcow2dedup
