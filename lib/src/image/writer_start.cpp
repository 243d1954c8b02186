// Starting a write session: what must hold before the first byte is written.
#include <fmt/format.h>

#include <algorithm>

#include "check/context.h"
#include "check/passes.h"
#include "dedup/hash_clusters.h"
#include "dedup/index_table.h"
#include "image/image_state.h"
#include "image/writer.h"
#include "io/vetted_stamps.h"

namespace qcow2dedup {

Status CheckWritableFormat(const Header& h) {
  // Version 2 is written as version 2 (writer_v2.cpp says how).
  // Persistent bitmaps are kept up to date (bitmap_marks.h).
  (void)h;
  return Status::Ok();
}

Status Writer::Prepare(const ProgressFn& progress) {
  const Header& h = s_.header;
  QD_RETURN_IF_ERROR(CheckWritableFormat(h));
  // Open repairs a dirty image first; one still dirty here is not ours to touch.
  if (h.incompatible & kIncompatDirty)
    return Status::Corruption("the image was not closed cleanly; repair it with 'check -r all' first");
  QD_RETURN_IF_ERROR(refcounts_->Load(s_.file_size));
  // The in-sync bit says who wrote the image last, not that its structure
  // is sound: a hostile or damaged image carries it as easily. Overlap
  // checks alone (QEMU's safety) would let a write through two L1 entries
  // sharing one L2 table, or onto a cluster whose refcount is too low,
  // change data the write never named. So the metadata pass runs, unless
  // the file is byte for byte what a session of ours left consistent (its
  // stamp says so, io/vetted_stamps.h): the pass's cost grows with the
  // image, and would only find what we left.
  open_stamp_ = s_.file->Stamp();
  const std::optional<VettedStamps> stamps = ProcessVettedStamps();
  if (!(stamps && open_stamp_ && stamps->Vouches(*open_stamp_))) QD_RETURN_IF_ERROR(VetStructure());
  if (h.dedup_in_sync() && CheckIndexPlacement(*h.dedup, s_.cs(), s_.file_size).ok()) {
    // We closed it cleanly last, and nobody wrote it since: the stored
    // index is searched where it lies, never loaded whole.
    if (h.dedup->free_hint <= s_.file_size / s_.cs()) refcounts_->set_free_hint(h.dedup->free_hint);
    if (h.dedup->index_offset) {
      index_.Attach(std::make_unique<IndexTable>(s_.file.get(), *h.dedup));
      reserved_index_ = {h.dedup->index_offset, IndexTableBytes(h.dedup->index_buckets)};
      refcounts_->Reserve(h.dedup->index_offset / s_.cs(), (reserved_index_.second + s_.cs() - 1) / s_.cs());
    }
    // Compressed copies are found through an index built by reading every
    // L2 table; an image we know holds none is spared that.
    return h.dedup->compressed ? LoadCompressed() : Status::Ok();
  }
  QD_RETURN_IF_ERROR(RebuildIndex(progress));
  index_changed_ = true;
  index_hashed_ = true;
  // Someone else wrote the image: QEMU's copy-on-write of a cluster shared
  // twice leaves the other reference's COPIED flag clear. Mend them all.
  fix_all_copied_ = true;
  return LoadCompressed();  // compressed_writer.cpp
}

// Before the first write, the same reference count that check makes (no
// hashing, metadata only): writing into an image whose tables overlap or
// whose refcounts are too low would spread the damage to good data.
Status Writer::VetStructure() {
  check::Context ctx;
  ctx.file = s_.file.get();
  ctx.header = s_.header;
  ctx.file_size = s_.file_size;
  QD_ASSIGN_OR_RETURN(check::PassResult pass, check::RunPass(ctx, RepairMode::kNone));
  // A COPIED flag left clear by QEMU's copy-on-write of a shared cluster is
  // harmless and mended at our next flush; anything else stops the write.
  uint64_t copied = 0;
  for (const Finding& f : pass.report.findings)
    copied += f.area == FindingArea::kCopiedFlags && f.kind == FindingKind::kError;
  const uint64_t serious = pass.report.corruptions - std::min(copied, pass.report.corruptions) + pass.report.overlaps;
  if (serious > 0 || pass.report.check_errors > 0)
    return Status::Corruption(fmt::format("the image has {} corruptions; repair it with 'check -r all' first",
                                          serious + pass.report.check_errors));
  if (copied) fix_all_copied_ = true;
  return Status::Ok();
}

// Hashes every uncompressed data cluster the L2 tables reference into the
// index, on every core. Every copy goes in, so that freeing one leaves the
// others findable.
Status Writer::RebuildIndex(const ProgressFn& progress) {
  index_.Reset();
  const uint64_t cs = s_.cs();
  std::vector<uint64_t> clusters;
  const auto& l1 = s_.map->l1();
  for (uint64_t i = 0; i < l1.size(); ++i) {
    if (!L1Offset(l1[i])) continue;
    QD_ASSIGN_OR_RETURN(TableCache::Table * t, s_.map->cache().Get(L1Offset(l1[i])));
    for (uint64_t j = 0; j < s_.header.l2_entries(); ++j) {
      auto e = s_.map->Decode(i * s_.header.l2_entries() + j, t->data() + j * s_.header.l2_entry_bytes());
      if (e.ok() && e->kind == ClusterKind::kData) clusters.push_back(e->host / cs);
    }
  }
  std::sort(clusters.begin(), clusters.end());
  clusters.erase(std::unique(clusters.begin(), clusters.end()), clusters.end());
  // Nothing here reads these clusters again soon: past the page cache.
  // Past index_memory a cluster is left out (SessionIndex::Insert): no
  // table, so nothing can fail.
  return HashClusters(
      *s_.file, cs, clusters, progress,
      [&](uint64_t c, const Digest& d) {
        (void)index_.Insert(d, c);
        digests_.Put(c, d);
      },
      Caching::kBypass);
}

}  // namespace qcow2dedup
