// Stored refcounts against the recount, block by block, as QEMU's
// compare_refcounts(): too high is a leak, too low a corruption, and a
// referenced cluster with refcount 0 asks for a rebuild.
#include <fmt/format.h>

#include "check/passes.h"
#include "format/refcount_block.h"

namespace qcow2dedup::check {

// Refcounts of clusters past the end of the file: nothing can reference
// them, and QEMU does not look at them, but the next allocation past the
// end (our index, for one) would find them in its way. A repair drops them
// quietly, as qemu-img reports nothing about them.
Status DropRefcountsPastEnd(Context& ctx, uint64_t nb, StoredRefcounts& stored, CheckReport& r) {
  const uint64_t per = stored.per_block();
  const uint32_t order = ctx.header.refcount_order;
  for (uint64_t b = nb / per; b < stored.table_size(); ++b) {
    auto offset = stored.BlockOffset(b);
    if (!offset.ok() || *offset == 0 || *offset >= ctx.file_size) continue;
    QD_ASSIGN_OR_RETURN(uint8_t * block, stored.Block(b));
    for (uint64_t i = std::max(nb, b * per); i < (b + 1) * per; ++i) {
      if (uint64_t v = GetRefcount(block, order, i - b * per)) {
        Note(r, FindingArea::kRefcounts, FindingKind::kRepaired,
             fmt::format("Repairing cluster {} refcount={} past the end of the file", i, v), i);
        QD_RETURN_IF_ERROR(stored.Set(i, 0));
      }
    }
    QD_RETURN_IF_ERROR(stored.Flush());
  }
  return Status::Ok();
}

Status CompareRefcounts(Context& ctx, const References& refs, StoredRefcounts& stored, CheckReport& r,
                        RepairMode fix, bool* rebuild, uint64_t* highest) {
  const uint64_t nb = refs.counts.size();
  const uint64_t per = stored.per_block();
  const uint32_t order = ctx.header.refcount_order;
  *highest = 0;
  for (uint64_t b = 0; b * per < nb; ++b) {
    const uint64_t first = b * per, end = std::min(nb, first + per);
    auto block = stored.Block(b);
    if (!block.ok()) {
      const uint64_t offset = stored.TableEntry(b) & kRefTableOffsetBits;
      if (offset % ctx.cs() && !ctx.corruption_signalled) {
        // qcow2_signal_corruption(), the words of qcow2_get_refcount() (C's
        // %#x prints 0 as "0").
        ctx.corruption_signalled = true;
        Note(r, FindingArea::kRefcounts, FindingKind::kNote,
             fmt::format("qcow2: Image is corrupt: Refblock offset {:#x} unaligned (reftable index: {}); further "
                         "non-fatal corruption events will be suppressed",
                         offset, b ? fmt::format("{:#x}", b) : "0"));
      }
      for (uint64_t i = first; i < end; ++i) {
        ++r.check_errors;
        Note(r, FindingArea::kRefcounts, FindingKind::kError,
             fmt::format("Can't get refcount for cluster {}: Input/output error", i), i);
      }
      continue;
    }
    for (uint64_t i = first; i < end; ++i) {
      const uint64_t stored_rc = *block ? GetRefcount(*block, order, i - first) : 0;
      const uint64_t counted = refs.counts.Get(i);
      if (stored_rc || counted) *highest = i;
      if (stored_rc == counted) continue;
      uint64_t* fixed = nullptr;
      if (stored_rc == 0) {
        *rebuild = true;
      } else if (stored_rc > counted && fix != RepairMode::kNone) {
        fixed = &r.leaks_fixed;
      } else if (stored_rc < counted && fix == RepairMode::kAll) {
        fixed = &r.corruptions_fixed;
      }
      const FindingKind kind = fixed                ? FindingKind::kRepaired
                               : stored_rc < counted ? FindingKind::kError
                                                     : FindingKind::kLeak;
      Note(r, FindingArea::kRefcounts, kind,
           fmt::format("{} cluster {} refcount={} reference={}", Word(kind), i, stored_rc, counted), i);
      if (fixed && stored.Set(i, counted).ok()) {
        ++*fixed;
        continue;
      }
      if (stored_rc < counted) ++r.corruptions;
      else ++r.leaks;
    }
    QD_RETURN_IF_ERROR(stored.Flush());
  }
  return Status::Ok();
}

}  // namespace qcow2dedup::check
