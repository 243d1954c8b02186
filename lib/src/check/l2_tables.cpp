// The recount's L2 step, as QEMU's check_refcounts_l2(): each table is read
// once however many L1 entries name it, and what it finds counts as often
// as QEMU, which walks it once per L1 entry, would count it.
#include <fmt/format.h>

#include <algorithm>

#include "check/references.h"
#include "format/endian.h"
#include "format/entries.h"

namespace qcow2dedup::check {

Status Recount::CountL2Tables(std::vector<L2Fix>* fixes) {
  for (const auto& [offset, use] : refs_.l2_tables) QD_RETURN_IF_ERROR(CountL2Table(offset, use, fixes));
  auto& data = refs_.active_data;
  std::sort(data.begin(), data.end());
  data.erase(std::unique(data.begin(), data.end()), data.end());
  auto& old = refs_.snapshot_data;
  std::sort(old.begin(), old.end());
  old.erase(std::unique(old.begin(), old.end()), old.end());
  std::vector<uint64_t> only_old;
  std::set_difference(old.begin(), old.end(), data.begin(), data.end(), std::back_inserter(only_old));
  old = std::move(only_old);

  // The same for compressed data, by descriptor; each keeps its lowest
  // guest offset.
  using C = References::Compressed;
  auto by_descriptor = [](const C& a, const C& b) {
    return a.descriptor != b.descriptor ? a.descriptor < b.descriptor : a.guest_offset < b.guest_offset;
  };
  auto same = [](const C& a, const C& b) { return a.descriptor == b.descriptor; };
  for (auto* v : {&refs_.active_compressed, &refs_.snapshot_compressed}) {
    std::sort(v->begin(), v->end(), by_descriptor);
    v->erase(std::unique(v->begin(), v->end(), same), v->end());
  }
  const auto& live = refs_.active_compressed;
  std::erase_if(refs_.snapshot_compressed, [&](const C& c) {
    return std::binary_search(live.begin(), live.end(), C{c.descriptor, 0},
                              [](const C& a, const C& b) { return a.descriptor < b.descriptor; });
  });
  return Status::Ok();
}

Status Recount::CountL2Table(uint64_t l2, const L2Use& use, std::vector<L2Fix>* fixes) {
  const Header& h = ctx_.header;
  const uint64_t cs = ctx_.cs();
  const uint64_t n = use.active + use.inactive, a = use.active;
  const bool ext = h.extended_l2();
  const uint32_t eb = h.l2_entry_bytes();
  std::vector<uint8_t> table(cs);
  QD_RETURN_IF_ERROR(ctx_.Read(l2, table));
  CheckReport found;
  notes_ = &found;
  struct Restore {
    Recount* rc;
    CheckReport* r;
    ~Restore() { rc->notes_ = r; }
  } restore{this, &r_};

  // Allocation statistics come from the active walks only.
  uint64_t next_contiguous = 0;
  for (uint64_t i = 0; i < h.l2_entries(); ++i) {
    const uint8_t* p = &table[i * eb];
    const uint64_t e = LoadBe64(p);
    const uint64_t bitmap = ext ? LoadBe64(p + 8) : 0;
    const bool compressed = IsCompressed(e);

    if (!compressed && (e & kL2ReservedMask)) {
      r_.corruptions += n;
      Note(*notes_, FindingArea::kL2Tables, FindingKind::kError, fmt::format("ERROR found l2 entry with reserved bits set: {:x}", e));
    }

    if (compressed) {
      const CompressedDescriptor d = DecodeCompressed(e, h.cluster_bits);
      if (e & kFlagCopied) {
        r_.corruptions += n;
        Note(*notes_, FindingArea::kL2Tables, FindingKind::kError, fmt::format("ERROR: coffset={:#x}: copied flag must never be set for compressed clusters", d.offset));
        fixes->push_back({l2, i, e & ~kFlagCopied, bitmap,
                          fmt::format("Repairing coffset={:#x}: copied flag must never be set for compressed clusters",
                                      d.offset)});
      }
      if (bitmap) {
        r_.corruptions += n;
        Note(*notes_, FindingArea::kL2Tables, FindingKind::kError, fmt::format("ERROR compressed cluster {} with non-zero subcluster allocation bitmap, entry={:#x}",
                             i, e));
        continue;
      }
      Inc(d.offset, d.bytes, n);
      (a ? refs_.active_compressed : refs_.snapshot_compressed)
          .push_back({e & ~kFlagCopied, use.guest_base + i * cs});
      // Compressed clusters are fragmented by nature (QEMU's words).
      r_.allocated_clusters += a;
      r_.compressed_clusters += a;
      r_.fragmented_clusters += a;
      continue;
    }

    const bool zero_flag = !ext && (e & kFlagZero);
    const uint64_t offset = e & kOffsetMask;
    if (offset == 0) {
      if (!zero_flag && (bitmap & kAllSubclustersAllocated)) {
        r_.corruptions += n;
        Note(*notes_, FindingArea::kL2Tables, FindingKind::kError, "ERROR: Unallocated cluster has non-zero subcluster allocation map");
      }
      continue;
    }

    // A standard cluster, or a preallocated zero cluster.
    if ((bitmap >> 32) & bitmap) {
      r_.corruptions += n;
      Note(*notes_, FindingArea::kL2Tables, FindingKind::kError, fmt::format("ERROR offset={:x}: Allocated cluster has corrupted subcluster allocation bitmap", offset));
    }
    if (offset % cs) {
      r_.corruptions += n;
      const bool contains_data = ext ? (bitmap & kAllSubclustersAllocated) != 0 : !zero_flag;
      if (!contains_data) {
        Note(*notes_, FindingArea::kL2Tables, FindingKind::kError, fmt::format("ERROR offset={:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                             offset));
        // Reads as zero either way: a plain zero entry loses nothing.
        const uint64_t zero_bitmap = (bitmap | (bitmap << 32)) & ~kAllSubclustersAllocated;
        fixes->push_back({l2, i, ext ? 0 : kFlagZero, ext ? zero_bitmap : 0,
                          fmt::format("Repairing offset={:x}: Preallocated cluster is not properly aligned; L2 entry "
                                      "corrupted.",
                                      offset)});
      } else {
        Note(*notes_, FindingArea::kL2Tables, FindingKind::kError, fmt::format("ERROR offset={:x}: Data cluster is not properly aligned; L2 entry corrupted.", offset));
      }
    }
    if (a) {
      r_.allocated_clusters += a;
      if (next_contiguous && offset != next_contiguous) r_.fragmented_clusters += a;
      next_contiguous = offset + cs;
    }
    Inc(offset, cs, n);
    if (!zero_flag && offset % cs == 0 && offset < ctx_.file_size)
      (a ? refs_.active_data : refs_.snapshot_data).push_back(offset / cs);
  }
  if (!found.findings.empty()) refs_.l2_findings[l2] = std::move(found.findings);
  return Status::Ok();
}

void PlaceL2Findings(CheckReport& r, const References& refs) {
  if (refs.l2_findings.empty()) return;
  CheckReport placed;
  size_t from = 0;
  auto copy_until = [&](size_t end) {
    for (; from < end && from < r.findings.size(); ++from)
      if (!IsOverflowNote(r.findings[from])) Note(placed, r.findings[from]);
  };
  for (const L2Walk& w : refs.l2_walks) {
    copy_until(w.at);
    auto it = refs.l2_findings.find(w.table);
    if (it == refs.l2_findings.end()) continue;
    for (uint64_t t = 0; t < w.times && !Full(placed); ++t)
      for (const Finding& f : it->second) Note(placed, f);
  }
  copy_until(r.findings.size());
  r.findings = std::move(placed.findings);
}

// Mends the entries that can be mended in place, where nothing but the L2
// table itself lives in its cluster (the counts are whole by now).
Result<uint64_t> ApplyL2Fixes(Context& ctx, const References& refs, const std::vector<L2Fix>& fixes,
                              CheckReport& r) {
  const Header& h = ctx.header;
  const uint64_t cs = ctx.cs();
  uint64_t applied = 0;
  std::vector<uint8_t> table(cs);
  for (size_t i = 0; i < fixes.size();) {
    const uint64_t l2 = fixes[i].table;
    size_t end = i;
    while (end < fixes.size() && fixes[end].table == l2) ++end;
    if (PureL2Table(refs, l2, cs)) {
      QD_RETURN_IF_ERROR(ctx.Read(l2, table));
      for (size_t k = i; k < end; ++k) {
        uint8_t* p = &table[fixes[k].index * h.l2_entry_bytes()];
        StoreBe64(p, fixes[k].entry);
        if (h.extended_l2()) StoreBe64(p + 8, fixes[k].bitmap);
        Note(r, FindingArea::kL2Tables, FindingKind::kRepaired, fixes[k].message);
        ++r.corruptions_fixed;
        ++applied;
      }
      QD_RETURN_IF_ERROR(ctx.Write(l2, table));
    }
    i = end;
  }
  if (applied) QD_RETURN_IF_ERROR(ctx.file->Sync());
  return applied;
}

}  // namespace qcow2dedup::check
