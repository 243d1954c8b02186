// Refcounts: the refcount table and its blocks, and the cluster allocator
// that rests on them. A cluster freed here is not handed out again until the
// image says the L2 change that freed it is on disk (ReleasePendingFrees).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "format/header.h"
#include "image/metadata_map.h"
#include "image/table_cache.h"

namespace qcow2dedup {

class Refcounts {
 public:
  Refcounts(File* file, Header* header, MetadataMap* meta, uint64_t cache_tables);

  // Reads and validates the refcount table.
  Status Load(uint64_t file_size);

  Result<uint64_t> Get(uint64_t cluster);
  Status Set(uint64_t cluster, uint64_t value);
  // Adds delta (+1 or -1); returns the new refcount. A drop to zero makes the
  // cluster a pending free.
  Result<uint64_t> Adjust(uint64_t cluster, int64_t delta);

  // Keeps clusters [first, first + count) from being handed out (they hold
  // the dedup index, which has no refcount). One range at a time.
  void Reserve(uint64_t first, uint64_t count) {
    reserved_first_ = first;
    reserved_end_ = first + count;
  }
  bool IsReserved(uint64_t c) const { return c >= reserved_first_ && c < reserved_end_; }
  // Whether a new refcount block had to go inside the reserved range (a
  // block lives in the first cluster of what it covers).
  bool overran_reserved() const { return overran_reserved_; }

  // A free cluster with its refcount set to 1; returns its host offset.
  Result<uint64_t> Allocate();
  // n contiguous free clusters past everything allocated, each set to 1.
  Result<uint64_t> AllocateRange(uint64_t n);
  // Clusters freed since the last call may now be reused; returns them.
  std::vector<uint64_t> ReleasePendingFrees();
  bool IsPendingFree(uint64_t cluster) const { return pending_free_.count(cluster) != 0; }

  // The search for a free cluster starts here: a clean image's extension
  // says below which cluster none is free, which spares a scan of every
  // refcount block per session.
  void set_free_hint(uint64_t c) { free_hint_ = c; }
  // No cluster below this one is free or about to be.
  uint64_t LowestFree() const {
    uint64_t low = free_hint_;
    for (uint64_t c : pending_free_) low = std::min(low, c);
    return std::min(low, reserved_end_ > reserved_first_ ? reserved_first_ : low);
  }
  // Version 2 images have no dirty bit, so nothing repairs refcounts after a
  // crash: a refcount on disk must never be lower than the references on
  // disk. With decrements held back, a drop changes what Get returns at
  // once but reaches the blocks only in ApplyHeldDecrements, which the
  // writer calls once the L2 change that dropped the reference is on disk
  // (QEMU orders its caches the same way: a decrease makes the refcount
  // block cache depend on the L2 table cache).
  void set_hold_decrements(bool on) { hold_decrements_ = on; }
  Status ApplyHeldDecrements();

  // One past the highest cluster whose refcount is not zero.
  Result<uint64_t> EndCluster();

  // Write-back, in the order Flush needs: blocks first, then the table.
  Status WriteBlocks() { return blocks_.WriteBack(); }
  Status WriteTable();
  bool header_dirty() const { return header_dirty_; }
  void clear_header_dirty() { header_dirty_ = false; }
  TableCache& cache() { return blocks_; }
  const std::vector<uint64_t>& table() const { return table_; }

 private:
  uint64_t BlockIndex(uint64_t cluster) const { return cluster / per_block_; }
  // The refcount as the blocks hold it (held decrements not subtracted).
  Result<uint64_t> Stored(uint64_t cluster);
  // The block for block index b, creating it (inside its own range) if absent.
  Result<TableCache::Table*> Block(uint64_t b, bool create);
  Status GrowTable(uint64_t min_blocks);

  File* file_;
  Header* h_;
  MetadataMap* meta_;
  TableCache blocks_;
  uint64_t per_block_;
  std::vector<uint64_t> table_;  // refcount table entries (raw)
  bool table_dirty_ = false;
  bool header_dirty_ = false;
  uint64_t free_hint_ = 0;
  uint64_t reserved_first_ = 0, reserved_end_ = 0;
  bool overran_reserved_ = false;
  std::unordered_set<uint64_t> pending_free_;
  bool hold_decrements_ = false;
  std::unordered_map<uint64_t, uint64_t> held_;  // cluster -> decrements not yet in its block
};

}  // namespace qcow2dedup
