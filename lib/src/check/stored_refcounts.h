// The refcounts as the image stores them, read the way QEMU's
// qcow2_get_refcount() reads them: no table entry or no block means 0, and a
// block at a misaligned offset cannot be read at all.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "check/context.h"

namespace qcow2dedup::check {

class StoredRefcounts {
 public:
  explicit StoredRefcounts(Context& ctx) : ctx_(ctx) {}

  // (Re)reads the refcount table the header points at.
  Status Load();

  uint64_t per_block() const { return ctx_.header.refblock_entries(); }
  uint64_t table_size() const { return table_.size(); }
  // The refcount table's entry for block b, as stored (0 past its end).
  uint64_t TableEntry(uint64_t b) const { return b < table_.size() ? table_[b] : 0; }
  // The block's offset (0: none). Fails for a misaligned block.
  Result<uint64_t> BlockOffset(uint64_t b) const;
  // The block's bytes, or nullptr when it has no block.
  Result<uint8_t*> Block(uint64_t b);
  Result<uint64_t> Get(uint64_t cluster);
  // Changes a refcount in a block that exists; written by Flush.
  Status Set(uint64_t cluster, uint64_t value);
  Status Flush();
  // One past the highest cluster with a refcount above zero.
  Result<uint64_t> EndCluster();

 private:
  struct Cached {
    std::vector<uint8_t> bytes;
    bool dirty = false;
  };
  Context& ctx_;
  std::vector<uint64_t> table_;  // raw entries
  std::unordered_map<uint64_t, Cached> cache_;
};

}  // namespace qcow2dedup::check
