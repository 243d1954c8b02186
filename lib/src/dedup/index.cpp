#include "dedup/index.h"

#include <algorithm>
#include <atomic>
#include <new>

#include "format/endian.h"

namespace qcow2dedup {

namespace {
std::atomic<uint32_t> fingerprint_bits{kFingerprintBits};  // SetFingerprintBitsForTesting

uint64_t* Resize(uint64_t* at, uint32_t n) {
  void* p = std::realloc(at, size_t(n) * sizeof(uint64_t));
  if (!p && n) throw std::bad_alloc();
  return static_cast<uint64_t*>(p);
}
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
  shard_bits_ = o.shard_bits_;
  live_ = o.live_;
  bytes_ = o.bytes_;
  o.shards_.clear();
  o.shard_bits_ = kMinShardBits;
  o.live_ = o.bytes_ = 0;
  return *this;
}

uint32_t DedupIndex::LowerBound(const Shard& s, uint64_t e) {
  return uint32_t(std::lower_bound(s.at, s.at + s.size, e) - s.at);
}

std::optional<uint64_t> DedupIndex::Find(Fingerprint f) const {
  if (shards_.empty()) return std::nullopt;
  const Shard& s = shards_[ShardOf(f)];
  // Just past the last entry with this tag (no cluster number is all ones).
  const uint32_t i = LowerBound(s, Entry(f, 0xffffffffu));
  if (i == 0 || (s.at[i - 1] >> 32) != (f & kTagMask)) return std::nullopt;
  return s.at[i - 1] & 0xffffffffu;
}

std::optional<uint64_t> DedupIndex::FindLowest(Fingerprint f) const {
  if (shards_.empty()) return std::nullopt;
  const Shard& s = shards_[ShardOf(f)];
  const uint32_t i = LowerBound(s, Entry(f, 0));
  if (i == s.size || (s.at[i] >> 32) != (f & kTagMask)) return std::nullopt;
  return s.at[i] & 0xffffffffu;
}

std::vector<uint64_t> DedupIndex::FindAll(Fingerprint f) const {
  std::vector<uint64_t> all;
  if (shards_.empty()) return all;
  const Shard& s = shards_[ShardOf(f)];
  for (uint32_t i = LowerBound(s, Entry(f, 0)); i < s.size && (s.at[i] >> 32) == (f & kTagMask); ++i)
    all.push_back(s.at[i] & 0xffffffffu);
  std::reverse(all.begin(), all.end());
  return all;
}

bool DedupIndex::Contains(Fingerprint f, uint64_t cluster) const {
  if (shards_.empty() || cluster > kMaxCluster) return false;
  const Shard& s = shards_[ShardOf(f)];
  const uint32_t i = LowerBound(s, Entry(f, cluster));
  return i < s.size && s.at[i] == Entry(f, cluster);
}

void DedupIndex::Insert(Fingerprint f, uint64_t cluster) {
  if (cluster > kMaxCluster) return;  // beyond what we index: only a lost dedup chance
  if (shards_.empty()) {
    shards_.resize(size_t(1) << shard_bits_);
    bytes_ += shards_.capacity() * sizeof(Shard);
  }
  if (Contains(f, cluster)) return;
  if (live_ + 1 > size_t(kSplitAt) * shards_.size()) Split();
  Shard& s = shards_[ShardOf(f)];
  const uint64_t e = Entry(f, cluster);
  const uint32_t i = LowerBound(s, e);
  if (s.size == s.capacity) {
    const uint32_t grown = GrownCapacity(s.capacity);
    s.at = Resize(s.at, grown);
    bytes_ += size_t(grown - s.capacity) * sizeof(uint64_t);
    s.capacity = grown;
  }
  std::memmove(s.at + i + 1, s.at + i, size_t(s.size - i) * sizeof(uint64_t));
  s.at[i] = e;
  ++s.size;
  ++live_;
}

bool DedupIndex::Remove(Fingerprint f, uint64_t cluster) {
  if (shards_.empty() || cluster > kMaxCluster) return false;
  Shard& s = shards_[ShardOf(f)];
  const uint64_t e = Entry(f, cluster);
  const uint32_t i = LowerBound(s, e);
  if (i == s.size || s.at[i] != e) return false;
  std::memmove(s.at + i, s.at + i + 1, size_t(s.size - i - 1) * sizeof(uint64_t));
  --s.size;
  --live_;
  if (live_ == 0) Clear();
  else Shrink(s);
  return true;
}

void DedupIndex::RemoveCluster(uint64_t cluster) {
  for (Shard& s : shards_) {
    uint32_t kept = 0;
    for (uint32_t i = 0; i < s.size; ++i)
      if ((s.at[i] & 0xffffffffu) != cluster) s.at[kept++] = s.at[i];
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
  s.at = Resize(s.at, keep);
  bytes_ -= size_t(s.capacity - keep) * sizeof(uint64_t);
  s.capacity = keep;
}

void DedupIndex::Clear() {
  for (Shard& s : shards_) std::free(s.at);
  std::vector<Shard>().swap(shards_);
  shard_bits_ = kMinShardBits;
  live_ = bytes_ = 0;
}

// Twice the shards, each old one cut in two where the next fingerprint bit
// changes (sorted by the bits below the shard's, its halves lie apart), and
// freed before the next is cut: the index is never held twice.
void DedupIndex::Split() {
  std::vector<Shard> next(shards_.size() * 2);
  const uint32_t bit = kFingerprintBits - shard_bits_ - 1;  // within the tag, as shard_bits_ >= 8
  size_t bytes = next.capacity() * sizeof(Shard);
  for (size_t i = 0; i < shards_.size(); ++i) {
    Shard& old = shards_[i];
    uint32_t cut = 0;
    while (cut < old.size && !((old.at[cut] >> 32 >> bit) & 1)) ++cut;
    Shard& lo = next[2 * i];
    Shard& hi = next[2 * i + 1];
    lo.size = lo.capacity = cut;
    hi.size = hi.capacity = old.size - cut;
    lo.at = Resize(nullptr, lo.capacity);
    hi.at = Resize(nullptr, hi.capacity);
    std::memcpy(lo.at, old.at, size_t(lo.size) * sizeof(uint64_t));
    std::memcpy(hi.at, old.at + cut, size_t(hi.size) * sizeof(uint64_t));
    std::free(old.at);
    old = Shard{};
    bytes += size_t(lo.capacity + hi.capacity) * sizeof(uint64_t);
  }
  shards_.swap(next);
  ++shard_bits_;
  bytes_ = bytes;
}

uint64_t DedupIndex::ShardsFor(uint64_t n) {
  uint64_t shards = uint64_t(1) << kMinShardBits;
  while (n > kSplitAt * shards) shards *= 2;
  return shards;
}

uint64_t DedupIndex::BoundBytes(uint64_t n) {
  if (n == 0) return 0;  // an empty index frees everything
  // A shard of s entries has room for at most s + 2 * Slack(s) <= 1.25 s + 8.
  const uint64_t shards = ShardsFor(n);
  return shards * sizeof(Shard) + sizeof(uint64_t) * (n + n / 4 + 8 * shards);
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
