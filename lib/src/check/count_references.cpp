// The recount's outer structures: header, L1 tables, snapshot table,
// refcount table and blocks. L2 tables and bitmaps have files of their own.
#include <fmt/format.h>

#include <algorithm>

#include "check/references.h"
#include "format/endian.h"

namespace qcow2dedup::check {

namespace {

class OuterWalk {
 public:
  OuterWalk(Context& ctx, CheckReport& r, References& refs) : ctx_(ctx), r_(r), refs_(refs), rc_(ctx, r, refs) {}

  // check_refcounts_l1 for one L1 table that n snapshots (or the active
  // image) share: the L2 tables it names are walked later, once each.
  Status CountL1(uint64_t offset, uint32_t entries, uint64_t n, bool active, const char* kind) {
    if (entries == 0) return Status::Ok();
    rc_.Inc(offset, uint64_t(entries) * 8, n);
    rc_.MarkMeta(offset, uint64_t(entries) * 8, kind, n);
    if (offset >= ctx_.file_size) return Status::Ok();  // all zeros: no entries
    std::vector<uint8_t> raw(std::min<uint64_t>(uint64_t(entries) * 8, (ctx_.file_size - offset + 7) & ~7ull));
    QD_RETURN_IF_ERROR(ctx_.Read(offset, raw));
    const uint64_t cs = ctx_.cs();
    for (uint64_t i = 0; i + 8 <= raw.size(); i += 8) {
      const uint64_t e = LoadBe64(&raw[i]);
      if (!e) continue;
      if (e & kL1ReservedMask) {
        r_.corruptions += n;
        Note(r_, FindingArea::kL1Table, FindingKind::kError,
             fmt::format("ERROR found L1 entry with reserved bits set: {:x}", e));
      }
      const uint64_t l2 = e & kOffsetMask;
      rc_.Inc(l2, cs, n);
      if (l2 % cs) {
        r_.corruptions += n;
        Note(r_, FindingArea::kL1Table, FindingKind::kError,
             fmt::format("ERROR l2_offset={:x}: Table is not cluster aligned; L1 entry corrupted", l2));
        // QEMU walks it all the same. Misaligned tables may overlap one
        // another: only as many as the file could hold side by side.
        if (!refs_.l2_tables.count(l2)) {
          if (l2 >= ctx_.file_size) continue;
          if (misaligned_budget_ < cs) {
            if (!misaligned_refused_) {
              ++r_.check_errors;
              Note(r_, FindingArea::kL1Table, FindingKind::kError,
                   "ERROR misaligned L2 tables beyond what the file can hold are not checked");
            }
            misaligned_refused_ = true;
            continue;
          }
          misaligned_budget_ -= cs;
        }
      } else {
        if (l2 >= ctx_.file_size) continue;  // reads as zeros: nothing to walk
        rc_.MarkMeta(l2, cs, kMetaL2Table, n);
      }
      const bool first_use = !refs_.l2_tables.count(l2);
      L2Use& use = refs_.l2_tables[l2];
      if (first_use) use.guest_base = i / 8 * ctx_.header.l2_span();
      (active ? use.active : use.inactive) += n;
      // The table's findings go here, where QEMU prints them.
      const size_t at = r_.findings.size();
      if (!refs_.l2_walks.empty() && refs_.l2_walks.back().at == at && refs_.l2_walks.back().table == l2)
        refs_.l2_walks.back().times += n;
      else
        refs_.l2_walks.push_back({at, l2, n});
    }
    return Status::Ok();
  }

