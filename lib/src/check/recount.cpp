// The recount's two primitives: counting references to a byte range, the
// way QEMU's qcow2_inc_refcounts_imrt() counts them, and noting which
// metadata lives in which cluster.
#include <fmt/format.h>

#include <algorithm>

#include "check/references.h"

namespace qcow2dedup::check {

const char kMetaL2Table[] = "an L2 table";
const char kMetaRefblock[] = "a refcount block";

ReferenceCounts::ReferenceCounts(uint64_t clusters, uint64_t max_refcount)
    : counts_(clusters, 0), max_(std::min<uint64_t>(max_refcount, UINT32_MAX)) {}

uint64_t ReferenceCounts::Add(uint64_t c, uint64_t n) {
  if (c >= counts_.size()) counts_.resize(c + 1, 0);
  const uint64_t room = max_ - counts_[c];
  const uint64_t added = std::min(room, n);
  counts_[c] = uint32_t(counts_[c] + added);
  return n - added;
}

void ReferenceCounts::Set(uint64_t c, uint64_t v) {
  if (c >= counts_.size()) counts_.resize(c + 1, 0);
  counts_[c] = uint32_t(std::min(v, max_));
}

uint64_t ReferenceCounts::End() const {
  for (uint64_t c = counts_.size(); c-- > 0;)
    if (counts_[c]) return c + 1;
  return 0;
}

void Recount::Inc(uint64_t offset, uint64_t size, uint64_t n) {
  if (size == 0 || n == 0) return;
  const uint64_t cs = ctx_.cs();
  // QEMU tolerates a reference into the partly written last cluster, not
  // one a whole cluster or more past the end of the file.
  if (offset + size >= ctx_.SectorLength() + cs || offset + size < offset) {
    r_.corruptions += n;
    Note(*notes_, FindingArea::kRefcounts, FindingKind::kError, fmt::format("ERROR: counting reference for region exceeding the end of the file by one cluster "
                         "or more: offset {:#x} size {:#x}",
                         offset, size));
    return;
  }
  for (uint64_t c = offset / cs; c <= (offset + size - 1) / cs; ++c) {
    if (uint64_t over = refs_.counts.Add(c, n)) {
      r_.corruptions += over;
      Note(*notes_, FindingArea::kRefcounts, FindingKind::kError, fmt::format("ERROR: overflow cluster offset={:#x}", c * cs), c);
      Note(*notes_, FindingArea::kRefcounts, FindingKind::kNote, "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean "
               "copy if the image cannot be opened for writing");
    }
  }
}

namespace {

bool Shareable(const char* kind) { return kind == kMetaL2Table; }

}  // namespace

void Recount::MarkMeta(uint64_t offset, uint64_t size, const char* kind, uint64_t n) {
  const uint64_t cs = ctx_.cs();
  if (size == 0 || n == 0 || offset >= ctx_.file_size) return;
  const uint64_t last = std::min((offset + size - 1) / cs, ctx_.FileClusters() - 1);
  for (uint64_t c = offset / cs; c <= last; ++c) {
    auto [it, fresh] = refs_.meta.try_emplace(c, MetaCluster{kind});
    if ((!fresh || n > 1) && !(Shareable(kind) && it->second.kind == kind)) it->second.mixed = true;
    it->second.expected += n;
  }
}

}  // namespace qcow2dedup::check
