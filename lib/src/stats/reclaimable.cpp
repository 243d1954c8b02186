#include "stats/reclaimable.h"

#include <cstring>

#include "dedup/hasher.h"
#include "dedup/index_store.h"
#include "stats/digest_set.h"

namespace qcow2dedup {
namespace {

Result<uint64_t> FromStoredIndex(ImageState& s, bool& loaded) {
  DedupIndex index;
  QD_ASSIGN_OR_RETURN(loaded, LoadIndex(*s.file, s.header, s.file_size, index));
  uint64_t copies = 0;
  index.ForEach([&](const uint8_t* key, uint64_t c) {
    Digest d{};
    std::memcpy(d.data(), key, DedupIndex::kKeyBytes);
    if (index.FindLowest(d) != c) ++copies;
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
  const size_t batch = std::max<size_t>(64, (8u << 20) / cs);
  std::vector<uint8_t> buf(batch * cs);
  std::vector<Digest> digests(batch);
  std::vector<Status> errors(batch);
  for (size_t start = 0; start < clusters.size(); start += batch) {
    const size_t n = std::min(batch, clusters.size() - start);
    ParallelFor(n, 8, [&](size_t k) {
      std::span<uint8_t> c(&buf[k * cs], cs);
      errors[k] = s.file->ReadAt(clusters[start + k] * cs, c);
      digests[k] = Sha256(c);
    });
    for (size_t k = 0; k < n; ++k) {
      QD_RETURN_IF_ERROR(errors[k]);
      if (digests[k] != zero && distinct.Insert(digests[k].data())) ++kept;
    }
    if (progress) progress(start + n, clusters.size());
  }
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