  Status CountSnapshots() {
    const uint64_t cs = ctx_.cs();
    for (size_t i = 0; i < ctx_.snapshot_incomplete.size(); ++i) {
      if (!ctx_.snapshot_incomplete[i]) continue;
      ++r_.corruptions;
      Note(r_, FindingArea::kSnapshots, FindingKind::kError, fmt::format("ERROR snapshot table entry {} is incomplete", i));
    }
    // Identical snapshot L1 tables are walked once; distinct ones only as far
    // as the file could hold them side by side (a valid image's L1 tables
    // never overlap), which bounds the work a hostile table can ask for.
    std::map<std::pair<uint64_t, uint32_t>, uint64_t> tables;
    for (const Snapshot& s : ctx_.snapshots.snapshots) {
      if (s.l1_offset % cs) {
        Note(r_, FindingArea::kSnapshots, FindingKind::kError, fmt::format("ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot "
                             "table entry corrupted",
                             s.info.id, s.info.name, s.l1_offset));
        ++r_.corruptions;
        continue;
      }
      if (uint64_t(s.l1_size) * 8 > kMaxL1Bytes) {
        Note(r_, FindingArea::kSnapshots, FindingKind::kError, fmt::format("ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry "
                             "corrupted",
                             s.info.id, s.info.name, s.l1_size));
        ++r_.corruptions;
        continue;
      }
      ++tables[{s.l1_offset, s.l1_size}];
    }
    uint64_t budget = ctx_.file_size;
    for (auto& [key, n] : tables) {
      // Only the part inside the file costs a read.
      const uint64_t bytes = uint64_t(key.second) * 8;
      const uint64_t inside = key.first >= ctx_.file_size ? 0 : std::min(bytes, ctx_.file_size - key.first);
      if (inside > budget) {
        ++r_.check_errors;
        Note(r_, FindingArea::kSnapshots, FindingKind::kError, fmt::format("ERROR snapshot L1 tables overlap beyond what the file can hold; the one at {:#x} "
                             "is not checked",
                             key.first));
        continue;
      }
      budget -= inside;
      QD_RETURN_IF_ERROR(CountL1(key.first, key.second, n, false, "a snapshot's L1 table"));
    }
    return Status::Ok();
  }

  Result<std::vector<uint64_t>> ReadRefTable() {
    const Header& h = ctx_.header;
    std::vector<uint8_t> raw(uint64_t(h.reftable_clusters) * ctx_.cs());
    QD_RETURN_IF_ERROR(ctx_.Read(h.reftable_offset, raw));
    std::vector<uint64_t> table(raw.size() / 8);
    for (size_t i = 0; i < table.size(); ++i) table[i] = LoadBe64(&raw[i * 8]);
    return table;
  }

  // check_refblocks: each block is referenced once, by the table, and
  // anything else there means the structure must be rebuilt.
  void CheckRefblocks(const std::vector<uint64_t>& table, RepairMode fix, bool* rebuild) {
    const uint64_t cs = ctx_.cs();
    for (uint64_t i = 0; i < table.size(); ++i) {
      const uint64_t offset = table[i] & kRefTableOffsetBits, cluster = offset / cs;
      if (table[i] & kRefTableReservedMask) {
        Note(r_, FindingArea::kRefcounts, FindingKind::kError,
             fmt::format("ERROR refcount table entry {} has reserved bits set", i));
        ++r_.corruptions;
        *rebuild = true;
        continue;
      }
      if (offset % cs) {
        Note(r_, FindingArea::kRefcounts, FindingKind::kError,
             fmt::format("ERROR refcount block {} is not cluster aligned; refcount table entry corrupted", i));
        ++r_.corruptions;
        *rebuild = true;
        continue;
      }
      if (cluster >= refs_.counts.size()) {
        // QEMU grows the file to hold the block; a rebuild puts it back
        // inside the image instead.
        ++r_.corruptions;
        const FindingKind kind = fix == RepairMode::kAll ? FindingKind::kRepaired : FindingKind::kError;
        Note(r_, FindingArea::kRefcounts, kind, fmt::format("{} refcount block {} is outside image", Word(kind), i));
        if (fix == RepairMode::kAll) *rebuild = true;
        continue;
      }
      if (offset != 0) {
        rc_.Inc(offset, cs);
        if (refs_.counts.Get(cluster) != 1) {
          Note(r_, FindingArea::kRefcounts, FindingKind::kError,
               fmt::format("ERROR refcount block {} refcount={}", i, refs_.counts.Get(cluster)), cluster);
          ++r_.corruptions;
          *rebuild = true;
        }
      }
    }
  }

