// Flushing a version 2 image. Version 2 has no dirty bit: QEMU opens such an
// image after a crash without repairing it, and trusts its refcounts and
// COPIED flags. So every state a crash can leave must be safe to write to:
// a refcount on disk is never lower than the references on disk (at worst
// a leak), and a COPIED flag on disk is never set on a cluster another
// entry on disk also references (QEMU would write into it in place).
//
// The order, each step synced before the next:
//  1. data;
//  2. refcount blocks with every increase, none of the decreases (held back
//     in Refcounts), then the refcount table (and the header if it moved);
//  3. L2 tables with every change except links to clusters others already
//     reference, which show their previous entry; then L1 (and the header).
//     The COPIED flags cleared on those clusters' other entries land here;
//  4. the links;
//  5. the decreases (no entry on disk uses those references any more);
//  6. COPIED set where a refcount fell to 1 (no other reference is left on
//     disk), and L1 entries' COPIED;
// and only then are freed clusters reused or punched.
#include "image/image_state.h"
#include "image/writer.h"

namespace qcow2dedup {

Status Writer::FlushStateV2() {
  QD_RETURN_IF_ERROR(FixCopiedFlags(CopiedPass::kClearOnly));
  QD_RETURN_IF_ERROR(data_.Flush());
  if (!marked_dirty_) return Status::Ok();
  File& f = *s_.file;
  QD_RETURN_IF_ERROR(f.Sync());

  QD_RETURN_IF_ERROR(refcounts_->WriteBlocks());
  QD_RETURN_IF_ERROR(f.Sync());
  QD_RETURN_IF_ERROR(refcounts_->WriteTable());
  QD_RETURN_IF_ERROR(f.Sync());
  if (refcounts_->header_dirty()) {
    QD_RETURN_IF_ERROR(WriteHeader(s_));
    QD_RETURN_IF_ERROR(f.Sync());
    refcounts_->clear_header_dirty();
  }

  std::vector<std::pair<uint64_t, uint64_t>> links;  // guest cluster, entry now
  for (const auto& [g, before] : held_links_) {
    QD_ASSIGN_OR_RETURN(uint64_t now, s_.map->GetEntry(g));
    links.emplace_back(g, now);
    QD_RETURN_IF_ERROR(s_.map->SetEntry(g, before));
  }
  QD_RETURN_IF_ERROR(s_.map->WriteTables());
  QD_RETURN_IF_ERROR(f.Sync());
  QD_RETURN_IF_ERROR(s_.map->WriteL1());
  QD_RETURN_IF_ERROR(f.Sync());
  if (header_changed_) {
    QD_RETURN_IF_ERROR(WriteHeader(s_));
    QD_RETURN_IF_ERROR(f.Sync());
    header_changed_ = false;
  }

  if (!links.empty()) {
    for (const auto& [g, now] : links) QD_RETURN_IF_ERROR(s_.map->SetEntry(g, now));
    QD_RETURN_IF_ERROR(s_.map->WriteTables());
    QD_RETURN_IF_ERROR(f.Sync());
    held_links_.clear();
  }

  QD_RETURN_IF_ERROR(refcounts_->ApplyHeldDecrements());
  QD_RETURN_IF_ERROR(refcounts_->WriteBlocks());
  QD_RETURN_IF_ERROR(f.Sync());

  QD_RETURN_IF_ERROR(FixCopiedFlags(CopiedPass::kSetOnly));
  QD_RETURN_IF_ERROR(s_.map->WriteTables());
  QD_RETURN_IF_ERROR(s_.map->WriteL1());
  QD_RETURN_IF_ERROR(f.Sync());
  return PunchFreed(refcounts_->ReleasePendingFrees());
}

}  // namespace qcow2dedup
