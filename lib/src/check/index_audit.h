// The dedup index against the data it describes. QEMU knows nothing of it;
// a wrong entry is what would make our writer link new guest data to a
// cluster holding something else, so an index the header vouches for (the
// in-sync autoclear bit) must match the data exactly. An index out of sync
// is not an error: the next writer rebuilds it before trusting it.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "check/context.h"
#include "check/references.h"
#include "check/stored_refcounts.h"
#include "qcow2dedup/image.h"

namespace qcow2dedup::check {

struct HashedCluster {
  uint64_t cluster;
  std::array<uint8_t, 20> key;  // the index keeps the first 160 bits of SHA-256
  // In the active L2 tables; else only a snapshot's. The writer keeps an
  // entry for such a cluster (it was active when stored, and may be shared
  // again); it needs none.
  bool active = true;
};

// Hashes every uncompressed data cluster of the L2 tables (active and the
// snapshots') that lies in the file and holds no metadata, on every core;
// ascending by cluster.
Result<std::vector<HashedCluster>> HashDataClusters(Context& ctx, const References& refs,
                                                    const ProgressFn& progress);

// Fills d; what is wrong with an in-sync index goes to notes' findings.
Status AuditIndex(Context& ctx, const std::vector<HashedCluster>& hashed, DedupFindings& d, CheckReport& notes);

// An error of AuditIndex's, worded as qemu-img words a mended one
// ("Repairing ..."), for when the index has been rebuilt; other findings
// are returned as they are.
Finding Mended(Finding f);

// Writes a fresh index from hashed past the last cluster with a refcount
// (where QEMU sees only free space), then the header that vouches for it.
Status SaveRebuiltIndex(Context& ctx, const std::vector<HashedCluster>& hashed, StoredRefcounts& stored);

}  // namespace qcow2dedup::check
