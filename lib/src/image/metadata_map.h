// Where the image's metadata lives, for the overlap check that QEMU runs
// before every metadata write: no table may land on another, and no guest
// data may land on a table.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "format/header.h"
#include "qcow2dedup/status.h"

namespace qcow2dedup {

class MetadataMap {
 public:
  explicit MetadataMap(const Header& h) : h_(&h) {}

  void AddTable(uint64_t offset) { tables_.insert(offset); }
  bool IsTable(uint64_t offset) const { return tables_.count(offset) != 0; }

  // What fixed structure, if any, covers host cluster offset.
  const char* FixedStructureAt(uint64_t offset) const {
    const uint64_t cs = h_->cluster_size();
    auto in = [&](uint64_t start, uint64_t bytes) {
      return bytes > 0 && offset + cs > start && offset < start + bytes;
    };
    if (offset < cs) return "the header";
    if (in(h_->l1_offset, uint64_t(h_->l1_size) * 8)) return "the L1 table";
    if (in(h_->reftable_offset, uint64_t(h_->reftable_clusters) * cs)) return "the refcount table";
    if (h_->nb_snapshots && in(h_->snapshots_offset, snapshot_table_bytes_)) return "the snapshot table";
    for (const auto& [start, bytes] : snapshot_l1_tables_)
      if (in(start, bytes)) return "a snapshot's L1 table";
    return nullptr;
  }

  // A table write at offset: it must not hit a fixed structure.
  Status CheckTableWrite(uint64_t offset) const {
    if (const char* what = FixedStructureAt(offset))
      return Status::Corruption(fmt_overlap("metadata", offset, what));
    return Status::Ok();
  }
  // A guest data write: it must not hit any metadata at all.
  Status CheckDataWrite(uint64_t offset) const {
    if (const char* what = FixedStructureAt(offset))
      return Status::Corruption(fmt_overlap("guest data", offset, what));
    if (IsTable(offset)) return Status::Corruption(fmt_overlap("guest data", offset, "an L2 table or refcount block"));
    return Status::Ok();
  }

  void set_snapshot_table_bytes(uint64_t b) { snapshot_table_bytes_ = b; }
  void AddSnapshotL1(uint64_t offset, uint64_t bytes) { snapshot_l1_tables_.emplace_back(offset, bytes); }

 private:
  static std::string fmt_overlap(const char* what, uint64_t offset, const char* target) {
    char buf[160];
    snprintf(buf, sizeof buf, "refusing to write %s at %#llx: it would overwrite %s", what,
             (unsigned long long)offset, target);
    return buf;
  }
  const Header* h_;
  uint64_t snapshot_table_bytes_ = 0;
  std::vector<std::pair<uint64_t, uint64_t>> snapshot_l1_tables_;  // offset, bytes
  std::unordered_set<uint64_t> tables_;
};

}  // namespace qcow2dedup
