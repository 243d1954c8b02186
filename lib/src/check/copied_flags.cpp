// COPIED (bit 63) says "refcount is exactly 1, write in place". A COPIED
// entry on a shared cluster lets a write change what others see; a missing
// one only costs a copy. Mirrors QEMU's check_oflag_copied().
#include <fmt/format.h>

#include <map>

#include "check/passes.h"
#include "format/endian.h"
#include "format/entries.h"

namespace qcow2dedup::check {

Status CheckCopiedFlags(Context& ctx, const References& refs, StoredRefcounts& stored, CheckReport& r,
                        RepairMode fix) {
  const Header& h = ctx.header;
  const uint64_t cs = ctx.cs();
  bool repair = false;
  if (fix == RepairMode::kAll) {
    repair = true;
  } else if (fix == RepairMode::kLeaks) {
    // Only when the refcounts are known good: they were just repaired.
    repair = !r.check_errors && !r.corruptions && !r.overlaps && !r.leaks;
  }

  std::vector<uint8_t> l1(uint64_t(h.l1_size) * 8);
  QD_RETURN_IF_ERROR(ctx.Read(h.l1_offset, l1));
  // QEMU walks an L2 table after each L1 entry that names it, printing its
  // findings every time; each table is read (and mended) once here, and
  // its findings said again for every later entry that names it.
  struct Walked {
    std::vector<Finding> findings;
    uint64_t corruptions = 0;
  };
  std::map<uint64_t, Walked> walked;
  std::vector<uint8_t> table(cs);
  for (uint32_t i = 0; i < h.l1_size; ++i) {
    uint64_t e = LoadBe64(&l1[uint64_t(i) * 8]);
    const uint64_t l2 = e & kOffsetMask;
    if (!l2) continue;
    auto rc = stored.Get(l2 / cs);
    if (!rc.ok()) continue;  // already reported by the comparison
    if ((*rc == 1) != ((e & kFlagCopied) != 0)) {
      ++r.corruptions;
      const FindingKind kind = repair ? FindingKind::kRepaired : FindingKind::kError;
      Note(r, FindingArea::kCopiedFlags, kind,
           fmt::format("{} OFLAG_COPIED L2 cluster: l1_index={} l1_entry={:x} refcount={}", Word(kind), i, e, *rc),
           l2 / cs);
      if (repair) {
        e = *rc == 1 ? e | kFlagCopied : e & ~kFlagCopied;
        StoreBe64(&l1[uint64_t(i) * 8], e);
        uint8_t raw[8];
        StoreBe64(raw, e);
        if (!ctx.Write(h.l1_offset + uint64_t(i) * 8, raw).ok()) {
          ++r.check_errors;
          r.stopped = true;
          return Status::Ok();
        }
        --r.corruptions;
        ++r.corruptions_fixed;
      }
    }
    if (l2 % cs != 0 || l2 >= ctx.file_size) continue;
    if (auto it = walked.find(l2); it != walked.end()) {
      // After a repair the later walks find nothing.
      if (repair) continue;
      r.corruptions += it->second.corruptions;
      for (const Finding& f : it->second.findings) {
        if (Full(r)) break;
        Note(r, f);
      }
      continue;
    }
    Walked& w = walked[l2];
    QD_RETURN_IF_ERROR(ctx.Read(l2, table));
    uint64_t dirty = 0;
    for (uint64_t j = 0; j < h.l2_entries(); ++j) {
      uint8_t* p = &table[j * h.l2_entry_bytes()];
      const uint64_t entry = LoadBe64(p);
      const uint64_t data = entry & kOffsetMask;
      if (IsCompressed(entry) || !data) continue;  // compressed, or unallocated/plain zero
      auto drc = stored.Get(data / cs);
      if (!drc.ok()) continue;
      if ((*drc == 1) == ((entry & kFlagCopied) != 0)) continue;
      ++r.corruptions;
      ++w.corruptions;
      const FindingKind kind = repair ? FindingKind::kRepaired : FindingKind::kError;
      Finding f{FindingArea::kCopiedFlags, kind, data / cs,
                fmt::format("{} OFLAG_COPIED data cluster: l2_entry={:x} refcount={}", Word(kind), entry, *drc)};
      if (!repair && !Full(r)) w.findings.push_back(f);
      Note(r, std::move(f));
      if (repair) {
        StoreBe64(p, *drc == 1 ? entry | kFlagCopied : entry & ~kFlagCopied);
        ++dirty;
      }
    }
    if (!dirty) continue;
    if (!PureL2Table(refs, l2, cs)) {
      Note(r, FindingArea::kCopiedFlags, FindingKind::kError,
           "ERROR: Could not write L2 table; metadata overlap check failed: Input/output error");
      ++r.check_errors;
      r.stopped = true;
      return Status::Ok();
    }
    if (!ctx.Write(l2, table).ok()) {
      Note(r, FindingArea::kCopiedFlags, FindingKind::kError, "ERROR: Could not write L2 table: Input/output error");
      ++r.check_errors;
      r.stopped = true;
      return Status::Ok();
    }
    r.corruptions -= dirty;
    r.corruptions_fixed += dirty;
  }
  if (repair) QD_RETURN_IF_ERROR(ctx.file->Sync());
  return Status::Ok();
}

}  // namespace qcow2dedup::check
