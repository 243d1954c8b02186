// Metadata must have its cluster to itself. QEMU's check notices an overlap
// only as a refcount that is too low, and its repair raises the refcount,
// which leaves guest data on top of a table; we report the overlap as long
// as it exists and move the guest data away.
#include <fmt/format.h>

#include <algorithm>
#include <map>

#include "check/fresh_clusters.h"
#include "check/passes.h"
#include "format/endian.h"
#include "format/entries.h"

namespace qcow2dedup::check {
namespace {

bool Overlapped(const References& refs, uint64_t c, const MetaCluster& m) {
  return m.mixed || refs.counts.Get(c) > m.expected;
}

}  // namespace

Status ReportOverlaps(const References& refs, StoredRefcounts& stored, CheckReport& r) {
  for (const auto& [c, m] : refs.meta) {
    // A refcount block's overlaps are check_refblocks' findings already.
    if (m.kind == kMetaRefblock || !Overlapped(refs, c, m)) continue;
    auto rc = stored.Get(c);
    const uint64_t counted = refs.counts.Get(c);
    const bool qemu_sees_it = rc.ok() && *rc < counted;
    Note(r, FindingArea::kOverlaps, FindingKind::kError,
         fmt::format("ERROR cluster {}: {} shares its cluster with other {} (reference={})", c, m.kind,
                     m.mixed ? "metadata" : "data", counted),
         c);
    if (!qemu_sees_it) ++r.overlaps;
  }
  return Status::Ok();
}

namespace {

struct Move {
  uint64_t table, index, entry;
  uint64_t first, last;  // the host clusters the entry's data touches
};

// Whether nothing but L2-table metadata claims the table's cluster, so that
// it may be rewritten once the data that points into it has moved.
bool L2Only(const References& refs, uint64_t table, uint64_t cs) {
  auto it = refs.meta.find(table / cs);
  return table % cs == 0 && it != refs.meta.end() && it->second.kind == kMetaL2Table && !it->second.mixed;
}

}  // namespace

Result<uint64_t> MoveDataOffMetadata(Context& ctx, const References& refs, StoredRefcounts& stored,
                                     FreshClusters& fresh, CheckReport& r) {
  const Header& h = ctx.header;
  const uint64_t cs = ctx.cs();
  const uint32_t bits = ctx.bits();
  // A refcount block that shares its cluster is no reason to move data:
  // the refcount structure is rebuilt elsewhere instead, and the pointer
  // to the block may well be the damaged one.
  auto on_metadata = [&](uint64_t c) {
    auto it = refs.meta.find(c);
    return it != refs.meta.end() && it->second.kind != kMetaRefblock && Overlapped(refs, c, it->second);
  };

  // Every data entry on metadata, in tables that only L2 metadata claims.
  std::vector<Move> moves;
  std::vector<uint8_t> table(cs);
  for (const auto& [l2, use] : refs.l2_tables) {
    (void)use;
    if (!L2Only(refs, l2, cs)) continue;
    QD_RETURN_IF_ERROR(ctx.Read(l2, table));
    for (uint64_t j = 0; j < h.l2_entries(); ++j) {
      const uint64_t e = LoadBe64(&table[j * h.l2_entry_bytes()]);
      Move m{l2, j, e, 0, 0};
      if (IsCompressed(e)) {
        const CompressedDescriptor d = DecodeCompressed(e, bits);
        if (d.offset + d.bytes > ctx.file_size) continue;  // nothing there to move
        m.first = FirstHostCluster(d, bits);
        m.last = LastHostCluster(d, bits);
      } else {
        const uint64_t offset = e & kOffsetMask;
        if (!offset || offset % cs) continue;
        m.first = m.last = offset / cs;
      }
      bool hit = false;
      for (uint64_t c = m.first; c <= m.last && !hit; ++c) hit = on_metadata(c);
      if (hit) moves.push_back(m);
    }
  }
  // A table is rewritten only if all the data on it moves too: otherwise
  // an entry left behind would read the rewritten bytes. Dropping one
  // table's moves can spoil another's, hence the loop.
  for (bool changed = true; changed;) {
    changed = false;
    std::map<uint64_t, uint64_t> moving;  // cluster -> references moving off it
    for (const Move& m : moves)
      for (uint64_t c = m.first; c <= m.last; ++c) ++moving[c];
    std::vector<Move> kept;
    for (const Move& m : moves) {
      const uint64_t t = m.table / cs;
      auto it = refs.meta.find(t);
      const bool safe = refs.counts.Get(t) <= it->second.expected + moving[t];
      if (safe) kept.push_back(m);
      else changed = true;
    }
    moves = std::move(kept);
  }
  if (moves.empty()) return uint64_t(0);

  // Copies first, from the bytes as they are now; then the tables.
  std::vector<uint8_t> data;
  std::map<uint64_t, std::vector<std::pair<uint64_t, uint64_t>>> rewrites;  // table -> (index, entry)
  for (const Move& m : moves) {
    uint64_t entry;
    if (IsCompressed(m.entry)) {
      const CompressedDescriptor d = DecodeCompressed(m.entry, bits);
      QD_ASSIGN_OR_RETURN(uint64_t c, fresh.Take((d.bytes + cs - 1) / cs));
      data.resize(d.bytes);
      QD_RETURN_IF_ERROR(ctx.Read(d.offset, data));
      QD_RETURN_IF_ERROR(ctx.Write(c * cs, data));
      entry = EncodeCompressed(c * cs, d.bytes, bits);
      Note(r, FindingArea::kOverlaps, FindingKind::kRepaired,
           fmt::format("Repairing L2 entry {:x}: compressed guest data on metadata moved to cluster {}", m.entry,
                          c));
    } else if (!h.extended_l2() && (m.entry & kFlagZero)) {
      entry = kFlagZero;  // reads as zero: no data to keep
      Note(r, FindingArea::kOverlaps, FindingKind::kRepaired,
           fmt::format("Repairing L2 entry {:x}: a preallocated zero cluster on metadata becomes a plain one",
                          m.entry));
    } else {
      QD_ASSIGN_OR_RETURN(uint64_t c, fresh.Take(1));
      data.resize(cs);
      QD_RETURN_IF_ERROR(ctx.Read(m.first * cs, data));
      QD_RETURN_IF_ERROR(ctx.Write(c * cs, data));
      entry = (c * cs) | kFlagCopied;
      Note(r, FindingArea::kOverlaps, FindingKind::kRepaired,
           fmt::format("Repairing L2 entry {:x}: guest data on metadata cluster {} moved to cluster {}", m.entry,
                          m.first, c));
    }
    rewrites[m.table].emplace_back(m.index, entry);
  }
  QD_RETURN_IF_ERROR(stored.Flush());
  QD_RETURN_IF_ERROR(ctx.file->Sync());
  for (const auto& [l2, entries] : rewrites) {
    QD_RETURN_IF_ERROR(ctx.Read(l2, table));
    for (const auto& [j, entry] : entries) StoreBe64(&table[j * h.l2_entry_bytes()], entry);
    QD_RETURN_IF_ERROR(ctx.Write(l2, table));
  }
  QD_RETURN_IF_ERROR(ctx.file->Sync());
  r.corruptions_fixed += moves.size();
  return uint64_t(moves.size());
}

}  // namespace qcow2dedup::check
