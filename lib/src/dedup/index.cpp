#include "dedup/index.h"

namespace qcow2dedup {

void DedupIndex::Insert(const Digest& d, uint64_t cluster) {
  if (cluster > kMaxCluster) return;  // beyond what we index: only a lost dedup chance
  if (!buckets_.empty()) {
    for (uint32_t i = buckets_[Bucket(d)]; i != kNil; i = At(i).next) {
      if (At(i).cluster == cluster && std::memcmp(At(i).key, d.data(), kKeyBytes) == 0) return;
    }
  }
  // Two entries a bucket on average: chains stay short, buckets cost 2-4 bytes.
  // The new entry goes first in its chain, so Find returns the newest copy.
  if (live_ + 1 > 2 * buckets_.size()) Rehash(std::max<size_t>(1024, buckets_.size() * 2));
  uint32_t slot;
  if (free_head_ != kNil) {
    slot = free_head_;
    free_head_ = At(slot).next;
  } else {
    slot = used_++;
    if ((slot >> kBlockShift) == blocks_.size()) {
      // Grown here by a known rule, so that MemoryBytesAfterInsert is exact.
      blocks_.reserve(BlockSlotsFor(blocks_.size() + 1, blocks_.capacity()));
      blocks_.push_back(std::make_unique_for_overwrite<Entry[]>(kBlockEntries));
    }
  }
  Entry& e = At(slot);
  std::memcpy(e.key, d.data(), kKeyBytes);
  e.cluster = uint32_t(cluster);
  size_t b = Bucket(d);
  e.next = buckets_[b];
  buckets_[b] = slot;
  ++live_;
}

bool DedupIndex::Remove(const Digest& d, uint64_t cluster) {
  if (buckets_.empty()) return false;
  uint32_t* link = &buckets_[Bucket(d)];
  while (*link != kNil) {
    Entry& e = At(*link);
    if (e.cluster == cluster && std::memcmp(e.key, d.data(), kKeyBytes) == 0) {
      uint32_t slot = *link;
      *link = e.next;
      e.cluster = kNil;
      e.next = free_head_;
      free_head_ = slot;
      --live_;
      return true;
    }
    link = &e.next;
  }
  return false;
}

void DedupIndex::RemoveCluster(uint64_t cluster) {
  for (uint32_t i = 0; i < used_; ++i) {
    const Entry& e = At(i);
    if (e.cluster != cluster) continue;
    Digest d{};
    std::memcpy(d.data(), e.key, kKeyBytes);
    Remove(d, cluster);
  }
}

void DedupIndex::Clear() {
  std::vector<std::unique_ptr<Entry[]>>().swap(blocks_);
  used_ = 0;
  std::vector<uint32_t>().swap(buckets_);
  free_head_ = kNil;
  live_ = 0;
}

size_t DedupIndex::MemoryBytesAfterInsert() const {
  size_t blocks = blocks_.size(), slots = blocks_.capacity();
  if (free_head_ == kNil && (used_ >> kBlockShift) == blocks) {
    ++blocks;
    slots = BlockSlotsFor(blocks, slots);
  }
  return Bytes(blocks, slots, BucketsAfterInsert());
}

void DedupIndex::Rehash(size_t n) {
  std::vector<uint32_t>(n, kNil).swap(buckets_);  // exactly n: MemoryBytesAfterInsert counts on it
  for (uint32_t i = 0; i < used_; ++i) {
    Entry& e = At(i);
    if (e.cluster == kNil) continue;
    Digest d{};
    std::memcpy(d.data(), e.key, kKeyBytes);
    size_t b = Bucket(d);
    e.next = buckets_[b];
    buckets_[b] = i;
  }
}

}  // namespace qcow2dedup
