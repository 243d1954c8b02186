// The recount: every reference to every host cluster, from the header, the
// L1 and L2 tables (active and snapshots), the snapshot table, the refcount
// structures and persistent bitmaps, in the manner of QEMU's
// calculate_refcounts() (block/qcow2-refcount.c).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "check/context.h"

namespace qcow2dedup::check {

// One counter a host cluster. Sized by the file (plus the partial cluster
// QEMU tolerates at its end), never by a number read from the image.
class ReferenceCounts {
 public:
  ReferenceCounts(uint64_t clusters, uint64_t max_refcount);

  uint64_t size() const { return counts_.size(); }
  uint64_t Get(uint64_t c) const { return c < counts_.size() ? counts_[c] : 0; }
  // Adds n references and returns how many did not fit: QEMU counts in the
  // image's own refcount width and calls every step past its maximum an
  // overflow.
  uint64_t Add(uint64_t c, uint64_t n);
  void Set(uint64_t c, uint64_t v);
  // One past the highest cluster with a reference (0 if none).
  uint64_t End() const;

 private:
  std::vector<uint32_t> counts_;
  uint64_t max_;
};

// Kinds compared by address: one array each (literals may not be merged).
extern const char kMetaL2Table[];
extern const char kMetaRefblock[];

// What lives in a metadata cluster, to tell sharing that the format allows
// (an L2 table in several L1 tables) from an overlap.
struct MetaCluster {
  const char* kind;
  uint64_t expected = 0;  // references the metadata itself accounts for
  bool mixed = false;     // two kinds of metadata claim the cluster
};

// How many L1 entries point at an L2 table: the active L1 table's entries
// count towards the allocation statistics, the snapshots' do not.
struct L2Use {
  uint64_t active = 0, inactive = 0;
  // The guest offset of the table's first entry in the first L1 table that
  // names it (the active one's, walked first, if it does): where a finding
  // about guest data points the reader.
  uint64_t guest_base = 0;
};

// Where QEMU would walk an L2 table (right after the L1 entry that names
// it, times times in a row): the table's findings go in at that point of
// the report's findings. Each table is walked once here, for all its uses.
struct L2Walk {
  size_t at;  // index into the findings
  uint64_t table, times;
};

struct References {
  explicit References(uint64_t clusters, uint64_t max_refcount) : counts(clusters, max_refcount) {}
  ReferenceCounts counts;
  std::map<uint64_t, MetaCluster> meta;  // host cluster -> metadata there
  std::map<uint64_t, L2Use> l2_tables;   // L2 table offset -> its uses
  std::vector<L2Walk> l2_walks;          // in QEMU's order
  std::map<uint64_t, std::vector<Finding>> l2_findings;  // L2 table offset -> what one walk of it finds
  // Host clusters of uncompressed guest data in the active L2 tables.
  std::vector<uint64_t> active_data;
  // ... and those only the snapshots' L2 tables reference.
  std::vector<uint64_t> snapshot_data;
  // Compressed guest data, one per distinct descriptor (the L2 entry without
  // COPIED), with the first guest offset that reads it; in the active L2
  // tables, and in the snapshots' only.
  struct Compressed {
    uint64_t descriptor, guest_offset;
  };
  std::vector<Compressed> active_compressed, snapshot_compressed;
};

// Whether repair may rewrite the L2 table at offset: nothing else lives in
// its cluster, neither other metadata nor guest data.
inline bool PureL2Table(const References& refs, uint64_t offset, uint64_t cs) {
  auto it = refs.meta.find(offset / cs);
  return offset % cs == 0 && it != refs.meta.end() && it->second.kind == kMetaL2Table && !it->second.mixed &&
         refs.counts.Get(offset / cs) <= it->second.expected;
}

struct CountOptions {
  RepairMode fix = RepairMode::kNone;
  // False leaves the refcount table and blocks out: a rebuild replaces them.
  bool refcount_structures = true;
};

// Recounts into a fresh References; findings go to r. Sets *rebuild when
// the refcount structure itself is broken (QEMU then rebuilds it).
Result<References> CountReferences(Context& ctx, CheckReport& r, const CountOptions& o, bool* rebuild);

// An L2 entry that repair can mend in place (QEMU mends the misaligned
// preallocated zero cluster; we also drop COPIED from compressed entries).
struct L2Fix {
  uint64_t table, index;
  uint64_t entry, bitmap;
  std::string message;  // the "Repairing ..." line
};

// Mends the entries of fixes in place where nothing but the L2 table itself
// lives in its cluster; returns how many it mended.
Result<uint64_t> ApplyL2Fixes(Context& ctx, const References& refs, const std::vector<L2Fix>& fixes,
                              CheckReport& r);

// Internals of the recount, one file each.
class Recount {
 public:
  Recount(Context& ctx, CheckReport& r, References& refs) : ctx_(ctx), r_(r), refs_(refs), notes_(&r) {}
  // qcow2_inc_refcounts_imrt: n references to every cluster [offset, offset+size) touches.
  void Inc(uint64_t offset, uint64_t size, uint64_t n = 1);
  void MarkMeta(uint64_t offset, uint64_t size, const char* kind, uint64_t n = 1);
  // Walks every L2 table once; entries it could mend go to fixes.
  Status CountL2Tables(std::vector<L2Fix>* fixes);
  Status CountBitmaps();

 private:
  Status CountL2Table(uint64_t offset, const L2Use& use, std::vector<L2Fix>* fixes);
  Context& ctx_;
  CheckReport& r_;  // the counts
  References& refs_;
  CheckReport* notes_;  // the findings: r_, or the findings of the L2 table being walked
};

// Puts each L2 table's findings into r's findings where QEMU prints them
// (refs.l2_walks), as often as QEMU walks the table.
void PlaceL2Findings(CheckReport& r, const References& refs);

}  // namespace qcow2dedup::check
