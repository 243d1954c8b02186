// One check pass in the order of QEMU's qcow2_check_refcounts(), so that
// the same damage gives the same counts: recount; compare; then either
// rebuild the refcount structure or fix refcounts one by one; then COPIED.
#include <fmt/format.h>

#include "check/passes.h"

namespace qcow2dedup::check {
namespace {

// After a rebuild the references are counted again; only the findings of
// that count matter, not its allocation statistics (QEMU would add those
// up twice, and qemu-img reports the statistics of its second run anyway).
void TakeFindings(CheckReport& into, const CheckReport& from) {
  into.corruptions = from.corruptions;
  into.overlaps = from.overlaps;
  into.check_errors += from.check_errors;
  NoteAll(into, from);
}

}  // namespace

Result<PassResult> RunPass(Context& ctx, RepairMode fix) {
  CheckReport r;
  const uint64_t cs = ctx.cs();
  // QEMU counts whole sectors of the virtual disk.
  r.total_clusters = (ctx.header.virtual_size / 512 * 512 + cs - 1) / cs;
  bool rebuild = false;
  QD_ASSIGN_OR_RETURN(References refs, CountReferences(ctx, r, {fix, true}, &rebuild));
  StoredRefcounts stored(ctx);
  QD_RETURN_IF_ERROR(stored.Load());

  // A fix is done on a second comparison from the same starting point; the
  // first one only decides whether the structure must be rebuilt.
  const CheckReport pre = r;
  uint64_t highest = 0;
  QD_RETURN_IF_ERROR(CompareRefcounts(ctx, refs, stored, r, RepairMode::kNone, &rebuild, &highest));

  const bool needs_rebuild = rebuild;
  if (rebuild && fix == RepairMode::kAll) {
    const CheckReport old = r;
    CheckReport scratch;
    bool ignored = false;
    QD_ASSIGN_OR_RETURN(References bare, CountReferences(ctx, scratch, {RepairMode::kNone, false}, &ignored));
    if (Status s = RebuildRefcounts(ctx, bare, refs.counts.End(), r); !s.ok()) {
      Note(r, FindingArea::kRefcounts, FindingKind::kError, "ERROR " + s.message());
      ++r.check_errors;
      r.stopped = true;
      return PassResult{std::move(r), std::move(refs), true};
    }
    QD_RETURN_IF_ERROR(ctx.RefreshFileSize().status());
    QD_RETURN_IF_ERROR(stored.Load());
    r.corruptions = 0;
    r.leaks = 0;
    CheckReport again;
    rebuild = false;
    QD_ASSIGN_OR_RETURN(refs, CountReferences(ctx, again, {RepairMode::kNone, true}, &rebuild));
    TakeFindings(r, again);
    // Leaks the rebuild itself left behind are mended quietly, as QEMU does.
    CheckReport fresh;
    QD_RETURN_IF_ERROR(CompareRefcounts(ctx, refs, stored, fresh, RepairMode::kLeaks, &rebuild, &highest));
    if (rebuild) Note(r, FindingArea::kRefcounts, FindingKind::kError, "ERROR rebuilt refcount structure is still broken");
    if (r.corruptions < old.corruptions) r.corruptions_fixed += old.corruptions - r.corruptions;
    if (r.leaks < old.leaks) r.leaks_fixed += old.leaks - r.leaks;
    r.leaks += fresh.leaks;
  } else if (fix != RepairMode::kNone) {
    if (rebuild) {
      Note(r, FindingArea::kRefcounts, FindingKind::kError, "ERROR need to rebuild refcount structures");
      ++r.check_errors;
      r.stopped = true;
      return PassResult{std::move(r), std::move(refs), needs_rebuild};
    }
    if (r.leaks || r.corruptions) {
      std::vector<Finding> findings = std::move(r.findings);
      r = pre;
      r.findings = std::move(findings);
      QD_RETURN_IF_ERROR(CompareRefcounts(ctx, refs, stored, r, fix, &rebuild, &highest));
      QD_RETURN_IF_ERROR(ctx.file->Sync());
    }
  }

  if (fix != RepairMode::kNone) QD_RETURN_IF_ERROR(DropRefcountsPastEnd(ctx, refs.counts.size(), stored, r));
  QD_RETURN_IF_ERROR(ReportOverlaps(refs, stored, r));
  QD_RETURN_IF_ERROR(CheckCopiedFlags(ctx, refs, stored, r, fix));
  r.image_end_offset = (highest + 1) * cs;
  return PassResult{std::move(r), std::move(refs), needs_rebuild};
}

}  // namespace qcow2dedup::check
