// dedup-stats --simulate: what optimal dedup would store at several cluster
// sizes, in one sequential pass over a device.
//
// Hashing is the cost, so data is hashed once: every cluster of the
// smallest size gets its SHA-256, and a cluster of a larger size gets the
// SHA-256 of its sub-clusters' digests (zero sub-clusters as 32 zero bytes).
// Two larger clusters are equal exactly when all their sub-clusters are,
// so the counts are those of hashing every size in full (barring SHA-256
// collisions), at 32 / smallest size extra bytes hashed per size.
// The next chunk is read while this one is hashed on every core.
#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <future>
#include <map>

#include "dedup/hasher.h"
#include "dedup/sha256.h"
#include "format/compression.h"
#include "qcow2dedup/stats.h"
#include "stats/digest_set.h"
#include "stats/size_estimate.h"

namespace qcow2dedup {
namespace {

// A multiple of the largest cluster size, so chunks cut no cluster.
constexpr uint64_t kChunkBytes = 8u << 20;
constexpr uint64_t kMinClusterSize = 512, kMaxClusterSize = 2u << 20;
// Less hashing than this is not worth a thread.
constexpr uint64_t kMinBytesPerThread = 256u << 10;

struct SizeScan {
  explicit SizeScan(uint64_t cs) : cs(cs) {}
  uint64_t cs;
  uint64_t nonzero = 0;
  uint64_t l2_tables = 0;  // L2 tables that map a non-zero cluster
  uint64_t last_table = UINT64_MAX;
  DigestSet unique;
  uint64_t compressible = 0, compressed_bytes = 0;
  std::vector<uint32_t> fresh;  // this chunk's clusters seen for the first time
  // This chunk's clusters.
  std::vector<uint8_t> nonzero_flags;
  std::vector<Digest> digests;
};

struct Chunk {
  uint64_t offset = 0;
  uint64_t length = 0;        // device bytes; data is zero-padded past them
  std::vector<uint8_t> data;  // a whole number of the largest clusters
};

// Reads the next chunk at or after pos, skipping zero runs by whole
// clusters of size align. length 0: the device has no more data.
Status Fetch(BlockDevice& dev, uint64_t pos, uint64_t align, Chunk& c) {
  const uint64_t size = dev.virtual_size();
  while (pos < size) {
    QD_ASSIGN_OR_RETURN(uint64_t zeros, dev.ZeroRun(pos));
    zeros = std::min(zeros, size - pos);
    if (zeros == size - pos) {
      pos = size;
      break;
    }
    if (zeros < align) break;
    pos += zeros / align * align;
  }
  c.offset = std::min(pos, size);
  c.length = std::min(kChunkBytes, size - c.offset);
  if (c.length == 0) return Status::Ok();
  c.data.resize((c.length + align - 1) / align * align);
  std::fill(c.data.begin() + c.length, c.data.end(), 0);
  return dev.Read(c.offset, std::span<uint8_t>(c.data.data(), c.length));
}

// Digests of the chunk's smallest clusters (leaves), on every core.
void HashLeaves(const Chunk& c, SizeScan& leaf) {
  const uint64_t cs = leaf.cs, n = c.data.size() / cs;
  leaf.nonzero_flags.assign(n, 0);
  leaf.digests.resize(n);
  ParallelFor(n, std::max<uint64_t>(1, kMinBytesPerThread / cs), [&](size_t i) {
    std::span<const uint8_t> cluster(&c.data[i * cs], cs);
    if (IsAllZero(cluster)) {
      leaf.digests[i] = Digest{};
      return;
    }
    leaf.nonzero_flags[i] = 1;
    leaf.digests[i] = Sha256(cluster);
  });
}

// Digests of a larger size's clusters from their leaves' digests.
void HashFromLeaves(const Chunk& c, const SizeScan& leaf, SizeScan& big) {
  const uint64_t n = c.data.size() / big.cs, r = big.cs / leaf.cs;
  big.nonzero_flags.assign(n, 0);
  big.digests.resize(n);
  ParallelFor(n, std::max<uint64_t>(1, kMinBytesPerThread / (r * sizeof(Digest))), [&](size_t j) {
    const auto first = leaf.nonzero_flags.begin() + j * r;
    if (std::find(first, first + r, 1) == first + r) return;
    big.nonzero_flags[j] = 1;
    const auto* bytes = reinterpret_cast<const uint8_t*>(&leaf.digests[j * r]);
    big.digests[j] = Sha256(std::span<const uint8_t>(bytes, r * sizeof(Digest)));
  });
}

void Count(const Chunk& c, SizeScan& s) {
  const uint64_t first = c.offset / s.cs, per_table = s.cs / 8;
  s.fresh.clear();
  for (size_t j = 0; j < s.nonzero_flags.size(); ++j) {
    if (!s.nonzero_flags[j]) continue;
    ++s.nonzero;
    const uint64_t table = (first + j) / per_table;
    if (table != s.last_table) {
      ++s.l2_tables;
      s.last_table = table;
    }
    if (s.unique.Insert(s.digests[j].data())) s.fresh.push_back(uint32_t(j));
  }
}

// Compresses the chunk's new unique clusters (convert -c compresses only
// those), on every core.
void CompressFresh(const Chunk& c, SizeScan& s, CompressionType type) {
  std::vector<uint32_t> sizes(s.fresh.size());
  ParallelFor(s.fresh.size(), std::max<uint64_t>(1, kMinBytesPerThread / s.cs), [&](size_t i) {
    thread_local std::vector<uint8_t> out;
    out.resize(s.cs);
    const size_t n = Compress(type, std::span<const uint8_t>(&c.data[s.fresh[i] * s.cs], s.cs),
                              std::span<uint8_t>(out).first(s.cs - 512));
    sizes[i] = WorthCompressing(n, s.cs) ? uint32_t(n) : 0;
  });
  for (uint32_t n : sizes)
    if (n) {
      ++s.compressible;
      s.compressed_bytes += n;
    }
}

Status Validate(const std::vector<uint64_t>& sizes) {
  if (sizes.empty()) return Status::InvalidArgument("no cluster sizes to simulate");
  for (uint64_t cs : sizes)
    if (!std::has_single_bit(cs) || cs < kMinClusterSize || cs > kMaxClusterSize)
      return Status::InvalidArgument(fmt::format("cluster size {} must be a power of two between 512 and 2M", cs));
  return Status::Ok();
}

}  // namespace

Result<std::vector<Simulation>> SimulateDedup(BlockDevice& device, const std::vector<uint64_t>& cluster_sizes,
                                              ProgressFn progress, std::optional<Compression> compression) {
  QD_RETURN_IF_ERROR(Validate(cluster_sizes));
  std::vector<uint64_t> distinct = cluster_sizes;
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  std::vector<SizeScan> scans(distinct.begin(), distinct.end());
  const uint64_t size = device.virtual_size(), largest = distinct.back();

  Chunk chunks[2];
  int cur = 0;
  QD_RETURN_IF_ERROR(Fetch(device, 0, largest, chunks[cur]));
  while (chunks[cur].length > 0) {
    const Chunk& c = chunks[cur];
    Chunk& next = chunks[1 - cur];
    // The device is touched by this thread only while hashing goes on.
    std::future<Status> fetched = std::async(std::launch::async, [&] {
      return Fetch(device, c.offset + c.length, largest, next);
    });
    HashLeaves(c, scans[0]);
    for (size_t k = 1; k < scans.size(); ++k) HashFromLeaves(c, scans[0], scans[k]);
    for (SizeScan& s : scans) {
      Count(c, s);
      if (compression)
        CompressFresh(c, s, *compression == Compression::kZstd ? CompressionType::kZstd : CompressionType::kDeflate);
    }
    QD_RETURN_IF_ERROR(fetched.get());
    if (progress) progress(next.length ? next.offset : size, size);
    cur = 1 - cur;
  }
  if (progress) progress(size, size);

  std::map<uint64_t, const SizeScan*> by_size;
  for (const SizeScan& s : scans) by_size[s.cs] = &s;
  std::vector<Simulation> out;
  for (uint64_t cs : cluster_sizes) {
    const SizeScan& s = *by_size[cs];
    Simulation sim;
    sim.cluster_size = cs;
    sim.clusters = (size + cs - 1) / cs;
    sim.nonzero = s.nonzero;
    sim.unique = s.unique.size();
    sim.ratio = sim.unique ? double(sim.nonzero) / double(sim.unique) : 1.0;
    sim.estimated_image_size = EstimateImageSize(size, cs, s.l2_tables, sim.unique);
    if (compression) {
      sim.compressible = s.compressible;
      sim.compressed_bytes = s.compressed_bytes;
      const uint64_t stored = sim.unique - s.compressible + (s.compressed_bytes + cs - 1) / cs;
      sim.estimated_compressed_image_size = EstimateImageSize(size, cs, s.l2_tables, stored);
    }
    out.push_back(sim);
  }
  return out;
}

}  // namespace qcow2dedup
