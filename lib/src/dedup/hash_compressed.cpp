#include "dedup/hash_compressed.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "dedup/hasher.h"
#include "format/compression.h"
#include "format/entries.h"

namespace qcow2dedup {
namespace {

struct Fragment {
  uint64_t descriptor;
  uint64_t offset, bytes;  // what to read
};

// Neighbouring fragments read at once: [begin, end) of the file for
// fragments [first, first + count) of the batch.
struct Piece {
  uint64_t begin, end;
  size_t first, count;
};

}  // namespace

Status HashCompressedClusters(File& file, uint64_t file_size, const Header& h,
                              std::span<const uint64_t> descriptors, const ProgressFn& progress,
                              const CompressedDone& done) {
  const uint64_t cs = h.cluster_size();
  // The format lets a fragment touch a little over two clusters; a damaged
  // descriptor may claim more, which no valid stream needs.
  const uint64_t max_fragment = 2 * cs + 512;
  std::vector<Fragment> all;
  all.reserve(descriptors.size());
  for (uint64_t e : descriptors) {
    const CompressedDescriptor d = DecodeCompressed(e & ~kFlagCopied, h.cluster_bits);
    all.push_back({e, d.offset, std::min(d.bytes, max_fragment)});
  }
  std::sort(all.begin(), all.end(), [](const Fragment& a, const Fragment& b) { return a.offset < b.offset; });

  // Batches of about 64 MiB of fragments (a batch ends with a wait for its
  // slowest piece); pieces of up to 1 MiB, bridging gaps of up to one
  // cluster (an uncompressible cluster stored plain between fragments).
  const size_t batch = std::max<size_t>(64, (64u << 20) / cs);
  const uint64_t per_piece = std::max<uint64_t>(1u << 20, max_fragment);
  const unsigned threads = HashThreads();
  std::vector<std::vector<uint8_t>> bufs(threads), outs(threads, std::vector<uint8_t>(cs));
  std::vector<Digest> digests;
  std::vector<Status> errors;
  std::vector<Piece> pieces;
  for (size_t start = 0; start < all.size(); start += batch) {
    const size_t n = std::min(batch, all.size() - start);
    const Fragment* f = &all[start];
    pieces.clear();
    for (size_t k = 0; k < n; ++k) {
      const uint64_t end = f[k].offset + f[k].bytes;
      if (!pieces.empty()) {
        Piece& p = pieces.back();
        if (f[k].offset <= p.end + cs && std::max(p.end, end) - p.begin <= per_piece) {
          p.end = std::max(p.end, end);
          ++p.count;
          continue;
        }
      }
      pieces.push_back({f[k].offset, end, k, 1});
    }
    digests.assign(n, Digest{});
    errors.assign(n, Status::Ok());
    std::atomic<size_t> next{0};
    auto work = [&](unsigned t) {
      std::vector<uint8_t>& buf = bufs[t];
      std::vector<uint8_t>& out = outs[t];
      for (size_t i; (i = next.fetch_add(1)) < pieces.size();) {
        const Piece& p = pieces[i];
        buf.resize(p.end - p.begin);
        const uint64_t inside = p.begin >= file_size ? 0 : std::min<uint64_t>(buf.size(), file_size - p.begin);
        Status read = inside ? file.ReadAt(p.begin, std::span(buf).first(inside)) : Status::Ok();
        std::memset(buf.data() + inside, 0, buf.size() - inside);
        for (size_t k = p.first; k < p.first + p.count; ++k) {
          if (!read.ok()) {
            errors[k] = read;
            continue;
          }
          const std::span<const uint8_t> in(&buf[f[k].offset - p.begin], f[k].bytes);
          errors[k] = Decompress(h.compression, in, out);
          if (errors[k].ok()) digests[k] = Sha256(out);
        }
      }
    };
    const unsigned helpers = unsigned(std::min<size_t>(threads, pieces.size())) - 1;
    std::vector<std::thread> pool;
    for (unsigned t = 1; t <= helpers; ++t) pool.emplace_back(work, t);
    work(0);
    for (std::thread& th : pool) th.join();
    for (size_t k = 0; k < n; ++k) {
      if (errors[k].ok()) done(f[k].descriptor, Result<Digest>(digests[k]));
      else done(f[k].descriptor, Result<Digest>(errors[k]));
    }
    if (progress) progress(start + n, all.size());
  }
  return Status::Ok();
}

}  // namespace qcow2dedup
