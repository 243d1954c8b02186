#include "stats/reclaimable.h"

#include <cstring>

#include "dedup/hash_clusters.h"
#include "dedup/index_table.h"
#include "stats/digest_set.h"

namespace qcow2dedup {
namespace {

Result<uint64_t> FromStoredIndex(ImageState& s, bool& loaded) {
  DedupIndex index;
  QD_ASSIGN_OR_RETURN(loaded, ReadIndexTable(*s.file, s.header, s.file_size, index));
  uint64_t copies = 0;
  // By fingerprint: two data sharing one are counted as copies, which at
  // 40 bits is a handful in a billion clusters (an estimate, not a link).
  index.ForEach([&](Fingerprint f, uint64_t c) {
    if (index.FindLowest(f) != c) ++copies;
  });
  return copies;
}

Result<uint64_t> ByHashing(ImageState& s, const HostReferences& refs, const ProgressFn& progress) {
  const uint64_t cs = s.cs();
  std::vector<uint64_t> clusters;
  refs.ForEach([&](uint64_t c, uint64_t) { clusters.push_back(c); });
  const Digest zero = Sha256(std::vector<uint8_t>(cs, 0));
  DigestSet distinct;
  uint64_t kept = 0;
  QD_RETURN_IF_ERROR(HashClusters(*s.file, cs, clusters, progress, [&](uint64_t, const Digest& d) {
    if (d != zero && distinct.Insert(d.data())) ++kept;
  }));
  return clusters.size() - kept;
}

}  // namespace

Result<uint64_t> CountReclaimable(ImageState& s, const HostReferences& refs, const ProgressFn& progress) {
  if (s.header.dedup_in_sync()) {
    bool loaded = false;
    QD_ASSIGN_OR_RETURN(uint64_t copies, FromStoredIndex(s, loaded));
    if (loaded) return copies;
  }
  return ByHashing(s, refs, progress);
}

}  // namespace qcow2dedup
