#include "dedup/hash_clusters.h"

#include <algorithm>
#include <vector>

#include "dedup/hasher.h"

namespace qcow2dedup {

Status HashClusters(File& file, uint64_t cs, std::span<const uint64_t> clusters, const ProgressFn& progress,
                    const std::function<void(uint64_t, const Digest&)>& done) {
  const size_t batch = std::max<size_t>(64, (8u << 20) / cs);
  std::vector<uint8_t> buf(std::min(batch, clusters.size()) * cs);
  std::vector<Digest> digests(batch);
  std::vector<Status> errors(batch);
  for (size_t start = 0; start < clusters.size(); start += batch) {
    const size_t n = std::min(batch, clusters.size() - start);
    ParallelFor(n, 8, [&](size_t k) {
      std::span<uint8_t> c(&buf[k * cs], cs);
      errors[k] = file.ReadAt(clusters[start + k] * cs, c);
      digests[k] = Sha256(c);
    });
    for (size_t k = 0; k < n; ++k) {
      QD_RETURN_IF_ERROR(errors[k]);
      done(clusters[start + k], digests[k]);
    }
    if (progress) progress(start + n, clusters.size());
  }
  return Status::Ok();
}

}  // namespace qcow2dedup
