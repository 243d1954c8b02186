#include "dedup/hash_clusters.h"

#include <algorithm>
#include <vector>

#include "dedup/hasher.h"

namespace qcow2dedup {
namespace {

// A run of clusters that lie side by side in the file: one read for all of
// them (a small cluster read alone costs a system call for 4 KiB).
struct Piece {
  size_t first;  // index into the batch
  size_t count;
};

}  // namespace

Status HashClusters(File& file, uint64_t cs, std::span<const uint64_t> clusters, const ProgressFn& progress,
                    const std::function<void(uint64_t, const Digest&)>& done) {
  const size_t batch = std::max<size_t>(64, (8u << 20) / cs);
  const size_t per_piece = std::max<size_t>(1, (1u << 20) / cs);  // pieces of 1 MiB: both cores get work
  std::vector<uint8_t> buf(std::min(batch, clusters.size()) * cs);
  std::vector<Digest> digests(batch);
  std::vector<Piece> pieces;
  std::vector<Status> errors;
  for (size_t start = 0; start < clusters.size(); start += batch) {
    const size_t n = std::min(batch, clusters.size() - start);
    pieces.clear();
    for (size_t k = 0; k < n; ++k) {
      if (!pieces.empty()) {
        Piece& p = pieces.back();
        if (p.count < per_piece && clusters[start + k] == clusters[start + p.first + p.count - 1] + 1) {
          ++p.count;
          continue;
        }
      }
      pieces.push_back({k, 1});
    }
    errors.assign(pieces.size(), Status::Ok());
    ParallelFor(pieces.size(), 1, [&](size_t i) {
      const Piece& p = pieces[i];
      std::span<uint8_t> bytes(&buf[p.first * cs], p.count * cs);
      errors[i] = file.ReadAt(clusters[start + p.first] * cs, bytes);
      for (size_t k = p.first; k < p.first + p.count; ++k) digests[k] = Sha256(std::span(&buf[k * cs], cs));
    });
    for (const Status& e : errors) QD_RETURN_IF_ERROR(e);
    for (size_t k = 0; k < n; ++k) done(clusters[start + k], digests[k]);
    if (progress) progress(start + n, clusters.size());
  }
  return Status::Ok();
}

}  // namespace qcow2dedup