  void MarkRefblocks(const std::vector<uint64_t>& table) {
    const uint64_t cs = ctx_.cs();
    for (uint64_t e : table) {
      const uint64_t offset = e & kRefTableOffsetBits;
      if (offset && offset % cs == 0 && !(e & kRefTableReservedMask)) rc_.MarkMeta(offset, cs, kMetaRefblock);
    }
  }

  Recount& rc() { return rc_; }

 private:
  Context& ctx_;
  CheckReport& r_;
  References& refs_;
  Recount rc_;
  uint64_t misaligned_budget_ = ctx_.file_size;
  bool misaligned_refused_ = false;
};

}  // namespace

namespace {

Result<References> CountOnce(Context& ctx, CheckReport& r, const CountOptions& o, bool* rebuild,
                             std::vector<L2Fix>* fixes) {
  const Header& h = ctx.header;
  const uint64_t cs = ctx.cs();
  References refs(ctx.FileClusters(), h.max_refcount());
  OuterWalk walk(ctx, r, refs);
  Recount& rc = walk.rc();

  // Metadata first, so that every later step knows what a cluster holds.
  QD_ASSIGN_OR_RETURN(std::vector<uint64_t> reftable, walk.ReadRefTable());
  if (o.refcount_structures) {
    walk.MarkRefblocks(reftable);
    rc.MarkMeta(h.reftable_offset, uint64_t(h.reftable_clusters) * cs, "the refcount table");
  }
  rc.Inc(0, cs);
  rc.MarkMeta(0, cs, "the header");
  QD_RETURN_IF_ERROR(walk.CountL1(h.l1_offset, h.l1_size, 1, true, "the active L1 table"));
  QD_RETURN_IF_ERROR(walk.CountSnapshots());
  rc.Inc(h.snapshots_offset, ctx.snapshots.bytes);
  rc.MarkMeta(h.snapshots_offset, ctx.snapshots.bytes, "the snapshot table");
  if (o.refcount_structures) rc.Inc(h.reftable_offset, uint64_t(h.reftable_clusters) * cs);
  QD_RETURN_IF_ERROR(rc.CountBitmaps());
  QD_RETURN_IF_ERROR(rc.CountL2Tables(fixes));
  PlaceL2Findings(r, refs);
  if (o.refcount_structures) walk.CheckRefblocks(reftable, o.fix, rebuild);
  return refs;
}

void Merge(CheckReport& into, const CheckReport& from) {
  into.check_errors += from.check_errors;
  into.corruptions += from.corruptions;
  into.overlaps += from.overlaps;
  into.leaks += from.leaks;
  into.corruptions_fixed += from.corruptions_fixed;
  into.leaks_fixed += from.leaks_fixed;
  into.allocated_clusters += from.allocated_clusters;
  into.fragmented_clusters += from.fragmented_clusters;
  into.compressed_clusters += from.compressed_clusters;
  NoteAll(into, from);
}

}  // namespace

Result<References> CountReferences(Context& ctx, CheckReport& r, const CountOptions& o, bool* rebuild) {
  std::vector<L2Fix> fixes;
  CheckReport first;
  bool first_rebuild = false;
  QD_ASSIGN_OR_RETURN(References refs, CountOnce(ctx, first, o, &first_rebuild, &fixes));
  uint64_t applied = 0;
  if (o.fix == RepairMode::kAll && !fixes.empty()) {
    QD_ASSIGN_OR_RETURN(applied, ApplyL2Fixes(ctx, refs, fixes, r));
  }
  if (!applied) {
    Merge(r, first);
    *rebuild |= first_rebuild;
    return refs;
  }
  // The mended entries no longer reference anything: count again.
  fixes.clear();
  return CountOnce(ctx, r, o, rebuild, &fixes);
}

}  // namespace qcow2dedup::check
