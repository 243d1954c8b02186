// The steps of one check pass, in the order of QEMU's
// qcow2_check_refcounts(): recount, compare, rebuild or fix, COPIED flags.
#pragma once

#include <cstdint>

#include "check/context.h"
#include "check/fresh_clusters.h"
#include "check/references.h"
#include "check/stored_refcounts.h"

namespace qcow2dedup::check {

// compare_refcounts: stored against counted for every cluster the file
// holds. Sets *rebuild when a referenced cluster has refcount 0 (there may
// be no block to fix it in) and *highest to the last cluster in use.
Status CompareRefcounts(Context& ctx, const References& refs, StoredRefcounts& stored, CheckReport& r,
                        RepairMode fix, bool* rebuild, uint64_t* highest);

// Zeroes refcounts of clusters past the end of the file (nb clusters):
// QEMU neither reports nor uses them, but they would stand in the way of
// allocations past the end.
Status DropRefcountsPastEnd(Context& ctx, uint64_t nb, StoredRefcounts& stored, CheckReport& r);

// rebuild_refcount_structure: a new refcount table and blocks, written from
// counts past the last cluster in use; the old ones are left unreferenced.
Status RebuildRefcounts(Context& ctx, References& counts, uint64_t first_free, CheckReport& r);

// check_oflag_copied: COPIED in the active L1 and L2 tables against the
// stored refcounts (which by now are repaired, if repair was asked for).
Status CheckCopiedFlags(Context& ctx, const References& refs, StoredRefcounts& stored, CheckReport& r,
                        RepairMode fix);

// Metadata that shares its cluster with other metadata or with guest data.
// QEMU only notices when the refcount is too low; this finds it always.
Status ReportOverlaps(const References& refs, StoredRefcounts& stored, CheckReport& r);

// Moves guest data that sits on metadata to fresh clusters (the guest reads
// the same bytes afterwards); returns how many L2 entries it moved.
Result<uint64_t> MoveDataOffMetadata(Context& ctx, const References& refs, StoredRefcounts& stored,
                                     FreshClusters& fresh, CheckReport& r);

// Writes the snapshot table anew when entries lack the extra data version 3
// requires; returns how many entries it completed.
Result<uint64_t> RewriteSnapshotTable(Context& ctx, StoredRefcounts& stored, FreshClusters& fresh, CheckReport& r);

struct PassResult {
  CheckReport report;
  References refs;  // the counts the pass ended with
  // Only a rebuild of the refcount structure can mend it (-r all).
  bool needs_rebuild = false;
};

// One whole pass; fix says what it may repair.
Result<PassResult> RunPass(Context& ctx, RepairMode fix);

}  // namespace qcow2dedup::check
