#include "dedup/hash_clusters.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <thread>
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

// Asks for clusters to be read in, a run of adjacent ones at a time.
void Prefetch(File& file, uint64_t cs, std::span<const uint64_t> clusters) {
  for (size_t k = 0; k < clusters.size();) {
    size_t run = 1;
    while (k + run < clusters.size() && clusters[k + run] == clusters[k] + run) ++run;
    file.Prefetch(clusters[k] * cs, run * cs);
    k += run;
  }
}

}  // namespace

Status HashClusters(File& file, uint64_t cs, std::span<const uint64_t> clusters, const ProgressFn& progress,
                    const std::function<void(uint64_t, const Digest&)>& done, Caching caching) {
  // A batch ends with a wait for its slowest piece, so it must be long
  // beside one piece's time. Direct reads go to the disk as they are asked:
  // larger ones, and four threads a core (most of them waiting on the disk
  // at any time), keep it streaming and both cores hashing. Cached reads
  // have the kernel's readahead for that.
  const bool uncached = caching == Caching::kBypass;
  const size_t batch = std::max<size_t>(64, ((uncached ? 256u : 64u) << 20) / cs);
  const size_t per_piece = std::max<size_t>(1, ((uncached ? 2u : 1u) << 20) / cs);
  const unsigned threads = HashThreads() * (uncached ? 4 : 1);
  // One piece each, aligned for direct reads.
  const size_t buf_bytes = per_piece * cs;
  std::vector<std::unique_ptr<uint8_t[], decltype(&std::free)>> bufs;
  for (unsigned t = 0; t < threads; ++t) {
    bufs.emplace_back(static_cast<uint8_t*>(std::aligned_alloc(4096, (buf_bytes + 4095) / 4096 * 4096)), &std::free);
    if (!bufs.back()) return Status::IOError("out of memory for hashing buffers");
  }
  std::vector<Digest> digests(std::min(batch, clusters.size()));
  std::vector<Piece> pieces;
  std::vector<Status> errors;
  if (!uncached) Prefetch(file, cs, clusters.first(std::min(batch, clusters.size())));
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
    // The next batch is read ahead while this one is hashed: on a cold cache
    // the barrier at a batch's end would otherwise leave the disk idle.
    if (!uncached) Prefetch(file, cs, clusters.subspan(start + n, std::min(batch, clusters.size() - start - n)));
    // Each thread takes the next piece when done with one: pieces differ in
    // size (a run of 1 MiB, a lone cluster), so a fixed split would leave a
    // core idle.
    std::atomic<size_t> next{0};
    auto work = [&](unsigned t) {
      for (size_t i; (i = next.fetch_add(1)) < pieces.size();) {
        const Piece& p = pieces[i];
        const std::span<uint8_t> buf(bufs[t].get(), p.count * cs);
        const uint64_t at = clusters[start + p.first] * cs;
        errors[i] = uncached ? file.ReadUncached(at, buf) : file.ReadAt(at, buf);
        if (!errors[i].ok()) continue;
        for (size_t k = 0; k < p.count; ++k) digests[p.first + k] = Sha256(std::span(&buf[k * cs], cs));
      }
    };
    const unsigned helpers = unsigned(std::min<size_t>(threads, pieces.size())) - 1;
    std::vector<std::thread> pool;
    for (unsigned t = 1; t <= helpers; ++t) pool.emplace_back(work, t);
    work(0);
    for (std::thread& th : pool) th.join();
    for (const Status& e : errors) QD_RETURN_IF_ERROR(e);
    for (size_t k = 0; k < n; ++k) done(clusters[start + k], digests[k]);
    if (progress) progress(start + n, clusters.size());
  }
  return Status::Ok();
}

}  // namespace qcow2dedup
