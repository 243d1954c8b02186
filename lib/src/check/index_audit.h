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
  std::array<uint8_t, 20> key;  // the first 160 bits of its SHA-256: duplicates are counted by them
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

// The compressed guest data: each distinct descriptor of the L2 tables
// (active and the snapshots') decompressed and hashed once, on every core.
struct HashedCompressed {
  std::vector<std::array<uint8_t, 20>> active;  // the active L2 tables' copies that decompress
  uint64_t bad = 0;                             // copies that do not (any L2 table's)
};

// A copy that does not decompress is an error finding in notes, naming its
// host and guest offsets. Past the end of the file it reads zeros, as QEMU.
Result<HashedCompressed> HashCompressedData(Context& ctx, const References& refs, const ProgressFn& progress,
                                            CheckReport& notes);

// Fills d; what is wrong with an in-sync index goes to notes' findings.
// Duplicates are counted over both kinds of copies.
Status AuditIndex(Context& ctx, const std::vector<HashedCluster>& hashed, const HashedCompressed& compressed,
                  DedupFindings& d, CheckReport& notes);

// An error of AuditIndex's, worded as qemu-img words a mended one
// ("Repairing ..."), for when the index has been rebuilt; other findings
// are returned as they are.
Finding Mended(Finding f);

// Writes a fresh index from hashed past the last cluster with a refcount
// (where QEMU sees only free space), then the header that vouches for it.
Status SaveRebuiltIndex(Context& ctx, const std::vector<HashedCluster>& hashed, StoredRefcounts& stored);

}  // namespace qcow2dedup::check
