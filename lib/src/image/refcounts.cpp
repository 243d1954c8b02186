#include "image/refcounts.h"

#include <fmt/format.h>

#include "format/entries.h"
#include "format/refcount_block.h"

namespace qcow2dedup {

Refcounts::Refcounts(File* file, Header* header, MetadataMap* meta, uint64_t cache_tables)
    : file_(file),
      h_(header),
      meta_(meta),
      blocks_(file, header->cluster_size(), cache_tables,
              [meta](uint64_t off) { return meta->CheckTableWrite(off); }),
      per_block_(header->refblock_entries()) {}

Status Refcounts::Load(uint64_t file_size) {
  const uint64_t cs = h_->cluster_size();
  std::vector<uint8_t> raw(uint64_t(h_->reftable_clusters) * cs);
  QD_RETURN_IF_ERROR(file_->ReadAt(h_->reftable_offset, raw));
  table_.resize(raw.size() / 8);
  for (size_t i = 0; i < table_.size(); ++i) {
    uint64_t e = LoadBe64(&raw[i * 8]);
    uint64_t off = RefTableOffset(e);
    if (e & kRefTableReservedMask)
      return Status::Corruption(fmt::format("refcount table entry {} has reserved bits set", i));
    if (off != 0) {
      if (off % cs != 0)
        return Status::Corruption(fmt::format("refcount block {} at {:#x} is not cluster aligned", i, off));
      if (off + cs > file_size)
        return Status::Corruption(fmt::format("refcount block {} at {:#x} lies beyond the end of the file", i, off));
      if (meta_->FixedStructureAt(off))
        return Status::Corruption(fmt::format("refcount block {} at {:#x} overlaps {}", i, off,
                                              meta_->FixedStructureAt(off)));
      meta_->AddTable(off);
    }
    table_[i] = off;
  }
  return Status::Ok();
}

Result<TableCache::Table*> Refcounts::Block(uint64_t b, bool create) {
  if (b >= table_.size() || table_[b] == 0) {
    if (!create) return static_cast<TableCache::Table*>(nullptr);
    if (b >= table_.size()) {
      QD_RETURN_IF_ERROR(GrowTable(b + 1));
      // The grown table's own block may be this very one.
      if (table_[b] != 0) return blocks_.Get(table_[b]);
    }
    // A new block describes itself: it lives in the first cluster of the
    // range it covers, which is free because no block covered it before.
    const uint64_t cluster = b * per_block_;
    const uint64_t off = cluster * h_->cluster_size();
    if (IsReserved(cluster)) overran_reserved_ = true;
    QD_RETURN_IF_ERROR(meta_->CheckTableWrite(off));
    QD_ASSIGN_OR_RETURN(TableCache::Table * t, blocks_.Create(off));
    SetRefcount(t->data(), h_->refcount_order, 0, 1);
    blocks_.MarkDirty(off);
    table_[b] = off;
    table_dirty_ = true;
    meta_->AddTable(off);
    return t;
  }
  return blocks_.Get(table_[b]);
}

Result<uint64_t> Refcounts::Stored(uint64_t cluster) {
  QD_ASSIGN_OR_RETURN(TableCache::Table * t, Block(BlockIndex(cluster), false));
  if (!t) return uint64_t(0);
  return GetRefcount(t->data(), h_->refcount_order, cluster % per_block_);
}

Result<uint64_t> Refcounts::Get(uint64_t cluster) {
  QD_ASSIGN_OR_RETURN(uint64_t v, Stored(cluster));
  if (!held_.empty())
    if (auto it = held_.find(cluster); it != held_.end()) v -= it->second;
  return v;
}

Status Refcounts::Set(uint64_t cluster, uint64_t value) {
  if (value > h_->max_refcount())
    return Status::Corruption(fmt::format("refcount of cluster {} would overflow", cluster));
  const uint64_t b = BlockIndex(cluster);
  QD_ASSIGN_OR_RETURN(TableCache::Table * t, Block(b, value != 0));
  if (!t) return Status::Ok();  // zero in an absent block is already zero
  if (value != 1 && cluster == b * per_block_ && table_[b] == cluster * h_->cluster_size())
    return Status::Corruption(fmt::format("refusing to change the refcount block's own refcount at cluster {}", cluster));
  SetRefcount(t->data(), h_->refcount_order, cluster % per_block_, value);
  blocks_.MarkDirty(table_[b]);
  return Status::Ok();
}

Result<uint64_t> Refcounts::Adjust(uint64_t cluster, int64_t delta) {
  QD_ASSIGN_OR_RETURN(uint64_t v, Get(cluster));
  if (delta < 0 && v < uint64_t(-delta))
    return Status::Corruption(fmt::format("refcount of cluster {} would drop below zero", cluster));
  uint64_t nv = v + uint64_t(delta);
  if (hold_decrements_ && delta < 0) {
    held_[cluster] += uint64_t(-delta);
  } else {
    QD_ASSIGN_OR_RETURN(uint64_t stored, Stored(cluster));
    QD_RETURN_IF_ERROR(Set(cluster, stored + (nv - v)));
  }
  if (nv == 0) {
    pending_free_.insert(cluster);
  }
  return nv;
}

Result<uint64_t> Refcounts::Allocate() {
  const uint32_t order = h_->refcount_order;
  for (uint64_t c = std::max<uint64_t>(free_hint_, 1);; ) {
    if (IsReserved(c)) c = reserved_end_;
    const uint64_t b = BlockIndex(c);
    QD_ASSIGN_OR_RETURN(TableCache::Table * t, Block(b, true));
    // Scan this block without going back through the cache per cluster.
    const uint64_t end = (b + 1) * per_block_;
    for (; c < end && !IsReserved(c); ++c) {
      if (GetRefcount(t->data(), order, c % per_block_) != 0) continue;
      if (!pending_free_.empty() && pending_free_.count(c)) continue;
      SetRefcount(t->data(), order, c % per_block_, 1);
      blocks_.MarkDirty(table_[b]);
      free_hint_ = c + 1;
      return c * h_->cluster_size();
    }
  }
}

// A range may be longer than one block covers, so the blocks it needs do
// not describe themselves (their first cluster would split the range): they
// go right after it, and each is counted in whichever block covers it.
Result<uint64_t> Refcounts::AllocateRange(uint64_t n) {
  auto start_past_all = [&]() -> Result<uint64_t> {
    QD_ASSIGN_OR_RETURN(uint64_t end, EndCluster());
    for (uint64_t c : pending_free_) end = std::max(end, c + 1);
    return std::max(end, reserved_end_);
  };
  QD_ASSIGN_OR_RETURN(uint64_t start, start_past_all());
  // Which blocks are missing for the range and for themselves (k of them,
  // placed after it), until adding them needs no further block.
  std::vector<uint64_t> missing;
  for (size_t k = 0;;) {
    missing.clear();
    for (uint64_t b = BlockIndex(start); b <= BlockIndex(start + n + k - 1); ++b)
      if (b >= table_.size() || table_[b] == 0) missing.push_back(b);
    if (!missing.empty() && missing.back() >= table_.size()) {
      QD_RETURN_IF_ERROR(GrowTable(missing.back() + 1));  // the table moves past the end first
      QD_ASSIGN_OR_RETURN(start, start_past_all());
      k = 0;
      continue;
    }
    if (missing.size() == k) break;
    k = missing.size();
  }
  const uint64_t cs = h_->cluster_size();
  for (size_t i = 0; i < missing.size(); ++i) {
    const uint64_t off = (start + n + i) * cs;
    QD_RETURN_IF_ERROR(meta_->CheckTableWrite(off));
    QD_ASSIGN_OR_RETURN(TableCache::Table * t, blocks_.Create(off));
    (void)t;
    blocks_.MarkDirty(off);
    table_[missing[i]] = off;
    table_dirty_ = true;
    meta_->AddTable(off);
  }
  for (size_t i = 0; i < missing.size(); ++i) QD_RETURN_IF_ERROR(Set(start + n + i, 1));
  for (uint64_t c = start; c < start + n; ++c) QD_RETURN_IF_ERROR(Set(c, 1));
  return start * cs;
}

Status Refcounts::ApplyHeldDecrements() {
  for (const auto& [cluster, n] : held_) {
    QD_ASSIGN_OR_RETURN(uint64_t stored, Stored(cluster));
    QD_RETURN_IF_ERROR(Set(cluster, stored - n));
  }
  held_.clear();
  return Status::Ok();
}

std::vector<uint64_t> Refcounts::ReleasePendingFrees() {
  std::vector<uint64_t> freed(pending_free_.begin(), pending_free_.end());
  for (uint64_t c : freed) free_hint_ = std::min(free_hint_, c);
  pending_free_.clear();
  return freed;
}

Result<uint64_t> Refcounts::EndCluster() {
  for (uint64_t b = table_.size(); b-- > 0;) {
    if (table_[b] == 0) continue;
    QD_ASSIGN_OR_RETURN(TableCache::Table * t, blocks_.Get(table_[b]));
    for (uint64_t i = per_block_; i-- > 0;)
      if (GetRefcount(t->data(), h_->refcount_order, i) != 0) return b * per_block_ + i + 1;
  }
  return uint64_t(0);
}

Status Refcounts::WriteTable() {
  if (!table_dirty_) return Status::Ok();
  // The table in memory is exactly the clusters the header gives it.
  std::vector<uint8_t> raw(table_.size() * 8, 0);
  for (size_t i = 0; i < table_.size(); ++i) StoreBe64(&raw[i * 8], table_[i]);
  QD_RETURN_IF_ERROR(file_->WriteAt(h_->reftable_offset, raw));
  table_dirty_ = false;
  return Status::Ok();
}

// Moves the refcount table to a larger home past everything allocated: a
// fresh block range whose first cluster holds its own refcount block and
// whose next clusters hold the new table. The caller's Flush writes the new
// table before the header points at it.
Status Refcounts::GrowTable(uint64_t min_blocks) {
  const uint64_t cs = h_->cluster_size();
  QD_ASSIGN_OR_RETURN(uint64_t end, EndCluster());
  // Past what a crash could still need (frees not yet on disk) and past
  // the index's reserved clusters too.
  for (uint64_t c : pending_free_) end = std::max(end, c + 1);
  end = std::max(end, reserved_end_);
  uint64_t home_block = std::max<uint64_t>((end + per_block_ - 1) / per_block_, table_.size());
  uint64_t blocks = std::max(min_blocks, home_block + 1);
  blocks += blocks / 2 + 8;  // room to grow
  uint64_t clusters = (blocks * 8 + cs - 1) / cs;
  if (clusters * cs > kMaxRefTableBytes) return Status::NoSpace("refcount table would exceed its maximum size");
  if (clusters + 1 > per_block_) return Status::Unsupported("refcount table would not fit one block range");
  const uint64_t old_offset = h_->reftable_offset, old_clusters = h_->reftable_clusters;
  table_.resize(clusters * cs / 8, 0);
  QD_ASSIGN_OR_RETURN(TableCache::Table * t, Block(home_block, true));
  (void)t;
  const uint64_t first = home_block * per_block_ + 1;
  h_->reftable_offset = first * cs;
  h_->reftable_clusters = uint32_t(clusters);
  for (uint64_t i = 0; i < clusters; ++i) QD_RETURN_IF_ERROR(Set(first + i, 1));
  for (uint64_t i = 0; i < old_clusters; ++i) {
    QD_ASSIGN_OR_RETURN(uint64_t left, Adjust(old_offset / cs + i, -1));
    (void)left;
  }
  table_dirty_ = true;
  header_dirty_ = true;
  return Status::Ok();
}

}  // namespace qcow2dedup
