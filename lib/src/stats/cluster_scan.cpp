#include "stats/cluster_scan.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <future>

#include "dedup/hasher.h"
#include "stats/size_estimate.h"

namespace qcow2dedup {
namespace {

constexpr uint64_t kMinClusterSize = 512, kMaxClusterSize = 2u << 20;
// Less hashing than this is not worth a thread.
constexpr uint64_t kMinBytesPerThread = 256u << 10;

// Reads the next chunk at or after pos, skipping zero runs by whole
// clusters of size align. length 0: the device has no more data.
Status Fetch(BlockDevice& dev, uint64_t pos, uint64_t align, ScanChunk& c) {
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
  c.length = std::min(kScanChunkBytes, size - c.offset);
  if (c.length == 0) return Status::Ok();
  c.data.resize((c.length + align - 1) / align * align);
  std::fill(c.data.begin() + c.length, c.data.end(), 0);
  return dev.Read(c.offset, std::span<uint8_t>(c.data.data(), c.length));
}

// Digests of the chunk's smallest clusters (leaves), on every core.
void HashLeaves(const ScanChunk& c, SizeScan& leaf) {
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
void HashFromLeaves(const ScanChunk& c, const SizeScan& leaf, SizeScan& big) {
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

}  // namespace

Status ValidateClusterSizes(const std::vector<uint64_t>& sizes) {
  if (sizes.empty()) return Status::InvalidArgument("no cluster sizes to simulate");
  for (uint64_t cs : sizes)
    if (!std::has_single_bit(cs) || cs < kMinClusterSize || cs > kMaxClusterSize)
      return Status::InvalidArgument(fmt::format("cluster size {} must be a power of two between 512 and 2M", cs));
  return Status::Ok();
}

std::vector<SizeScan> MakeSizeScans(std::vector<uint64_t> sizes) {
  std::sort(sizes.begin(), sizes.end());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  return std::vector<SizeScan>(sizes.begin(), sizes.end());
}

Status ScanDevice(BlockDevice& device, std::vector<SizeScan>& scans,
                  const std::function<Status(const ScanChunk&)>& on_chunk, const ProgressFn& progress) {
  const uint64_t size = device.virtual_size(), largest = scans.back().cs;
  ScanChunk chunks[2];
  int cur = 0;
  QD_RETURN_IF_ERROR(Fetch(device, 0, largest, chunks[cur]));
  while (chunks[cur].length > 0) {
    const ScanChunk& c = chunks[cur];
    ScanChunk& next = chunks[1 - cur];
    // The device is touched by this thread only while hashing goes on.
    std::future<Status> fetched = std::async(std::launch::async, [&] {
      return Fetch(device, c.offset + c.length, largest, next);
    });
    HashLeaves(c, scans[0]);
    for (size_t k = 1; k < scans.size(); ++k) HashFromLeaves(c, scans[0], scans[k]);
    Status st = on_chunk(c);
    Status read = fetched.get();
    QD_RETURN_IF_ERROR(st);
    QD_RETURN_IF_ERROR(read);
    if (progress) progress(next.length ? next.offset : size, size);
    cur = 1 - cur;
  }
  if (progress) progress(size, size);
  return Status::Ok();
}

void CountChunk(const ScanChunk& c, SizeScan& s) {
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

Simulation ToSimulation(const SizeScan& s, uint64_t size) {
  Simulation sim;
  sim.cluster_size = s.cs;
  sim.clusters = (size + s.cs - 1) / s.cs;
  sim.nonzero = s.nonzero;
  sim.unique = s.unique.size();
  sim.ratio = sim.unique ? double(sim.nonzero) / double(sim.unique) : 1.0;
  sim.estimated_image_size = EstimateImageSize(size, s.cs, s.l2_tables, sim.unique);
  return sim;
}

}  // namespace qcow2dedup
